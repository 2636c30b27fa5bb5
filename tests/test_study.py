"""results/study.py and late.py: run naming, the lr schedule, the tables they publish (fake run folders) and
that the committed tables are what the committed files give."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "results"))
import late  # noqa: E402
import study  # noqa: E402


def args(*argv: str):
    return study.get_args(list(argv))


def fake_run(
    root: Path, run: str, clean: float, pgd: float, aa: float, extra: float | None = None, new: bool = False
) -> None:
    """A run's files; `new`: written since robust points must be classified correctly clean too (with precision)."""
    out = root / run
    out.mkdir(parents=True)
    epochs = [{"epoch": e, "time": 1800.0} for e in (1, 2)]
    since = {"precision": "fp32"} if new else {}
    final = {"final": {"best": {"epoch": 2, "test_clean": clean, "test_pgd": pgd, **since}}}
    (out / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [*epochs, final]))
    for mode, acc in [("apgd-ce", aa), ("apgd-ce+apgd-t", extra)]:
        if acc is not None:
            (out / f"best.{mode}-Linf-eps8-n1017-seed0.json").write_text(
                json.dumps({"robust_acc": acc, "settings": {"n": 1017, "mode": mode}})
            )
    k = round(100 * pgd)  # 100 points: k robust, then one misclassified clean with a positive PGD-20 margin
    margins, clean = [0.5] * k + [0.3, -0.05] + [-1.0] * (98 - k), [1] * k + [0] + [1] * (99 - k)
    settings = {"loss": run.split("-s")[0], "checkpoint": str(out / "best.pt"), **since}
    (out / "best.margins-Linf-eps8-n1017-seed0.json").write_text(
        json.dumps({"margins": margins, "clean": clean, "settings": settings})
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
    assert rows[1][6:8] == ["-", "1.0"] and rows[0][-1] == "2.00 |"  # train hours summed over seeds


def test_table_counts_a_point_robust_only_if_it_is_also_correct_clean(tmp_path: Path) -> None:
    """A margins file of before that rule: its misclassified-clean point with a positive PGD-20 margin (0.3) is not
    robust (PGD-20 30%, not 31%) and enters with margin 0; the table says which of its figures are bounds."""
    a = args("--losses", "ce", "--seeds", "0", "--ratios", "", "--extra-on", "")
    fake_run(tmp_path, "ce-s0", 0.40, 0.30, 0.28)
    text = study.table(tmp_path, a)
    row = [line.split(" | ") for line in text.splitlines() if line.startswith("| ce")][0]
    assert row[4].startswith("30.0 ") and row[7] == "2.0"  # PGD-20, and PGD-20 minus the worst attack
    assert row[8:12] == ["-1.00", "-0.53", "0.50", "2%"]  # 30% smallest, mean, robust points' (0.5 only), near 0
    assert study.OLD_MARGINS in text
    fake_run(tmp_path / "new", "ce-s0", 0.40, 0.30, 0.28, new=True)
    assert study.OLD_MARGINS not in study.table(tmp_path / "new", a)


def test_table_flag_only_tabulates(tmp_path: Path, monkeypatch) -> None:
    fake_run(tmp_path / "t", "ce-s0", 0.40, 0.30, 0.28)
    monkeypatch.setattr(study, "HERE", tmp_path)
    monkeypatch.setattr(study, "SUBSET", tmp_path / "missing.npz")  # a study run would stop here
    monkeypatch.setattr(study.runner, "run_local", lambda *a, **k: pytest.fail("--table ran a command"))
    flags = ["--table", "--tag", "t", "--losses", "ce", "--seeds", "0", "--ratios", "", "--extra-on", ""]
    monkeypatch.setattr(sys, "argv", ["study.py", *flags])
    study.main()
    assert (tmp_path / "t" / "table.md").read_text() == study.table(tmp_path / "t", args(*flags))
    assert (tmp_path / "t" / "margins.png").exists()


def test_committed_tables_are_what_the_committed_files_give() -> None:
    """python results/study.py --table and python results/late.py --table re-write the tables unchanged."""
    assert study.table(study.HERE / "e5", args()) == (study.HERE / "e5" / "table.md").read_text()
    assert late.table() == (late.ROOT / "table.md").read_text()


def test_table_flag_refuses_flags_that_find_no_run(tmp_path: Path, monkeypatch, capsys) -> None:
    """--aa of another study finds no evaluated run: one line, exit 1, the published table.md untouched."""
    fake_run(tmp_path / "t", "ce-s0", 0.40, 0.30, 0.28)
    (tmp_path / "t" / "table.md").write_text("published")
    monkeypatch.setattr(study, "HERE", tmp_path)
    monkeypatch.setattr(sys, "argv", ["study.py", "--table", "--tag", "t", "--aa", "standard"])
    with pytest.raises(SystemExit) as e:
        study.main()
    assert "no run in" in str(e.value) and "nothing written" in str(e.value)
    assert (tmp_path / "t" / "table.md").read_text() == "published" and not (tmp_path / "t" / "margins.png").exists()


def test_study_exits_1_naming_the_failed_runs_after_the_table(tmp_path: Path, monkeypatch) -> None:
    fake_run(tmp_path / "t", "ce-s0", 0.40, 0.30, 0.28)
    monkeypatch.setattr(study, "HERE", tmp_path)
    monkeypatch.setattr(study, "SUBSET", tmp_path / "t" / "ce-s0" / "log.jsonl")  # exists
    monkeypatch.setattr(study.runner, "run_local", lambda lines, *a: {f: f.endswith("s1") for f in lines})
    flags = ["--tag", "t", "--losses", "ce", "--seeds", "0,1", "--ratios", "", "--extra-on", ""]
    monkeypatch.setattr(sys, "argv", ["study.py", *flags])
    with pytest.raises(SystemExit) as e:
        study.main()
    assert str(e.value).endswith("1 runs failed: ce-s1 (see their console.log)")
    assert (tmp_path / "t" / "table.md").read_text() == study.table(tmp_path / "t", args(*flags))


def test_late_exits_1_naming_the_failed_runs_after_the_tables(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # run_all moves to the repository root; this puts the test's back
    start = tmp_path / "last.pt"
    late.margins_result(start).write_text("{}")
    monkeypatch.setattr(late, "pretrain", lambda: start)
    drawn = []
    monkeypatch.setattr(late, "tables", lambda: drawn.append(1))
    monkeypatch.setattr(late.runner, "run_queue", lambda tasks, *a: {t: t == "mail-s1" for t in tasks})
    with pytest.raises(SystemExit) as e:
        late.run_all()
    assert "1 runs failed: mail-s1 " in str(e.value) and drawn == [1]


def test_late_says_in_one_line_that_the_common_start_failed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(late.runner, "link", lambda *a: 1)  # the pretraining command fails
    monkeypatch.setattr(late, "ROOT", tmp_path)
    with pytest.raises(SystemExit) as e:
        late.run_all()
    assert str(e.value).startswith("late.py: error: the common start failed: ") and "pretrain" in str(e.value)


def test_late_tables_draw_one_at_a_time(monkeypatch) -> None:
    """unit() redraws the tables from two queue threads: pyplot and table.md take one writer at a time."""
    held = []
    monkeypatch.setattr(late, "table", lambda: held.append(late.TABLES.locked()))
    late.tables()
    assert held == [True] and not late.TABLES.locked()


def test_late_retrain_removes_every_file_train_py_refuses_to_sit_beside(tmp_path: Path, monkeypatch) -> None:
    """A finished run whose checkpoints are gone is trained again: its files go first (attack.py's state too), so
    that train.py accepts the fresh run; its console.log stays."""
    r = ("ce", 0, None, False)
    out = tmp_path / late.name(*r)
    out.mkdir()
    final = {"final": {"best": {"epoch": 14}, "last": {"epoch": 15}}}
    (out / "log.jsonl").write_text(json.dumps({"epoch": 15}) + "\n" + json.dumps(final) + "\n")
    files = ["curves.png", "last.apgd-ce+apgd-t-Linf-eps8-n1017-seed0.json.state", "best.margins-train-test.json"]
    for f in [*files, "eval-last.log", "console.log"]:
        (out / f).write_text("")
    monkeypatch.setattr(late, "ROOT", tmp_path)
    left = []

    def retrain(*a) -> None:
        left.extend(sorted(p.name for p in out.iterdir()))
        raise RuntimeError("stop here")

    monkeypatch.setattr(late, "continue_run", retrain)
    assert late.unit(r, tmp_path / "start.pt", {}) == 1
    assert left == ["console.log"]
