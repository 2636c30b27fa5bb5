"""What .ci/gpu does that a CPU can check: its refusals, its time budgets (a step stopped at the end of its own, its
row and the summary still written), the estimate it prints from them, the commit line, and .ci/gpu_summary.py.
A stand-in torch module and python (this file's fake_torch) play the GPU machine: each run takes a second or two."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent
FAKE_TORCH = """
import os
if os.environ["FAKE_TORCH"] == "broken":
    raise ImportError("libcudart.so.13: cannot open shared object file: No such file or directory")
__version__ = "9.9.9+fake"
class cuda:
    is_available = staticmethod(lambda: os.environ["FAKE_TORCH"] == "cuda")
    get_device_name = staticmethod(lambda: "NVIDIA Fake GPU")
class version:
    cuda = "13.0"
class backends:
    class cudnn:
        version = staticmethod(lambda: 91900)
"""
# python for .ci/gpu: train.py outlives any budget, anything else is the real python
FAKE_PYTHON = f"""#!/bin/sh
[ "$1" = train.py ] && exec sleep 30
exec {sys.executable} "$@"
"""


@pytest.fixture
def fake_torch(tmp_path: Path) -> dict:
    """The environment of a .ci/gpu run on the stand-ins; FAKE_TORCH: broken (no import), cpu or cuda."""
    (tmp_path / "fake" / "torch").mkdir(parents=True)
    (tmp_path / "fake" / "torch" / "__init__.py").write_text(FAKE_TORCH)
    (tmp_path / "python").write_text(FAKE_PYTHON)
    (tmp_path / "python").chmod(0o755)
    (tmp_path / "data.npz").write_bytes(b"")
    return {**os.environ, "PYTHONPATH": str(tmp_path / "fake"), "PYTHON": str(tmp_path / "python")}


def check(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / ".ci" / "gpu"), *args], env=env, capture_output=True, text=True)


def copy_of_the_check(to: Path) -> Path:
    """.ci/gpu and its summary in a folder of their own, so that a run writes its results/ there."""
    (to / ".ci").mkdir(parents=True)
    for name in ("gpu", "gpu_summary.py"):
        shutil.copy(HERE / ".ci" / name, to / ".ci" / name)
    return to


@pytest.mark.parametrize(
    "torch_is, args, code, says",
    [
        ("cuda", [], 2, r"\.ci/gpu: usage: bash \.ci/gpu DATA\.npz .*got ''\)"),
        ("broken", ["data.npz"], 1, r"\.ci/gpu: '.*python' cannot import torch \(ImportError: libcudart\.so\.13: "),
        ("cpu", ["data.npz"], 1, r"\.ci/gpu: torch 9\.9\.9\+fake sees no CUDA device on this machine "),
    ],
    ids=["no data", "torch fails to import", "no CUDA device"],
)
def test_refusals_are_one_line_that_says_what_is_missing(fake_torch, tmp_path, torch_is, args, code, says) -> None:
    env = {**fake_torch, "FAKE_TORCH": torch_is}
    p = check(HERE, env, *[str(tmp_path / a) for a in args])
    assert p.returncode == code and p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and re.match(says, p.stderr), p.stderr


def test_a_step_past_its_budget_is_stopped_and_still_reported(fake_torch, tmp_path) -> None:
    """train.py outlives its 2 s budget: stopped, its row written, attack.py (same budget) not run, the summary
    written, exit 1; the estimate printed is the sum of the budgets of what runs. Outside a git checkout, the
    commit is unknown, not 'with uncommitted changes'."""
    env = {**fake_torch, "FAKE_TORCH": "cuda", "GPU_STEPS": "train", "GPU_BUDGET_TRAIN": "2"}
    repo = copy_of_the_check(tmp_path / "repo")
    p = check(repo, env, str(tmp_path / "data.npz"))
    assert p.returncode == 1, p.stdout + p.stderr
    assert re.search(r"^  train +2 s  train\.py ResNet-18", p.stdout, re.M)
    assert re.search(r"^  tests +- s  not run \(GPU_STEPS\)$", p.stdout, re.M)
    assert re.search(r"^  total +52 s  \(0\.9 minutes\)$", p.stdout, re.M)  # start 30 + train 2 + summary 20
    (out,) = (repo / "results" / "gpu").iterdir()
    assert out.name.startswith("Fake-GPU-")
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [r[:2] for r in rows] == [["train", "124"], ["attack", "skipped"]]
    assert rows[0][3] == "2" and rows[1][3] in ("0", "1")  # the seconds allowed: 2, and what was left (under 2)
    assert int(rows[0][2]) <= 2 and rows[0][4].endswith(
        "train.py --dataset "
        + str(tmp_path / "data.npz")
        + (" --arch resnet18 --epochs 10 --val 500 --device cuda --out runs/gpu-check")
    )
    summary = (out / "summary.md").read_text()
    assert "| train | stopped at its budget |" in summary and "| attack | not run: no time left |" in summary
    assert "commit: unknown (not a git checkout)" in (out / "env.txt").read_text()


def test_the_commit_line_says_uncommitted_changes_in_a_changed_checkout(fake_torch, tmp_path) -> None:
    repo = copy_of_the_check(tmp_path / "repo")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "start"]):
        subprocess.run([*git, *args], check=True)
    (repo / ".ci" / "gpu_summary.py").write_text((repo / ".ci" / "gpu_summary.py").read_text() + "\n")
    env = {**fake_torch, "FAKE_TORCH": "cuda", "GPU_STEPS": "none"}
    assert check(repo, env, str(tmp_path / "data.npz")).returncode == 0
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (env_txt,) = (repo / "results" / "gpu").glob("*/env.txt")
    assert f"commit: {head} (with uncommitted changes)\n" in env_txt.read_text()


def test_the_headers_estimate_is_the_sum_of_the_default_budgets() -> None:
    script = (HERE / ".ci" / "gpu").read_text()
    said = re.search(
        r"^#   start (\d+) s \+ tests (\d+) s \+ bench (\d+) s \+ train (\d+) s \+ summary (\d+) s = (\d+) s$",
        script,
        re.M,
    )
    assert said, "the header names each step's budget and their sum"
    *parts, total = map(int, said.groups())
    assert sum(parts) == total and f"at most {total // 60} minutes ({total} s" in script
    defaults = dict(re.findall(r"^    \[(\w+)\]=(?:\$\{GPU_BUDGET_\w+:-)?(\d+)\}?$", script, re.M))
    assert defaults == dict(zip(("start", "tests", "bench", "train", "summary"), map(str, parts)))


def summary_module():
    spec = importlib.util.spec_from_file_location("gpu_summary", HERE / ".ci" / "gpu_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("amp, says", [(True, "bf16 autocast,"), (False, "fp32 (this GPU has no bf16 tensor cores)")])
def test_the_summary_labels_the_benchs_precision_from_what_ran(tmp_path: Path, amp: bool, says: str) -> None:
    """A GPU before Ampere trains in fp32 (bench.py's settings.amp_bf16 False): the summary says fp32 there."""
    settings = dict(arch="wrn34", params=46e6, compile=False, batch=128, loss="sovr", pgd_steps=10, repeats=3, warmup=1)
    run = dict(
        settings={**settings, "amp_bf16": amp},
        train=dict(img_s=700.0, first_step_s=9.0),
        textbook=dict(img_s=270.0),
        speedup=2.6,
        eval=dict(pgd20_img_s=400.0, apgd_ce_img_s=20.0),
        loss_cost={"512x10": dict(ratio=5.8)},
    )
    (tmp_path / "bench-wrn34.json").write_text(json.dumps(run))
    text = "\n".join(summary_module().bench(str(tmp_path)))
    assert f"PGD-10 (training), {says}" in text and ("bf16 autocast" in text) == amp


def test_a_tests_python_subprocess_keeps_what_is_on_pythonpath(monkeypatch) -> None:
    """The GPU machine carries pyautoattack's files on PYTHONPATH: torchrun's ranks started by a test need them too."""
    from conftest import child_pythonpath

    monkeypatch.setenv("PYTHONPATH", "/carried/pyautoattack")
    assert child_pythonpath() == f"{HERE}{os.pathsep}/carried/pyautoattack"
    monkeypatch.delenv("PYTHONPATH")
    assert child_pythonpath() == str(HERE)
    replacing = [
        p.name
        for p in [*HERE.glob("test_*.py"), *HERE.glob("tests/test_*.py")]
        if re.search(r"PYTHONPATH=(str|os\.fspath)\(", p.read_text())
    ]
    assert replacing == [], "a subprocess's PYTHONPATH is conftest.child_pythonpath(), which extends it"
