"""End-to-end train.py runs on synthetic data and the real CIFAR-10 subset; resume; clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import losses
import models
import train

HERE = Path(__file__).resolve().parent
SUBSET = HERE.parent / "shared" / "data" / "cifar10_subset.npz"
SMOKE = ["--smoke", "--device", "cpu"]


def run(*argv) -> None:
    train.main([str(a) for a in argv])


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def rebuild(ckpt: dict) -> torch.nn.Module:
    m = models.build(ckpt["arch"], ckpt["num_classes"], ckpt["mean"], ckpt["std"], ckpt["width"])
    m.load_state_dict(ckpt["model"])
    return m.eval()


@pytest.mark.parametrize("loss", ["ce", "sovr"])
def test_smoke_run_writes_checkpoints_that_rebuild_the_model(tmp_path: Path, loss: str) -> None:
    run(*SMOKE, "--loss", loss, "--out", tmp_path)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records[:-1]] == [1, 2] and "final" in records[-1]
    ckpt = load(tmp_path / "last.pt")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert ckpt["eps"] == 8 and ckpt["args"]["loss"] == loss and ckpt["epoch"] == 2
    # The rebuilt model reproduces the test accuracy that train.py reported for last.pt.
    data = train.load_data("synthetic", "")
    with torch.no_grad():
        acc = (rebuild(ckpt)(data["x_test"].float() / 255).argmax(1) == data["y_test"]).float().mean().item()
    assert acc == pytest.approx(records[-1]["final"]["last"]["test_clean"], abs=1e-6)
    assert load(tmp_path / "best.pt")["metrics"]["val_pgd"] == max(r["val_pgd"] for r in records[:-1])


@pytest.mark.skipif(not SUBSET.exists(), reason="../shared/data/cifar10_subset.npz not present")
def test_real_subset_trains(tmp_path: Path) -> None:
    run("--dataset", SUBSET, "--arch", "wrn16", "--width", 1, "--train-limit", 128, "--val", 64, "--epochs", 1,
        "--batch", 64, "--steps", 2, "--eval-steps", 2, "--device", "cpu", "--out", tmp_path)
    ckpt = load(tmp_path / "best.pt")
    assert ckpt["num_classes"] == 10 and ckpt["dataset"] == str(SUBSET)
    assert ckpt["mean"] == pytest.approx(models.STATS["cifar10"][0], abs=0.02)


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    run(*SMOKE, "--out", tmp_path / "a")
    run(*SMOKE, "--out", tmp_path / "b", "--stop-after", 1)
    assert load(tmp_path / "b" / "last.pt")["epoch"] == 1
    run(*SMOKE, "--out", tmp_path / "b", "--resume")
    a, b = load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def expect_error(capsys, argv: list, match: str) -> None:
    with pytest.raises(SystemExit) as e:
        run(*argv)
    msg = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err
    assert e.value.code != 0 and match in msg, msg


@pytest.mark.parametrize("argv, match", [
    (["--arch", "vgg"], "invalid choice: 'vgg'"),
    (["--loss", "hinge"], "invalid choice: 'hinge'"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--dataset", "missing.npz"], "no such dataset file"),
    (["--ratio", "1.5"], "--ratio must lie in [0, 1]"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--val", "5000"], "--val must lie in"),
    (["--resume"], "no checkpoint at"),
    (["--device", "gpu"], "--device 'gpu' is not a device name"),
    (["--width", "0"], "--width must be >= 1"),
    (["--eps", "-8"], "--eps must be >= 0"),
    (["--device", "cuda:7"], "no such CUDA device"),
])
def test_bad_input_gives_one_clear_line(tmp_path: Path, capsys, argv: list, match: str) -> None:
    expect_error(capsys, [*SMOKE, "--out", tmp_path, *argv], match)


@pytest.mark.parametrize("arrays, match", [
    (dict(x_train=np.zeros((4, 3, 8, 8), np.uint8)), "lacks array"),
    (dict(x_train=np.zeros((4, 3, 8, 8), np.float32), y_train=np.zeros(4), x_test=np.zeros((2, 3, 8, 8), np.uint8),
          y_test=np.zeros(2)), "must be uint8"),
])
def test_malformed_npz(tmp_path: Path, capsys, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    expect_error(capsys, [*SMOKE, "--dataset", tmp_path / "bad.npz", "--out", tmp_path / "o"], match)
    (tmp_path / "junk.npz").write_text("not an npz")
    expect_error(capsys, [*SMOKE, "--dataset", tmp_path / "junk.npz", "--out", tmp_path / "o"], "not a readable .npz")


def test_resume_from_other_configuration_and_unwritable_out(tmp_path: Path, capsys) -> None:
    run(*SMOKE, "--out", tmp_path, "--stop-after", 1)
    expect_error(capsys, [*SMOKE, "--out", tmp_path, "--resume", "--lr", "0.05"], "was trained with --lr 0.1, not 0.05")
    (tmp_path / "file").write_text("")
    expect_error(capsys, [*SMOKE, "--out", tmp_path / "file" / "sub"], "Not a directory")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, capsys, monkeypatch) -> None:
    def nan_in_second_epoch(net, atk, x, y, args, epoch):
        loss, z = losses.ce(net, atk, x, y, args, epoch)
        return (loss * float("nan") if epoch == 1 else loss), z
    monkeypatch.setitem(losses.OBJECTIVES, "ce", nan_in_second_epoch)
    expect_error(capsys, [*SMOKE, "--loss", "ce", "--out", tmp_path], "loss is nan at epoch 2, step 1")
    ckpt = load(tmp_path / "last.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_cli_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(HERE / "train.py"), "--dataset", "missing.npz", "--out", str(tmp_path)],
                       capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode != 0 and p.stderr.strip() == "train.py: error: no such dataset file: missing.npz"
