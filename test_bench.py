"""bench.py runs end to end with tiny settings and writes every figure; no timing is asserted."""

import json

import pytest
import torch

import bench

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
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err
