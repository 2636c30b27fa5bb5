"""End-to-end train.py runs on synthetic data and the real CIFAR-10 subset; resume; clear errors."""

import argparse
import copy
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import flags as policy  # "flags" names the lists of flags in these tests
import losses
import models
import runlog
import train

HERE = Path(__file__).resolve().parent.parent
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
    d = data.load_data("synthetic", "")
    with torch.no_grad():
        acc = (rebuild(ckpt)(d["x_test"].float() / 255).argmax(1) == d["y_test"]).float().mean().item()
    assert acc == pytest.approx(records[-1]["final"]["last"]["test_clean"], abs=1e-6)
    loaded = models.load(str(tmp_path / "last.pt"))  # the one-call loader gives the same model, in eval mode
    assert not loaded.training and all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), rebuild(ckpt).state_dict().values())
    )
    assert load(tmp_path / "best.pt")["metrics"]["val_pgd"] == max(r["val_pgd"] for r in records[:-1])


def test_default_val_holds_out_half_of_a_small_training_set(tmp_path: Path) -> None:
    """The synthetic set's 1,000 training images with every default but the run's length: 500 held out."""
    run(
        "--dataset",
        "synthetic",
        "--epochs",
        "1",
        "--width",
        "8",
        "--steps",
        "1",
        "--eval-steps",
        "1",
        "--out",
        tmp_path,
    )
    assert load(tmp_path / "last.pt")["args"]["val"] == 500  # --resume and results/runner.py read it back


@pytest.mark.skipif(not SUBSET.exists(), reason="../shared/data/cifar10_subset.npz not present")
def test_real_subset_trains(tmp_path: Path) -> None:
    run(
        "--dataset",
        SUBSET,
        "--arch",
        "wrn16",
        "--width",
        1,
        "--train-limit",
        128,
        "--val",
        64,
        "--epochs",
        1,
        "--batch",
        64,
        "--steps",
        2,
        "--eval-steps",
        2,
        "--device",
        "cpu",
        "--out",
        tmp_path,
    )
    ckpt = load(tmp_path / "best.pt")
    assert ckpt["num_classes"] == 10 and ckpt["dataset"] == str(SUBSET)
    assert ckpt["mean"] == pytest.approx(models.STATS["cifar10"][0], abs=0.02)


def aux_file(path: Path, n: int = 300, size: int = 32, classes: int = 10) -> Path:
    """Generated images in DM-Improves-AT's format: `image` uint8 N x H x W x 3, `label`."""
    rng = np.random.default_rng(1)
    np.savez(path, image=(rng.random((n, size, size, 3)) * 255).astype(np.uint8), label=np.arange(n) % classes)
    return path


@pytest.mark.parametrize("extra", [[], ["--ema", "--aux-data"]])
def test_resume_matches_uninterrupted_run(tmp_path: Path, extra: list) -> None:
    flags = [*SMOKE, *extra] + ([aux_file(tmp_path / "aux.npz")] if extra else [])
    run(*flags, "--out", tmp_path / "a")
    run(*flags, "--out", tmp_path / "b", "--stop-after", 1)
    assert load(tmp_path / "b" / "last.pt")["epoch"] == 1
    run("--out", tmp_path / "b", "--resume", "--device", "cpu")  # every flag from last.pt, but --stop-after and
    # --device (on a GPU machine the default device is CUDA's): to the end
    a, b = load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt")
    for weights in ("model", "unaveraged") if extra else ("model",):  # with --ema, the average and the trained model
        assert all(torch.equal(a[weights][k], b[weights][k]) for k in a[weights])


def test_a_resumed_run_keeps_last_pts_contents_only_until_loaded(tmp_path: Path, monkeypatch) -> None:
    """--resume reads last.pt whole (the optimizer's state included, the size of the file again per process); once
    the model and optimizer hold it, nothing keeps it: a weakref to one of its weights is dead in the first resumed
    epoch."""
    run(*SMOKE, "--train-limit", 64, "--out", tmp_path, "--stop-after", 1)
    read, refs, alive, epoch = models.read, [], [], train.train_epoch

    def remembered(path: str, flag: str | None = None) -> dict:
        state = read(path, flag)
        refs.extend([weakref.ref(next(iter(state["model"].values())))] * (flag == "--resume"))
        return state

    monkeypatch.setattr(models, "read", remembered)
    monkeypatch.setattr(train, "train_epoch", lambda *a: alive.append(refs[0]() is not None) or epoch(*a))
    run("--out", tmp_path, "--resume", "--device", "cpu")
    assert len(refs) == 1 and alive == [False]


def test_ema_is_the_model_that_is_validated_saved_and_loaded(tmp_path: Path) -> None:
    run(*SMOKE, "--ema", "0.9", "--out", tmp_path)
    last, best = load(tmp_path / "last.pt"), load(tmp_path / "best.pt")
    assert "unaveraged" in last and "unaveraged" not in best
    assert any(not torch.equal(last["model"][k], last["unaveraged"][k]) for k in last["model"])
    loaded = models.load(str(tmp_path / "last.pt"))  # as attack.py rebuilds it: the average
    assert all(torch.equal(v, last["model"][k]) for k, v in loaded.state_dict().items())
    d = data.load_data("synthetic", "")
    args = train.get_args([*SMOKE, "--ema", "0.9"])
    final = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()][-1]["final"]
    assert train.evaluate(loaded, d["x_test"], d["y_test"], args) == (
        final["last"]["test_clean"],
        final["last"]["test_pgd"],
    )


def untimed(rec: dict) -> dict:
    """A test record (log.jsonl's final report, or one checkpoint's) but its seconds and where its figures come from."""
    drop = ("test_time", "same_weights_as")
    return {k: untimed(v) if isinstance(v, dict) else v for k, v in rec.items() if k not in drop}


def test_a_last_pt_holding_best_pts_weights_is_tested_once(tmp_path: Path, monkeypatch) -> None:
    """One epoch: best.pt is last.pt, so the 200 test images are attacked once and both records hold its figures;
    a last.pt with other weights is tested on its own."""
    tested, evaluate = [], train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda model, x, *a: tested.append(len(x)) or evaluate(model, x, *a))
    run(*SMOKE, "--epochs", 1, "--out", tmp_path)
    final = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["final"]
    assert tested == [64, 200] and untimed(final["best"]) == untimed(final["last"])  # validation, then the one test
    assert final["last"]["same_weights_as"] == "best.pt" and "same_weights_as" not in final["best"]
    last = load(tmp_path / "last.pt")
    key = next(k for k, v in last["model"].items() if v.is_floating_point())
    torch.save({**last, "model": {**last["model"], key: last["model"][key] + 1}}, tmp_path / "last.pt")
    tested.clear()
    model = models.load(str(tmp_path / "best.pt"))
    train.test(
        train.get_args([*SMOKE, "--out", str(tmp_path)]), model, model, data.load_data("synthetic", ""), print, 0
    )
    assert tested == [200, 200]


def test_ema_update_follows_dm_improves_at() -> None:
    """watrain.py's ema_update: a copy until 2.5% of the run's steps, then decay min(tau, (1 + t) / (10 + t))."""
    model = torch.nn.Linear(2, 1)
    ema = models.EMA(model, 0.995, steps=400)  # warm-up: 10 steps
    for step, decay in ((3, 0.0), (10, 0.1), (11, 2 / 11), (2000, 0.995)):
        before = ema.model.weight.clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(step)
        torch.testing.assert_close(ema.model.weight, decay * before + (1 - decay) * model.weight)
    assert not any(p.requires_grad for p in ema.model.parameters())
    bn = torch.nn.BatchNorm1d(2)
    ema = models.EMA(bn, 0.9, 1)
    bn.running_mean.fill_(3.0)  # the trained model's statistics move: the average takes them over (update_bn)
    assert ema.take_buffers(bn).running_mean.tolist() == [3.0, 3.0] and ema.model is not bn


def test_generated_data_fills_its_share_of_every_batch() -> None:
    """int(0.7 * 64) = 44 generated images in every batch of 64 (semisup.py's int(batch_size * unsup_fraction)), the
    rest from the training tensors, never from elsewhere (the held-out validation images are not among them)."""
    x = torch.zeros(256, 3, 32, 32, dtype=torch.uint8)  # real images: black, labels 0..4
    aux = torch.full((50, 3, 32, 32), 255, dtype=torch.uint8), torch.arange(50) % 5 + 5  # generated: white, labels 5..9
    seen = []
    for xb, yb in data.batches(x, torch.arange(256) % 5, 64, 0, 0, aux=aux, aux_fraction=0.7):
        white = xb[:, :, 16, 16].mean(1) == 1.0  # the centre pixel survives every crop
        assert white.sum() == 44 and torch.equal(white, yb >= 5) and not white[:20].all()  # shuffled in
        seen.append(yb)
    assert len(seen) == 4  # an epoch counts the batches of one pass over the real set, as without generated data
    halves = list(data.batches(x, torch.arange(256) % 5, 64, 0, 0, rank=1, world=2, aux=aux, aux_fraction=0.7))
    assert all(0 < (yb >= 5).sum() < 32 for _, yb in halves)  # each process's share mixes both


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(img=np.zeros((4, 32, 32, 3), np.uint8), label=np.arange(4)), "lacks array 'x_train'"),
        (
            dict(image=np.zeros((4, 28, 28, 3), np.uint8), label=np.arange(4)),
            "must be uint8 images of the dataset's size",
        ),
        (dict(image=np.zeros((4, 32, 32, 3), np.float32), label=np.arange(4)), "must be uint8 images"),
        (
            dict(image=np.zeros((4, 32, 32, 3), np.uint8), label=np.arange(3)),
            "label must hold one label per image (4 in image)",
        ),
        (dict(image=np.zeros((4, 32, 32, 3), np.uint8), label=np.array([0, 1, 2, 10])), "labels run from 0 to 10"),
        (
            dict(image=np.zeros((4, 32, 32, 3), np.uint8), label=np.array([0, 1, 2, 3])),
            "labels run from 0 to 3; the dataset's classes are 0..9",
        ),
        (dict(x_train=np.zeros((4, 3, 32, 32), np.uint8), y_train=np.array([0, 1, 2, 3])), "labels run from 0 to 3"),
    ],
)
def test_bad_generated_data_gives_one_clear_line(tmp_path: Path, capsys, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "aux.npz", **arrays)
    expect_error(capsys, [*SMOKE, "--aux-data", tmp_path / "aux.npz", "--out", tmp_path / "o"], match)
    assert not (tmp_path / "o").exists()
    expect_error(
        capsys, [*SMOKE, "--aux-data", tmp_path / "no.npz", "--out", tmp_path / "o"], "--aux-data: no such dataset file"
    )
    expect_error(capsys, [*SMOKE, "--aux-fraction", "0.5", "--out", tmp_path / "o"], "--aux-fraction needs --aux-data")


def test_evaluation_is_seeded_so_the_same_weights_give_the_same_figures() -> None:
    """A linear model and its own labels, attacked by the random start alone (--step 0): unseeded, four draws
    broke 6, 2, 1 and 3 of these 48 points."""
    args = train.get_args([*SMOKE, "--eval-steps", "1", "--step", "0", "--eval-batch", "16"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval()
    x, _ = tiny_batch("cpu", 48)
    with torch.no_grad():
        y = model(x.float() / 255).argmax(1)
    first = train.evaluate(model, x, y, args)
    for draw in range(3):
        torch.rand(7 + draw)  # the global random state moves on, as training moves it
        assert train.evaluate(model, x, y, args) == first
    assert first[0] == 1 and first[1] < 1


def expect_error(capsys, argv: list, match: str) -> None:
    with pytest.raises(SystemExit) as e:
        run(*argv)
    msg = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err
    assert e.value.code != 0 and match in msg, msg


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--arch", "vgg"], "invalid choice: 'vgg'"),
        (["--loss", "hinge"], "invalid choice: 'hinge'"),
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--dataset", "missing.npz"], "no such dataset file"),
        (["--ratio", "1.5"], "--ratio must lie in [0, 1]"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--val", "5000"], "--val must lie in"),
        (["--resume"], "--resume: no such checkpoint"),
        (["--resume", "yes"], "takes no value or 'auto', not 'yes'"),
        (["--device", "gpu"], "--device 'gpu' is not a device name"),
        (["--width", "0"], "--width must be >= 1"),
        (["--eps", "-8"], "--eps must be >= 0"),
        (["--milestones", "5,x"], "--milestones: must be comma-separated integers, not '5,x'"),
        (["--milestones", "0"], "--milestones must be >= 1"),
        (["--ema", "1.5"], "--ema must lie in (0, 1), got 1.5"),
        (["--device", "cuda:7"], "no such CUDA device"),
        (["--stop-after", "-1"], "--stop-after must be >= 0"),
        (["--eps", "256"], "--eps must be <= 255 with --norm Linf (the whole pixel range), got 256"),
        (["--momentum", "1"], "--momentum must lie in [0, 1), got 1.0"),
        (["--momentum", "-0.1"], "--momentum must lie in [0, 1), got -0.1"),
        (["--loss", "trades", "--beta", "-1"], "--beta must be >= 0, got -1"),
        (["--lr", "nan"], "--lr must be a positive number, got nan"),
        (["--lr", "inf"], "--lr must be a positive number, got inf"),
        (["--lr", "0"], "--lr must be a positive number, got 0.0"),
        (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
        (["--wd=-1e-4"], "--wd must be >= 0, got -0.0001"),
        (["--loss", "mail", "--mail-slope", "nan"], "--mail-slope must be finite, got nan"),
        # a flag the objective does not read would do nothing: refused, naming the losses that read it
        (["--loss", "ce", "--ratio", "0.2"], "--loss ce does not read --ratio (read by sovr, trades-sovr)"),
        (["--loss", "ovr", "--ratio", "0.2"], "--loss ovr does not read --ratio (read by sovr, trades-sovr)"),
        (["--loss", "ce", "--beta", "1"], "--loss ce does not read --beta (read by trades, trades-sovr, mart)"),
        (
            ["--mail-slope", "1", "--burn-in", "2"],
            "sovr does not read --mail-slope (read by mail), --burn-in (read by mail,",
        ),
        (["--loss", "mart", "--emr-temp", "2"], "--loss mart does not read --emr-temp (read with --emr > 0)"),
        (["--loss", "mart", "--emr", "0", "--emr-decay", "1"], "--emr-decay (read with --emr > 0)"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path: Path, capsys, argv: list, match: str) -> None:
    expect_error(capsys, [*SMOKE, "--out", tmp_path, *argv], match)
    assert not list(tmp_path.iterdir())  # refused before anything is written


@pytest.mark.parametrize("value, radius", [("8", 8), ("8/255", 8), ("8.0", 8), ("127.5", 127.5), ("0", 0)])
def test_a_radius_is_read_in_1_255_units(value: str, radius: float) -> None:
    """--eps and --step of train.py and attack.py's --eps, one reader: a whole radius stays the int that checkpoints,
    run names and result files have always held."""
    assert policy.radius(value) == radius and type(policy.radius(value)) is type(radius)
    for bad in ("8/256", "eight", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="takes a number in 1/255 units"):
            policy.radius(bad)


def refusal(capsys, argv: list) -> str:
    """train.py's one line for a command line it refuses after parsing: exit 2, no usage, no traceback."""
    with pytest.raises(SystemExit) as e:
        run(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("train.py: error: "), err
    return err.strip()


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--eps", "0.031"], "--eps 0.031 is 0.031/255; for 8/255 give --eps 8 (radii and steps are in 1/255 units)"),
        (["--step", "0.0078"], "--step 0.0078 is 0.0078/255; for 2/255 give --step 2 (radii and steps are in 1/255"),
        (["--ratio", "1.5"], "--ratio must lie in [0, 1], got 1.5"),
        (["--loss", "ce", "--beta", "1"], "--loss ce does not read --beta"),
        (["--resume"], "--resume: no such checkpoint"),
    ],
)
def test_a_refusal_after_parsing_is_one_line(tmp_path: Path, capsys, argv: list, says: str) -> None:
    assert says in refusal(capsys, [*SMOKE, "--out", tmp_path, *argv])
    with pytest.raises(SystemExit) as e:  # argparse's own syntax errors keep its usage
        run(*SMOKE, "--arch", "vgg")
    assert e.value.code == 2 and "usage: train.py" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(x_train=np.zeros((4, 3, 8, 8), np.uint8)), "lacks array"),
        (
            dict(
                x_train=np.zeros((4, 3, 8, 8), np.float32),
                y_train=np.zeros(4),
                x_test=np.zeros((2, 3, 8, 8), np.uint8),
                y_test=np.zeros(2),
            ),
            "must be uint8",
        ),
    ],
)
def test_malformed_npz(tmp_path: Path, capsys, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    expect_error(capsys, [*SMOKE, "--dataset", tmp_path / "bad.npz", "--out", tmp_path / "o"], match)
    (tmp_path / "junk.npz").write_text("not an npz")
    expect_error(capsys, [*SMOKE, "--dataset", tmp_path / "junk.npz", "--out", tmp_path / "o"], "not a readable .npz")


def test_a_fresh_run_never_overwrites_a_run_folder(tmp_path: Path, capsys) -> None:
    run(*SMOKE, "--out", tmp_path, "--epochs", 1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    expect_error(
        capsys,
        [*SMOKE, "--out", tmp_path, "--epochs", 1],
        f"last.pt, log.jsonl): it is this run, finished: its test results are in {tmp_path / 'log.jsonl'}; to train "
        "it again: python train.py",
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in recs] == [1, None] and "final" in recs[-1]


def suggested(capsys, argv: list) -> tuple[str, list[str]]:
    """A refusal of train.py, and the command it gives as flags."""
    said = refusal(capsys, argv)
    assert ": python train.py " in said, said
    return said, shlex.split(said.split(": python train.py ", 1)[1])


def test_a_refused_run_folder_says_the_command_that_works(tmp_path: Path, capsys, monkeypatch) -> None:
    """The README's trial and then a longer run, into the default folder: the refusal names the setting that
    differs and gives a command into a folder of its own; --resume's refusal of the finished run gives the command
    that trains it longer; a run of the same settings is continued, or, finished, run again elsewhere. No command
    given is refused: the one from --init runs (its first epoch: --stop-after refuses nothing), the others pass
    train.py's checks of a command line (a fresh run into an empty folder and a resume meet no others)."""
    monkeypatch.chdir(tmp_path)
    d = data.load_data("synthetic", "")
    np.savez(
        "tiny.npz", x_train=d["x_train"][:48], y_train=d["y_train"][:48], x_test=d["x_test"][:8], y_test=d["y_test"][:8]
    )
    tiny, folder = [*SMOKE, "--dataset", "tiny.npz", "--batch", 16, "--val", 16], "runs/tiny-resnet18-sovr-s0"
    run(*tiny, "--epochs", 1)
    said, longer = suggested(capsys, [*tiny, "--epochs", 2])
    assert "it trained --epochs 1, not --epochs 2; give this run a folder of its own: " in said
    assert policy.train_args(longer, claim=True)[0].out == f"{folder}-epochs2"
    said, init = suggested(capsys, [*tiny, "--epochs", 2, "--resume"])
    assert "has finished its 1 epochs; to train it longer, start a new run from its weights" in said
    assert init[-4:] == ["--init", f"{folder}/last.pt", "--out", f"{folder}-epochs2-init"]
    run(*init, "--stop-after", 1)
    said, resume = suggested(capsys, init)  # the same settings, not finished
    assert said.endswith(f"continue it: python train.py {shlex.join(init)} --resume")
    assert policy.train_args(resume, claim=True)[1]["epoch"] == 1
    said, again = suggested(capsys, [*tiny, "--epochs", 1])  # the same settings, finished
    assert f"it is this run, finished: its test results are in {folder}/log.jsonl; to train it again: " in said
    assert policy.train_args(again, claim=True)[0].out == f"{folder}-2"


def test_resume_auto_of_a_finished_run_says_so(tmp_path: Path, capsys) -> None:
    run(*SMOKE, "--out", tmp_path, "--epochs", 1)
    log = (tmp_path / "log.jsonl").read_text()
    capsys.readouterr()
    run(*SMOKE, "--out", tmp_path, "--epochs", 1, "--resume", "auto")
    assert "has finished its 1 epochs; its test results are in log.jsonl" in capsys.readouterr().out
    assert (tmp_path / "log.jsonl").read_text() == log  # no second test evaluation


def test_refused_init_or_resume_leaves_no_folder(tmp_path: Path, capsys) -> None:
    expect_error(
        capsys, [*SMOKE, "--out", tmp_path / "a", "--init", tmp_path / "nope.pt"], "--init: no such checkpoint"
    )
    expect_error(capsys, [*SMOKE, "--out", tmp_path / "b", "--resume"], "--resume: no such checkpoint")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_run_folder_and_labels_carry_the_objective(tmp_path: Path, capsys) -> None:
    """The default --out names every objective flag that is not its default; the run says where it writes."""
    out = lambda *argv: train.get_args(["--dataset", "x.npz", "--arch", "wrn16", *argv]).out  # noqa: E731
    assert out() == os.path.join("runs", "x-wrn16-sovr-s0")
    assert out("--ratio", "0.2", "--seed", "1") == os.path.join("runs", "x-wrn16-sovr-r0.2-s1")
    assert out("--loss", "ovr") == os.path.join("runs", "x-wrn16-ovr-s0")
    assert out("--loss", "trades-sovr", "--beta", "1", "--emr", "3") == os.path.join(
        "runs", "x-wrn16-trades-sovr-b1-emr3-s0"
    )
    assert out("--loss", "ce", "--emr", "0") == os.path.join("runs", "x-wrn16-ce-s0")  # EMR off: no tag
    run(*SMOKE, "--out", tmp_path, "--epochs", 1, "--loss", "ovr")
    assert f"run folder {tmp_path}" in capsys.readouterr().out


L2_RECIPE = "recipe: L2 (robust_overfitting experiments/cifar10_standard_l2)"


def test_the_recipe_fills_what_the_command_line_leaves_out() -> None:
    """--eps, --step and --lr come from the recipe of --norm and the dataset's family where not given, and the
    header says which recipe gave which; an L2 run's name and label say L2."""
    get = lambda *argv: train.get_args([*SMOKE, *argv])  # noqa: E731
    a = get("--norm", "L2")
    assert (a.eps, a.step, a.lr) == (128, 15, 0.1)
    assert policy.recipe(a) == f"{L2_RECIPE}: eps 128/255, step 15/255, lr 0.1"
    assert f"\n{policy.recipe(a)}" in train.describe(a, 256, 64, None, 0, 1, torch.device("cpu"), False)
    a = get("--norm", "L2", "--eps", "64", "--lr", "0.05")  # given: they win, and the header leaves them out
    assert (a.eps, a.step, a.lr) == (64, 15, 0.05) and policy.recipe(a) == f"{L2_RECIPE}: step 15/255"
    assert get("--norm", "L2", "--eps", "383").eps == 383  # an L2 radius of 1.5: the pixel range bounds L-inf's alone
    a = get()
    assert (a.eps, a.step, a.lr) == (8, 2, 0.1) and policy.recipe(a).startswith("recipe: Linf (Bag of Tricks")
    svhn = lambda norm: policy.fill(argparse.Namespace(**{**policy.DEFAULTS, "dataset": "svhn", "norm": norm}))  # noqa: E731
    assert [(s.eps, s.step, s.lr) for s in (svhn("Linf"), svhn("L2"))] == [(8, 1, 0.01), (128, 15, 0.01)]
    assert svhn("Linf").milestones == [55, 82] and get("--dataset", "svhn", "--epochs", "20").milestones == [10, 15]
    name = train.get_args(["--dataset", "x.npz", "--arch", "wrn16", "--norm", "L2", "--ratio", "0.2"]).out
    assert name == os.path.join("runs", "x-wrn16-sovr-r0.2-l2-s0")


def test_a_run_older_than_norm_was_linf_and_resumes_so(tmp_path: Path, capsys) -> None:
    """A last.pt written before --norm (no norm in it or its args) is an L-inf run: --resume keeps L-inf and its
    radius, and refuses --norm L2 as it refuses any other change."""
    old = {k: v for k, v in vars(train.get_args([*SMOKE, "--out", str(tmp_path)])).items() if k != "norm"}
    ckpt = dict(model={}, arch="resnet18", num_classes=10, mean=[0.0] * 3, std=[1.0] * 3, eps=8, dataset="synthetic")
    models.save({**ckpt, "epoch": 1, "optimizer": {}, "args": old}, str(tmp_path / "last.pt"))
    assert models.read(str(tmp_path / "last.pt"))["norm"] == "Linf"
    a = train.get_args(["--out", str(tmp_path), "--resume"])
    assert (a.norm, a.eps, a.step) == ("Linf", 8, 2)
    said = refusal(capsys, ["--out", tmp_path, "--resume", "--norm", "L2"])
    assert "was trained with --norm Linf, not --norm L2 (leave them out to continue it)" in said


def test_an_l2_run_trains_resumes_and_is_attacked_under_l2(tmp_path: Path, capsys, monkeypatch) -> None:
    """The smallest L2 run, stopped after its first epoch and resumed with no flag but --resume, records L2 and
    its recipe; attack.py without --norm or --eps attacks it with L2 AutoAttack at its radius."""
    import aa_run
    import attack

    run(*SMOKE, "--norm", "L2", "--train-limit", 128, "--stop-after", 1, "--out", tmp_path)
    assert L2_RECIPE in capsys.readouterr().out
    run("--out", tmp_path, "--resume", "--device", "cpu")
    best = load(tmp_path / "best.pt")
    assert (best["norm"], best["eps"], best["args"]["step"], load(tmp_path / "last.pt")["epoch"]) == ("L2", 128, 15, 2)
    make = aa_run.make_autoattack

    def quick(*a, **k):  # 5 APGD steps: this checks which attack runs, not its strength
        aa, go = make(*a, **k)
        aa.apgd.n_iter = 5
        return aa, go

    monkeypatch.setattr(aa_run, "make_autoattack", quick)
    attack.main([str(tmp_path / "best.pt"), "--points", "8", "--attacks", "apgd-ce", "--device", "cpu"])
    (result,) = tmp_path.glob("best.apgd-ce-L2-eps128-*.json")
    assert json.loads(result.read_text())["settings"]["norm"] == "L2"
    assert "APGD-CE (L2 128/255, n=8, standard's settings)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "epochs, milestones, burn_in", [(110, [100, 105], 60), (11, [10], 6), (30, [27, 29], 16), (5, [4], 3), (1, [], 1)]
)
def test_schedules_follow_the_run_length(epochs: int, milestones: list, burn_in: int) -> None:
    a = train.get_args(["--loss", "mail", "--epochs", str(epochs)])
    assert (a.milestones, a.burn_in) == (milestones, burn_in)
    a = train.get_args(["--loss", "mail", "--epochs", str(epochs), "--milestones", "3", "--burn-in", "2"])
    assert (a.milestones, a.burn_in) == ([3], 2)  # an explicit value wins


def test_mail_for_eleven_epochs_reweights_late_and_lowers_its_lr(tmp_path: Path, monkeypatch) -> None:
    """Defaults scaled to 11 epochs: 6 unweighted epochs (60/110), lr x0.1 after epoch 10 (100/110)."""
    now, weighted = [], set()
    spy = lambda fn, record: lambda *a: record(a) or fn(*a)  # noqa: E731
    monkeypatch.setitem(losses.OBJECTIVES, "mail", spy(losses.mail, lambda a: now.append(a[5])))
    monkeypatch.setattr(losses, "mail_weights", spy(losses.mail_weights, lambda a: weighted.add(now[-1] + 1)))
    run(*SMOKE, "--loss", "mail", "--epochs", 11, "--train-limit", 64, "--out", tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()[:-1]]
    assert [r["lr"] for r in recs] == pytest.approx([0.1] * 10 + [0.01])
    assert sorted(set(n + 1 for n in now)) == list(range(1, 12)) and sorted(weighted) == list(range(7, 12))


@pytest.mark.parametrize(
    "milestones, says",
    [
        ("", "lr 0.1 (constant)"),
        ("1", "lr 0.1 (x0.1 after epoch 1)"),
        ("100,105", "lr 0.1 (x0.1 after epochs 100 and 105)"),
    ],
)
def test_the_header_says_the_lr_schedule_in_words(milestones: str, says: str) -> None:
    args = train.get_args([*SMOKE, "--epochs", "110", "--milestones", milestones])
    assert f", {says}, " in train.describe(args, 256, 64, None, 0, 1, torch.device("cpu"), False)


def test_a_schedule_that_never_takes_effect_is_said(tmp_path: Path, capsys) -> None:
    run(*SMOKE, "--loss", "gairat", "--epochs", 2, "--burn-in", 2, "--milestones", "1,5", "--out", tmp_path)
    out = capsys.readouterr().out
    assert "note: the lr drops after epochs 5 (--milestones) never happen in --epochs 2" in out
    assert "note: --burn-in 2 >= --epochs 2: gairat never reweights, this run is plain PGD-AT" in out


def test_init_starts_from_the_checkpoint_weights_with_a_fresh_schedule(tmp_path: Path, capsys) -> None:
    run(*SMOKE, "--out", tmp_path / "a", "--epochs", 1)
    a = load(tmp_path / "a" / "last.pt")
    run(
        *SMOKE,
        "--out",
        tmp_path / "b",
        "--init",
        tmp_path / "a" / "last.pt",
        "--loss",
        "mail",
        "--epochs",
        1,
        "--lr",
        1e-30,
        "--dataset",
        "synthetic",
    )  # lr 1e-30: the weights stay those of a
    b = load(tmp_path / "b" / "last.pt")
    assert b["epoch"] == 1 and b["args"]["init"] == str(tmp_path / "a" / "last.pt") and b["mean"] == a["mean"]
    assert all(
        torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=1e-20)
        for k in a["model"]
        if "running" not in k and "batches" not in k
    )
    expect_error(
        capsys,
        [*SMOKE, "--out", tmp_path / "c", "--init", tmp_path / "a" / "last.pt", "--arch", "preact18"],
        "holds a resnet18 with 10 classes, not a preact18 with 10",
    )
    expect_error(
        capsys,
        [*SMOKE, "--out", tmp_path / "c", "--init", tmp_path / "a" / "last.pt", "--width", 4],
        "do not fit --arch resnet18 --width 4",
    )
    expect_error(
        capsys, [*SMOKE, "--out", tmp_path / "c", "--init", tmp_path / "nope.pt"], "--init: no such checkpoint"
    )


def test_resume_from_other_configuration_and_unwritable_out(tmp_path: Path, capsys) -> None:
    run(*SMOKE, "--out", tmp_path, "--stop-after", 1)
    expect_error(
        capsys,
        [*SMOKE, "--out", tmp_path, "--resume", "--lr", "0.05", "--loss", "ce", "--compile", "--eps", "8"],
        f"--resume: {tmp_path / 'last.pt'} was trained with --loss sovr --lr 0.1, not --loss ce --lr 0.05 (leave them "
        "out to continue it)",  # every flag that differs, at once; --compile may differ, --eps is the same
    )
    (tmp_path / "file").write_text("")
    expect_error(capsys, [*SMOKE, "--out", tmp_path / "file" / "sub"], "cannot create the folder: Not a directory")
    expect_error(capsys, [*SMOKE, "--out", tmp_path / "file"], f"--out {tmp_path / 'file'} is a file, not a folder")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, capsys, monkeypatch) -> None:
    def nan_in_second_epoch(net, atk, x, y, args, epoch):
        loss, z = losses.ce(net, atk, x, y, args, epoch)
        return (loss * float("nan") if epoch == 1 else loss), z

    monkeypatch.setitem(losses.OBJECTIVES, "ce", nan_in_second_epoch)
    expect_error(capsys, [*SMOKE, "--loss", "ce", "--out", tmp_path], "loss is nan at epoch 2, step 1")
    ckpt = load(tmp_path / "last.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    "phase, says, not_said",
    [
        ("train_step", "CUDA out of memory at --batch 64: lower --batch", "--eval-batch"),
        (
            "pgd_accuracy",
            "CUDA out of memory in evaluation (fp32 PGD in batches of its own) at --eval-batch 500: lower --eval-batch",
            "lower --batch",
        ),
    ],
)
def test_out_of_memory_names_the_batch_of_its_phase(tmp_path: Path, monkeypatch, phase, says, not_said) -> None:
    """Out of memory in a training step advises --batch; in validation (fp32 PGD in batches of its own), where
    --batch changes nothing, --eval-batch."""

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 11.00 GiB")

    monkeypatch.setattr(train if phase == "train_step" else losses, phase, oom)
    with pytest.raises(SystemExit) as e:
        run(*SMOKE, "--epochs", 1, "--train-limit", 64, "--out", tmp_path)
    msg = e.value.code
    assert says in msg and not_said not in msg and "\n" not in msg, msg


def test_eval_batch_is_the_batch_of_validation_and_test(tmp_path: Path, monkeypatch) -> None:
    """--eval-batch sets the batch of every evaluation; a --resume may change it, and no run name carries it."""
    seen, pgd_accuracy = [], losses.pgd_accuracy
    first = lambda model, x, y, *a, **kw: seen.append(a[-1]) or pgd_accuracy(model, x[: a[-1]], y[: a[-1]], *a, **kw)  # noqa: E731
    monkeypatch.setattr(losses, "pgd_accuracy", first)  # evaluates the first batch only: fast
    run(*SMOKE, "--epochs", 1, "--train-limit", 64, "--eval-batch", 24, "--out", tmp_path)
    assert seen == [24] * 2  # the validation of epoch 1, then the one test of best.pt, which is last.pt
    assert train.get_args(["--out", str(tmp_path), "--resume", "--eval-batch", "8"]).eval_batch == 8
    assert train.get_args([*SMOKE, "--eval-batch", "8"]).out == train.get_args(SMOKE).out


@pytest.mark.parametrize(
    "device, bf16, capability, default",
    [
        ("cuda", True, (8, 0), True),  # A100
        ("cuda", True, (9, 0), True),  # H100
        ("cuda", True, (7, 0), False),  # V100: is_bf16_supported() says True, by emulation
        ("cuda", True, (7, 5), False),  # T4
        ("cuda", False, (8, 6), False),
        ("cpu", True, (9, 0), False),
    ],
)
def test_bf16_autocast_is_the_default_only_on_gpus_with_bf16_tensor_cores(
    monkeypatch, device, bf16, capability, default
):
    import cli

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert cli.bf16_default(torch.device(device)) is default
    said = train.describe(train.get_args(SMOKE), 64, 64, None, 0, 1, torch.device(device), default)
    assert ("bf16 autocast training" if default else "fp32 training") in said
    assert ("no bf16 tensor cores" in said) == (device == "cuda" and not default)


def test_offline_download_says_what_to_do(tmp_path: Path, capsys, monkeypatch) -> None:
    import urllib.error
    import urllib.request

    import attack

    def no_network(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    want = f"could not download cifar10 into {tmp_path / 'data'}"
    expect_error(capsys, ["--device", "cpu", "--data-dir", tmp_path / "data", "--out", tmp_path / "o"], want)
    msg = capsys.readouterr().err
    run(*SMOKE, "--out", tmp_path / "run", "--epochs", 1)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    torch.save({**ckpt, "dataset": "cifar10"}, tmp_path / "c10.pt")
    with pytest.raises(SystemExit) as e:
        attack.main([str(tmp_path / "c10.pt"), "--data-dir", str(tmp_path / "data"), "--device", "cpu"])
    assert want in str(e.value.code) and "--dataset file.npz" in str(e.value.code), msg


# train.py, SIGTERMed by itself halfway through writing its second last.pt (handled between the two halves)
SIGTERM_MID_SAVE = f"""
import os, signal, sys
sys.path.insert(0, {str(HERE)!r})
import runlog, train
real, saves = runlog._write_all, []

def write_all(fd, data):
    saves.append(os.readlink(f"/proc/self/fd/{{fd}}").endswith("/last.pt.tmp"))
    if saves[-1] and saves.count(True) == 2:
        real(fd, bytes(data[: len(data) // 2]))
        os.kill(os.getpid(), signal.SIGTERM)
    real(fd, data)

runlog._write_all = write_all
train.main(sys.argv[1:])
"""


@pytest.mark.parametrize("variant", ["plain", "init", "ema"])
def test_resume_auto_restarts_a_killed_run_to_the_same_weights(tmp_path: Path, variant: str) -> None:
    """A run killed mid-epoch and restarted with the identical command ends as an uninterrupted run; also a run
    that starts from --init without --width (which --init fills in from its checkpoint), and one with --ema. The
    plain run is killed (SIGKILL: nothing said); the --init run gets SIGTERM halfway through its second last.pt, the
    --ema run mid-epoch: each says in one line what it kept, exits 143 and leaves no temporary file."""
    flags = ["--smoke"] + ["--ema"] * (variant == "ema")
    if variant == "init":
        run(*SMOKE, "--epochs", 1, "--out", tmp_path / "pre")
        flags = [
            "--dataset",
            "synthetic",
            "--val",
            64,
            "--batch",
            64,
            "--steps",
            2,
            "--eval-steps",
            2,
            "--init",
            tmp_path / "pre" / "last.pt",
        ]
    cmd = [
        sys.executable,
        str(HERE / "train.py"),
        *flags,
        "--device",
        "cpu",
        "--train-limit",
        256,
        "--epochs",
        3,
        "--resume",
        "auto",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    argv = lambda out: [str(c) for c in cmd + ["--out", out]]  # noqa: E731
    # the uninterrupted run goes alongside the killed one and its restart (one core each): they share no file
    first = subprocess.Popen(argv(tmp_path / "a"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = (
        argv(tmp_path / "b")
        if variant != "init"
        else [sys.executable, "-c", SIGTERM_MID_SAVE, *argv(tmp_path / "b")[2:]]
    )
    p = subprocess.Popen(killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while variant != "init" and p.poll() is None and not (tmp_path / "b" / "last.pt").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    if variant == "plain":
        p.kill()
    elif variant == "ema":
        p.send_signal(signal.SIGTERM)  # as SLURM's preemption, scancel and time limit do
    said = p.communicate()[1]
    assert load(tmp_path / "b" / "last.pt")["epoch"] < 3, "the run ended before it could be killed"
    if variant != "plain":
        kept = f"{tmp_path / 'b' / 'last.pt'} keeps the last finished epoch (continue with --resume)"
        assert p.returncode == 143 and said.splitlines()[-1] == f"train.py: terminated (SIGTERM); {kept}", said
        assert not list((tmp_path / "b").glob("*.tmp"))
        assert variant == "ema" or load(tmp_path / "b" / "last.pt")["epoch"] == 1  # cut at the second
    again = subprocess.run(argv(tmp_path / "b"), env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "resumed after epoch" in again.stdout, again.stdout + again.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    a, b = load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt")
    for weights in ("model", "unaveraged") if variant == "ema" else ("model",):
        assert all(torch.equal(a[weights][k], b[weights][k]) for k in a[weights])
    assert a["width"] == b["width"] == 8
    recs = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs[:-1]] == [1, 2, 3] and "final" in recs[-1]
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "b" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_live_progress_only_on_a_terminal(tmp_path: Path, capsys, monkeypatch) -> None:
    flags = [*SMOKE, "--epochs", 1, "--milestones", ""]
    run(*flags, "--out", tmp_path / "pipe")
    out, err = capsys.readouterr()
    assert "img/s" not in err and out.count("epoch   1/1") == 1  # a log keeps one line per epoch
    # the test at the end says when it starts and how long it took, there and in log.jsonl
    assert "test best.pt (epoch 1): clean and PGD-2 accuracy of 200 test images ...\n" in out
    assert re.search(r"test best.pt \(epoch 1\): clean \d+\.\d\d% pgd2 \d+\.\d\d%, \d+\.\ds\n", out), out
    final = runlog.final(str(tmp_path / "pipe"))
    assert final["best"]["test_time"] > 0 and "test_time" in final["last"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    run(*flags, "--out", tmp_path / "tty")
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "img/s" in err and "run left" in err
    assert "test best.pt: 100%" in err  # the test's live line, as an epoch's


def test_training_goes_on_without_matplotlib(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(runlog, "_SAID", [])
    run(*SMOKE, "--out", tmp_path)
    err = capsys.readouterr().err
    assert err.count("matplotlib is not installed: no curves.png is drawn") == 1  # said once, not every epoch
    assert load(tmp_path / "last.pt")["epoch"] == 2 and not (tmp_path / "curves.png").exists()


def test_cli_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, str(HERE / "train.py"), "--dataset", "missing.npz", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert p.returncode != 0 and p.stderr.strip() == "train.py: error: no such dataset file: missing.npz"


@pytest.mark.parametrize("files", [["best.pt", "log.jsonl"], ["curves.png"], ["last.aa-Linf-eps8-n500-seed0.json"]])
def test_a_fresh_run_never_replaces_another_runs_files(tmp_path: Path, capsys, files: list) -> None:
    """Not last.pt alone: any file of a run refuses a fresh run, and --resume auto, which would be one."""
    for name in files:
        (tmp_path / name).write_text('{"final": {}}\n')
    for resume in ([], ["--resume", "auto"]):
        expect_error(
            capsys,
            [*SMOKE, "--out", tmp_path, *resume],
            f"{tmp_path} holds a run already ({', '.join(sorted(files))}; no last.pt to continue from): "
            "choose another --out",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    assert all((tmp_path / name).read_text() == '{"final": {}}\n' for name in files)
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "last.pt.tmp").write_text("")  # a write cut short: the run's next write replaces it
    assert runlog.held(str(tmp_path / "killed")) == []


def test_resume_takes_every_flag_not_given_from_last_pt(tmp_path: Path, capsys) -> None:
    flags = ["--loss", "trades", "--beta", 2, "--batch", 32, "--train-limit", 64, "--epochs", 3, "--stop-after", 1]
    run(*SMOKE, *flags, "--out", tmp_path)
    args = train.get_args(["--out", str(tmp_path), "--resume"])
    assert (args.loss, args.beta, args.batch, args.epochs, args.dataset, args.smoke) == (
        "trades",
        2,
        32,
        3,
        "synthetic",
        True,
    )
    assert (args.stop_after, args.resume) == (0, True)  # those of one invocation are not taken
    assert (args.device, args.amp) == (None, None)  # nor --device cpu: the machine's default, and --amp's for it
    # --smoke's defaults are no flags given: the run's --batch 32 stays; a flag given at the run's value is fine
    assert train.get_args([*SMOKE, "--out", str(tmp_path), "--resume", "--beta", "2"]).batch == 32
    assert train.get_args(["--out", str(tmp_path), "--resume", "--stop-after", "1", "--no-compile"]).stop_after == 1
    expect_error(  # an objective flag the run's loss reads is compared, not refused as unread by the default loss
        capsys,
        ["--out", tmp_path, "--resume", "--beta", "3", "--batch", 64],
        "was trained with --batch 32 --beta 2.0, not --batch 64 --beta 3.0 (leave them out to continue it)",
    )
    run("--out", tmp_path, "--resume", "--device", "cpu")
    assert load(tmp_path / "last.pt")["epoch"] == 3
    said, longer = suggested(capsys, ["--out", tmp_path, "--resume", "--epochs", 5])
    assert "has finished its 3 epochs; to train it longer, start a new run from its weights" in said
    old, new = load(tmp_path / "last.pt")["args"], vars(policy.train_args(longer, claim=True)[0])
    assert new["init"] == str(tmp_path / "last.pt") and new["epochs"] == 5  # the run's settings, but --epochs
    assert {k for k in old if old[k] != new[k]} <= policy.RESUMABLE | {"init", "epochs", "milestones", "burn_in"}


@pytest.mark.parametrize("resumed", [False, True])
def test_ctrl_c_says_what_was_saved(tmp_path: Path, capsys, monkeypatch, resumed: bool) -> None:
    """Interrupted in a fresh run's first epoch, nothing was saved; in a resumed run, last.pt keeps its epoch. A
    resumed run redraws curves.png at its start, from the log trimmed to last.pt (a kill may have come after
    last.pt and before the curves)."""
    if resumed:
        run(*SMOKE, "--out", tmp_path, "--stop-after", 1)
        (tmp_path / "curves.png").unlink(missing_ok=True)

    def ctrl_c(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_epoch", ctrl_c)
    said = f"{tmp_path / 'last.pt'} keeps the last finished epoch (continue with --resume)"
    said = said if resumed else "no epoch had finished: nothing was saved"
    expect_error(capsys, [*SMOKE, "--out", tmp_path, *["--resume"] * resumed], f"train.py: interrupted; {said}")
    if resumed and importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "curves.png").exists()


CUT = [*SMOKE, "--epochs", 1, "--train-limit", 64, "--resume", "auto"]


@pytest.fixture(scope="module")
def uncut(tmp_path_factory) -> Path:
    """The run that test_resume_auto_redoes_what_a_kill_cut_from_the_end_of_an_epoch's cut runs must equal, once."""
    out = tmp_path_factory.mktemp("uncut")
    run(*CUT, "--out", out)
    return out


@pytest.mark.parametrize("cut", ["last.pt", "best.pt", "log", "curves"])
def test_resume_auto_redoes_what_a_kill_cut_from_the_end_of_an_epoch(
    tmp_path: Path, monkeypatch, cut: str, uncut: Path
) -> None:
    """A run stopped at any write of its first epoch's end, then restarted with the same --resume auto command,
    leaves what an uninterrupted run does: last.pt is written first, and a resume writes best.pt, the log record
    and the curves from it (a refusal of the folder, or a missing best.pt or record, would not)."""
    flags = CUT

    def killed(fn, hit):
        return lambda *a: (_ for _ in ()).throw(KeyboardInterrupt) if hit(*a) else fn(*a)

    if cut in ("last.pt", "best.pt"):
        monkeypatch.setattr(models, "save", killed(models.save, lambda obj, path: path.endswith(cut)))
    else:
        name = {"log": "append", "curves": "curves"}[cut]
        monkeypatch.setattr(runlog, name, killed(getattr(runlog, name), lambda *a: True))
    with pytest.raises(SystemExit):
        run(*flags, "--out", tmp_path / "b")
    monkeypatch.undo()
    run(*flags, "--out", tmp_path / "b")
    for name in ("best.pt", "last.pt"):
        a, b = load(uncut / name), load(tmp_path / "b" / name)
        assert a.keys() == b.keys() and a["epoch"] == b["epoch"] == 1
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    a, b = runlog.records(str(uncut)), runlog.records(str(tmp_path / "b"))
    assert [r.get("val_pgd") for r in a] == [r.get("val_pgd") for r in b] and untimed(a[-1]) == untimed(b[-1])


def test_deterministic_mode_is_set_before_cuda_and_kept_on_resume(tmp_path: Path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, **kw: calls.append((on, kw)))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    run(*SMOKE, "--out", tmp_path, "--stop-after", 1, "--deterministic")
    assert calls == [(True, {})] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # errors, not warnings
    assert not torch.backends.cudnn.benchmark
    assert train.get_args(["--out", str(tmp_path), "--resume"]).deterministic  # taken from last.pt
    assert not train.get_args(["--out", str(tmp_path), "--resume", "--no-deterministic"]).deterministic  # may differ


def test_progress_without_tqdm(monkeypatch) -> None:
    import cli

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    with cli.progress(10, "epoch 1/1", "img") as bar:
        bar.update(5)
        bar.set_postfix_str("loss 1")
    assert bar.disable


def test_curves_name_the_run_and_keep_inside_their_panels() -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    lrs = [0.1] * 5 + [0.01] * 2
    recs = [
        dict(epoch=k + 1, lr=lr, train_loss=1 / (k + 1), train_adv_acc=0.1, val_clean=0.5, val_pgd=0.1 * (k + 1) % 0.6)
        for k, lr in enumerate(lrs)
    ]
    fig = runlog.figure(plt, recs, "runs/x: sovr")
    fig.canvas.draw()
    a1, _, a3 = fig.axes
    assert fig._suptitle.get_text() == "runs/x: sovr"
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        assert all(t == int(t) for t in ax.get_xticks() if lo <= t <= hi)  # whole epochs
    (line,) = a3.get_lines()
    assert line.get_drawstyle() == "steps-pre"  # the lr holds through each epoch: drawn as steps, not as a ramp
    box, renderer = a1.get_window_extent(), fig.canvas.get_renderer()
    for text in a1.texts:
        t = text.get_window_extent(renderer)
        assert box.x0 <= t.x0 and t.x1 <= box.x1 and box.y0 <= t.y0 and t.y1 <= box.y1, text.get_text()
    plt.close(fig)


# ---- torch.compile on CPU, and the CUDA path (these skip without CUDA)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on CPU needs a C++ compiler"
)
def test_compiled_step_matches_eager_step_on_cpu() -> None:
    """The --compile path cannot rot unseen: one tiny model, one SOVR step through train.wrap as train.py
    --compile runs it (compiled attack and training step), the same loss and weights as without it."""
    args = train.get_args([*SMOKE, "--loss", "sovr", "--steps", "1"])
    x8, y = tiny_batch("cpu", 16)
    out = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = models.build("wrn16", 10, width=1).to(memory_format=torch.channels_last)
        args.compile = compiled
        net, atk = train.wrap(model, args, world=1)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
        ema = models.EMA(model, 0.995, steps=0)
        torch.manual_seed(1)  # the same PGD start
        stats = train.train_step(
            net, atk, opt, losses.OBJECTIVES["sovr"], x8.float() / 255, y, args, 0, amp=False, ema=ema, step=1
        )
        out[compiled] = stats, {**model.state_dict(), **{f"ema.{k}": v for k, v in ema.model.state_dict().items()}}
    assert isinstance(net, torch._dynamo.eval_frame.OptimizedModule)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-5)
    for k, v in out[False][1].items():
        torch.testing.assert_close(out[True][1][k], v, rtol=1e-3, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def tiny_batch(device: str, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8).to(device), torch.randint(
        0, 10, (n,), generator=g
    ).to(device)


@CUDA
@pytest.mark.parametrize("loss", ["sovr", "trades", "mart"])
def test_fp32_step_on_cuda_matches_cpu(loss: str, no_tf32) -> None:
    # --eps 0 makes every attack return the clean images, whatever its random start on either device.
    args = train.get_args(["--smoke", "--loss", loss, "--eps", "0"])
    cpu = models.build("wrn16", 10, width=2).train()
    gpu = copy.deepcopy(cpu).cuda()
    x8, y = tiny_batch("cpu")
    out = {}
    for dev, model in (("cpu", cpu), ("cuda", gpu)):
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
        out[dev] = train.train_step(
            model, model, opt, losses.OBJECTIVES[loss], x8.to(dev).float() / 255, y.to(dev), args, 0, amp=False
        ).cpu()
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-5, atol=1e-5)
    for (k, a), b in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        # one SGD step at lr 0.1 of gradients that agree to float rounding (measured on an H100: at most 3e-5)
        torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@CUDA
def test_pgd_on_cuda_matches_cpu(no_tf32) -> None:
    model = models.build("wrn16", 10, width=2).eval()
    x8, y = tiny_batch("cpu")
    x = x8.float() / 255
    a, ka = losses.pgd(model, x, y, 8 / 255, 2 / 255, 5, start="zero")
    b, kb = losses.pgd(model.cuda(), x.cuda(), y.cuda(), 8 / 255, 2 / 255, 5, start="zero")
    same = (a == b.cpu()).float().mean().item()
    assert same > 0.99, f"only {same:.2%} of adversarial pixels agree"  # a sign can flip where a gradient is ~0
    assert (ka != kb.cpu()).sum() <= 1


@CUDA
@pytest.mark.parametrize(
    "loss, flags", [(name, []) for name in sorted(losses.OBJECTIVES)] + [("ce", ["--emr", "1"]), ("sovr", ["--ema"])]
)
def test_cuda_training_step_never_waits_for_the_gpu(loss: str, flags: list) -> None:
    """A host-device synchronisation inside the step would stall the GPU at every step: none may happen."""
    burn_in = ["--burn-in", "0"] * (loss in ("mail", "gairat"))  # reweighting on from step 1
    args = train.get_args(["--smoke", "--loss", loss, *burn_in, *flags])
    model = models.build("resnet18", 10, width=8).cuda().to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    x_pool, y_pool = tiny_batch("cuda", 64)
    batches = data.batches(x_pool, y_pool, 32, 0, 0)  # train.py's own batches and step
    ema = models.EMA(model, 0.995, 10) if "--ema" in flags else None

    def step() -> torch.Tensor:
        return train.train_step(
            model, model, opt, losses.OBJECTIVES[loss], *next(batches), args, 0, amp=True, ema=ema, step=20
        )

    step()  # warm-up: cuDNN autotuning and lazy initialisation may synchronise once
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(stats).all()


@CUDA
def test_deterministic_cuda_runs_and_their_resume_give_the_same_bits(tmp_path: Path) -> None:
    flags = ["--smoke", "--device", "cuda", "--deterministic", "--epochs", 2]
    try:
        run(*flags, "--out", tmp_path / "a")
        run(*flags, "--out", tmp_path / "b", "--stop-after", 1)
        run("--out", tmp_path / "b", "--resume")
    finally:
        torch.use_deterministic_algorithms(False)  # process-wide: the other tests run as without the flag
    a, b = load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@CUDA
def test_cuda_out_of_memory_is_one_clear_line_and_keeps_last_checkpoint(tmp_path: Path, capsys, cap_gpu_memory) -> None:
    flags = ["--smoke", "--device", "cuda", "--out", tmp_path]
    run(*flags, "--stop-after", 1)
    before = (tmp_path / "last.pt").read_bytes()
    cap_gpu_memory(16)  # enough for the data and the model, not for a PGD step at batch 64
    expect_error(capsys, [*flags, "--resume"], "CUDA out of memory at --batch 64: lower --batch")
    assert (tmp_path / "last.pt").read_bytes() == before and not (tmp_path / "last.pt.tmp").exists()


@pytest.mark.parametrize("script", ["train", "attack"])
def test_help_shows_every_default(script: str, capsys) -> None:
    """--help goes through the parser itself: the flag tables write defaults as %(default)s, which cli.given's
    default-free copy cannot format (a KeyError before)."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(["--help"])
    assert e.value.code == 0 and "(default 500" in capsys.readouterr().out
