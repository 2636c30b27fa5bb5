"""The late-training study : SOVR and its baselines where the paper's effect should live.

    python results/late.py            # runs whatever is missing (resumable, skips what is done), then the tables
    python results/late.py --table    # only re-writes results/late/table.md and the figures from what exists

One PGD-AT (CE) pre-training on a part of the real CIFAR-10 subset (120 epochs at lr 0.1, then 10 at 0.01, where
most training points get fitted), then every loss continues from that one checkpoint (`train.py --init`) with the
same late schedule (lr 0.01 for 10 epochs, then 0.001 for 5) and the same seeds,
reweighting and switching from its first epoch: the official protocol of MAIL and GAIRAT (plain PGD-AT first),
and every comparison is paired (same start, same data order and attack starts for the same seed). Each final
and best-by-validation checkpoint gets clean, PGD-20, APGD-CE and APGD-T accuracy on all 1,017 test images,
and the logit margins of PGD-20 examples of the training points the losses act on and of the test points. The
important points are the 30% with the smallest margin under the common starting checkpoint, the same points
for every loss. Every command goes through results/runner.py (its link skips what has finished, its queue runs
two at a time with one CPU thread each); the pre-training alone uses both.
"""

import json
import os
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
import runner  # noqa: E402  (the one launcher of results/, and the margins of training and test points)
from compare_table import smallest  # noqa: E402  (the important points, as compare.py's)
from study import STUDY_RATIO, reads_burn_in, worst  # noqa: E402  (one pinned ratio, one margin count)

import attack  # noqa: E402
import cli  # noqa: E402
import runlog  # noqa: E402

SUBSET = "../shared/data/cifar10_subset.npz"  # as train.py is run from the repository root
ROOT = HERE / "late"
ARCH, WIDTH, TRAIN, VAL = "preact18", 16, 2000, 500  # PreAct ResNet-18 at width 16: 0.70M parameters
PRE_EPOCHS, PRE_LOW = 120, 10  # pre-training: 120 epochs at lr 0.1, then 10 at 0.01, where most points get fitted
EPOCHS, DROP = 15, 10  # the continuation: lr 0.01 for 10 epochs, then 0.001 for 5
MAIN, SEEDS = ("ce", "mail", "gairat", "sovr"), (0, 1, 2)
# A run is (loss, seed, ratio or None, ema): --ratio for sovr losses, train.py --ema (weight averaging) or not.
EXTRA = [("trades", 0, None, False), ("trades-sovr", 0, None, False)] + [("sovr", 0, r, False) for r in (0.1, 0.2, 0.6)]
EXTRA += [
    ("ovr", s, None, False) for s in SEEDS
]  # the sweep's best, ratio 1 (pure OVR; ran as --loss sovr --ratio 1.0)
EXTRA += [(loss, s, None, True) for s in SEEDS for loss in ("ce", "sovr")]  # weight averaging
AA = "apgd-ce,apgd-t"
STANDARD_ON, N_STANDARD = (
    [(loss, 1, None, False) for loss in MAIN],
    500,
)  # standard AutoAttack on these final checkpoints
COMMON = [
    "--dataset",
    SUBSET,
    "--arch",
    ARCH,
    "--width",
    str(WIDTH),
    "--train-limit",
    str(TRAIN),
    "--val",
    str(VAL),
    "--compile",
    "--device",
    "cpu",
]


def name(loss: str, seed: int, ratio: float | None, ema: bool = False) -> str:
    return f"{loss}-s{seed}" + ("" if ratio is None else f"-ratio{ratio:g}") + ("-ema" if ema else "")


CPU = {"CUDA_VISIBLE_DEVICES": ""}


def sh(cmd: list, log: Path, done: Path, env: dict) -> None:
    """One command from the repository root through results/runner.py's link (skipped when `done` shows it
    finished), its output appended to log; RuntimeError if it fails."""
    if runner.link(str(log), str(done), [str(c) for c in cmd], env):
        raise RuntimeError(f"failed: {shlex.join(map(str, cmd))} (see {log})")


def pretrain() -> Path:
    """PGD-AT with CE: PRE_EPOCHS at lr 0.1, then PRE_LOW at lr 0.01 from there (--init); the common start."""
    phases = [
        (ROOT / "pretrain", ["--epochs", str(PRE_EPOCHS)]),
        (ROOT / "start", ["--epochs", str(PRE_LOW), "--lr", "0.01", "--init", str(ROOT / "pretrain" / "last.pt")]),
    ]
    for out, flags in phases:
        if not runner.finished(str(out)):
            out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "train.py", *COMMON, "--loss", "ce", "--milestones", "", "--out", str(out), *flags]
            sh(cmd + ["--resume", "auto"], out / "console.log", out, {**CPU, "OMP_NUM_THREADS": "2"})
    return ROOT / "start" / "last.pt"


def ratio_of(loss: str, ratio: float | None) -> float | None:
    """The SOVR ratio a run trains with: its own, else STUDY_RATIO for the sovr losses; None for the others."""
    return STUDY_RATIO if ratio is None and "sovr" in loss else ratio


def continue_run(
    loss: str, seed: int, ratio: float | None, ema: bool, start: Path, env: dict, again: bool = False
) -> None:
    out = ROOT / name(loss, seed, ratio, ema)
    if runner.finished(str(out)) and not again:
        return
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "train.py",
        *COMMON,
        "--init",
        str(start),
        "--loss",
        loss,
        "--seed",
        str(seed),
        "--lr",
        "0.01",
        "--epochs",
        str(EPOCHS),
        "--milestones",
        str(DROP),
        "--out",
        str(out),
    ]
    cmd += ["--burn-in", "0"] * reads_burn_in(loss)
    cmd += ([] if ratio_of(loss, ratio) is None else ["--ratio", str(ratio_of(loss, ratio))]) + ["--ema"] * ema
    sh(
        cmd + (["--resume"] if (out / "last.pt").exists() and not runner.finished(str(out)) else []),
        out / "console.log",
        out,
        env,
    )


def checkpoints(out: Path) -> list[Path]:
    """last.pt, and best.pt unless it is the same epoch (then the same weights)."""
    final = runlog.final(str(out))
    return [out / "last.pt"] + ([out / "best.pt"] if final["best"]["epoch"] != final["last"]["epoch"] else [])


def aa_result(ckpt: Path, mode: str = AA.replace(",", "+"), n: int = 1017) -> Path:
    return Path(attack.result_path(str(ckpt), mode, "Linf", 8, n, 0))


def margins_result(ckpt: Path) -> Path:
    """runner.margins' JSON: PGD-20 margins of the training points train.py used and of the test points."""
    return runner.margins_path(ckpt)


def evaluate(ckpt: Path, env: dict) -> None:
    log = ckpt.parent / f"eval-{ckpt.stem}.log"
    aa = [sys.executable, "attack.py", str(ckpt), "--attacks", AA, "--device", "cpu", "--bs", "500", "--n", "1017"]
    sh(aa, log, aa_result(ckpt), env)
    sh([sys.executable, runner.ME, "margins", str(ckpt)], log, margins_result(ckpt), env)


def standard(ckpt: Path, env: dict) -> None:
    cmd = [sys.executable, "attack.py", str(ckpt), "--version", "standard", "--n", str(N_STANDARD)]
    sh(
        cmd + ["--device", "cpu", "--bs", "500"],
        ckpt.parent / f"eval-{ckpt.stem}.log",
        aa_result(ckpt, "standard", N_STANDARD),
        env,
    )


def wanted(out: Path) -> list[Path]:
    """The checkpoints of a finished run that need an evaluation. A best.pt lost before its evaluation (they are
    not kept in git) is not made again: that would re-train the run and replace its evaluated final checkpoint
    with other weights (CPU training is not bit for bit repeatable), so the run keeps its final evaluation only."""
    last_done = not pending_eval(out / "last.pt")
    return [c for c in checkpoints(out) if c.exists() or not last_done]


def pending(r: tuple) -> bool:
    """Whether a run still lacks its training or one of its evaluations."""
    out = ROOT / name(*r)
    if not runner.finished(str(out)):
        return True
    return std_pending(r) or any(pending_eval(c) for c in wanted(out))


def pending_eval(ckpt: Path) -> bool:
    return not (aa_result(ckpt).exists() and margins_result(ckpt).exists())


def std_pending(r: tuple) -> bool:
    return r in STANDARD_ON and not aa_result(ROOT / name(*r) / "last.pt", "standard", N_STANDARD).exists()


def unit(r: tuple, start: Path, env: dict) -> int:
    """One run from start to its last evaluation, so that an interruption loses at most the runs in flight.
    The checkpoints stay out of git: a finished run with an evaluation missing is trained again if the checkpoint
    that evaluation needs is gone, and only evaluated if it is there."""
    if not pending(r):
        return 0
    out = ROOT / name(*r)
    again = False
    if runner.finished(str(out)):
        todo = [c for c in wanted(out) if pending_eval(c)] + ([out / "last.pt"] if std_pending(r) else [])
        again = any(not c.exists() for c in todo)
    if again:  # trained again, and not bit for bit on another CPU: its old evaluations are of other weights
        for f in [*map(out.joinpath, runlog.held(str(out))), *out.glob("eval-*.log")]:
            f.unlink(missing_ok=True)  # train.py refuses a fresh run beside any file runlog.held lists
    try:
        continue_run(*r, start, env, again)
        for ckpt in wanted(out):
            evaluate(ckpt, env)
        if r in STANDARD_ON:
            standard(out / "last.pt", env)
    except RuntimeError as e:
        print(f"{name(*r)}: {e}", flush=True)
        return 1
    tables()
    print(f"done: {name(*r)}", flush=True)
    return 0


def run_all() -> None:
    t0 = time.time()
    os.chdir(REPO)  # the commands name train.py, attack.py and SUBSET from there
    try:
        start = pretrain()
    except RuntimeError as e:  # every run starts from it: nothing else can run
        sys.exit(f"late.py: error: the common start {e}")
    if not margins_result(start).exists():
        runner.margins(start, device="cpu")
    runs = [(loss, s, None, False) for s in SEEDS for loss in MAIN] + EXTRA
    tasks = {name(*r): (lambda env, r=r: unit(r, start, env)) for r in runs}
    rcs = runner.run_queue(tasks, runner.slots([], 1, 2, threads=1), lambda run, rc: None)
    tables()
    failed = [run for run, rc in rcs.items() if rc]
    if failed:  # unit() printed why
        sys.exit(f"late.py: error: {len(failed)} runs failed: {', '.join(failed)} ({(time.time() - t0) / 3600:.1f} h)")
    print(f"all done ({(time.time() - t0) / 3600:.1f} h)", flush=True)


# ---- tables and figures ----


def margins_of(ckpt: Path, part: str) -> list[float]:
    """A checkpoint's margins of the "train" or "test" points as losses.worst_of counts them: the test points'
    through the clean flags of the checkpoint's AutoAttack JSON where it has one (study.worst), the training
    points' as written (no file holds their clean flags)."""
    m = json.loads(margins_result(ckpt).read_text())[part]
    aa = aa_result(ckpt)
    return worst(m, json.loads(aa.read_text())["clean"]) if part == "test" and aa.exists() else m


def important_mask(part: str) -> list[bool]:
    """The 30% of points with the smallest margin under the starting checkpoint (ties: lower index first)."""
    return smallest(margins_of(ROOT / "start" / "last.pt", part))


def mean(v: list) -> float:
    return sum(v) / len(v)


def metrics(ckpt: Path) -> dict | None:
    """One checkpoint's figures, or None while its evaluation is missing."""
    if pending_eval(ckpt):
        return None
    aa, mg = json.loads(aa_result(ckpt).read_text()), json.loads(margins_result(ckpt).read_text())
    final = runlog.final(str(ckpt.parent))[ckpt.stem]
    out = dict(
        old_pgd="precision" not in final,  # test reports since the worst_of count record their precision
        old_margins="precision" not in mg,
        epoch=final["epoch"],
        clean=aa["clean_acc"],
        pgd20=final["test_pgd"],
        apgd_ce=aa["robust_after"]["apgd-ce"],
        aa=aa["robust_acc"],
        train_pgd20=mean([v > 0 for v in mg["train"]]),
    )
    for part in ("train", "test"):
        imp, m = important_mask(part), margins_of(ckpt, part)
        out[f"{part}_imp"] = mean([v for v, i in zip(m, imp) if i])
        out[f"{part}_rest"] = mean([v for v, i in zip(m, imp) if not i])
    std = aa_result(ckpt, "standard", N_STANDARD)
    if std.exists():
        out["standard"] = json.loads(std.read_text())["robust_acc"]
    return out


COLS = [
    ("clean", "clean %", 100),
    ("pgd20", "PGD-20 %", 100),
    ("apgd_ce", "APGD-CE %", 100),
    ("aa", "APGD-CE+T %", 100),
    ("gap", "PGD-20 minus APGD-CE+T", 100),
    ("train_pgd20", "train PGD-20 %", 100),
    ("train_imp", "train margin, important", 1),
    ("train_rest", "train margin, rest", 1),
    ("test_imp", "test margin, important", 1),
    ("test_rest", "test margin, rest", 1),
]


# paired differences, same seed, between variants (loss, ratio, ema): each loss against ce, SOVR inside TRADES against
# TRADES, each ratio against ce, weight averaging against none and SOVR against CE under it
PAIRS = (
    [((loss, None, False), ("ce", None, False)) for loss in MAIN[1:] + ("trades", "trades-sovr")]
    + [(("trades-sovr", None, False), ("trades", None, False))]
    + list(
        dict.fromkeys(
            [((loss, r, False), ("ce", None, False)) for loss, _, r, e in EXTRA if r is not None or loss == "ovr"]
        )
    )
    + [(("ovr", None, False), ("sovr", None, False))]
    + [((loss, None, True), (loss, None, False)) for loss in ("ce", "sovr")]
    + [(("sovr", None, True), ("ce", None, True))]
)


def label(variant: tuple) -> str:
    loss, ratio, ema = variant
    return (
        loss
        + ("" if ratio_of(loss, ratio) is None else f" (ratio {ratio_of(loss, ratio):g})")
        + (" + ema" if ema else "")
    )


def fmt(vals: list[float], scale: float) -> str:
    if not vals:
        return "-"
    m = statistics.mean(vals) * scale
    digits = 1 if scale == 100 else 2
    return f"{m:.{digits}f}" + (f" ± {statistics.stdev(vals) * scale:.{digits}f}" if len(vals) > 1 else "")


def table() -> str | None:
    """The text of late/table.md, None before the start's margins exist."""
    if not margins_result(ROOT / "start" / "last.pt").exists():
        return None
    found = measured()
    start = json.loads(margins_result(ROOT / "start" / "last.pt").read_text())
    lines = [
        f"Start (pre-trained CE): training points' PGD-10 accuracy {start['train_pgd10_acc']:.1%} (eval-mode BN), "
        f"PGD-20 {mean([v > 0 for v in start['train']]):.1%}; test PGD-20 {mean([v > 0 for v in start['test']]):.1%}.",
        "",
    ]
    for which in ("last", "best"):
        lines += [
            f"### {'Final' if which == 'last' else 'Best-by-validation'} checkpoints",
            "",
            "| loss | ratio | ema | seeds | " + " | ".join(c[1] for c in COLS) + " | standard AA % (n=500) |",
            "|" + "---|" * (len(COLS) + 5),
            *variant_rows(found, which),
            "",
            "Paired differences (same seed, same start and data order), mean ± std over seeds:",
            "",
            "| loss | seeds | " + " | ".join(c[1] for c in COLS) + " |",
            "|" + "---|" * (len(COLS) + 2),
            *paired_rows(found, which),
            "",
        ]
    every = found.values()
    lines += [OLD_PGD, ""] * any(m["old_pgd"] for m in every) + [OLD_MARGINS, ""] * any(m["old_margins"] for m in every)
    return "\n".join(lines)


def measured() -> dict:
    """The figures of each finished run's last.pt and best.pt (its last.pt where the best is the last epoch), by
    (run, "last" or "best"); a checkpoint not yet evaluated has none."""
    found = {}
    for r in [(loss, s, None, False) for loss in MAIN for s in SEEDS] + EXTRA:
        out = ROOT / name(*r)
        if runner.finished(str(out)):
            for which in ("last", "best"):
                ckpt = out / f"{which}.pt"
                if which == "best" and out / "best.pt" not in checkpoints(out):
                    ckpt = out / "last.pt"  # best is the last epoch
                mt = metrics(ckpt)
                if mt:
                    mt["gap"] = mt["pgd20"] - mt["aa"]
                    found[(r, which)] = mt
    return found


def variant_rows(found: dict, which: str) -> list[str]:
    """A row per variant (loss, ratio, ema): mean ± std over its seeds."""
    groups, lines = {}, []
    for (r, w), mt in found.items():
        if w == which:
            groups.setdefault((r[0], r[2], r[3]), []).append((r[1], mt))
    for (loss, ratio, ema), items in groups.items():
        cells = [fmt([mt[k] for _, mt in items], sc) for k, _, sc in COLS]
        std = [mt["standard"] for _, mt in items if "standard" in mt]
        lines.append(
            f"| {loss} | {'-' if ratio_of(loss, ratio) is None else ratio_of(loss, ratio)} "
            f"| {'yes' if ema else '-'} "
            f"| {len(items)} | " + " | ".join(cells) + f" | {fmt(std, 100)} |"
        )
    return lines


def paired_rows(found: dict, which: str) -> list[str]:
    """A row per pair of PAIRS with a seed that both have: the mean ± std of their differences over those seeds."""
    lines = []
    for a, b in PAIRS:
        pairs = [(found.get(((a[0], s, a[1], a[2]), which)), found.get(((b[0], s, b[1], b[2]), which))) for s in SEEDS]
        pairs = [(x, y) for x, y in pairs if x and y]
        if pairs:
            cells = [fmt([x[k] - y[k] for x, y in pairs], sc) for k, _, sc in COLS]
            lines.append(f"| {label(a)} - {label(b)} | {len(pairs)} | " + " | ".join(cells) + " |")
    return lines


# what the table says of files written before a robust point had to be classified correctly clean too (worst_of)
OLD_PGD = (
    "PGD-20 % is train.py's test report. Reports written before a robust point also had to be classified correctly "
    "clean counted it robust when PGD-20 left it correct, and hold no per-point data to recount: there PGD-20 % and "
    "PGD-20 minus APGD-CE+T are upper bounds (see results/README.md)."
)
OLD_MARGINS = (
    "Margins are per point the smaller of the clean and the PGD-20 margin. Margins files written before that rule "
    "hold the PGD-20 margin alone: a test point misclassified clean (the AutoAttack file's flag) enters with "
    "min(PGD-20 margin, 0), an upper bound; training margins and train PGD-20 % are upper bounds there (no file "
    "holds the training points' clean flags)."
)


TABLES = threading.Lock()  # unit() redraws them from run_queue's worker threads: pyplot is not thread-safe


def tables() -> None:
    """late/table.md and late/margins.png from the files under late/, one writer at a time."""
    with TABLES:
        text = table()
        if text is not None:
            (ROOT / "table.md").write_text(text)
            histograms()


def histograms() -> None:
    """The paper's histograms: margins of the important points and of the rest, ce vs mail vs gairat vs sovr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4))
    colors = {"start": "gray", "ce": "C0", "mail": "C1", "gairat": "C2", "sovr": "C4"}
    for row, part in zip(axes, ("train", "test")):
        imp = important_mask(part)
        for ax, sel in zip(row, (True, False)):
            for loss in ("start",) + MAIN:
                ckpt = ROOT / "start" / "last.pt" if loss == "start" else ROOT / name(loss, 0, None) / "last.pt"
                if not margins_result(ckpt).exists():
                    continue
                m = [v for v, i in zip(margins_of(ckpt, part), imp) if i == sel]
                ax.hist(
                    m,
                    bins=60,
                    range=(-12, 8),
                    histtype="step",
                    linewidth=1.3,
                    color=colors[loss],
                    linestyle=":" if loss == "start" else "-",
                    label=f"{loss} (mean {mean(m):.2f})",
                )
            ax.axvline(0, color="black", linewidth=0.6)
            ax.set_title(f"{part} points, {'important (30% smallest at start)' if sel else 'rest'}", fontsize=9)
            ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel(
            "logit margin $z_y - \\max_{k \\neq y} z_k$, the lower of clean and PGD-20 (final, seed 0)", fontsize=8
        )
    for ax in axes[:, 0]:
        ax.set_ylabel("points")
    fig.tight_layout()
    fig.savefig(ROOT / "margins.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    p = cli.parser(__doc__)
    p.add_argument("--table", action="store_true", help="only re-write the table and figures from what exists")
    p.add_argument("--margins", default=None, metavar="CKPT", help="its margins JSON: results/runner.py margins CKPT")
    a = p.parse_args()
    margins = lambda: runner.margins(a.margins, device="cpu")  # noqa: E731  (as the published files were made)
    job = margins if a.margins else tables if a.table else run_all
    cli.run("late.py", job, "", "the same command continues the runs where they stopped")  # Ctrl-C 130, SIGTERM 143
