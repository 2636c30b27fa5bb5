"""attack.py on a tiny model trained by train.py: results, equality with a direct AutoAttack call, errors."""

import argparse
import ast
import errno
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
import torch

import aa_run
import attack
import cli
import data
import masking
import models
import runlog
import train
from conftest import child_pythonpath

HERE = Path(__file__).resolve().parent.parent
QUICK = ["--n", "24", "--bs", "12", "--device", "cpu"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    # ratio 0.4 pinned: the attacks at eps 24/255 must break some points of this tiny model, not all or none
    train.main(
        [
            "--smoke",
            "--arch",
            "wrn16",
            "--width",
            "1",
            "--epochs",
            "3",
            "--milestones",
            "",
            "--lr",
            "0.05",
            "--ratio",
            "0.4",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    return out / "last.pt"


def run(*argv) -> None:
    attack.main([str(a) for a in argv])


@pytest.fixture
def few_steps(monkeypatch) -> None:
    """The package's APGD with 5 steps for 100 (rand's 20 EOT samples each), for tests of files, lines and
    resumes rather than of the attack's strength."""
    make = aa_run.make_autoattack

    def quick(*a, **k):
        aa, run = make(*a, **k)
        aa.apgd.n_iter = 5
        return aa, run

    monkeypatch.setattr(aa_run, "make_autoattack", quick)


def result_files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.parent.glob("last.*.json"))


def test_custom_attacks_match_a_direct_package_call(ckpt: Path) -> None:
    run(ckpt, *QUICK, "--attacks", "apgd-ce,apgd-dlr", "--eps", 24)  # a radius that breaks some points
    (path,) = [p for p in result_files(ckpt) if "apgd-ce+apgd-dlr" in p.name]
    res = json.loads(path.read_text())
    assert res["settings"]["n"] == 24 and res["settings"]["eps"] == "24/255" and "pyautoattack" in res["versions"]
    assert 0 < res["robust_acc"] < res["clean_acc"]
    assert all(r <= c for r, c in zip(res["robust"], res["clean"]))
    after = res["robust_after"]
    assert list(after) == ["apgd-ce", "apgd-dlr"] and after["apgd-ce"] >= after["apgd-dlr"] == res["robust_acc"]
    assert not os.path.exists(str(path) + ".state")

    from pyautoattack import AutoAttack

    model = models.load(str(ckpt))
    d = data.load_data("synthetic", "")
    x, y = d["x_test"][:24].float() / 255, d["y_test"][:24]
    aa = AutoAttack(model, eps=24 / 255, norm="Linf", version="standard", device="cpu", seed=0)
    aa.attacks_to_run = ["apgd-ce", "apgd-dlr"]
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=12)
    assert res["robust"] == (y_adv == y).int().tolist()


def test_interrupted_run_resumes_from_its_state(ckpt: Path, capsys, monkeypatch, few_steps) -> None:
    run(ckpt, *QUICK, "--attacks", "apgd-ce,apgd-dlr")
    result = Path(attack.result_path(str(ckpt), "apgd-ce+apgd-dlr", "Linf", 8, 24, 0, bs=12))
    settings = json.loads(result.read_text())["settings"]
    state = Path(str(result) + ".state")
    # A run of apgd-ce,apgd-dlr stopped after apgd-ce, 1000 s in, left this state (and no result): no point
    # survived apgd-ce.
    result.unlink()
    state.write_text(json.dumps(dict(settings=settings, robust=[False] * 24, after={"apgd-ce": 0}, time_s=1000)))
    saved, write_json = [], models.write_json
    monkeypatch.setattr(models, "write_json", lambda obj, path: saved.append(dict(obj)) or write_json(obj, path))
    run(ckpt, *QUICK, "--attacks", "apgd-ce,apgd-dlr")
    assert "resuming from" in capsys.readouterr().out
    res = json.loads(result.read_text())
    assert res["robust_acc"] == 0 and res["clean_acc"] > 0 and not state.exists()
    assert res["robust_after"] == {"apgd-ce": 0.0, "apgd-dlr": 0.0}
    # the time of every part: the state after apgd-dlr and the result count the 1000 s before the resume
    assert [list(o["after"]) for o in saved[:-1]] == [["apgd-ce", "apgd-dlr"]]
    assert saved[0]["time_s"] >= 1000 and res["time_s"] >= saved[0]["time_s"]
    monkeypatch.undo()
    result.unlink()
    # the progress of other settings (tampered here; an older attack.py's state has none) is never mixed in
    for other in ({**settings, "seed": 9}, None):
        state.write_text(json.dumps(dict(settings=other, robust=[False] * 24, after={"apgd-ce": 0})))
        expect_error(
            capsys,
            [ckpt, *QUICK, "--attacks", "apgd-ce,apgd-dlr"],
            "holds the progress of an evaluation "
            "with other settings than this one; finish that one with its own flags, or delete the file",
        )
        assert json.loads(state.read_text())["settings"] == other
    state.unlink()


@pytest.mark.parametrize("stop", ["full disk", "SIGTERM"])
def test_a_full_disk_or_sigterm_at_the_result_keeps_the_attacks_for_a_rerun(
    ckpt: Path, capsys, monkeypatch, few_steps, full_disk, stop: str, sigterm_fails_the_test
) -> None:
    """The result JSON cannot be written (no space left) or SIGTERM comes while it is written: one line naming what
    was kept, exit 1 or 143, the .state of the finished attacks kept and no .tmp; the same command then continues."""
    flags = [ckpt, *QUICK, "--attacks", "apgd-ce", "--seed", 3]
    result = Path(attack.result_path(str(ckpt), "apgd-ce", "Linf", 8, 24, 3, bs=12))
    real = runlog._write_all
    if stop == "full disk":
        full_disk(errno.ENOSPC, result.name + ".tmp")
    else:

        def terminated(fd: int, data) -> None:
            if os.readlink(f"/proc/self/fd/{fd}").endswith(result.name + ".tmp"):
                os.kill(os.getpid(), signal.SIGTERM)  # as SLURM's scancel: handled at the next line of Python
            real(fd, data)

        monkeypatch.setattr(runlog, "_write_all", terminated)
    with pytest.raises(SystemExit) as e:
        run(*flags)
    kept = "the attacks finished so far are kept (a .state file beside the result): rerun the same command to continue"
    said = e.value.code if stop == "full disk" else capsys.readouterr().err.strip().splitlines()[-1]
    want = f"error: cannot write {result}: no space left on device" if stop == "full disk" else "terminated (SIGTERM)"
    assert said == f"attack.py: {want}; {kept}" and (e.value.code == 143) == (stop == "SIGTERM"), said
    assert Path(f"{result}.state").exists() and not result.exists() and not list(ckpt.parent.glob("*.tmp"))
    monkeypatch.setattr(runlog, "_write_all", real)  # space freed
    run(*flags)
    assert "resuming from" in capsys.readouterr().out and result.exists() and not Path(f"{result}.state").exists()
    result.unlink()


def test_settings_that_change_a_result_never_share_a_file(ckpt: Path, few_steps) -> None:
    """Another --bs, --version (with --attacks) or --dataset writes its own JSON and resumes only its own state."""
    base = [ckpt, "--n", 24, "--device", "cpu", "--attacks", "apgd-ce", "--seed", 5]
    for flags in (["--bs", 12], ["--bs", 8], ["--bs", 12, "--version", "rand"], ["--bs", 12, "--dataset", "synthetic"]):
        run(*base, *flags)
    names = sorted(p.name for p in result_files(ckpt) if "-seed5" in p.name)
    assert names == [
        "last.apgd-ce-Linf-eps8-n24-seed5-bs12.json",
        "last.apgd-ce-Linf-eps8-n24-seed5-bs8.json",
        "last.apgd-ce-Linf-eps8-n24-seed5-rand-bs12.json",
    ]  # --dataset synthetic: the checkpoint's own
    bs8 = json.loads((ckpt.parent / names[1]).read_text())["settings"]
    assert (bs8["bs"], bs8["version"], bs8["device"], bs8["processes"]) == (8, "standard", "cpu", 1)


def test_margins_writes_json_and_png(ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run(ckpt, ckpt.parent / "best.pt", *QUICK, "--margins", "--plot", tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    path = [p for p in result_files(ckpt) if ".margins-" in p.name][0]
    res = json.loads(path.read_text())
    assert len(res["margins"]) == 24 and res["mean_margin_smallest30"] <= res["mean_margin"]
    assert res["settings"]["objective"] == "sovr"  # the histogram's label
    path.unlink()
    run(ckpt, *QUICK, "--margins", "--plot", tmp_path / "again.png")  # PGD's starts are seeded from --seed
    assert json.loads(path.read_text())["margins"] == res["margins"]


def no_attack(*a, **k):
    raise AssertionError("an attack ran")


def test_a_finished_evaluation_prints_its_result_and_runs_nothing(ckpt: Path, capsys, monkeypatch, few_steps):
    flags = [ckpt, *QUICK, "--attacks", "apgd-ce", "--seed", 6]
    run(*flags)
    line = capsys.readouterr().out.splitlines()[-2]  # "<checkpoint>: clean ..., AutoAttack (...) ..., Ns"
    result = Path(attack.result_path(str(ckpt), "apgd-ce", "Linf", 8, 24, 6, bs=12))
    before = result.read_text()
    monkeypatch.setattr(aa_run, "autoattack", no_attack)
    monkeypatch.setattr(attack.losses, "pgd_margins", no_attack)
    run(*flags)
    out = capsys.readouterr().out
    assert out == f"{result} is finished (move it away to evaluate again)\n{line}\n" and result.read_text() == before
    # beside the checkpoint, a result written before its folder was moved is still this checkpoint's
    moved = json.loads(before)
    result.write_text(json.dumps({**moved, "settings": {**moved["settings"], "checkpoint": "/elsewhere/best.pt"}}))
    run(*flags)
    assert capsys.readouterr().out.startswith(f"{result} is finished")
    # in --out, another checkpoint's result of the same name is neither taken for this one's nor replaced
    out = result.parent / "out"
    out.mkdir()
    (out / result.name).write_text(result.read_text())
    expect_error(capsys, [*flags, "--out", out], f"{out / result.name} holds the result of other settings (checkpoint)")
    result.write_text(before)


def test_everything_is_checked_before_any_attack(ckpt: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(aa_run, "autoattack", no_attack)
    monkeypatch.setattr(attack.losses, "pgd_margins", no_attack)
    expect_error(capsys, [ckpt, tmp_path / "missing.pt", *QUICK], "no such checkpoint")
    torch.save({**torch.load(ckpt, weights_only=True), "dataset": "../elsewhere/x.npz"}, tmp_path / "moved.pt")
    expect_error(capsys, [ckpt, tmp_path / "moved.pt", *QUICK], "no such dataset file: ../elsewhere/x.npz")
    # a folder no file can be written in: below a regular file (real for root too), or read-only
    (tmp_path / "file").write_text("")
    for margins in ([], ["--margins"]):
        expect_error(
            capsys,
            [ckpt, *QUICK, *margins, "--out", tmp_path / "file" / "results"],
            f"cannot write results in {tmp_path / 'file' / 'results'}: {tmp_path / 'file'} is not a folder",
        )
    expect_error(
        capsys,
        [ckpt, *QUICK, "--margins", "--plot", tmp_path / "file" / "m.png"],
        f"cannot write the plot in {tmp_path / 'file'}",
    )
    ro = tmp_path / "read-only"
    ro.mkdir()
    shutil.copy(ckpt, ro / "last.pt")
    ro.chmod(0o555)
    access = os.access  # root passes os.access whatever the mode: here it is told the mode bits, as anyone else
    monkeypatch.setattr(
        os, "access", lambda p, m: access(p, m) and not (m & os.W_OK and not os.stat(p).st_mode & 0o222)
    )
    expect_error(
        capsys, [ro / "last.pt", *QUICK], f"cannot write results in {ro}: it is read-only (choose another --out)"
    )
    # two checkpoints that would share one result file
    expect_error(capsys, [ckpt, ro / "last.pt", *QUICK, "--out", tmp_path / "r"], "would both write")
    assert not (tmp_path / "r").exists()
    monkeypatch.undo()
    run(ro / "last.pt", *QUICK, "--attacks", "apgd-ce", "--out", tmp_path / "r")
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["last.apgd-ce-Linf-eps8-n24-seed0-bs12.json"]
    ro.chmod(0o755)


def test_plot_tells_checkpoints_apart_and_counts_in_whole_points(ckpt: Path) -> None:
    pytest.importorskip("matplotlib")
    s = dict(checkpoint="/runs/a/last.pt", objective="sovr")
    results = [
        dict(settings=s, margins=[0.1, 0.5, 2.0]),
        dict(settings={**s, "checkpoint": "/runs/a/best.pt"}, margins=[1.0]),
    ]
    fig = attack.plot(results, os.devnull)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sovr (a/last.pt)", "sovr (a/best.pt)"]
    assert all(float(t).is_integer() for t in ax.get_yticks())


def expect_error(capsys, argv: list, match: str) -> None:
    with pytest.raises(SystemExit) as e:
        run(*argv)
    msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    assert e.value.code != 0 and match in msg, msg


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--eps", "0.031"], "--eps 0.031 is 0.031/255; for 8/255 give --eps 8 (radii and steps are in 1/255 units)"),
        (["--norm", "L2", "--eps", "0.5"], "--eps 0.5 is 0.5/255; for 127.5/255 give --eps 127.5 (radii and steps"),
    ],
)
def test_eps_in_the_fraction_form_is_refused_in_one_line(capsys, argv: list, says: str) -> None:
    """--eps as train.py reads it (flags.radius): 8/255 is 8, L2's 0.5 is 127.5; 0.031, AutoAttack's way to write
    8/255, would attack at 0.031/255 and report the clean accuracy as robust: refused before any checkpoint is read."""
    assert attack.get_args(["best.pt", "--eps", "8/255"]).eps == 8
    assert attack.get_args(["best.pt", "--norm", "L2", "--eps", "127.5"]).eps == 127.5
    with pytest.raises(SystemExit) as e:
        attack.get_args(["best.pt", "--points", "20", "--attacks", "apgd-ce", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"attack.py: error: {says}") and err.count("\n") == 1, err


def test_the_examples_pass_torchruns_parser() -> None:
    """torchrun's parser reads the flags after the script too, abbreviations allowed: it stops at --n (--nnodes,
    --nproc-per-node...). Every train.py and attack.py line of README.md and of the scripts' docstrings reaches the
    script whole under torchrun (parsed only, nothing launched)."""
    from torch.distributed.run import get_args_parser

    text = "\n".join((HERE / name).read_text() for name in ("README.md", "train.py", "attack.py"))
    lines = [
        shlex.split(line, comments=True)
        for line in text.splitlines()
        if line.strip().startswith(("python ", "torchrun "))
    ]
    runs = [(w[i], w[i + 1 :]) for w in lines for i, s in enumerate(w) if s in ("train.py", "attack.py")]
    assert len(runs) > 15
    for script, argv in runs:
        assert get_args_parser().parse_args(["--nproc_per_node=2", script, *argv]).training_script_args == argv


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bad_input(ckpt: Path, tmp_path: Path, capsys) -> None:
    expect_error(capsys, [tmp_path / "missing.pt"], "no such checkpoint")
    expect_error(
        capsys, [ckpt.parent], f"{ckpt.parent} is a folder, not a checkpoint: give {ckpt.parent / 'best.pt'} or {ckpt}"
    )
    (tmp_path / "text.pt").write_text("hello")
    expect_error(capsys, [tmp_path / "text.pt"], "is not a file torch.save wrote")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    expect_error(capsys, [tmp_path / "other.pt"], "holds no model: not a train.py checkpoint")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"model": Evil()}))
    expect_error(capsys, [tmp_path / "evil.pt"], "refuses to run")
    good = torch.load(ckpt, weights_only=True)
    torch.save({**good, "arch": "vgg"}, tmp_path / "arch.pt")
    expect_error(capsys, [tmp_path / "arch.pt"], "unknown arch 'vgg'")
    torch.save({**good, "arch": "preact18"}, tmp_path / "mismatch.pt")
    expect_error(capsys, [tmp_path / "mismatch.pt"], "weights do not fit arch preact18")
    expect_error(capsys, [ckpt, "--n", "100000", "--device", "cpu"], "--n 100000 is larger than the 200 test points")
    expect_error(capsys, [ckpt, "--dataset", "cifar100", "--device", "cpu"], "trained on synthetic")
    expect_error(capsys, [ckpt, "--device", "cuda:7"], "no such CUDA device")
    expect_error(capsys, [ckpt, "--attacks", "apgd-ce,apgd-xx"], "unknown attack(s) apgd-xx")
    expect_error(capsys, [ckpt, "--eps", "-1"], "--eps must be > 0 (in 1/255 units), got -1")
    expect_error(
        capsys, [ckpt, "--eps", "256"], "--eps must be <= 255 with --norm Linf (the whole pixel range), got 256"
    )
    expect_error(capsys, [ckpt, "--attacks", ""], "--attacks: takes attack names separated by commas, got ''")
    expect_error(capsys, [ckpt, "--attacks", "apgd-ce,"], "--attacks: takes attack names separated by commas")
    expect_error(capsys, [ckpt, "--attacks", "apgd-ce,apgd-t,apgd-ce"], "--attacks: names apgd-ce twice")
    expect_error(capsys, [ckpt, "--plot", "m.png"], "--plot needs --margins or --sweep (it draws their figure; or drop")
    expect_error(capsys, [ckpt, "--sweep", "--margins"], "--sweep takes no --margins (two modes: choose one)")
    expect_error(capsys, [ckpt, "--sweep", "--attacks", "apgd-ce"], "--sweep takes no --attacks (it runs its own, APGD")
    expect_error(capsys, [ckpt, "--seed", "-1"], "--seed must be >= 0, got -1")
    expect_error(capsys, [ckpt, "--n", "-1"], "--n must be >= 0, got -1")
    expect_error(capsys, [ckpt, "--bs", "0"], "--bs must be >= 1, got 0")
    expect_error(capsys, [ckpt, "--norm", "L2"], "--norm L2 needs --eps (in 1/255 units, e.g. 127.5 for 0.5)")
    torch.save({**good, "dataset": "../elsewhere/x.npz"}, tmp_path / "moved.pt")
    expect_error(
        capsys,
        [tmp_path / "moved.pt", "--device", "cpu"],
        "no such dataset file: ../elsewhere/x.npz (the checkpoint's dataset: point --dataset at it)",
    )


def test_interrupt_is_one_line(ckpt: Path, capsys, monkeypatch) -> None:
    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(attack, "evaluate", interrupted)
    expect_error(
        capsys,
        [ckpt, *QUICK],
        "attack.py: interrupted; the attacks finished so far are kept (a .state "
        "file beside the result): rerun the same command to continue",
    )


def test_progress_on_a_terminal_and_package_lines_with_verbose(ckpt: Path, capsys, caplog, monkeypatch, few_steps):
    flags = [ckpt, *QUICK, "--attacks", "apgd-ce", "--eps", 24]
    run(*flags, "--seed", 1)
    out, err = capsys.readouterr()
    package = lambda: [r.getMessage() for r in caplog.records if r.name == "auto-attack"]  # noqa: E731
    assert "robust accuracy" in out and "pt/s" not in err and not package()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    run(*flags, "--seed", 2)
    assert "pt/s" in capsys.readouterr().err  # the live line of the attack
    run(*flags, "--seed", 3, "--verbose")
    assert "running apgd-ce" in package()  # the package's own log lines


def test_model_card_has_what_robustbench_asks(ckpt: Path, few_steps) -> None:
    run(ckpt, *QUICK, "--attacks", "apgd-ce", "--seed", 4)
    res = json.loads(Path(attack.result_path(str(ckpt), "apgd-ce", "Linf", 8, 24, 4, bs=12)).read_text())
    card, model = res["robustbench"], models.load(str(ckpt))
    assert card == dict(
        standard_autoattack_full_test_set=False,
        dataset="synthetic",
        threat_model="Linf",
        eps=8 / 255,
        eps_str="8/255",
        clean_acc=res["clean_acc"],
        robust_acc=res["robust_acc"],
        autoattack_acc=None,  # APGD-CE alone is not AutoAttack
        attacks="APGD-CE (n=24, standard's settings)",
        n_points=24,
        architecture="wrn16 width 1",
        params=sum(p.numel() for p in model.parameters()),
        training_loss="sovr",
        eps_training="Linf 8/255",
    )


class Scaled(torch.nn.Module):
    """A model whose logits are `scale` times the tiny model's plus `noise` times a normal draw: at 1e4 the softmax
    of cross-entropy saturates (gradient masking: APGD-CE's gradients vanish), noise makes it a randomized model."""

    def __init__(self, model: torch.nn.Module, scale: float = 1.0, noise: float = 0.0):
        super().__init__()
        self.model, self.scale, self.noise = model, scale, noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.scale * self.model(x)
        return z + self.noise * torch.randn_like(z)


SQUARE = "Square Attack has decreased the robust accuracy of"
RANDOM = 'it seems to be a randomized defense! Please use version="rand".'


@pytest.mark.parametrize(
    "scale, noise, says",
    [(1.0, 0.0, []), (1e4, 0.0, [SQUARE]), (1.0, 1e-3, [RANDOM])],
    ids=["plain", "masked", "randomized"],
)
def test_the_packages_checks_are_said_once_and_kept(ckpt, tmp_path, capsys, monkeypatch, scale, noise, says) -> None:
    """A masked model: Square breaks what APGD-CE could not, and the package's own check_square_sr, applied to the
    whole evaluation's counts, says so; a randomized one: the package's check, run at every batch (of 4 points; the
    package printed it at each), is said once; a plain model: none is said. In the result line's count and the JSON."""
    loaded = models.from_checkpoint
    monkeypatch.setattr(models, "from_checkpoint", lambda *a, **k: Scaled(loaded(*a, **k), scale, noise))
    run(ckpt, "--n", 24, "--bs", 4, "--device", "cpu", "--attacks", "apgd-ce,square", "--eps", 64, "--out", tmp_path)
    out = capsys.readouterr().out
    res = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [m[: len(s)] for m, s in zip(res["checks"], says)] == says and len(res["checks"]) == len(says), res
    assert [ln for ln in out.splitlines() if ln.startswith("AutoAttack's check: ")] == [
        f"AutoAttack's check: {m}" for m in res["checks"]
    ]
    assert (f"{len(says)} warning of AutoAttack's checks" in out) == bool(says)
    if says == [SQUARE]:
        assert res["robust_after"]["square"] < res["robust_after"]["apgd-ce"] - 0.002


def test_the_checks_of_a_resumed_evaluation_survive_the_resume(ckpt: Path, tmp_path: Path, capsys) -> None:
    """What the checks said before an interruption is kept in the state file, said again and lands in the JSON."""
    flags = [ckpt, *QUICK, "--attacks", "apgd-ce,apgd-dlr", "--out", tmp_path]
    result = Path(attack.result_path(str(tmp_path / "last.pt"), "apgd-ce+apgd-dlr", "Linf", 8, 24, 0, bs=12))
    args = attack.get_args([str(a) for a in flags])
    args.rank, args.world, args.device = 0, 1, "cpu"
    settings = attack.prepare(str(ckpt), args)["settings"]
    said = "there are 3 points with zero gradient! This might lead to unreliable evaluation"
    st = dict(settings=settings, robust=[False] * 24, after={"apgd-ce": 0}, checks=[said], time_s=10)
    Path(str(result) + ".state").write_text(json.dumps(st))
    run(*flags)
    assert f"AutoAttack's check: {said}" in capsys.readouterr().out
    assert json.loads(result.read_text())["checks"] == [said]


def test_rank_0s_read_says_whether_an_evaluation_is_finished(ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    """A finished evaluation is rank 0's result file (cli.agreed), whatever this process reads: one whose own copy
    differs (stale) would skip the gathers the others enter, or enter them alone."""
    args = attack.get_args([str(ckpt), *QUICK, "--out", str(tmp_path)])
    args.rank, args.world, args.device = 1, 2, "cpu"
    monkeypatch.setattr(attack.cli, "agreed", lambda value: {"rank 0's": "result"})
    assert attack.prepare(str(ckpt), args)["done"] == {"rank 0's": "result"}


def test_a_check_is_printed_once_whatever_numbers_it_holds(capsys) -> None:
    """The zero-gradient count of each batch, and a --sweep's radii sharing what was said: printed once."""
    said: list[str] = []
    aa_run.tell(["there are 3 points with zero gradient!", "it seems to be a dynamic defense!"], 0, said)
    aa_run.tell(["there are 5 points with zero gradient!"], 0, said)
    aa_run.tell(["it seems to be a dynamic defense!"], 1, [])  # another rank: rank 0 says it
    assert capsys.readouterr().out.splitlines() == [
        "AutoAttack's check: there are 3 points with zero gradient!",
        "AutoAttack's check: it seems to be a dynamic defense!",
    ]
    assert said == ["there are 3 points with zero gradient!", "it seems to be a dynamic defense!"]


def test_versions_name_the_autoattack_package_imported_from_a_path_without_metadata(tmp_path: Path, monkeypatch):
    """The GPU check's machine gets pyautoattack's .py files on PYTHONPATH, not an installed package: its version is
    the module's own __version__, or says where it came from; never silently missing."""

    def no_metadata(pkg: str) -> str:
        raise metadata.PackageNotFoundError(pkg)

    monkeypatch.setattr(metadata, "version", no_metadata)
    monkeypatch.setitem(sys.modules, "autoattack", None)  # upstream autoattack absent: not named
    copy = types.ModuleType("pyautoattack")
    copy.__path__ = [str(tmp_path / "pyautoattack")]
    monkeypatch.setitem(sys.modules, "pyautoattack", copy)
    assert aa_run.versions()["pyautoattack"] == f"unknown ({tmp_path / 'pyautoattack'})"
    copy.__version__ = "0.2.0"
    assert {k: v for k, v in aa_run.versions().items() if "autoattack" in k} == {"pyautoattack": "0.2.0"}


def test_sweep_writes_its_curve_and_says_whether_it_holds(ckpt: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Three radii (8, 16 and 64/255; APGD-CE alone, to keep it quick): the accuracy falls to 0 and never rises,
    PGD-100 <= PGD-20, said in the checkpoint's line; the figures in a JSON of its own, and a PNG."""
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(masking, "SWEEP_SCALES", (1, 2, 8))
    monkeypatch.setattr(masking, "SWEEP_ATTACKS", "apgd-ce")
    run(ckpt, "--n", 8, "--bs", 8, "--device", "cpu", "--sweep", "--out", tmp_path, "--plot", tmp_path / "s.png")
    out = capsys.readouterr().out.splitlines()
    res = json.loads((tmp_path / "last.sweep-Linf-eps8-n8-seed0-bs8.json").read_text())
    sw = res["sweep"]
    acc = list(sw["robust_acc"].values())
    assert sw["radii"] == ["8/255", "16/255", "64/255"] and acc == sorted(acc, reverse=True) and acc[-1] == 0
    assert sw["pgd100"] <= sw["pgd20"] and sw["pgd_step"] == "2/255" and res["checks"] == []
    assert res["sweep_holds"] and res["sweep_verdict"].startswith("sweep: holds (acc falls to 0.0% at 64/255; ")
    assert len(res["sweep_robust"]["8/255"]) == 8 and acc[0] == sum(res["sweep_robust"]["8/255"]) / 8
    assert sum(ln.startswith(f"{ckpt}: clean ") and res["sweep_verdict"] in ln for ln in out) == 1
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob("*.state*"))


def test_sweep_plot_draws_a_line_per_checkpoint_at_its_own_radii() -> None:
    pytest.importorskip("matplotlib")
    s = dict(checkpoint="/runs/a/last.pt", objective="sovr", norm="Linf")
    sw = dict(radii=["8/255", "16/255"], attacks="apgd-ce,apgd-t", robust_acc={"8/255": 0.4, "16/255": 0.1})
    other = dict(radii=["4/255", "8/255"], attacks="apgd-ce,apgd-t", robust_acc={"4/255": 0.5, "8/255": 0.3})
    fig = masking.plot_sweep(
        [dict(settings=s, sweep=sw), dict(settings={**s, "objective": "ce"}, sweep=other)], "/dev/null"
    )
    ax = fig.axes[0]
    assert [(ln.get_label(), list(ln.get_xdata())) for ln in ax.get_lines()] == [
        ("sovr (a/last.pt)", [8.0, 16.0]),
        ("ce (a/last.pt)", [4.0, 8.0]),
    ]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8/255", "16/255", "4/255"]
    assert ax.get_ylabel() == "accuracy under APGD-CE + APGD-T, %"


@pytest.mark.parametrize(
    "acc, pgd, says",
    [
        ([0.3, 0.1, 0.0], dict(pgd20=0.4, pgd100=0.4), "holds (acc falls to 0.0% at 64/255; PGD-100 40.0% <= PGD-20"),
        ([0.3, 0.35, 0.0], dict(pgd20=0.4, pgd100=0.4), "fails (acc rises from 30.0% at 8/255 to 35.0% at 16/255)"),
        ([0.3, 0.2, 0.1], dict(pgd20=0.4, pgd100=0.4), "fails (acc stays at 10.0% at 64/255 (more than 1%))"),
        ([0.3, 0.1, 0.0], dict(pgd20=0.4, pgd100=0.45), "fails (PGD-100 45.0% > PGD-20 40.0% by 5.0%)"),
    ],
)
def test_sweep_verdict_names_what_failed_and_by_how_much(acc: list, pgd: dict, says: str) -> None:
    holds, verdict = masking.sweep_verdict(dict(zip(["8/255", "16/255", "64/255"], acc)), pgd)
    assert verdict.startswith(f"sweep: {says}") and holds == says.startswith("holds"), verdict


def test_one_picture_takes_one_norm(ckpt: Path, tmp_path: Path, capsys) -> None:
    """--margins (and --sweep) of checkpoints trained under different norms draws no picture of mixed radii: refused
    in one line before any attack, unless --norm and --eps put them under one."""
    l2 = tmp_path / "l2.pt"
    torch.save({**torch.load(ckpt, weights_only=True), "norm": "L2"}, l2)
    argv = [ckpt, l2, "--margins", "--points", "4", "--out", tmp_path, "--device", "cpu"]
    expect_error(capsys, argv, "the checkpoints were trained under L2 and Linf: give --norm and --eps")
    assert not list(tmp_path.glob("*.json"))


def test_the_sweeps_pgd_pair_attacks_in_the_evaluations_norm(monkeypatch) -> None:
    """--sweep's PGD-20 and PGD-100 run in the ball of the evaluation's norm (L2 as L-inf), at step eps/4."""
    calls = []

    def logits(model, x, y, eps, step, steps, bs, norm):
        calls.append((eps, step, steps, norm))
        return torch.eye(2)[y], torch.eye(2)[y]  # every point robust

    monkeypatch.setattr(masking.losses, "pgd_logits", logits)
    y, args = torch.tensor([0, 1]), argparse.Namespace(seed=0, bs=500)
    pair = masking.pgd_pair(None, torch.zeros(2, 3), y, 0.5, "L2", args)
    assert calls == [(0.5, 0.125, 20, "L2"), (0.5, 0.125, 100, "L2")] and (pair["pgd20"], pair["pgd100"]) == (1, 1)


def plain_net(arch: str, classes: int = 10) -> torch.nn.Module:
    """A tiny network of `arch` (no normalization) with seeded weights and BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    net = models.ARCHS[arch](classes, 1 if arch == "wrn16" else 2)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2)
    return net.eval()


def plain_args(path: Path, arch: str, *more) -> argparse.Namespace:
    width = "1" if arch == "wrn16" else "2"
    args = attack.get_args([str(path), "--arch", arch, "--width", width, "--eps", "8", *QUICK, *more])
    args.rank, args.world = 0, 1
    return args


@pytest.mark.parametrize("arch", sorted(models.ARCHS))
def test_a_state_dict_of_each_arch_is_the_network_that_saved_it(arch: str, tmp_path: Path) -> None:
    """A bare state_dict of each arch: what attack.py evaluates computes the saved network's logits, on raw [0, 1]
    images (no normalization by default), and its settings say what was assumed."""
    net = plain_net(arch)
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    args = plain_args(tmp_path / "plain.pt", arch, "--dataset", "synthetic")
    e = attack.prepare(str(tmp_path / "plain.pt"), args)
    with torch.no_grad():
        assert torch.equal(attack.model_of(str(tmp_path / "plain.pt"), e, args)(e["x"]), net(e["x"]))
    assumed = e["settings"]["assumed"]
    assert (assumed["arch"], assumed["num_classes"], assumed["mean"], assumed["std"]) == (arch, 10, [0.0] * 3, [1] * 3)
    assert assumed["normalization"] == "none (images in [0, 1] as they are)" and e["settings"]["objective"] is None


def test_a_wrapped_state_dict_is_evaluated_and_says_what_was_assumed(tmp_path: Path, capsys, few_steps) -> None:
    """TRADES' and MART's form, {'state_dict': ...} with DataParallel's 'module.', normalized as --normalize says: the
    clean flags are the saved network's on normalized images; the line, the JSON and the model card say it."""
    net = plain_net("wrn16")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 76}
    torch.save(wrapped, tmp_path / "trades.pt")
    few = ["--n", 8, "--bs", 8, "--device", "cpu"]
    run(tmp_path / "trades.pt", "--arch", "wrn16", "--width", 1, "--eps", 8, "--normalize", "cifar10", "--dataset",
        "synthetic", *few, "--attacks", "apgd-ce", "--out", tmp_path)  # fmt: skip
    (path,) = tmp_path.glob("trades.*.json")
    res = json.loads(path.read_text())
    mean, std = models.STATS["cifar10"]
    x, y = attack.test_points(dict(dataset="synthetic", num_classes=10), attack.get_args(["x.pt", *map(str, few)]))
    with torch.no_grad():
        clean = net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).argmax(1) == y
    assert res["clean"] == clean.int().tolist() and res["settings"]["assumed"]["mean"] == pytest.approx(mean)
    said = f"(a state_dict taken as wrn16 width 1 with 10 classes, normalization cifar10 (mean {mean}, std {std})"
    assert f"{tmp_path / 'trades.pt'} {said}, test set synthetic): clean " in capsys.readouterr().out
    card = res["robustbench"]
    assert (card["architecture"], card["eps_training"], card["training_loss"]) == ("wrn16 width 1", None, None)


def test_a_state_dict_is_refused_in_one_line_before_any_attack(ckpt: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(aa_run, "autoattack", no_attack)
    torch.save(plain_net("wrn16").state_dict(), tmp_path / "plain.pt")
    plain = [tmp_path / "plain.pt", "--dataset", "synthetic", *QUICK]
    expect_error(capsys, plain, "holds no model: not a train.py checkpoint (for a state_dict, give --arch and --eps)")
    expect_error(capsys, [*plain, "--arch", "wrn16"], "--arch needs --eps (a state_dict holds no training eps")
    expect_error(capsys, [*plain, "--width", 1, "--eps", 8], "--width needs --arch (the network of a state_dict")
    expect_error(capsys, [*plain, "--arch", "wrn16", "--eps", 8, "--normalize", "0.5/0"], "argument --normalize")
    # a mismatch names the first key at fault: missing, unexpected, or of another shape
    expect_error(
        capsys,
        [*plain, "--arch", "preact18", "--width", 1, "--eps", 8],
        f"{tmp_path / 'plain.pt'}: its weights do not fit arch preact18 with 10 classes, width 1: missing key "
        "1.6.bn1.weight (and 20 more)",
    )
    expect_error(capsys, [*plain, "--arch", "wrn16", "--width", 2, "--eps", 8], "width 2: missing key 1.0.short.weight")
    torch.save({**plain_net("wrn16").state_dict(), "head.weight": torch.zeros(3, 2)}, tmp_path / "extra.pt")
    expect_error(
        capsys,
        [tmp_path / "extra.pt", "--arch", "wrn16", "--width", 1, "--eps", 8, *QUICK],
        "with 3 classes, width 1: unexpected key head.weight",
    )
    torch.save(plain_net("wrn16", 100).state_dict(), tmp_path / "c100.pt")
    expect_error(
        capsys,
        [tmp_path / "c100.pt", "--arch", "wrn16", "--width", 1, "--eps", 8, "--dataset", "synthetic", *QUICK],
        "--dataset synthetic has 10 classes, the weights 100",
    )
    expect_error(
        capsys,
        [ckpt, "--arch", "wrn16", "--width", 1, "--eps", 8, *QUICK],
        f"--arch, --width would do nothing: {ckpt} is a train.py checkpoint, which names its own arch, width and "
        "normalization (drop --arch, --width)",
    )
    # the file that evaluate() reads again is the one prepare() checked
    args = plain_args(tmp_path / "plain.pt", "wrn16", "--dataset", "synthetic")
    e = attack.prepare(str(tmp_path / "plain.pt"), args)
    os.utime(tmp_path / "plain.pt", ns=(0, 0))
    with pytest.raises(ValueError, match="plain.pt changed after it was checked: rerun to evaluate it as it is now"):
        attack.model_of(str(tmp_path / "plain.pt"), e, args)


def test_normalize_takes_a_named_set_or_mean_and_std() -> None:
    mean, std, normalization = *models.STATS["cifar100"], attack.flags.normalization
    assert normalization("cifar100") == (f"cifar100 (mean {mean}, std {std})", mean, std)
    assert normalization("0.5/0.25")[1:] == ((0.5,) * 3, (0.25,) * 3) and normalization(None) is None
    assert normalization("0.1,0.2,0.3/1,2,3")[1:] == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    for bad in ("imagenet", "0.5", "0.5/0", "0.5,0.5/1", "0.5/1/1", "a/b"):
        with pytest.raises(argparse.ArgumentTypeError, match="takes none, cifar10, cifar100, svhn or MEAN/STD"):
            normalization(bad)


def test_one_model_is_on_the_device_at_a_time(ckpt: Path, tmp_path: Path, monkeypatch, few_steps) -> None:
    """Every checkpoint is checked before the first evaluation, but its model is built only for its own and freed
    after (by reference counting: no garbage collection needed): while the second is evaluated, the first's model
    is gone."""
    import weakref

    built, alive, loaded, attacks = [], [], models.from_checkpoint, aa_run.autoattack

    def build(*a, **k):
        built.append(weakref.ref(model := loaded(*a, **k)))
        return model

    def measure(*a, **k):
        alive.append(sum(r() is not None for r in built))
        return attacks(*a, **k)

    monkeypatch.setattr(models, "from_checkpoint", build)
    monkeypatch.setattr(aa_run, "autoattack", measure)
    run(
        ckpt, ckpt.parent / "best.pt", "--n", 4, "--bs", 4, "--device", "cpu", "--attacks", "apgd-ce", "--out", tmp_path
    )
    assert len(built) == 2 and alive == [1, 1]


def test_attack_py_is_the_evaluation_script_above_the_modules_it_uses() -> None:
    """attack.py, at most 300 lines, stands above what it shares: aa_run.py (AutoAttack run one attack at a time,
    resumably, and what names a result) imports neither attack.py nor masking.py, and masking.py (the
    gradient-masking diagnostics, which run AutoAttack too) not attack.py: no import circle."""

    def imports(name: str) -> set[str]:
        tree = ast.parse((HERE / name).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert len((HERE / "attack.py").read_text().splitlines()) <= 300
    assert {"aa_run", "masking"} <= imports("attack.py") and "aa_run" in imports("masking.py")
    assert not {"attack", "masking"} & imports("aa_run.py") and "attack" not in imports("masking.py")


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, str(HERE / "attack.py"), str(tmp_path / "nope.pt")], capture_output=True, text=True
    )
    assert p.returncode != 0 and p.stderr.strip() == f"attack.py: error: no such checkpoint: {tmp_path / 'nope.pt'}"


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@CUDA
def test_cuda_gives_the_cpu_result_point_by_point(ckpt: Path, no_tf32) -> None:
    res = {}
    for device in ("cpu", "cuda"):  # each writes its own file
        run(ckpt, "--n", 24, "--bs", 12, "--device", device, "--attacks", "apgd-ce,apgd-t", "--eps", 24)
        res[device] = json.loads(
            Path(attack.result_path(str(ckpt), "apgd-ce+apgd-t", "Linf", 24, 24, 0, bs=12, device=device)).read_text()
        )
    assert res["cuda"]["clean"] == res["cpu"]["clean"]
    # APGD's random starts are drawn on the CPU, so both devices attack from the same points; only rounding in
    # the kernels differs, and a step-size or sign decision can amplify it for a point at the boundary.
    differ = sum(a != b for a, b in zip(res["cuda"]["robust"], res["cpu"]["robust"]))
    assert differ <= 1, f"{differ} of 24 points differ: cpu {res['cpu']['robust']}, cuda {res['cuda']['robust']}"


@CUDA
def test_cuda_out_of_memory_is_one_clear_line(ckpt: Path, capsys, cap_gpu_memory) -> None:
    cap_gpu_memory(8)  # less than one batch of 200 images needs
    expect_error(
        capsys,
        [ckpt, "--n", 200, "--bs", 200, "--device", "cuda", "--attacks", "apgd-ce"],
        "CUDA out of memory at --bs 200: lower --bs",
    )


LATE_RANK = """
import datetime, os, time
import torch.distributed.distributed_c10d as c10d
import aa_run
import attack
import cli

c10d.default_pg_timeout = datetime.timedelta(seconds=2)  # torch's default, as short next to the wait as NCCL's 10 min
attacks = aa_run.autoattack


def late(*a, **k):
    out = attacks(*a, **k)
    if os.environ["RANK"] == "1":
        time.sleep(4)  # rank 0 waits for rank 1 in the gather past torch's default
    return out


aa_run.autoattack = late
attack.main()
"""


def test_torchrun_shards_the_points_and_gathers_one_result(ckpt: Path, tmp_path: Path) -> None:
    """2 gloo processes: each attacks its contiguous half; rank 0 writes the one JSON, equal point by point to
    one process attacking the same two halves. Rank 1 reaches the final gather 4 s after rank 0, past torch's
    default timeout (shortened here to 2 s): cli.setup's process group waits SOVR_DIST_TIMEOUT (a day by default).
    A shard's state file resumes that shard alone."""
    import shutil

    import torch.distributed as dist

    if not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    shutil.copy(ckpt, tmp_path / "last.pt")
    flags = ["--points", "24", "--bs", "6", "--attacks", "apgd-ce,apgd-dlr", "--eps", "24", "--device", "cpu"]
    (tmp_path / "late.py").write_text(LATE_RANK)
    outer = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SOVR_DIST_TIMEOUT")
    env = {k: v for k, v in os.environ.items() if k not in outer}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=child_pythonpath(), CUDA_VISIBLE_DEVICES="")
    torchrun_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = Path(
        attack.result_path(str(tmp_path / "last.pt"), "apgd-ce+apgd-dlr", "Linf", 24, 24, 0, bs=6, processes=2)
    )

    def torchrun(script: Path) -> dict:
        cmd = [*torchrun_cmd, str(script), str(tmp_path / "last.pt"), *flags]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        return json.loads(result.read_text())

    res = torchrun(tmp_path / "late.py")
    args = attack.get_args([str(tmp_path / "last.pt"), *flags])
    args.rank, args.world, args.device = 0, 1, "cpu"
    c = models.read(str(tmp_path / "last.pt"))
    model = models.from_checkpoint(c)
    x, y = attack.test_points(c, args)
    clean = attack.predict(model, x, 6, "cpu") == y
    ref = []
    for half in (slice(0, 12), slice(12, 24)):
        robust, *_ = aa_run.autoattack(
            model, x[half], y[half], clean[half], 24 / 255, args, str(tmp_path / f"{half.start}.st"), res["settings"]
        )
        ref += robust.int().tolist()
    assert res["settings"]["processes"] == 2 and res["clean"] == clean.int().tolist() and res["robust"] == ref
    assert 0 < sum(ref) < sum(res["clean"]) and res["robustbench"]["robust_acc"] == res["robust_acc"]
    assert not list(tmp_path.glob("*.state*"))
    # rank 1 was interrupted after apgd-ce, having lost every point (and no result was written): only its shard
    # resumes from that
    result.unlink()
    Path(str(result) + ".state.rank1-of-2").write_text(
        json.dumps(dict(settings=res["settings"], robust=[False] * 12, after={"apgd-ce": 0}))
    )
    again = torchrun(HERE / "attack.py")
    assert again["robust"] == ref[:12] + [0] * 12


def test_the_process_groups_timeout_is_sovr_dist_timeout(monkeypatch) -> None:
    """The knob, read where the process group starts; its effect: test_torchrun_shards_the_points_and_gathers_..."""
    monkeypatch.delenv("SOVR_DIST_TIMEOUT", raising=False)
    assert cli.dist_timeout().total_seconds() == cli.DIST_TIMEOUT_S == 86_400
    monkeypatch.setenv("SOVR_DIST_TIMEOUT", "2.5")
    assert cli.dist_timeout().total_seconds() == 2.5
    monkeypatch.setenv("SOVR_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="SOVR_DIST_TIMEOUT=soon: give a number of seconds > 0"):
        cli.dist_timeout()
