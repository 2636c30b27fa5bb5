"""The paper's comparison in one command: every loss, trained, attacked and its margins measured, then one table.

    python results/compare.py                     # the default grid here: every visible GPU busy, one run each
    python results/compare.py --dry-run           # each run's self-contained shell line, nothing run
    python results/compare.py --slurm --partition gpu --time 12:00:00    # one SLURM array job per run (submitit)
    python results/compare.py --status            # a line per run: done / running / stopped / waiting / failed
    python results/compare.py --table             # table.md, table.csv, aa.png, margins.png from what finished
    python results/compare.py --losses ce,sovr --seeds 0 --points 20 --attacks apgd-ce -- --dataset synthetic

A run is (dataset, arch, loss, seed) in <out>/<dataset>-<arch>-<objective>-s<seed>/ (train.py's name) and the
chain: train.py --resume auto; attack.py on best.pt (standard AutoAttack, or --attacks/--points); attack.py on
last.pt with APGD-CE+APGD-T (best vs last, cheaply); runner.py margins of best.pt (PGD-20 margins of the first
--train-points training points and of the attacked test points). Flags after `--` go to every train.py command.
The important points of a run are the 30% of training (and of test) points with the smallest margin under the
same seed's ce run's best.pt: the same points for every loss of a seed. Running the same command again continues
a killed grid and never repeats a finished link (results/runner.py). The grid's definition is kept in grid.json.
"""

import contextlib
import csv
import glob
import importlib.util
import io
import itertools
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
import runner  # noqa: E402  (the one launcher of results/)

import cli  # noqa: E402
import runlog  # noqa: E402

LOSSES = "ce,trades,mart,mail,gairat,sovr,trades-sovr,ovr"
LAST_ATTACKS = "apgd-ce,apgd-t"  # last.pt's cheap check; standard AA runs them first, so best.pt's figure is in it
IMPORTANT = 0.3  # the share of points with the smallest margins, as attack.py's mean_margin_smallest30
COLS = ["clean", "pgd20", "aa", "gap", "last_minus_best", "train_imp", "train_rest", "test_imp", "test_rest"]


def get_args(argv: list[str]):
    own, flags = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = cli.parser(__doc__, usage="%(prog)s [options] [-- train.py flags]")
    a = p.add_argument
    a("--losses", default=LOSSES, help=f"comma-separated train.py --loss values (default {LOSSES})")
    a("--archs", default="resnet18", help="comma-separated --arch values (default resnet18)")
    a("--datasets", default="cifar10", help="comma-separated --dataset values (default cifar10)")
    a("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    a("--points", type=int, default=0, help="attack.py: the first N test points (default 0 = all)")
    a("--attacks", default=None, help="attack.py --attacks for best.pt (default: standard AutoAttack)")
    a("--train-points", type=int, default=10000, help="training points whose margins are measured (default 10000)")
    a("--out", default="runs/compare", help="the grid's folder (default runs/compare)")
    a("--gpus-per-run", type=int, default=1, help="GPUs per run, through torchrun when > 1; 0: CPU (default 1)")
    a("--jobs", type=int, default=1, help="runs at a time without a GPU (default 1)")
    for flag in ("dry-run", "status", "table", "slurm", "wait"):
        a(f"--{flag}", action="store_true", help={"wait": "with --slurm: wait for the jobs, then --table"}.get(flag))
    s = p.add_argument_group("SLURM (with --slurm)").add_argument
    s("--partition"), s("--time", default="24:00:00", help="per job, HH:MM:SS (default 24:00:00)")
    s("--cpus-per-run", type=int, default=8), s("--mem", default=None, help="per job, e.g. 64G")
    s("--account"), s("--constraint"), s("--max-parallel", type=int, default=0, help="jobs at a time (0 = all)")
    args = p.parse_args(own)
    args.flags, args.prog = flags, p.prog
    for bad in ("--out", "--resume", "--loss", "--seed", "--init"):
        if any(f == bad or f.startswith(bad + "=") for f in flags):
            p.error(f"{bad} after -- is the grid's own: the runner sets it for every run")
    if min(args.points, args.train_points, args.gpus_per_run) < 0 or args.jobs < 1:
        p.error("--points, --train-points and --gpus-per-run must be >= 0, --jobs >= 1")
    try:
        args.minutes = minutes(args.time)
    except (ValueError, KeyError):
        p.error(f"--time {args.time}: use SLURM's MM, MM:SS, HH:MM:SS or D-HH:MM:SS")
    return args, p


def minutes(t: str) -> int:
    """A SLURM time limit in whole minutes, rounded up."""
    days, _, rest = t.rpartition("-")
    parts = [int(v) for v in rest.split(":")]
    h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return int(days or 0) * 1440 + h * 60 + m + (s > 0)


def grid_of(args) -> dict:
    return dict(
        **{k: getattr(args, k).split(",") for k in ("losses", "archs", "datasets", "seeds")},
        points=args.points,
        attacks=args.attacks,
        train_points=args.train_points,
        train_flags=args.flags,
    )


def quiet(parse, argv: list[str]):
    """A parser's result, or ValueError with the one line its error printed."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse(argv)
    except SystemExit:
        raise ValueError(err.getvalue().strip().splitlines()[-1]) from None


def runs(grid: dict, out: Path, gpus_per_run: int) -> list[dict]:
    """Every run of the grid with its links [(done, cmd)], each command checked by train.py's or attack.py's own
    parser first."""
    import attack
    import train

    for d in grid["datasets"]:
        if d not in ("cifar10", "cifar100", "synthetic") and not (d.endswith(".npz") and os.path.isfile(d)):
            raise ValueError(f"unknown dataset {d!r}: use cifar10, cifar100, synthetic or an existing .npz file")
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus_per_run}"]
    launch = [sys.executable, *torchrun * (gpus_per_run > 1)]
    found = []
    for d, arch, loss, seed in itertools.product(grid["datasets"], grid["archs"], grid["losses"], grid["seeds"]):
        argv = ["--dataset", os.path.abspath(d) if d.endswith(".npz") else d, "--arch", arch, "--loss", loss]
        t = quiet(train.get_args, argv := [*argv, "--seed", seed, *grid["train_flags"]])
        run = out / os.path.basename(t.out)  # train.py's own name for it
        links = [(str(run), [*launch, str(REPO / "train.py"), *argv, "--out", str(run), "--resume", "auto"])]
        for ckpt, attacks in (("best", grid["attacks"]), ("last", grid["attacks"] or LAST_ATTACKS)):
            flags = [
                str(run / f"{ckpt}.pt"),
                *(["--attacks", attacks] if attacks else []),
                "--points",
                str(grid["points"]),
            ]
            quiet(attack.get_args, flags)
            mode = attacks.replace(",", "+") if attacks else "standard"
            links.append(
                (
                    str(run / f"{ckpt}.{mode}-Linf-eps*-n{grid['points'] or '*'}-seed0*.json"),
                    [*launch, str(REPO / "attack.py"), *flags],
                )
            )
        best, points = (
            str(run / "best.pt"),
            ["--train-points", str(grid["train_points"]), "--points", str(grid["points"])],
        )
        links.append((str(runner.margins_path(best)), [sys.executable, runner.ME, "margins", best, *points]))
        found.append(dict(run=run, loss=loss, seed=t.seed, dataset=t.dataset, arch=t.arch, links=links))
    names = [r["run"] for r in found]
    if len(set(names)) < len(names):
        raise ValueError(
            f"two runs of the grid share the folder {max(names, key=names.count)} (see the flags after --)"
        )
    return found


def line(r: dict) -> str:
    """The run's shell line: from the directory compare.py was started in (so relative paths in the flags and
    train.py's ./data mean what they mean here), every script by its absolute path."""
    return runner.chain_line(r["links"], str(r["run"] / "console.log"), os.getcwd())


def slurm(args, todo: list[dict]) -> list:
    """One array job per unfinished run: submitit calls runner.Chain on its line; a timed-out or preempted job is
    requeued (submitit's checkpoint) and the same line continues it."""
    try:
        import submitit
    except ImportError:
        raise ValueError("--slurm needs submitit: pip install submitit") from None
    ex = submitit.AutoExecutor(folder=str(Path(args.out).resolve() / "slurm"), cluster="slurm")
    ex.update_parameters(
        timeout_min=args.minutes,
        **({"gpus_per_node": args.gpus_per_run} if args.gpus_per_run else {}),
        cpus_per_task=args.cpus_per_run,
        tasks_per_node=1,
        name="compare",
        slurm_array_parallelism=args.max_parallel or len(todo) or 1,
        **{f"slurm_{k}": getattr(args, k) for k in ("partition", "account", "constraint") if getattr(args, k)},
        **({"slurm_mem": args.mem} if args.mem else {}),
        slurm_additional_parameters={"chdir": str(runner.HERE)},  # where the job imports runner.Chain from
    )
    return ex.map_array(runner.Chain(), [line(r) for r in todo])


def result(done: str) -> dict | None:
    """A finished link's JSON (None while it has not finished)."""
    found = sorted(glob.glob(done))
    return json.loads(Path(found[0]).read_text()) if found else None


def smallest(margins: list[float]) -> list[bool]:
    """The IMPORTANT share of points with the smallest margins (ties: lower index first), as results/late.py."""
    chosen = set(sorted(range(len(margins)), key=lambda i: margins[i])[: round(IMPORTANT * len(margins))])
    return [i in chosen for i in range(len(margins))]


def metrics(r: dict, ce: dict | None) -> dict:
    """A run's figures from its finished links only (None where a link has not finished); ce: the same seed's ce
    run's margins, which fix the important points."""
    final = runlog.final(str(r["run"]))
    aa, last, mg = (result(done) if final else None for done, _ in r["links"][1:])
    recs = [x for x in runlog.records(str(r["run"])) if "epoch" in x]
    res = {k: None for k in COLS} | dict(s_epoch=statistics.mean(x["time"] for x in recs) if recs else None)
    if aa:
        s = aa["settings"]
        res |= dict(clean=aa["clean_acc"], aa=aa["robust_acc"], n=s["n"], eps=s["eps"], s_aa=aa["time_s"])
        res["torch"] = aa["versions"]["torch"]
    if aa and last:  # the same attacks on both: last.pt's list, which best.pt's run also went through
        res["last_minus_best"] = last["robust_acc"] - aa["robust_after"].get(list(last["robust_after"])[-1], math.nan)
    if aa and mg:  # PGD-20 on the attacked points; a point counts if it is classified right, clean and attacked
        res["pgd20"] = statistics.mean(bool(c) and m > 0 for c, m in zip(aa["clean"], mg["test"]))
        res["gap"] = res["pgd20"] - res["aa"]
    if mg:
        res["gpu"] = mg.get("device")
        for part in ("train", "test") if ce else ():
            imp = smallest(ce[part])
            res[f"{part}_imp"] = statistics.mean(v for v, i in zip(mg[part], imp) if i)
            res[f"{part}_rest"] = statistics.mean(v for v, i in zip(mg[part], imp) if not i)
    with contextlib.suppress(OSError, IndexError):
        res["commit"] = json.loads((r["run"] / "links.jsonl").read_text().splitlines()[0])["commit"]
    return res


def fmt(vals: list, col: str) -> str:
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    scale, digits = (1, 2) if "_imp" in col or "_rest" in col else (100, 1)
    sd = f" ± {statistics.stdev(vals) * scale:.{digits}f}" if len(vals) > 1 else ""
    return f"{statistics.mean(vals) * scale:.{digits}f}{sd}"


HEAD = [
    "clean %",
    "PGD-20 %",
    "AA %",
    "PGD-20 - AA",
    "last - best, APGD-CE+T",
    "train margin, important",
    "train margin, other",
    "test margin, important",
    "test margin, other",
]


def table(grid: dict, out: Path, found: list[dict]) -> str:
    """table.md and table.csv (one row per run), aa.png and margins.png, from the finished links."""
    ce = {(r["dataset"], r["arch"], r["seed"]): result(r["links"][3][0]) for r in found if r["loss"] == "ce"}
    for r in found:
        r["m"] = metrics(r, ce.get((r["dataset"], r["arch"], r["seed"])))
    complete = [r for r in found if all(runner.finished(d) for d, _ in r["links"])]
    extra = ["n", "eps", "gpu", "s_epoch", "s_aa", "torch", "commit"]
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "arch", "loss", "seed", "run", *COLS, *extra])
        for r in found:
            w.writerow(
                [r["dataset"], r["arch"], r["loss"], r["seed"], r["run"].name, *(r["m"][k] for k in COLS + extra)]
            )
    lines = [f"# {', '.join(grid['losses'])} on {', '.join(grid['datasets'])}, {', '.join(grid['archs'])}", ""]
    if len(complete) < len(found):
        lines += [
            f"**Partial grid: {len(complete)} of {len(found)} runs have finished every link**; a cell counts "
            "only the finished links of its runs (seeds: runs with a figure of their own, of those in the grid).",
            "",
        ]
    lines += [
        "Per loss, mean ± std over seeds, then each seed; important points: the 30% smallest margins under the "
        "same seed's ce run (best.pt). Paired: minus ce, same seed.",
        "",
    ]
    lines += [
        "| loss | seeds | " + " | ".join(HEAD) + " | n | eps | GPU | s/epoch | s per AA | torch | commit |",
        "|---" * (len(HEAD) + 9) + "|",
    ]
    groups: dict = {}
    for r in found:
        groups.setdefault((r["dataset"], r["arch"], r["loss"]), []).append(r)
    for (d, arch, loss), rs in groups.items():
        have = [r for r in rs if r["m"]["aa"] is not None or r["m"]["clean"] is not None]
        pre = f"{loss}" + (f" ({d}, {arch})" if len(groups) > len(grid["losses"]) else "")
        rows = [(f"**{pre}**", f"{len(have)} of {len(rs)}", have)] + [
            (f"{pre}, seed {r['seed']}", "1", [r]) for r in have
        ]
        for name, seeds, sel in rows:
            cells = [fmt([r["m"][k] for r in sel], k) for k in COLS]
            first = sel[0]["m"] if sel else {}
            env = [first.get(k) for k in ("n", "eps", "gpu")] + [
                fmt([r["m"][k] / 100 for r in sel if r["m"][k]], "s") for k in ("s_epoch", "s_aa")
            ]
            env += [first.get("torch"), ",".join(sorted({str(r["m"].get("commit")) for r in sel}))]
            lines.append(
                f"| {name} | {seeds} | " + " | ".join(cells + [str(v if v is not None else "-") for v in env]) + " |"
            )
        if loss != "ce":
            base = {r["seed"]: r for r in found if (r["dataset"], r["arch"], r["loss"]) == (d, arch, "ce")}
            pairs = [(r["m"], base[r["seed"]]["m"]) for r in rs if r["seed"] in base]
            cells = [fmt([a[k] - b[k] for a, b in pairs if None not in (a[k], b[k])], k) for k in COLS]
            n = sum(a["aa"] is not None and b["aa"] is not None for a, b in pairs)
            lines.append(f"| {pre} - ce, paired | {n} | " + " | ".join(cells) + " |" + " |" * 7)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    figures(grid, out, groups)
    return "\n".join(lines)


def figures(grid: dict, out: Path, groups: dict) -> None:
    """aa.png: AutoAttack accuracy per loss, each seed a point; margins.png: the important points' margins per loss
    (the first seed), training and test points."""
    plt = cli.pyplot()
    if plt is None:
        return print("matplotlib is not installed: no figures (pip install matplotlib)")
    fig, ax = plt.subplots(figsize=(1 + 0.9 * len(groups), 3.5))
    for k, rs in enumerate(groups.values()):
        v = [100 * r["m"]["aa"] for r in rs if r["m"]["aa"] is not None]
        ax.scatter([k] * len(v), v, color="C0", s=18)
        if v:
            ax.hlines(statistics.mean(v), k - 0.3, k + 0.3, color="C1")
    ax.set_xticks(range(len(groups)), [k[2] for k in groups], rotation=30)
    ax.set(ylabel="AutoAttack accuracy % (each seed; line: mean)")
    fig.tight_layout(), fig.savefig(out / "aa.png", dpi=120), plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, part in zip(axes, ("train", "test")):
        for (d, arch, loss), rs in groups.items():
            r = next((r for r in rs if r["m"][f"{part}_imp"] is not None), None)
            if r:
                ce = next(c for c in groups[(d, arch, "ce")] if c["seed"] == r["seed"])
                imp, m = smallest(result(ce["links"][3][0])[part]), result(r["links"][3][0])[part]
                ax.hist([v for v, i in zip(m, imp) if i], bins=40, histtype="step", label=f"{loss} (seed {r['seed']})")
        ax.axvline(0, color="gray", linewidth=0.8)
        ax.set(xlabel=f"PGD-20 logit margin, important {part} points", ylabel="points")
        ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(out / "margins.png", dpi=120), plt.close(fig)


def visible_gpus() -> list[str]:
    import torch

    ids = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    return (ids or [str(i) for i in range(torch.cuda.device_count())])[: torch.cuda.device_count()]


def setup(args) -> tuple[dict, Path, list[dict], list[str]]:
    """The grid (the flags, or grid.json for --status and --table), its folder, its runs and the GPUs to run them
    on here; ValueError for input that no run could use, before anything starts."""
    out = Path(args.out).resolve()
    saved = json.loads((out / "grid.json").read_text()) if (out / "grid.json").exists() else None
    grid = grid_of(args)
    if args.status or args.table:
        if saved is None:
            raise ValueError(f"{out} holds no grid (no grid.json); start one, or point --out at one")
        grid = saved
    elif saved is not None and saved != grid:
        diff = next(k for k in grid if grid[k] != saved.get(k))
        raise ValueError(
            f"{out} holds another grid ({diff}: {saved.get(diff)} there, {grid[diff]} here); choose another --out"
        )
    if args.slurm and not args.dry_run and not shutil.which("sbatch"):
        raise ValueError("--slurm: sbatch is not on PATH (no SLURM here; --dry-run prints the lines to submit)")
    if args.slurm and not args.dry_run and not importlib.util.find_spec("submitit"):
        raise ValueError("--slurm needs submitit: pip install submitit")
    found = runs(grid, out, args.gpus_per_run)
    gpus = visible_gpus() if args.gpus_per_run and not (args.slurm or args.dry_run) else []
    if 0 < len(gpus) < args.gpus_per_run:
        raise ValueError(f"--gpus-per-run {args.gpus_per_run}: this machine shows {len(gpus)} GPUs")
    return grid, out, found, gpus


def launch(args, grid: dict, out: Path, found: list[dict], gpus: list[str]) -> int:
    """Runs (or submits) every unfinished run, then writes the table; 1 if a run failed."""
    for r in found:
        r["run"].mkdir(parents=True, exist_ok=True)
    runner.write_json(grid, out / "grid.json")
    todo = [r for r in found if not all(runner.finished(d) for d, _ in r["links"])]
    if args.slurm:
        jobs = slurm(args, todo)
        print(f"submitted {len(jobs)} runs: SLURM jobs {' '.join(j.job_id for j in jobs)}", flush=True)
        if not args.wait:
            return 0
        failed = [r["run"].name for r, j in zip(todo, jobs) if j.exception() is not None]
    else:

        def report(run: str, rc: int) -> None:
            said = "done" if rc == 0 else f"failed: {runner.last_line(Path(run) / 'console.log')}"
            print(f"{Path(run).name}: {said}", flush=True)

        lines = {str(r["run"]): line(r) for r in todo}
        failed = [
            Path(n).name for n, rc in runner.run_local(lines, gpus, args.gpus_per_run, args.jobs, report).items() if rc
        ]
    table(grid, out, found)
    print(f"wrote {out / 'table.md'}" + (f"; {len(failed)} runs failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args, p = get_args(sys.argv[1:] if argv is None else argv)
    try:
        grid, out, found, gpus = setup(args)
    except ValueError as e:
        sys.exit(f"{p.prog}: error: {e}")
    if args.dry_run:
        print("\n".join(line(r) for r in found))
    elif args.status:
        for r in found:
            st, log = runner.state(r["links"], r["run"] / "console.log"), r["run"] / "console.log"
            print(f"{r['run'].name}: {st}" + ("" if st in ("done", "waiting") else f": {runner.last_line(log)}"))
    elif args.table:
        print(table(grid, out, found))
    else:
        return launch(args, grid, out, found, gpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
