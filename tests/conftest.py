"""Fixtures shared by the test files: the CUDA marker's helpers (CUDA tests skip cleanly without a GPU), a
subprocess's PYTHONPATH (child_pythonpath) and a real one-node SLURM cluster (slurm_cluster; skips cleanly where
SLURM is not installed)."""

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


def child_pythonpath() -> str:
    """PYTHONPATH for a test's python subprocess: the project first, then whatever was there (the GPU check carries
    pyautoattack's files on PYTHONPATH on a machine where it is not installed: a subprocess needs them too)."""
    return os.pathsep.join([str(Path(__file__).resolve().parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])])


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """fp32 on CUDA means fp32 for the test: TF32 convolutions would round inputs to 10 mantissa bits."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture
def cap_gpu_memory() -> Iterator[Callable[[int], None]]:
    """cap(mib) limits this process's CUDA memory to what it holds now plus mib; lifted after the test."""

    def cap(mib: int) -> None:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + mib * 2**20) / total)

    yield cap
    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.fixture
def full_disk(monkeypatch) -> Callable[[int, str], None]:
    """full_disk(code, match): the one low-level writer of every file (runlog._write_all) writes half of a file
    whose path holds `match`, then fails with OSError(code), as a full disk (ENOSPC) or an exceeded quota (EDQUOT)
    does; other files are written as ever."""
    import runlog

    real = runlog._write_all

    def fail(code: int, match: str) -> None:
        def write_all(fd: int, data) -> None:
            if match not in os.readlink(f"/proc/self/fd/{fd}"):
                return real(fd, data)
            real(fd, bytes(data[: len(data) // 2]))
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(runlog, "_write_all", write_all)

    return fail


@pytest.fixture
def sigterm_fails_the_test() -> Iterator[None]:
    """A SIGTERM that the code under test leaves unhandled fails the test, rather than end the test session."""

    def unhandled(*a):
        raise AssertionError("SIGTERM reached the test process unhandled")

    before = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, before)


# A real one-node SLURM cluster for the tests that submit jobs (Debian: apt-get install slurm-wlm munge).
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")


@dataclass(frozen=True)
class SlurmCluster:
    """The session's cluster. conf: its slurm.conf; partition: the one (default) partition, holding the one node
    with cpus CPUs; env: what a subprocess needs on top of os.environ (SLURM_CONF); folder: its state, spool and logs
    (munged.log, slurmctld.log, slurmd.log, and <daemon>.out for what a daemon says before its log is open)."""

    conf: Path
    partition: str
    node: str
    cpus: int
    folder: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 30) -> str:
        """A SLURM client command (scontrol, squeue, scancel, ...) against this cluster; its stdout."""
        done = subprocess.run(args, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
        return done.stdout


def _free_ports(n: int) -> list[int]:
    """n distinct ports free now: each run its own, so a leftover cluster of a killed session cannot answer."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _daemon(stack: ExitStack, args: list[str], log: Path) -> subprocess.Popen:
    """Starts a daemon in the foreground (so its pid is ours to stop), stopped by that pid when the stack closes,
    or by the kernel (SIGTERM) when this process dies first (a slurmd whose job still runs then lingers)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGTERM),
        )

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    stack.callback(stop)
    return proc


def _wait(ready: Callable[[], bool], what: str, procs: list[subprocess.Popen], folder: Path, s: float) -> None:
    """Polls ready() until true; a dead daemon or s seconds without it fail with the tails of the daemons' logs."""
    deadline = time.monotonic() + s
    while not ready():
        dead = [Path(p.args[0]).name for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = sorted([*folder.glob("*.log"), *folder.glob("*.out")])
            tails = "".join(f"--- {log}\n" + "".join(log.read_text().splitlines(True)[-15:]) for log in logs)
            why = f"{', '.join(dead)} died" if dead else f"not within {s:.0f} s"
            raise RuntimeError(f"SLURM test cluster: {what} ({why})\n{tails}")
        time.sleep(0.1)


def _slurm_conf(folder: Path, node_line: str, node: str, partition: str, ports: list[int]) -> str:
    # cred_expire (at least 5) is also how long a requeued job waits before it starts again (default 120).
    # No cgroups in containers: processes are tracked through /proc, tasks are not confined.
    return f"""\
ClusterName=pytest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder / "munge.socket"},cred_expire=5
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd.pid"}
SlurmctldLogFile={folder / "slurmctld.log"}
SlurmdLogFile={folder / "slurmd.log"}
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=1
MinJobAge=10
InactiveLimit=0
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
"""


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A one-node SLURM cluster (munged, slurmctld, slurmd as root) of this session, its node idle; SLURM_CONF is set
    for the session. Skips where SLURM or munge is not installed. Every daemon it starts is stopped by its pid."""
    sbin = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = {p: shutil.which(p, path=sbin) for p in _SLURM_PROGRAMS}
    if missing := [p for p, path in found.items() if path is None]:
        pytest.skip(f"SLURM is not installed (no {', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("a SLURM test cluster runs its slurmd as root")
    folder = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    key = os.open(folder / "munge.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    os.write(key, os.urandom(1024))
    os.close(key)
    # slurmd -C: this machine's CPUs, sockets, cores and RealMemory as slurmd itself will report them.
    node_line = subprocess.run([found["slurmd"], "-C"], capture_output=True, text=True, check=True).stdout
    node_line = node_line.splitlines()[0]
    node, cpus = node_line.split()[0].removeprefix("NodeName="), int(re.search(r"CPUs=(\d+)", node_line)[1])
    partition, conf = "debug", folder / "slurm.conf"
    conf.write_text(_slurm_conf(folder, node_line, node, partition, _free_ports(2)))
    cluster = SlurmCluster(conf, partition, node, cpus, folder, {"SLURM_CONF": str(conf)})
    with ExitStack() as stack, pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(conf))
        # -f: munged refuses a socket below a folder that not everyone can enter, as pytest's are; -F logs to stderr.
        files = {"key-file": "munge.key", "socket": "munge.socket", "pid-file": "munged.pid", "seed-file": "munge.seed"}
        munged = [found["munged"], "-F", "-f", *(f"--{option}={folder / name}" for option, name in files.items())]
        procs = [_daemon(stack, munged, folder / "munged.log")]
        _wait((folder / "munge.socket").exists, "munged did not start", procs, folder, 30)
        for daemon in ("slurmctld", "slurmd"):  # their logs: <daemon>.log, and <daemon>.out before the log is open
            procs.append(_daemon(stack, [found[daemon], "-D", "-f", str(conf)], folder / f"{daemon}.out"))
        stack.callback(_cancel_jobs, cluster, procs[1])

        def idle() -> bool:
            try:
                return cluster.run("sinfo", "-h", "-N", "-n", node, "-o", "%T").strip() == "idle"
            except (RuntimeError, subprocess.TimeoutExpired):
                return False

        _wait(idle, f"node {node} not idle", procs, folder, 60)
        yield cluster


def _cancel_jobs(cluster: SlurmCluster, slurmctld: subprocess.Popen) -> None:
    """Cancels the cluster's jobs and waits for them to end, so that no job step outlives the daemons."""
    if slurmctld.poll() is not None:
        return  # nobody left to ask, and the job steps' daemons cannot reach it either
    try:
        cluster.run("scancel", f"--partition={cluster.partition}")
        deadline = time.monotonic() + 30
        while cluster.run("squeue", "-h", "-o", "%i").strip() and time.monotonic() < deadline:
            time.sleep(0.2)
    except (RuntimeError, subprocess.TimeoutExpired):
        pass  # the controller stopped answering: the daemons are stopped all the same
