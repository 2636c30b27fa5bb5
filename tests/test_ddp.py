"""train.py under torchrun (2 CPU processes, gloo): DDP equals a single-process run over the same global batch; and
each process's device (cli.setup, with torchrun's environment and the GPUs faked).

Where the two runs cannot agree by design, the equivalence runs remove the cause rather than loosen the check:
  - BatchNorm: SyncBatchNorm needs CUDA, so every BatchNorm normalizes with its running statistics (eval
    mode; its weight and bias still train) and no per-rank batch can change it.
  - PGD's random start is drawn on each rank from the same seed, not as a slice of the single-process draw,
    so they use --eps 0: the attack still runs (forward and input gradient) but returns the clean images.
  - SOVR picks its OVR samples within each rank's shard, so they use --loss ce, a mean over the global batch; a
    SOVR pair checks that per-shard switch against one process that switches within each half of its batch.
A further run keeps the default model and loss and checks that all ranks end with the same weights and BatchNorm
statistics. The runs go through a launcher that changes nothing in train.py's logic: it swaps the BatchNorm
class when asked, saves each rank's weights before train.test reloads best.pt, and draws no curves.png.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import child_pythonpath


def aux_file(path: Path) -> str:
    """Generated images in DM-Improves-AT's format: `image` uint8 N x 32 x 32 x 3, `label`."""
    rng = np.random.default_rng(1)
    np.savez(path, image=(rng.random((100, 32, 32, 3)) * 255).astype(np.uint8), label=np.arange(100) % 10)
    return str(path)


LAUNCHER = '''
import os, sys
import torch
import torch.distributed as dist
import torch.nn.functional as F
import runlog
import train

runlog.curves = lambda out, title: None  # no test here reads curves.png, and each run would spend a second drawing it


class EvalModeBN(torch.nn.BatchNorm2d):
    """Normalizes with its running statistics in train mode too, so no batch can change its output."""
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


if os.environ["TEST_EVAL_BN"] == "1":
    torch.nn.BatchNorm2d = EvalModeBN  # models.py looks the class up when it builds a model

if os.environ.get("TEST_SOVR_SHARDS"):  # one process doing what torchrun's ranks do: SOVR switches within each shard
    import losses
    from sovr import sovr_loss
    shards = int(os.environ["TEST_SOVR_SHARDS"])
    losses.sovr_loss = lambda z, y, ratio: torch.stack([sovr_loss(a, b, ratio) for a, b in zip(z.chunk(shards),
                                                                                               y.chunk(shards))]).mean()


if os.environ.get("TEST_NAN_RANK"):  # one process's loss turns NaN in the second epoch
    import losses
    ce = losses.OBJECTIVES["ce"]

    def nan_on_one_rank(net, atk, x, y, args, epoch):
        loss, z = ce(net, atk, x, y, args, epoch)
        return (loss * float("nan") if epoch == 1 and dist.get_rank() == int(os.environ["TEST_NAN_RANK"]) else loss), z

    losses.OBJECTIVES["ce"] = nan_on_one_rank


def final_report(args, model, *rest):
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(model.state_dict(), os.path.join(args.out, f"weights-rank{rank}.pt"))
    return report(args, model, *rest)


report, train.test = train.test, final_report
train.main(sys.argv[1:])
'''

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def start(
    tmp: Path,
    name: str,
    nproc: int,
    eval_bn: bool,
    *flags: str,
    launch: bool = False,
    sovr_shards: int = 0,
    nan_rank: int | None = None,
) -> tuple[Path, subprocess.Popen]:
    """Starts train.py (through the launcher) on nproc CPU processes (torchrun for nproc > 1 or launch);
    finish() waits for it. A --device among the flags overrides the CPU."""
    launcher, out = tmp / f"launch-{name}.py", tmp / name  # one file a run: a rewrite must not race a start
    launcher.write_text(LAUNCHER)
    outer = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # in case pytest runs under torchrun
    env = {k: v for k, v in os.environ.items() if k not in outer}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=child_pythonpath(),
        TEST_EVAL_BN="1" if eval_bn else "0",
        TEST_SOVR_SHARDS=str(sovr_shards or ""),
        TEST_NAN_RANK="" if nan_rank is None else str(nan_rank),
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (torchrun if nproc > 1 or launch else [sys.executable]) + [
        str(launcher),
        "--smoke",
        "--device",
        "cpu",
        "--out",
        str(out),
        *flags,
    ]
    return out, subprocess.Popen(
        cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )  # its own process group, for stop()


def finish(out: Path, proc: subprocess.Popen) -> Path:
    output, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{output}"
    return out


def stop(proc: subprocess.Popen) -> None:
    """Ends the job and the workers torchrun started for it, if it is still running."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def weights(out: Path, rank: int) -> dict:
    return torch.load(out / f"weights-rank{rank}.pt", weights_only=True)


def log(out: Path) -> list[dict]:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return recs[:-1] + list(recs[-1]["final"].values())  # one record per epoch, then best.pt's and last.pt's test


def assert_checkpoints(out: Path, trained: dict) -> None:
    for name in ("last.pt", "best.pt"):
        state = torch.load(out / name, weights_only=True)["model"]
        assert not [k for k in state if k.startswith("module.")], f"{name} keys carry DDP's module. prefix"
        assert state.keys() == trained.keys()
    for k, v in torch.load(out / "last.pt", weights_only=True)["model"].items():
        assert torch.equal(v, trained[k].cpu()), f"last.pt differs from the trained weights at {k}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The runs, side by side: DDP and one process with eval-mode BN, for CE and for SOVR (one process once with
    the switch within each half of the batch, once over the whole batch), and DDP with the default model."""
    tmp, eq, sovr = tmp_path_factory.mktemp("ddp"), ("--loss", "ce", "--eps", "0"), ("--loss", "sovr", "--eps", "0")
    jobs = dict(
        ddp=start(tmp, "ddp", 2, True, *eq),
        single=start(tmp, "single", 1, True, *eq),
        ddp_bn=start(tmp, "ddp_bn", 2, False, "--epochs", "1", "--ema", "--aux-data", aux_file(tmp / "aux.npz")),
        ddp_sovr=start(tmp, "ddp_sovr", 2, True, *sovr),
        halves=start(tmp, "halves", 1, True, *sovr, sovr_shards=2),
        whole=start(tmp, "whole", 1, True, *sovr),
    )
    try:
        return {name: finish(*job) for name, job in jobs.items()}
    finally:
        for _, proc in jobs.values():
            stop(proc)


def test_ddp_equals_single_process_run(runs: dict[str, Path]) -> None:
    ddp, single = runs["ddp"], runs["single"]
    w0, w1, ref = weights(ddp, 0), weights(ddp, 1), weights(single, 0)
    assert w0.keys() == w1.keys() == ref.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks differ at {k}"
        torch.testing.assert_close(w0[k], ref[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert_checkpoints(ddp, w0)
    for a, b in zip(log(ddp), log(single)):  # validation and test accuracy, sharded and summed over ranks
        for k in ("val_clean", "val_pgd", "test_clean", "test_pgd"):
            assert k not in a or abs(a[k] - b[k]) <= 0.02, (k, a, b)
        for k in ("train_loss", "train_adv_acc"):  # the logged training figures are over every rank's shard
            assert k not in a or a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a, b)


def test_ddp_sovr_switches_within_each_ranks_shard(runs: dict[str, Path]) -> None:
    """Under torchrun SOVR's OVR samples are the round(ratio * B_local) smallest margins of each rank's shard: the
    same weights as one process switching within each half of the batch, other weights than one whole-batch switch."""
    ddp, halves, whole = (weights(runs[k], 0) for k in ("ddp_sovr", "halves", "whole"))
    for k in ddp:
        torch.testing.assert_close(ddp[k], halves[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert any(not torch.allclose(ddp[k], whole[k], rtol=1e-3, atol=1e-4) for k in ddp if ddp[k].is_floating_point())


def test_ddp_ranks_agree_with_train_mode_batchnorm(runs: dict[str, Path]) -> None:
    """Default model and loss, with weight averaging and generated data: the average's weights and BatchNorm
    statistics end the same on every rank."""
    w0, w1 = weights(runs["ddp_bn"], 0), weights(runs["ddp_bn"], 1)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks differ at {k}"
    assert_checkpoints(runs["ddp_bn"], w0)


def test_a_nan_on_one_rank_stops_every_rank_with_one_line(tmp_path: Path) -> None:
    """The processes agree on the finite check: none waits in a collective for one that has stopped."""
    out, proc = start(tmp_path, "nan", 2, False, "--loss", "ce", nan_rank=1)
    try:
        output, _ = proc.communicate(timeout=150)
    finally:
        stop(proc)
    assert proc.returncode != 0 and output.count("train.py: error:") == 1, output
    assert "train.py: error: loss is not finite on another process at epoch 2, step 1;" in output, output
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_ctrl_c_under_torchrun_is_said_once(tmp_path: Path) -> None:
    out, proc = start(tmp_path, "ctrl-c", 2, False, "--epochs", "50")
    try:
        while proc.poll() is None and not (out / "last.pt").exists():
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to torchrun and its processes
        output, _ = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert output.count("train.py: interrupted;") == 1, output
    assert "last.pt keeps the last finished epoch (continue with --resume)" in output, output


STALE = """
import json, os, sys
import torch
import cli, data, models, train

out = sys.argv[1]
device, rank, world = cli.setup("cpu")
args, d = train.get_args(["--smoke", "--device", "cpu", "--out", out]), data.load_data("synthetic", "")
model, read, reports = models.load(os.path.join(out, "best.pt")), models.read, []


def stale(path, flag=None):  # this process's copy of last.pt is another epoch's (a stale file on its node)
    state = read(path, flag)
    if path.endswith("last.pt"):
        weights = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
        state = {**state, "epoch": 1, "model": weights}
    return state


for differs in (False, True):
    models.read = stale if differs and rank == 1 else read
    reports.append(train.test(args, model, model, d, lambda *a: None, rank))
try:
    train.same_run(rank, start=2, epochs=2 + rank)
except ValueError as e:
    reports.append(str(e))
with open(os.path.join(out, f"reports-rank{rank}.json"), "w") as f:
    json.dump(reports, f)
torch.distributed.destroy_process_group()  # as cli.run does: a gloo process that exits without it may abort
"""


def untimed(report: dict) -> dict:
    return {name: {k: v for k, v in rec.items() if k != "test_time"} for name, rec in report.items()}


def test_rank_0s_reads_decide_every_collective(tmp_path: Path) -> None:
    """Rank 1 reads another last.pt than rank 0 (a stale copy): rank 0 decides whether last.pt is tested again and
    every rank tests rank 0's weights, so both end (none waits in a collective the other skipped) with the figures
    of the test where the reads agree; loop bounds that differ from rank 0's end the differing rank in one line."""
    import data
    import models
    import runlog
    import train

    args, d = train.get_args(["--smoke", "--device", "cpu"]), data.load_data("synthetic", "")
    model = models.build(args.arch, d["num_classes"], d["mean"], d["std"], args.width)
    for name in ("best.pt", "last.pt"):  # the last epoch was the best: one test
        models.save(runlog.checkpoint(model, args, d, 2, {}), str(tmp_path / name))
    (tmp_path / "stale.py").write_text(STALE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=child_pythonpath(), SOVR_DIST_TIMEOUT="30", MASTER_ADDR="127.0.0.1")
    env.update(MASTER_PORT=str(port), WORLD_SIZE="2")
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "stale.py"), str(tmp_path)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for r in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            stop(p)
    assert [p.returncode for p in procs] == [0, 0], outputs
    rank0, rank1 = (json.loads((tmp_path / f"reports-rank{r}.json").read_text()) for r in (0, 1))
    assert untimed(rank0[0]) == untimed(rank0[1]) == untimed(rank1[0]) == untimed(rank1[1])
    assert rank0[1]["last"]["epoch"] == 2 and rank0[1]["last"]["same_weights_as"] == "best.pt"
    assert len(rank0) == 2 and rank1[2] == (
        "process 1 read another run than process 0: epochs 3 (process 0: 2); a stale last.pt, log.jsonl or data "
        "file on its node? Run again once every node sees the same files"
    )


@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs CUDA and NCCL")
def test_nccl_one_process_trains_and_resumes(tmp_path: Path) -> None:
    out = finish(*start(tmp_path, "nccl", 1, False, "--device", "cuda", "--stop-after", "1", launch=True))
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    finish(*start(tmp_path, "nccl", 1, False, "--device", "cuda", "--resume", launch=True))
    assert [r["epoch"] for r in log(out)[:2]] == [1, 2] and len(log(out)) == 4  # 2 epochs, then best.pt and last.pt
    assert_checkpoints(out, weights(out, 0))


@pytest.fixture
def torchrun_env(monkeypatch):
    """cli.setup as a torchrun process of LOCAL_RANK `local` on a machine showing `gpus` GPUs: the process group's
    start and torch.cuda.set_device are recorded, not run."""
    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(device))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # setup sets it

    def at(local: int, gpus: int) -> list:
        monkeypatch.setenv("RANK", str(local))
        monkeypatch.setenv("LOCAL_RANK", str(local))
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus))))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        return calls

    return at


@pytest.mark.parametrize(
    "name, local, gpus, device, backend",
    [(None, 1, 2, "cuda:1", "nccl"), ("cuda", 1, 2, "cuda:1", "nccl"), ("cpu", 1, 2, "cpu", "gloo"),
     (None, 1, 0, "cpu", "gloo")],
)  # fmt: skip
def test_torchrun_process_takes_the_gpu_of_its_local_rank_or_the_cpu(torchrun_env, name, local, gpus, device, backend):
    import cli

    calls = torchrun_env(local, gpus)
    assert cli.setup(name)[0] == torch.device(device)
    assert calls == [backend, *[torch.device(device)] * (backend == "nccl")]


@pytest.mark.parametrize(
    "name, local, gpus, says",
    [
        ("cuda:3", 0, 8, "--device cuda:3 under torchrun: each process takes the GPU of its LOCAL_RANK; give --device "
         "cuda, cpu (gloo) or none, and choose the GPUs with CUDA_VISIBLE_DEVICES"),
        (None, 4, 2, "LOCAL_RANK 4, but this process sees 2 GPUs (CUDA_VISIBLE_DEVICES 0,1): start at most 2 "
         "processes a node (torchrun --nproc_per_node)"),
        ("cuda", 2, 2, "LOCAL_RANK 2, but this process sees 2 GPUs"),
        ("cuda", 0, 0, "--device cuda: no such CUDA device on this machine"),
    ],
)  # fmt: skip
def test_torchrun_device_refusals_are_one_line(torchrun_env, tmp_path: Path, name, local, gpus, says) -> None:
    """An explicit GPU (torchrun gives each process its own) and a LOCAL_RANK beyond the visible GPUs end in one
    line before the process group starts, where the device was ignored and torch.cuda.set_device raised."""
    import train

    calls = torchrun_env(local, gpus)
    with pytest.raises(SystemExit) as e:
        train.main(["--smoke", *["--device", name] * bool(name), "--out", str(tmp_path / "run")])
    msg = e.value.code
    assert msg.startswith("train.py: error: ") and says in msg and "\n" not in msg, msg
    assert calls == []  # refused before the process group
