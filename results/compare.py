"""The paper's comparison in one command: every loss, trained, attacked and its margins measured, then one table.

    python results/compare.py                     # the default grid here: every visible GPU busy, one run each
    python results/compare.py --dry-run           # each run's self-contained shell line, nothing run
    python results/compare.py --slurm --partition gpu --time 12:00:00    # one SLURM array job per run (submitit)
    python results/compare.py --status            # a line per run: done / running / stopped / waiting / failed
    python results/compare.py --table             # table.md, table.csv, aa.png, margins.png from what finished
    python results/compare.py --losses ce,sovr --seeds 0 --points 20 --attacks apgd-ce --train-points 64 \\
        --sweep-points 0 --jobs 2 -- --smoke     # small: 20 s on an idle 2-core CPU

While a grid runs it prints a line as each link starts (where: GPU, CPU slot or SLURM job), ends (its time and
figure) or fails (its log's last line and path), and a summary at the end. An exported OMP_NUM_THREADS is every
run's; an unset one is filled with the cores shared out among the runs at once.

A run is (dataset, arch, loss, seed) in <out>/<dataset>-<arch>-<objective>-s<seed>/ (train.py's name) and the
chain: train.py --resume auto; attack.py on best.pt (standard AutoAttack, or --attacks/--points); attack.py on
last.pt with APGD-CE+APGD-T (best vs last, cheaply); runner.py margins of best.pt (PGD-20 margins of the first
--train-points training points and of the attacked test points); attack.py --sweep on best.pt (its first
--sweep-points test points, at most --points). Flags after `--` go to every train.py command.
The important points of a run are the 30% of training (and of test) points with the smallest margin under the
same seed's ce run's best.pt: the same points for every loss of a seed. Running the same command again continues
a killed grid and never repeats a finished link (results/runner.py). The grid's definition is kept in grid.json.
"""

import argparse
import contextlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
import runner  # noqa: E402  (the one launcher of results/)
from compare_table import result, table  # noqa: E402

import cli  # noqa: E402
import runlog  # noqa: E402

LOSSES = "ce,trades,mart,mail,gairat,sovr,trades-sovr,ovr"
LAST_ATTACKS = "apgd-ce,apgd-t"  # last.pt's cheap check; standard AA runs them first, so best.pt's figure is in it


MODES = {  # compare.py's switches, as --help says them
    "dry-run": "print each run's self-contained shell line (its links joined by &&), one a line; run nothing",
    "status": "a line per run of the grid in --out: done / running (which link, where) / stopped / waiting / failed",
    "table": "write table.md, table.csv, aa.png and margins.png from the finished links; run nothing",
    "slurm": "submit one SLURM array job per unfinished run through submitit (see the SLURM flags below)",
    "wait": "with --slurm: wait for the jobs, printing their links' events, then write the table",
}


def get_args(argv: list[str]):
    own, flags = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = parser()
    args = p.parse_args(own)
    args.flags, args.prog = grid_flags(p, args, flags), p.prog
    if min(args.points, args.train_points, args.sweep_points, args.gpus_per_run) < 0 or args.jobs < 1:
        p.error("--points, --train-points, --sweep-points and --gpus-per-run must be >= 0, --jobs >= 1")
    try:
        args.minutes = minutes(args.time)
    except (ValueError, KeyError):
        p.error(f"--time {args.time}: use SLURM's MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    return args, p


def parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, prog="compare.py", usage="%(prog)s [options] [-- train.py flags]")
    a = p.add_argument
    a("--losses", default=LOSSES, help=f"comma-separated train.py --loss values (default {LOSSES})")
    a("--archs", default="resnet18", help="comma-separated --arch values (default resnet18)")
    a("--datasets", default="cifar10", help="comma-separated --dataset values (default cifar10)")
    a("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    a("--points", type=int, default=0, help="attack.py: the first N test points (default 0 = all)")
    a("--attacks", default=None, help="attack.py --attacks for best.pt (default: standard AutoAttack)")
    a("--train-points", type=int, default=10000, help="training points whose margins are measured (default 10000)")
    a("--sweep-points", type=int, default=1000, help="attack.py --sweep on best.pt, N points (default 1000; 0: none)")
    a("--out", default="runs/compare", help="the grid's folder (default runs/compare)")
    a("--gpus-per-run", type=int, default=1, help="GPUs per run, through torchrun when > 1; 0: CPU (default 1)")
    a("--jobs", type=int, default=1, help="runs at a time without a GPU (default 1)")
    for flag, said in MODES.items():
        a(f"--{flag}", action="store_true", help=said)
    s = p.add_argument_group("SLURM (with --slurm)").add_argument
    s("--partition"), s("--time", default="24:00:00", help="per job, HH:MM:SS (default 24:00:00)")
    s("--cpus-per-run", type=int, default=8), s("--mem", default=None, help="per job, e.g. 64G")
    s("--account"), s("--constraint"), s("--max-parallel", type=int, default=0, help="jobs at a time (0 = all)")
    return p


def grid_flags(p: argparse.ArgumentParser, args, flags: list[str]) -> list[str]:
    """The flags after -- that every train.py command gets: a --dataset or --arch among them sets the grid's axis to
    its one value instead (the last one wins, as in train.py); the flags the runner sets itself are refused."""
    if "--smoke" in flags and not any(f.split("=")[0] == "--dataset" for f in flags):
        flags += ["--dataset", "synthetic"]  # --smoke's own data: the grid's dataset would win over its default
    for flag, axis in (("--dataset", "datasets"), ("--arch", "archs")):
        keep, rest = [], iter(flags)
        for f in rest:
            if f.split("=")[0] != flag:
                keep.append(f)
            else:
                value = f.split("=", 1)[1] if "=" in f else next(rest, "")
                setattr(args, axis, value or p.error(f"{flag} after -- needs a value"))
        flags = keep
    for bad in ("--out", "--resume", "--loss", "--seed", "--init"):
        if any(f == bad or f.startswith(bad + "=") for f in flags):
            p.error(f"{bad} after -- is the grid's own: the runner sets it for every run")
    return flags


def minutes(t: str) -> int:
    """A SLURM time limit in whole minutes, rounded up: MM, MM:SS, HH:MM:SS, or after a day count D-HH, D-HH:MM,
    D-HH:MM:SS (sbatch --time)."""
    days, _, rest = t.rpartition("-")
    parts = [int(v) for v in rest.split(":")]
    if days:
        h, m, s = {1: (*parts, 0, 0), 2: (*parts, 0), 3: tuple(parts)}[len(parts)]
    else:
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return int(days or 0) * 1440 + h * 60 + m + (s > 0)


def grid_of(args) -> dict:
    return dict(
        **{k: getattr(args, k).split(",") for k in ("losses", "archs", "datasets", "seeds")},
        points=args.points,
        attacks=args.attacks,
        train_points=args.train_points,
        sweep_points=args.sweep_points,
        train_flags=args.flags,
    )


def quiet(script: str, parse, argv: list[str]):
    """A script's parser's result, or ValueError with the one line its error printed."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse(argv)
    except SystemExit as e:
        if not e.code:  # -- --help: the script's own help, then the end
            raise
        raise ValueError(f"{script}: {err.getvalue().strip().splitlines()[-1].split('error: ', 1)[-1]}") from None


def runs(grid: dict, out: Path, gpus_per_run: int) -> list[dict]:
    """Every run of the grid with its links [(done, cmd)], each command checked by train.py's or attack.py's own
    parser first."""
    import flags as policy
    import train

    check_datasets(grid["datasets"])
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus_per_run}"]
    launch = [sys.executable, *torchrun * (gpus_per_run > 1)]
    found, n = [], str(grid["points"])
    sweep = min(grid.get("sweep_points", 0), grid["points"] or math.inf)  # a grid.json from before the sweep has none
    per_loss = {loss: loss_flags(loss, grid["train_flags"], policy) for loss in grid["losses"]}
    given = {f.split("=")[0][2:].replace("-", "_") for f in grid["train_flags"]} & set(policy.TAGS)
    for key in sorted(given - {k for _, read in per_loss.values() for k in read}):  # a flag no run would read
        flag = "--" + key.replace("_", "-")
        raise ValueError(f"{flag} after -- is read by none of --losses ({policy.readers(key)})")
    for d, arch, loss, seed in itertools.product(grid["datasets"], grid["archs"], grid["losses"], grid["seeds"]):
        argv = ["--dataset", os.path.abspath(d) if d.endswith(".npz") else d, "--arch", arch, "--loss", loss]
        argv += ["--seed", seed, *per_loss[loss][0]]
        t = quiet("train.py", train.get_args, argv)
        run, norm = out / os.path.basename(t.out), t.norm  # train.py's own name; attack.py's norm
        links = [(str(run), [*launch, str(REPO / "train.py"), *argv, "--out", str(run), "--resume", "auto"])]
        for ckpt, attacks in (("best", grid["attacks"]), ("last", grid["attacks"] or LAST_ATTACKS)):
            mode = attacks.replace(",", "+") if attacks else "standard"
            links.append(evaluation(run / f"{ckpt}.pt", ["--attacks", attacks] * bool(attacks), mode, n, launch, norm))
        best = str(run / "best.pt")
        cmd = [sys.executable, runner.ME, "margins", best, "--train-points", str(grid["train_points"]), "--points", n]
        links.append((str(runner.margins_path(best)), cmd))
        if sweep:
            links.append(evaluation(run / "best.pt", ["--sweep"], "sweep", str(sweep), launch, norm))
        found.append(
            dict(run=run, loss=loss, seed=t.seed, dataset=t.dataset, arch=t.arch, data=t.data_dir, links=links)
            | dict(eval_steps=t.eval_steps, norm=norm, eps=t.eps)
        )
    check_folders([r["run"] for r in found])
    return found


def check_datasets(datasets: list[str]) -> None:
    """ValueError for a dataset train.py does not know, or an .npz file that is not there."""
    import data

    for d in datasets:
        if d not in data.NAMES and not (d.endswith(".npz") and os.path.isfile(d)):
            raise ValueError(f"unknown dataset {d!r}: use {', '.join(data.NAMES)} or an existing .npz file")


def check_folders(names: list[Path]) -> None:
    """ValueError where two runs of the grid would share a folder: train.py names them alike."""
    if len(set(names)) < len(names):
        raise ValueError(
            f"two runs of the grid share the folder {max(names, key=names.count)} (see the flags after --)"
        )


def evaluation(ckpt: Path, flags: list[str], mode: str, n: str, launch: list[str], norm: str) -> tuple[str, list[str]]:
    """An attack.py link of a run, (done, cmd): its result file's glob (any device, any process count) and its
    command, checked by attack.py's parser; attack.py attacks under the checkpoint's `norm` (train.py's)."""
    import attack

    argv = [str(ckpt), *flags, "--points", n]
    quiet("attack.py", attack.get_args, argv)
    done = ckpt.with_name(f"{ckpt.stem}.{mode}-{norm}-eps*-n{n if n != '0' else '*'}-seed0*.json")
    return str(done), [*launch, str(REPO / "attack.py"), *argv]


def loss_flags(loss: str, flags: list[str], policy) -> tuple[list[str], set[str]]:
    """The flags after -- that this loss's train.py gets, and the objective settings among them it reads: an
    objective flag goes only to the losses that read it (train.py refuses it elsewhere), so that `-- --ratio 0.2`
    changes sovr and trades-sovr and leaves ce the baseline it is."""
    objective = {"--" + k.replace("_", "-"): k for k in policy.TAGS}  # each takes one value
    pairs, i = [], 0
    while i < len(flags):
        n = 1 if "=" in flags[i] or flags[i] not in objective else 2
        pairs.append(flags[i : i + n])
        i += n
    emr = next((p[-1].split("=")[-1] for p in pairs if p[0].split("=")[0] == "--emr"), "0")
    with contextlib.suppress(ValueError):  # a value that is no number: train.py's parser says so
        emr = float(emr)
    read = set(policy.reads(loss, emr))
    keys = [objective.get(p[0].split("=")[0]) for p in pairs]
    return [f for p, k in zip(pairs, keys) if k is None or k in read for f in p], {k for k in keys if k in read}


def line(r: dict) -> str:
    """The run's shell line: from the directory compare.py was started in (so relative paths in the flags and
    train.py's ./data mean what they mean here), every script by its absolute path."""
    return runner.chain_line(r["links"], str(r["run"] / "console.log"), os.getcwd())


def slurm(args, todo: list[dict]) -> list:
    """One array job per unfinished run: submitit calls runner.Chain on its line; a timed-out or preempted job is
    requeued (submitit's checkpoint) and the same line continues it. A submission sbatch refuses ends compare.py in
    one line: sbatch's reason and the flag to change."""
    import submitit  # setup() checked that it is there

    ex = submitit.AutoExecutor(folder=str(Path(args.out).resolve() / "slurm"), cluster="slurm")
    ex.update_parameters(
        timeout_min=args.minutes,
        **({"gpus_per_node": args.gpus_per_run} if args.gpus_per_run else {}),
        cpus_per_task=args.cpus_per_run,
        tasks_per_node=1,
        name="compare",
        slurm_array_parallelism=args.max_parallel or len(todo),
        **{f"slurm_{k}": getattr(args, k) for k in ("partition", "account", "constraint") if getattr(args, k)},
        **({"slurm_mem": args.mem} if args.mem else {}),
        slurm_additional_parameters={"chdir": str(runner.HERE)},  # where the job imports runner.Chain from
    )
    said = io.StringIO()  # submitit prints sbatch's stderr before it raises it: said once, below
    try:
        with contextlib.redirect_stderr(said):
            jobs = ex.map_array(runner.Chain(), [line(r) for r in todo])
    except submitit.core.utils.FailedJobError as e:
        sys.exit(f"{args.prog}: error: {refusal(str(e))}")
    sys.stderr.write(said.getvalue())
    return jobs


# What sbatch's refusal names -> what to change in compare.py's flags (None: no flag of compare.py changes it). The
# first pattern found wins: an "Invalid account or account/partition combination" is --account's, a "Job violates
# accounting/QOS policy (... time limits)" the QOS's.
SBATCH_FLAGS = (
    (r"generic resource|gres", "--gpus-per-run 0 on a partition without GPUs"),
    (r"qos", None),
    (r"account", "another --account"),
    (r"partition", "another --partition"),
    (r"time limit|--time", "a shorter --time"),
    (r"memory|--mem", "less --mem"),
    (r"feature|constraint", "another --constraint"),
    (r"node configuration", "fewer --cpus-per-run, less --mem or another --constraint"),
)


def refusal(message: str) -> str:
    """One line for an sbatch refusal in submitit's message: sbatch's own error lines, and the flag to change."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()] or ["sbatch failed"]
    errors = [ln.removeprefix("sbatch: error: ") for ln in lines if ln.startswith("sbatch: error: ")]
    reason = "sbatch: error: " + "; ".join(errors) if errors else lines[-1]
    use = next((use for pattern, use in SBATCH_FLAGS if re.search(pattern, reason, re.IGNORECASE)), None)
    return reason + (f"; use {use}" if use else "")


def fetch(todo: list[dict], prog: str) -> None:
    """Each torchvision dataset (CIFAR, SVHN) of the runs to come downloaded once, before any starts, into the folder
    they read (train.py's --data-dir, relative to here, where they run), saying so: the runs find it there rather
    than wait in turn for data.py's lock while one of them downloads it. A failure ends the grid in one line before
    anything starts."""
    import data

    for name, folder in sorted({(r["dataset"], r["data"]) for r in todo if r["dataset"] in data.TORCHVISION}):
        print(f"fetching {name} into {folder} once, before the runs", flush=True)
        try:
            data.load_data(name, folder)
        except ValueError as e:
            sys.exit(f"{prog}: error: {e}")


def visible_gpus() -> list[str]:
    import torch

    ids = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    return (ids or [str(i) for i in range(torch.cuda.device_count())])[: torch.cuda.device_count()]


def setup(args) -> tuple[dict, Path, list[dict], list[str]]:
    """The grid (the flags, or grid.json for --status and --table), its folder, its runs and the GPUs to run them
    on here; ValueError for input that no run could use, before anything starts."""
    out = Path(args.out).resolve()
    saved = json.loads((out / "grid.json").read_text()) if (out / "grid.json").exists() else None
    if saved is not None:
        saved.setdefault("sweep_points", 0)  # a grid from before --sweep-points had no sweep: it resumes with 0
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


class Watch:
    """One line per event of the runs' links while a grid runs, read from the markers runner.link writes in each
    console.log (so the same for the local queue and SLURM): a link started and where (runner.where: GPU, CPU or
    SLURM job), finished (its time and headline figure) or failed (its log's last line and the log's path)."""

    def __init__(self, todo: list[dict]) -> None:
        self.todo, self.stop = todo, threading.Event()
        self.seen = {str(r["run"]): len(runner.markers(r["run"] / "console.log")) for r in todo}  # a rerun's old lines
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def __enter__(self) -> "Watch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.scan()  # what the last links wrote as they ended

    def poll(self) -> None:
        while not self.stop.wait(1):
            self.scan()

    def scan(self) -> None:
        for r in self.todo:
            new = runner.markers(r["run"] / "console.log")
            for mark in new[self.seen[str(r["run"])] :]:
                print(f"{r['run'].name}: {event(r, mark)}", flush=True)
            self.seen[str(r["run"])] = len(new)


def event(r: dict, mark: str) -> str:
    """The line of one marker: `$ CMD` (started, where), `done in Ns: CMD` or `failed (why) in Ns: CMD`."""
    if mark.startswith("$ "):
        at = runner.running(r["run"] / "console.log")[2]
        return f"{runner.link_name(shlex.split(mark[2:]))} started" + f" on {at}" * bool(at)
    said, cmd = mark.split(": ", 1)
    k = next((k for k, (_, c) in enumerate(r["links"]) if shlex.join(c) == cmd), None)
    name = runner.link_name(shlex.split(cmd))
    if said.startswith("done"):
        return f"{name} {said}" + (f": {headline(r, k)}" if k is not None else "")
    log = r["run"] / "console.log"
    return f"{name} {said}: {runner.last_line(log)} (log: {log})"


def headline(r: dict, k: int) -> str:
    """A finished link's figure: train.py's test of best.pt, an attack's robust accuracy named by what ran
    (aa_run.attack_label), the margins' means, the sweep's verdict."""
    import aa_run

    if k == 0:
        best = (runlog.final(str(r["run"])) or {}).get("best", {})
        clean, pgd = best.get("test_clean", math.nan), best.get("test_pgd", math.nan)
        return f"test of best.pt (epoch {best.get('epoch')}): clean {clean:.2%}, PGD-{r['eval_steps']} {pgd:.2%}"
    res = result(r["links"][k][0]) or {}
    if "robust_acc" in res:
        return f"clean {res['clean_acc']:.2%}, {aa_run.attack_label(res['settings'])} {res['robust_acc']:.2%}"
    if "test" in res:
        train, test = statistics.mean(res["train"]), statistics.mean(res["test"])
        return f"mean PGD-20 margin {train:.2f} (training points), {test:.2f} (test points)"
    return res.get("sweep_verdict", "")


def launch(args, grid: dict, out: Path, found: list[dict], gpus: list[str]) -> int:
    """Runs (or submits) every unfinished run, a line per event of their links (Watch), then writes the table and
    a summary line; 1 if a run failed."""
    todo, t0 = [r for r in found if not all(runner.finished(d) for d, _ in r["links"])], time.time()
    fetch(todo, args.prog)
    for r in found:
        r["run"].mkdir(parents=True, exist_ok=True)
    runner.write_json(grid, out / "grid.json")
    print(f"{len(todo)} of {len(found)} runs to run in {out}" + (f" ({threads(gpus, args)})" * bool(todo)), flush=True)
    if args.slurm:
        jobs = slurm(args, todo) if todo else []
        print(f"submitted {len(jobs)} runs: SLURM jobs {' '.join(j.job_id for j in jobs)}", flush=True)
        if not args.wait:
            return 0
        with Watch(todo):
            failed = [r["run"].name for r, j in zip(todo, jobs) if j.exception() is not None]
    else:
        lines = {str(r["run"]): line(r) for r in todo}
        where = runner.slots(gpus, args.gpus_per_run, args.jobs, int(os.environ.get("OMP_NUM_THREADS") or 0) or None)
        with Watch(todo):
            rcs = runner.run_local(lines, where, lambda run, rc: None)
        failed = [Path(n).name for n, rc in rcs.items() if rc and rc not in runner.STOPPED]
    table(grid, out, found)
    done = sum(all(runner.finished(d) for d, _ in r["links"]) for r in found)
    said = f"{done} of {len(found)} runs done; ran {len(todo)} in {time.time() - t0:.0f}s; wrote {out / 'table.md'}"
    print(said + (f"; {len(failed)} runs failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def threads(gpus: list[str], args) -> str:
    """What the runs' OMP_NUM_THREADS is, said once: a value the user exported is kept (a thread count changes
    results in their last digits); only an unset one is filled with the cores shared out (runner.slots)."""
    mine = os.environ.get("OMP_NUM_THREADS")
    if args.slurm:
        return f"OMP_NUM_THREADS {mine}, as exported here" if mine else "OMP_NUM_THREADS as SLURM's job sets it"
    if mine:
        return f"OMP_NUM_THREADS={mine} from your environment, kept for every run"
    fill = runner.slots(gpus, args.gpus_per_run, args.jobs)[0]["OMP_NUM_THREADS"]
    return f"OMP_NUM_THREADS unset: {fill} per process, the cores shared out"


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
            print(
                f"{r['run'].name}: {st}"
                + ("" if st == "done" or st.startswith("waiting") else f": {runner.last_line(log)}")
            )
    elif args.table:
        print(cli.run(p.prog, lambda: table(grid, out, found), "", "the runs' files are as they were"))
    else:  # cli.run: one line for a file it cannot write, Ctrl-C and SIGTERM, and the exit codes of every script
        again = "the same command continues the grid where it stopped"
        return cli.run(p.prog, lambda: launch(args, grid, out, found, gpus), "", again)
    return 0


if __name__ == "__main__":
    sys.exit(main())
