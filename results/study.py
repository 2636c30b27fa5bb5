"""The CPU study on the real CIFAR-10 subset: trains every loss, evaluates it, writes results/README tables.

    python results/study.py          # the published 5-epoch study (results/e5), resumable
    python results/study.py --table  # only re-writes results/e5/table.md and margins.png from the files there
    python results/study.py --epochs 15 --val 1000 --aa standard --extra-on "" --tag e15   # the longer design

Each run is `train.py` on ../shared/data/cifar10_subset.npz (5,085 train images less `--val` held out; 1,017
test images) followed by `attack.py` on its best-by-validation checkpoint: AutoAttack, and the
logit-margin diagnostic: one chain per run through results/runner.py (a rerun skips every finished link). Runs
go `--jobs` at a time, one CPU thread each.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
import runner  # noqa: E402  (the one launcher of results/)
from compare_table import smallest  # noqa: E402  (the 30% smallest margins, one count for results/)

import aa_run  # noqa: E402  (the name of what an attack ran)
import attack  # noqa: E402  (its result file names and its histogram)
import cli  # noqa: E402
import flags  # noqa: E402
import runlog  # noqa: E402

SUBSET = REPO.parent / "shared" / "data" / "cifar10_subset.npz"
TEST_POINTS = 1017  # the subset's test images
STUDY_RATIO = 0.4  # the CPU studies' sovr and trades-sovr runs without a ratio of their own, pinned


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__)
    a = p.add_argument
    a("--losses", default="ce,mail,sovr,gairat,trades,trades-sovr", help="comma-separated --loss values")
    a("--seeds", default="0,1", help="comma-separated seeds for every loss (default 0,1)")
    a(
        "--ratios",
        default="0.2,0.6,0.8,1.0",
        help="extra SOVR --ratio values, seed 0 (the default ratio runs anyway; ratio 0 is exactly ce)",
    )
    a("--epochs", type=int, default=5, help="epochs per run; lr x0.1 at 2/3 and 5/6 of them (default 5)")
    a("--burn-in", type=int, default=None, help="MAIL/GAIRAT burn-in epochs (default: half the epochs, as 60 of 120)")
    a("--arch", default="wrn16", help="architecture (default wrn16)")
    a("--width", type=int, default=1, help="width (default 1: WRN-16-1, 0.18M parameters)")
    a("--val", type=int, default=500, help="validation images for model selection (default 500)")
    a("--aa", default="apgd-ce", help="AutoAttack version, or a comma-separated attack list (default apgd-ce)")
    a("--n-aa", type=int, default=0, help="test points for AutoAttack (default 0 = all 1,017)")
    a("--extra-aa", default="apgd-ce,apgd-t", help="a second attack list, run only on the --extra-on runs")
    a(
        "--extra-on",
        default="ce-s0,ce-s1,mail-s0,mail-s1,gairat-s0,gairat-s1,sovr-s0,sovr-s1",
        help="comma-separated run names for --extra-aa",
    )
    a("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2, this machine's cores)")
    a("--tag", default="e5", help="name of the output folder under results/ (default e5)")
    a("--table", action="store_true", help="only re-write the table and the figure from the files there; run nothing")
    return p.parse_args(argv)


def runs(args) -> list[dict]:
    out = [dict(loss=loss, seed=int(s), ratio=None) for loss in args.losses.split(",") for s in args.seeds.split(",")]
    if args.ratios and "sovr" in args.losses.split(","):
        out += [dict(loss="sovr", seed=0, ratio=float(r)) for r in args.ratios.split(",")]
    return out


def name(r: dict) -> str:
    return f"{r['loss']}-s{r['seed']}" + ("" if r["ratio"] is None else f"-ratio{r['ratio']:g}")


def milestones(e: int) -> str:
    """lr x0.1 at 2/3 and 5/6 of the epochs, kept distinct (MultiStepLR counts a repeated epoch twice)."""
    first = max(1, round(e * 2 / 3))
    return f"{first},{max(first + 1, round(e * 5 / 6))}"


def mode(attacks: str) -> str:
    """attack.py's name for an attack list in its result file."""
    return attacks.replace(",", "+")


def result_path(out: Path, mode: str, n: int) -> Path:
    """attack.py's JSON for this mode on the first n test points (0 = all)."""
    return Path(attack.result_path(str(out / "best.pt"), mode, "Linf", 8, n or TEST_POINTS, 0))


def result(out: Path, mode: str, n: int) -> Path | None:
    """That JSON, if it exists."""
    path = result_path(out, mode, n)
    return path if path.exists() else None


def reads_burn_in(loss: str) -> bool:
    return "burn_in" in flags.READS.get(loss, ())  # train.py refuses a flag that the loss does not read


def links(r: dict, args, root: Path) -> list[tuple[str, list[str]]]:
    """The run's chain for results/runner.py, each link with the result that shows it done: train.py, then
    attack.py on its best-by-validation checkpoint (AutoAttack, the extra attacks on --extra-on, the margins)."""
    out = root / name(r)
    e = args.epochs
    cmd = [
        sys.executable,
        "train.py",
        "--dataset",
        str(SUBSET),
        "--arch",
        args.arch,
        "--width",
        str(args.width),
        "--loss",
        r["loss"],
        "--seed",
        str(r["seed"]),
        "--epochs",
        str(e),
        "--device",
        "cpu",
        "--out",
        str(out),
        "--milestones",
        milestones(e),
        "--val",
        str(args.val),
    ]
    cmd += ["--burn-in", str(e // 2 if args.burn_in is None else args.burn_in)] * reads_burn_in(r["loss"])
    cmd += ["--ratio", str(STUDY_RATIO if r["ratio"] is None else r["ratio"])] if "sovr" in r["loss"] else []
    found = [(str(out), cmd + ["--resume", "auto"])]
    aa = ["--version", args.aa] if args.aa in ("standard", "plus", "rand") else ["--attacks", args.aa]
    common = [sys.executable, "attack.py", str(out / "best.pt"), "--device", "cpu", "--bs", "500"]
    found.append((str(result_path(out, mode(args.aa), args.n_aa)), [*common, *aa, "--n", str(args.n_aa)]))
    if name(r) in args.extra_on.split(",") and args.extra_aa:
        found.append((str(result_path(out, mode(args.extra_aa), 0)), [*common, "--attacks", args.extra_aa]))
    return found + [(str(result_path(out, "margins", 0)), [*common, "--margins"])]


def worst(margins: list[float], clean: list) -> list[float]:
    """Per-point margins as losses.worst_of counts them (the smaller of the clean and the PGD margin), from a file's
    margins and clean flags: files written before that rule hold the PGD margin, and there a point misclassified
    clean gets min(margin, 0), an upper bound of its clean margin; newer files pass unchanged."""
    return [v if c else min(v, 0.0) for v, c in zip(margins, clean, strict=True)]


def row(out: Path, args) -> dict:
    final, recs = runlog.final(str(out))["best"], [r for r in runlog.records(str(out)) if "final" not in r]
    aa = json.loads(result(out, mode(args.aa), args.n_aa).read_text())
    m = json.loads(result(out, "margins", 0).read_text())
    found = args.extra_aa and result(out, mode(args.extra_aa), 0)
    extra = json.loads(found.read_text()) if found else None
    margins = worst(m["margins"], m["clean"])
    robust = [v for v in margins if v > 0]  # the points classified correctly both clean and after PGD-20
    return dict(
        old_margins="precision" not in m["settings"],  # files since the worst_of count record their precision
        clean=final["test_clean"],
        pgd=len(robust) / len(margins),  # see PGD_SOURCE
        aa=aa["robust_acc"],
        n_aa=aa["settings"]["n"],
        robust_margin=statistics.mean(robust) if robust else float("nan"),
        near0=sum(abs(v) < 0.1 for v in margins) / len(margins),
        extra=extra and extra["robust_acc"],
        worst=aa["robust_acc"] if extra is None else min(aa["robust_acc"], extra["robust_acc"]),
        aa_settings=aa["settings"],
        extra_settings=extra and extra["settings"],
        margin30=statistics.mean(v for v, i in zip(margins, smallest(margins)) if i),
        margin=statistics.mean(margins),
        epochs=len(recs),
        best_epoch=final["epoch"],
        hours=sum(r["time"] for r in recs) / 3600,
    )


def fmt(vals: list[float], n: int) -> str:
    """mean +- std over seeds, and the binomial standard error of one run, in percent."""
    mean = statistics.mean(vals)
    se = math.sqrt(mean * (1 - mean) / n)
    std = f" ± {100 * statistics.stdev(vals):.1f}" if len(vals) > 1 else ""
    return f"{100 * mean:.1f}{std} (se {100 * se:.1f})"


def table(root: Path, args) -> str:
    """table.md's text: a row per (loss, ratio) over its seeds, then its notes; "" before a run is evaluated."""
    groups = evaluated(root, args)
    if not groups:
        return ""
    first, every = next(iter(groups.values()))[0], [r for rs in groups.values() for r in rs]
    extra = f" | {extra_label(every, args)}" if args.extra_aa else ""
    lines = [
        f"| loss | ratio | seeds | clean % | PGD-20 % | {aa_run.attack_label(first['aa_settings'], ' %')}{extra} "
        "| PGD-20 minus worst attack "
        "| margin, 30% smallest | mean margin | margin of robust points | share abs(margin) < 0.1 | epochs "
        "| train h, all seeds |",
        "|---" * (13 + bool(extra)) + "|",
    ]
    # the main rows in --losses order, then the ratio sweep in increasing ratio
    for (loss, ratio), rs in sorted(groups.items(), key=lambda kv: (kv[0][1] is not None, kv[0][1] or 0)):
        lines.append("| " + " | ".join(cells(loss, ratio, rs, bool(extra))) + " |")
    notes = [f"Robust accuracy: {aa_run.attack_label(first['aa_settings'], threat=True)}."]
    notes += [PGD_SOURCE] + [OLD_MARGINS] * any(r["old_margins"] for r in every)
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def evaluated(root: Path, args) -> dict:
    """The figures of each finished and evaluated run, grouped by (loss, ratio)."""
    groups: dict = {}
    for r in runs(args):
        if runlog.final(str(root / name(r))):
            try:
                found = row(root / name(r), args)
            except AttributeError:
                continue  # trained, not yet evaluated
            groups.setdefault((r["loss"], r["ratio"]), []).append(found)
    return groups


def cells(loss: str, ratio: float | None, rs: list[dict], extra: bool) -> list[str]:
    """The table's cells of one (loss, ratio) over its seeds `rs`; extra: the --extra-aa column is there."""
    strong = [r["extra"] for r in rs if r["extra"] is not None]
    partial = "" if len(strong) == len(rs) else f" ({len(strong)} of {len(rs)} seeds)"
    out = [
        loss,
        (f"{STUDY_RATIO:g}" if "sovr" in loss else "-") if ratio is None else f"{ratio:g}",
        str(len(rs)),
        fmt([r["clean"] for r in rs], TEST_POINTS),
        fmt([r["pgd"] for r in rs], TEST_POINTS),
        fmt([r["aa"] for r in rs], rs[0]["n_aa"]),
    ]
    out += [fmt(strong, TEST_POINTS) + partial if strong else "-"] if extra else []
    return out + [
        f"{100 * statistics.mean(r['pgd'] - r['worst'] for r in rs):.1f}",
        f"{statistics.mean(r['margin30'] for r in rs):.2f}",
        f"{statistics.mean(r['margin'] for r in rs):.2f}",
        f"{statistics.mean(r['robust_margin'] for r in rs):.2f}",
        f"{100 * statistics.mean(r['near0'] for r in rs):.0f}%",
        str(rs[0]["epochs"]),
        f"{sum(r['hours'] for r in rs):.2f}",
    ]


def extra_label(every: list[dict], args) -> str:
    """The --extra-aa column's name (aa_run.attack_label): from its first result, else from the flag (all the test
    points, standard's settings)."""
    s = next((r["extra_settings"] for r in every if r["extra_settings"]), None)
    return aa_run.attack_label(s or dict(mode=mode(args.extra_aa), n=TEST_POINTS), " %")


PGD_SOURCE = (
    "PGD-20 % is counted per point from the margins file (attack.py --margins: train.py's test attack, PGD-20 on "
    "CE with step eps/4 in eval mode, random starts seeded 0, on the same checkpoint and test points), robust if "
    "classified correctly both clean and after PGD-20; train.py's test report in log.jsonl holds no per-point data "
    "(and reports written before that rule counted the PGD image alone: see results/README.md)."
)
# what the table says of files written before a robust point had to be classified correctly clean too (worst_of)
OLD_MARGINS = (
    "Margins are per point the smaller of the clean and the PGD-20 margin. Files written before that rule hold "
    "the PGD-20 margin and the clean flag: a point misclassified clean enters with min(PGD-20 margin, 0), an upper "
    "bound of its margin, and is not robust."
)


def overlay(root: Path, args) -> None:
    """The paper's figure: margin histograms of CE, MAIL and SOVR (seed 0) in one picture."""
    found = [
        json.loads(p.read_text())
        for loss in ("ce", "mail", "sovr")
        for p in (root / f"{loss}-s0").glob("best.margins-*.json")
    ]
    if found:
        attack.plot([{**r, "margins": worst(r["margins"], r["clean"])} for r in found], str(root / "margins.png"))


def write(root: Path, args) -> None:
    """table.md and margins.png from the files under root."""
    if not root.is_dir():
        sys.exit(f"study.py: error: {root} not found: nothing to tabulate")
    text = table(root, args)
    if not text:  # row() leaves out a run without the results these flags name: the flags are not the study's
        sys.exit(
            f"study.py: error: no run in {root} has finished with these flags (--aa, --losses, ...): nothing written"
        )
    (root / "table.md").write_text(text)
    overlay(root, args)
    print((root / "table.md").read_text())


def main() -> None:
    args = get_args()
    if args.table:
        return write(HERE / args.tag, args)
    if not SUBSET.exists():
        sys.exit(f"study.py: error: {SUBSET} not found")
    root = HERE / args.tag
    root.mkdir(parents=True, exist_ok=True)
    t0, lines = time.time(), {}
    for r in runs(args):
        (root / name(r)).mkdir(parents=True, exist_ok=True)
        lines[str(root / name(r))] = runner.chain_line(links(r, args, root), str(root / name(r) / "console.log"), REPO)

    def report(run: str, rc: int) -> None:
        said = "done" if rc == 0 else f"failed: {runner.last_line(Path(run) / 'console.log')} (see its console.log)"
        print(f"{Path(run).name} {said}", flush=True)

    rcs = runner.run_local(lines, runner.slots([], 1, args.jobs, threads=1), report)
    print(f"study wall time {time.time() - t0:.0f}s")
    write(root, args)
    failed = [Path(run).name for run, rc in rcs.items() if rc]
    if failed:
        sys.exit(f"study.py: error: {len(failed)} runs failed: {', '.join(failed)} (see their console.log)")


if __name__ == "__main__":  # cli.run: one line and the exit codes of every script (Ctrl-C 130, SIGTERM 143)
    cli.run("study.py", main, "", "the same command continues the study where it stopped")
