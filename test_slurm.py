"""submitit against a real one-node SLURM cluster (conftest.slurm_cluster; skips where SLURM is not installed).

What a requeued job does, as these tests show on SLURM 22.05 with submitit 1.5:
- Every start of a job (array task) runs the same batch script, which loads the job's ``<id>_submitted.pkl`` from
  the executor's folder and calls it; the id (SLURM_JOB_ID, ``<array>_<task>`` for arrays) survives the requeue,
  SLURM_RESTART_COUNT counts the starts after the first.
- ``scontrol requeue <id>`` (what an admin or a preemption with PreemptMode=REQUEUE does) sends SIGCONT and SIGTERM,
  which submitit's job process ignores ("Bypassing signal"), then SIGKILL: checkpoint() is NOT called, and the rerun
  calls the pickle as submitted (or as the last checkpoint() rewrote it). A resumable callable must therefore find
  its progress on disk by itself: a requeued job reruns the same resumable chain from its own files.
- SIGUSR2 to the job step (``scancel --signal=USR2 <id>``, or SLURM itself ``slurm_signal_delay_s`` (90) seconds
  before the time limit) makes submitit call the callable's checkpoint(), pickle the DelayedSubmission it returns
  over ``<id>_submitted.pkl``, and requeue the job itself (``scontrol requeue``); the rerun calls that.
- A requeued job starts again no sooner than AuthInfo's cred_expire (120 s by default, 5 s here) after it ended,
  and ending takes SLURM at least 5 s when the process ignores SIGTERM.
Without accounting (no slurmdbd) sacct fails: submitit warns on each poll and reports the state UNKNOWN, so it cannot
tell a job that died without a result from a running one; these tests wait for results with a deadline.
"""

import os
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")

HERE = Path(__file__).resolve().parent


def _executor(cluster, folder: Path) -> "submitit.AutoExecutor":
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # chdir: the job unpickles this module's classes by reference, so it imports them from here.
    executor.update_parameters(
        slurm_partition=cluster.partition,
        timeout_min=10,
        cpus_per_task=1,
        mem_gb=1,
        slurm_additional_parameters={"chdir": str(HERE)},
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
            time.sleep(600)
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
    """scontrol requeue reruns the pickle as submitted; SIGUSR2 reruns what checkpoint() returned."""
    executor = _executor(slurm_cluster, tmp_path / "jobs")
    requeued, signalled = tmp_path / "requeued", tmp_path / "signalled"
    jobs = [executor.submit(Chain(), str(requeued)), executor.submit(Chain(), str(signalled))]
    _wait_for(requeued)
    _wait_for(signalled)
    slurm_cluster.run("scontrol", "requeue", jobs[0].job_id)
    slurm_cluster.run("scancel", "--signal=USR2", jobs[1].job_id)
    assert _result(jobs[0]) == ["checkpoints=0 restarts=0", "checkpoints=0 restarts=1"]
    assert _result(jobs[1]) == ["checkpoints=0 restarts=0", "checkpoints=1 restarts=1"]
