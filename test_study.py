"""results/study.py: run naming, the lr schedule it passes, and the table it publishes (fake run folders)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "results"))
import study  # noqa: E402


def args(*argv: str):
    return study.get_args(list(argv))


def fake_run(root: Path, run: str, clean: float, pgd: float, aa: float, extra: float | None = None) -> None:
    out = root / run
    out.mkdir(parents=True)
    epochs = [{"epoch": e, "time": 1800.0} for e in (1, 2)]
    final = {"final": {"best": {"epoch": 2, "test_clean": clean, "test_pgd": pgd}}}
    (out / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [*epochs, final]))
    for mode, acc in [("apgd-ce", aa), ("apgd-ce+apgd-t", extra)]:
        if acc is not None:
            (out / f"best.{mode}-Linf-eps8-n1017-seed0.json").write_text(
                json.dumps({"robust_acc": acc, "settings": {"n": 1017, "mode": mode}})
            )
    (out / "best.margins-Linf-eps8-n1017-seed0.json").write_text(
        json.dumps({"mean_margin_smallest30": -1.0, "mean_margin": -0.5, "margins": [-1.0, -0.05, 0.3, 0.5]})
    )


@pytest.mark.parametrize("e", range(2, 20))
def test_milestones_are_distinct_and_inside_the_run(e: int) -> None:
    first, second = map(int, study.milestones(e).split(","))
    assert 1 <= first < second <= e


def test_runs_cover_losses_seeds_and_the_ratio_sweep() -> None:
    names = [study.name(r) for r in study.runs(args("--losses", "ce,sovr", "--seeds", "0,1", "--ratios", "0,1.0"))]
    assert names == ["ce-s0", "ce-s1", "sovr-s0", "sovr-s1", "sovr-s0-ratio0", "sovr-s0-ratio1"]


def test_table_means_over_seeds_gap_and_sweep_order(tmp_path: Path) -> None:
    a = args("--losses", "ce,sovr", "--seeds", "0,1", "--ratios", "1.0,0.2", "--extra-on", "ce-s0")
    fake_run(tmp_path, "ce-s0", 0.40, 0.30, 0.28, extra=0.27)
    fake_run(tmp_path, "ce-s1", 0.42, 0.32, 0.30)
    fake_run(tmp_path, "sovr-s0-ratio1", 0.38, 0.29, 0.29)
    fake_run(tmp_path, "sovr-s0-ratio0.2", 0.39, 0.31, 0.30)
    (tmp_path / "sovr-s0").mkdir()  # unfinished: left out
    rows = [
        line.split(" | ")
        for line in study.table(tmp_path, a).splitlines()
        if line.startswith("| ") and "---" not in line
    ][1:]
    assert [r[0:3] for r in rows] == [["| ce", "-", "2"], ["| sovr", "0.2", "1"], ["| sovr", "1", "1"]]
    assert rows[0][3].startswith("41.0 ± 1.4 (se 1.5)")  # mean, std over seeds, binomial se of one run
    assert rows[0][6] == "27.0 (se 1.4) (1 of 2 seeds)"  # the extra attack list, run on ce-s0 only
    assert rows[0][7] == "2.5"  # PGD-20 minus the worst attack: (0.30 - 0.27 + 0.32 - 0.30) / 2
    assert rows[0][10:12] == ["0.40", "25%"]  # mean margin of the points PGD-20 left robust; share near zero
    assert rows[1][6:8] == ["-", "1.0"] and rows[0][-1] == "2.00 |"  # train hours summed over seeds
