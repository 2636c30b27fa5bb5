"""submitit against a real one-node SLURM cluster (conftest.slurm_cluster; skips where SLURM is not installed).

Without accounting (no slurmdbd) sacct fails: submitit warns at each poll and reports the state UNKNOWN, so it cannot
tell a job that died without a result from a running one; these tests wait for results with a deadline. A request
the node cannot satisfy (more CPUs than it has, nodes=2) is accepted and pends for ever; one for GPUs (gpus_per_node,
slurm_gres) fails at submission (no GRES on this node).
"""

import os
import sys
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "results"))
import compare  # noqa: E402


def _executor(cluster, folder: Path) -> "submitit.AutoExecutor":
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # chdir: the job unpickles this module's classes by reference, so it imports them from its folder.
    executor.update_parameters(
        slurm_partition=cluster.partition,
        timeout_min=10,
        cpus_per_task=1,
        mem_gb=1,
        slurm_additional_parameters={"chdir": str(Path(__file__).resolve().parent)},
    )
    return executor


def _result(job, timeout: float = 90):
    """job.result() once the job wrote it: submitit, blind without sacct, would wait forever on a dead job."""
    deadline = time.monotonic() + timeout
    while not job.paths.result_pickle.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"SLURM job {job.job_id} wrote no result within {timeout} s:\n{job.stderr()}")
        time.sleep(0.2)
    return job.result()


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.1)


class Chain(submitit.helpers.Checkpointable):
    """Logs each start (checkpoint() calls so far, SLURM's restart count) to marker; the first start sleeps until
    it is stopped, the next returns every start's line."""

    def __init__(self) -> None:
        self.checkpoints = 0

    def __call__(self, marker: str) -> list[str]:
        with open(marker, "a") as f:
            f.write(f"checkpoints={self.checkpoints} restarts={os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
        starts = Path(marker).read_text().splitlines()
        if len(starts) == 1:
            time.sleep(120)
        return starts

    def checkpoint(self, marker: str) -> "submitit.helpers.DelayedSubmission":
        self.checkpoints += 1
        return super().checkpoint(marker)


def test_submit_returns_the_result(slurm_cluster, tmp_path):
    job = _executor(slurm_cluster, tmp_path / "jobs").submit(pow, 2, 5)
    assert _result(job) == 32


def test_job_array(slurm_cluster, tmp_path):
    jobs = _executor(slurm_cluster, tmp_path / "jobs").map_array(pow, [2, 3], [3, 2])
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1  # one array, two tasks
    assert [_result(job) for job in jobs] == [8, 9]


def test_requeue_reruns_the_submitted_callable(slurm_cluster, tmp_path):
    """A requeued job reruns the same resumable chain: scontrol requeue reruns the pickle as submitted, SIGUSR2 what
    checkpoint() returned (SLURM 22.05, submitit 1.5).

    - Each start of a job (or array task) runs the same batch script, which loads ``<id>_submitted.pkl`` from the
      executor's folder and calls it. The id (SLURM_JOB_ID; ``<array>_<task>`` for arrays) survives the requeue;
      SLURM_RESTART_COUNT counts the starts after the first. JobRequeue=1 (or sbatch --requeue) allows requeueing.
    - ``scontrol requeue <id>`` (an admin, or a preemption with PreemptMode=REQUEUE) sends SIGCONT and SIGTERM, which
      submitit's job process ignores ("Bypassing signal SIGTERM"), then SIGKILL: checkpoint() is NOT called, the rerun
      calls the pickle as submitted (or as the last checkpoint() rewrote it). So a resumable callable must find its
      progress in its own files, whatever its checkpoint() does.
    - SIGUSR2 to the job step (``scancel --signal=USR2 <id>``; SLURM sends it itself slurm_signal_delay_s, default
      90, seconds before the time limit) makes submitit call checkpoint(), pickle the DelayedSubmission it returns
      over ``<id>_submitted.pkl`` and requeue the job itself (``scontrol requeue``, with the job's SLURM_CONF).
    - A requeued job starts again no sooner than AuthInfo's cred_expire (120 s by default, 5 s here) after it ended,
      and ending takes SLURM at least 5 s when the process ignores SIGTERM.
    """
    executor = _executor(slurm_cluster, tmp_path / "jobs")
    requeued, signalled = tmp_path / "requeued", tmp_path / "signalled"
    jobs = [executor.submit(Chain(), str(requeued)), executor.submit(Chain(), str(signalled))]
    _wait_for(requeued)
    _wait_for(signalled)
    slurm_cluster.run("scontrol", "requeue", jobs[0].job_id)
    slurm_cluster.run("scancel", "--signal=USR2", jobs[1].job_id)
    assert _result(jobs[0]) == ["checkpoints=0 restarts=0", "checkpoints=0 restarts=1"]
    assert _result(jobs[1]) == ["checkpoints=0 restarts=0", "checkpoints=1 restarts=1"]


@pytest.mark.parametrize(
    "flags, reason, change",
    [
        ([], "Invalid generic resource (gres) specification", "--gpus-per-run 0"),  # the node has no GPUs
        (["--gpus-per-run", "0", "--partition", "nope"], "nope", "--partition"),
    ],
)
def test_an_sbatch_refusal_is_one_line_naming_the_flag(slurm_cluster, tmp_path, capsys, flags, reason, change):
    """compare.py --slurm on a request sbatch refuses: sbatch's own reason and the flag to change, in one line."""
    argv = ["--slurm", "--out", str(tmp_path / "g"), "--losses", "ce", "--seeds", "0", *flags, "--", "--smoke"]
    with pytest.raises(SystemExit) as e:
        compare.main(argv)
    said = str(e.value.code)
    assert said.startswith("compare.py: error: sbatch: error: ") and reason in said and change in said, said
    assert "\n" not in said and capsys.readouterr().err == ""  # submitit's copy of sbatch's stderr is not shown


def test_each_refusal_names_its_flag():
    """sbatch's reasons this cluster cannot produce (no accounting, no limits), as submitit raises them."""
    for reason, use in [
        ("Invalid account or account/partition combination specified", "another --account"),
        ("Requested time limit is invalid (missing or exceeds some limit)", "a shorter --time"),
        ("Memory required by task is not available", "less --mem"),
        ("Requested node configuration is not available", "fewer --cpus-per-run, less --mem or another --constraint"),
        ("Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)", None),
    ]:
        said = compare.refusal(f"sbatch: error: Batch job submission failed: {reason}\n")
        assert said == f"sbatch: error: Batch job submission failed: {reason}" + (f"; use {use}" if use else "")
