"""The one way results/ launches runs: a run is a chain of links (train.py, attack.py, margins), written as one
self-contained shell line; the line runs here (run_local: a queue of GPU or CPU slots), on SLURM (Chain, a
submitit job per run), or anywhere a user pastes it (compare.py --dry-run). results/late.py, whose chains decide
as they go, puts its own tasks in the same queue (run_queue) and runs each command through `link`.

Each link in a line is `python results/runner.py link LOG DONE -- CMD...`: it skips CMD when DONE shows the link's
result exists (a run folder: train.py's final test report in its log.jsonl; anything else: a glob of result files,
e.g. attack.py's JSON, whatever suffix its device or process count gives the name), else appends `$ CMD`, CMD's
output and `done in Ns: CMD` (or `failed`) to LOG. The links themselves resume (train.py --resume auto, attack.py's
state file), so running a killed line again continues it and never repeats a finished link.

    python results/runner.py margins CKPT [--train-points N] [--points N]   # PGD-20 margins, train and test points
"""

import contextlib
import glob
import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
import runlog  # noqa: E402  (no torch: a link starts in a blink)

ME = str(HERE / "runner.py")


def finished(done: str) -> bool:
    """Whether a link's result exists: a run folder holds train.py's final report, or a result glob matches."""
    return runlog.final(done) is not None if os.path.isdir(done) else bool(glob.glob(done))


def link(log: str, done: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Runs one link unless its result exists, logging to `log`; its exit code (1 when it ends without its result).
    A link stopped by Ctrl-C or SIGTERM (its command exits 130 or 143, cli.INTERRUPTED and TERMINATED, having said
    what it kept; or the link passed a SIGTERM on and its command failed, as torchrun does) is `stopped`, not failed,
    and exits 130 or 143: the same line continues it."""
    if finished(done):
        return 0
    line = shlex.join(cmd)
    with open(log, "a") as f:
        # before the link's first line, and kept after it ends (the next link replaces it): whoever reads that line,
        # however late (compare.py's events, --status), finds where it ran; the log's last marker says if it still runs
        Path(log).with_name("running").write_text(f"{socket.gethostname()} {os.getpid()} {where()}\n")
        f.write(f"$ {line}\n")
        f.flush()
        t0 = time.time()
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        with passed_on(child) as got:
            rc = child.wait()
        said = f"signal {-rc}" if rc < 0 else rc  # e.g. the kernel's OOM killer: a failure, not SLURM's signal
        rc = TERMINATED if got and rc else rc  # torchrun, SIGTERMed, exits 1 once its processes have stopped
        rc = 1 if rc < 0 else rc if rc in STOPPED else rc or (0 if finished(done) else 1)
        end = f"stopped ({STOPPED[rc]})" if rc in STOPPED else "done" if rc == 0 else f"failed ({said or rc})"
        f.write(f"{end} in {time.time() - t0:.0f}s: {line}\n")
    if rc == 0:  # beside the log, what the table reports with the figures: the code that made them
        rec = dict(cmd=cmd, seconds=round(time.time() - t0, 1), commit=commit(), host=socket.gethostname())
        with open(Path(log).with_name("links.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
    return rc


# cli.INTERRUPTED and cli.TERMINATED, by the same rule (a shell's 128 + the signal): cli needs torch, a link does not
TERMINATED = 128 + signal.SIGTERM
STOPPED = {128 + signal.SIGINT: "Ctrl-C", TERMINATED: "SIGTERM"}


@contextlib.contextmanager
def passed_on(child: subprocess.Popen):
    """While a link's command runs (in a link's own process, its main thread), a SIGTERM to the link reaches the
    command too, which says what it kept and exits 143, as it does when SLURM signals every process of the job; a
    Ctrl-C reaches the command from the terminal: the link waits for it rather than kill it mid-save. Yields a list
    that holds the SIGTERMs passed on."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def term(*a) -> None:
        got.append(signal.SIGTERM)
        child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, term)
    try:
        yield got
    finally:
        for s, handler in zip((signal.SIGINT, signal.SIGTERM), before):
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def where() -> str:
    """Where this process runs, for compare.py's lines and --status: its SLURM job, else its GPUs or the CPU (as the
    local queue gives them), with its thread count; empty where nothing says (a line pasted into a shell)."""
    env = os.environ.get
    if env("SLURM_JOB_ID"):
        array = env("SLURM_ARRAY_JOB_ID"), env("SLURM_ARRAY_TASK_ID")
        return f"SLURM job {'_'.join(array) if all(array) else env('SLURM_JOB_ID')}"
    gpus, threads = env("CUDA_VISIBLE_DEVICES"), env("OMP_NUM_THREADS")
    device = "" if gpus is None else f"GPU{'s' * (',' in gpus)} {gpus}" if gpus else "the CPU"
    return device + (f", {threads} thread{'s' * (threads != '1')}" if device and threads else "")


def link_name(cmd: list[str]) -> str:
    """A link's short name for compare.py's lines and --status: its script and checkpoint, and attack.py's mode."""
    i = next((k for k, c in enumerate(cmd) if c.endswith(".py")), 0)
    script, rest = Path(cmd[i]).name, cmd[i + 1 :]
    if script == "runner.py" and rest[:1] == ["margins"]:
        return f"margins of {Path(rest[1]).name}"
    if script != "attack.py" or not rest:
        return script
    mode = next((f"{f} {v}" for f, v in zip(rest, rest[1:]) if f == "--attacks"), "standard AutoAttack")
    return f"{script} {Path(rest[0]).name} {'--sweep' if '--sweep' in rest else mode}"


def commit() -> str:
    run = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return run.stdout.strip() or "unknown"


def chain_line(links: list[tuple[str, list[str]]], log: str, cwd: str | Path) -> str:
    """One shell line: cd to `cwd`, then each (done, cmd) link through `link`, joined by &&. Where it runs (GPUs,
    threads) is the queue's or the scheduler's business, not the line's."""
    parts = [shlex.join([sys.executable, ME, "link", log, done, "--", *cmd]) for done, cmd in links]
    return f"cd {shlex.quote(str(cwd))} && " + " && ".join(parts)


def write_json(obj: dict, path: str | Path) -> None:
    """Atomic, as models.write_json (which needs torch)."""
    runlog.write(str(path), json.dumps(obj, indent=1))


MARKS = ("$ ", "done in ", "failed (", "stopped (")  # the lines `link` writes around a command's output


def log_lines(log: str | Path) -> list[str]:
    return Path(log).read_text(errors="replace").splitlines() if os.path.exists(log) else []


def markers(log: str | Path) -> list[str]:
    """`link`'s marker lines in a log, whole lines only (one being written waits for the next look)."""
    text = Path(log).read_text(errors="replace") if os.path.exists(log) else ""
    return [ln for ln in text.split("\n")[:-1] if ln.startswith(MARKS)]


def running(log: str | Path) -> tuple[str, int, str]:
    """The host, pid and place (where()) of the link that started last beside `log` (its `running` file); this
    host, pid 0 and no place where there is none."""
    flag = Path(log).with_name("running")
    host, pid, *at = flag.read_text().split(maxsplit=2) if flag.exists() else [socket.gethostname(), "0"]
    return host, int(pid), "".join(at).strip()


def last_line(log: str | Path) -> str:
    """The last line a command wrote to the log (its error, when it failed), for a one-line report."""
    lines = [ln.strip() for ln in log_lines(log) if ln.strip() and not ln.startswith(MARKS)]
    return lines[-1] if lines else "(no output yet)"


def state(links: list[tuple[str, list[str]]], log: str | Path) -> str:
    """done / running / stopped / failed / waiting, from the links' results and the log's markers."""
    done = sum(finished(d) for d, _ in links)
    if done == len(links):
        return "done"
    last = markers(log)
    if last and last[-1].startswith("failed"):
        return "failed"
    if last and last[-1].startswith("stopped"):
        return "stopped"  # by Ctrl-C or SIGTERM: the same command continues it
    if last and last[-1].startswith("$ "):
        host, pid, at = running(log)
        if host == socket.gethostname() and not alive(pid):
            return "stopped"  # killed: the same command continues it
        cmds = [shlex.join(c) for _, c in links]
        k = cmds.index(last[-1][2:]) + 1 if last[-1][2:] in cmds else "?"
        at = [at] * bool(at) + [f"host {host}"] * (host != socket.gethostname())
        on = f" on {', '.join(at)}" if at else ""
        return f"running {link_name(shlex.split(last[-1][2:]))} (link {k} of {len(links)}){on}"
    return f"waiting ({done} of {len(links)} links done)"


def alive(pid: int) -> bool:
    """Whether a process of this machine runs (a killed one may linger as a zombie until it is reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] not in "ZX"
    except (OSError, IndexError):
        return False


def slots(gpus: list[str], per_run: int, jobs: int, threads: int | None = None) -> list[dict[str, str]]:
    """Where runs go on this machine: per_run GPUs each (CUDA_VISIBLE_DEVICES), or without GPUs `jobs` CPU slots;
    each process of a slot (per_run under torchrun, which keeps an OMP_NUM_THREADS it is given) with `threads`
    threads (OMP_NUM_THREADS; default: the cores shared out among the processes that run at once, as otherwise
    each would start a thread per core)."""
    if gpus:
        where = [",".join(gpus[k : k + per_run]) for k in range(0, len(gpus) - per_run + 1, per_run)]
    else:
        where, per_run = [""] * jobs, 1
    threads = threads or max(1, (os.cpu_count() or 1) // (len(where) * per_run))
    return [{"CUDA_VISIBLE_DEVICES": w, "OMP_NUM_THREADS": str(threads)} for w in where]


def run_queue(
    tasks: dict[str, Callable[[dict], int]],
    where: list[dict],
    report: Callable[[str, int], None],
    pass_on: Callable[[], None] | None = None,
) -> dict[str, int]:
    """The local queue: each task(env) once a slot is free, as many at a time as there are slots; a failed task
    does not stop the others; report(name, exit code) as each ends. Ctrl-C or SIGTERM (in the main thread) starts
    no further task; a SIGTERM, which reaches this process alone, is passed on to the tasks running (pass_on), as a
    terminal's Ctrl-C reaches them itself; the queue waits for them to stop, then raises it on."""
    free: queue.Queue = queue.Queue()
    one_at_a_time = threading.Lock()  # reports print from the queue's threads: a line and its newline apart
    stopping = threading.Event()
    for slot in where:
        free.put(slot)

    def one(name: str) -> int | None:
        slot = free.get()
        try:
            if stopping.is_set():
                return None
            rc = tasks[name](slot)
        finally:
            free.put(slot)
        with one_at_a_time:
            report(name, rc)
        return rc

    with ThreadPoolExecutor(len(where)) as pool:
        started = [pool.submit(one, name) for name in tasks]
        try:
            return {name: f.result() for name, f in zip(tasks, started)}
        except KeyboardInterrupt as e:
            stopping.set()
            if isinstance(e, runlog.Terminated) and pass_on:
                pass_on()
            raise


def run_local(lines: dict[str, str], where: list[dict], report: Callable[[str, int], None]) -> dict[str, int]:
    """Every run folder's line, written to <folder>/run.sh and run with bash in the queue."""
    running: dict[str, subprocess.Popen] = {}

    def task(folder: str) -> Callable[[dict], int]:
        script = Path(folder) / "run.sh"
        script.write_text(lines[folder] + "\n")

        def start(env: dict) -> int:
            with subprocess.Popen(["bash", str(script)], env={**os.environ, **env}, stdout=subprocess.DEVNULL) as p:
                running[folder] = p
                try:
                    rc = p.wait()
                    return 128 - rc if rc < 0 else rc  # bash killed by a signal (pass_on's): as a shell says it
                finally:
                    running.pop(folder)

        return start

    def pass_on() -> None:  # to each line's running link, which passes it to its command; and to bash, which
        links = [pid for p in list(running.values()) for pid in children(p.pid)]  # would start the next link
        for pid in [*links, *(p.pid for p in list(running.values()))]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        while any(alive(pid) for pid in links):  # each says what it kept, once its command has
            time.sleep(0.05)

    return run_queue({folder: task(folder) for folder in lines}, where, report, pass_on)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux's /proc, as alive())."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(") ", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


try:  # SLURM's requeue of a timed-out or preempted job, when submitit is installed
    from submitit.helpers import Checkpointable
except ImportError:
    Checkpointable = object


class Chain(Checkpointable):
    """A submitit job: one run's shell line. As a Checkpointable, a job that times out or is preempted is
    requeued with the same line, which continues the run from its links' results and checkpoints."""

    def __call__(self, line: str) -> None:
        rc = subprocess.call(["bash", "-c", line])
        if rc < 0 or rc > 128:  # a signal: SLURM is ending the job (requeue, preemption, time limit)
            time.sleep(600)  # until it ends this process too: a result now would tell --wait the run had ended
        if rc:
            raise RuntimeError(f"the run's line exited with {rc}; its console.log says why")


# ---- the margin diagnostic of a checkpoint: its training points and its test points


def margins_path(ckpt: str | Path) -> Path:
    return Path(ckpt).with_suffix(".margins-train-test.json")


def margins(ckpt: str | Path, train_points: int = 0, points: int = 0, device: str | None = None) -> dict:
    """PGD-20 margins (losses.pgd_margins, as attack.py --margins: eval mode, step eps/4) of the first
    `train_points` (0 = all) of the training points train.py used (its split: the same held-out --val, then
    --train-limit), and of the first `points` test points (0 = all); with the training points' accuracy under the
    training attack (PGD --steps, eval-mode BN), both counted as losses.worst_of counts, and the precision they ran
    in. Written beside the checkpoint."""
    import torch

    import cli
    import models
    from data import load_data
    from losses import pgd_logits, pgd_margins, precision, worst_of

    torch.manual_seed(0)
    c = models.read(str(ckpt))
    a, dev = c["args"], cli.pick_device(device)
    model = models.from_checkpoint(c, dev)
    data = load_data(c["dataset"], a.get("data_dir", "./data"))
    split = torch.randperm(len(data["x_train"]), generator=torch.Generator().manual_seed(0))  # as train.py
    tr = split[a["val"] :][: a.get("train_limit") or None][: train_points or None]
    test = slice(0, points or None)
    out = {}
    for part, x, y in (
        ("train", data["x_train"][tr], data["y_train"][tr]),
        ("test", data["x_test"][test], data["y_test"][test]),
    ):
        m = pgd_margins(model, x.float() / 255, y, c["eps"] / 255, norm=c["norm"])  # the training norm
        out[part] = [round(v, 5) for v in m.tolist()]
    x, y = data["x_train"][tr], data["y_train"][tr]
    eps, step = c["eps"] / 255, a.get("step", 2) / 255
    z, z_adv = pgd_logits(model, x, y, eps, step, a.get("steps", 10), norm=c["norm"])
    out["train_pgd10_acc"] = int(worst_of(z, z_adv, y.to(z.device))[0].sum()) / len(x)
    out["precision"] = precision(str(dev))
    out["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    out["torch"] = torch.__version__
    models.write_json(out, str(margins_path(ckpt)))
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["link"] and len(argv) > 4 and argv[3] == "--":
        return link(argv[1], argv[2], argv[4:])
    import cli

    p = cli.parser(__doc__)
    p.add_argument("command", choices=["margins"])
    p.add_argument("checkpoint")
    p.add_argument("--train-points", type=int, default=0, help="first N of train.py's training points (default all)")
    p.add_argument("--points", type=int, default=0, help="first N test points (default all)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default cuda if available)")
    a = p.parse_args(argv)
    cli.run("runner.py margins", lambda: margins(a.checkpoint, a.train_points, a.points, a.device), "", "rerun it")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
