"""bench.py runs end to end with tiny settings and writes every figure; no timing is asserted. Its peak table, and
.ci/gpu's training command."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import train

REPO = Path(__file__).resolve().parent.parent

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


@pytest.mark.parametrize("device", DEVICES)
def test_bench_writes_positive_figures(tmp_path, device: str) -> None:
    out = tmp_path / "bench.json"
    argv = [
        "--arch",
        "wrn16",
        "--width",
        "1",
        "--batch",
        "8",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--workers",
        "0",
        "--threads",
        "1",
        "--quick",
        "--device",
        device,
        "--out",
        str(out),
    ]
    threads = torch.get_num_threads()
    try:
        returned = bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    r = json.loads(out.read_text())
    assert r == json.loads(json.dumps(returned))
    assert not (tmp_path / "bench.json.tmp").exists()
    assert r["device"] == device and r["torch"] == torch.__version__ and r["device_name"] and r["date"]
    assert r["command"] == "python bench.py " + " ".join(argv)
    assert r["settings"]["arch"] == "wrn16" and r["settings"]["width"] == 1 and r["settings"]["batch"] == 8
    for section in ("train", "textbook"):
        assert positive(r[section]["img_s"]) and len(r[section]["step_s"]) == 1
    assert positive(r["speedup"])
    assert set(r["loss_cost"]) == {"512x10", "512x100"}
    for c in r["loss_cost"].values():
        assert all(positive(c[k]) for k in ("ce_us", "sovr_us", "ratio"))
    assert positive(r["eval"]["pgd20_img_s"]) and positive(r["eval"]["apgd_ce_img_s"])
    if device == "cuda":
        c = r["cuda"]
        assert all(
            positive(c[k])
            for k in (
                "train_peak_mem_gib",
                "textbook_peak_mem_gib",
                "train_flops_per_step",
                "train_tflops",
                "hours_110_epochs",
            )
        )
    else:
        assert "cuda" not in r


def test_bench_rejects_bad_flags(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        bench.main(["--repeats", "0"])
    assert e.value.code == 2 and capsys.readouterr().err == "bench.py: error: --repeats must be >= 1\n"  # no usage


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA L40S", 362), ("NVIDIA L4", 121), ("NVIDIA L40", None), ("NVIDIA H100 PCIe", 756),
     ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA A100-SXM4-80GB", 312), ("Tesla V100-SXM2-16GB", None)],
)  # fmt: skip
def test_bf16_peak_is_found_by_whole_words_of_the_device_name(name: str, peak: int | None) -> None:
    """An L40 (no entry) is not an L4: the table's names are matched as words, not as substrings."""
    assert bench.peak_tflops(name) == peak


def test_gpu_check_trains_with_every_lr_drop_inside_its_epochs(tmp_path: Path) -> None:
    """.ci/gpu's training (GPU_EPOCHS=10) with a python that records each command: train.py's schedule for that
    command lowers the lr before the last epoch, where milestones 9,10 put the second drop after it."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "gpu", tmp_path / ".ci" / "gpu")  # it writes beside itself: results/, runs/
    (tmp_path / "data.npz").write_bytes(b"")
    calls = tmp_path / "calls.jsonl"
    fake = tmp_path / "python"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\nopen({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "print('Fake-GPU') if sys.argv[1] == '-c' else None\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "GPU_STEPS": "train", "GPU_EPOCHS": "10"}
    subprocess.run(["bash", str(tmp_path / ".ci" / "gpu"), str(tmp_path / "data.npz")], env=env, capture_output=True)
    argv = next(a for a in map(json.loads, calls.read_text().splitlines()) if a[0] == "train.py")
    args = train.get_args(argv[1:])
    assert args.epochs == 10 and args.milestones and max(args.milestones) < args.epochs, argv
