"""Writes <dir>/summary.md from what .ci/gpu left in <dir>: env.txt, steps.tsv, tests.xml, bench-*.json,
train-log.jsonl and the attack JSON. Usage: python .ci/gpu_summary.py results/gpu/<device>-<date>"""

import glob
import json
import os
import re
import statistics
import sys
import xml.etree.ElementTree as ET

EPOCH_IMAGES = 49_000  # CIFAR-10 less train.py's 1,000 validation images, as bench.py counts it
# steps.tsv's exit codes that are not the command's own: timeout's (.ci/gpu's budgets) and a step not run
STEP_ENDS = {
    "124": "stopped at its budget",
    "137": "killed at its budget",
    "skipped": "not run: no time left",
    "interrupted": "not run: interrupted",
}


def read(path: str) -> str:
    return open(path).read() if os.path.exists(path) else ""


def steps(d: str) -> list[str]:
    """One row a command: its exit code (or that its budget stopped it, or that it did not run), its seconds and its
    budget (the time it was allowed; steps.tsv of a check before budgets has no such column)."""
    out = ["| step | exit code | seconds | budget s | command |", "|---|---|---|---|---|"]
    for line in read(f"{d}/steps.tsv").splitlines():
        name, rc, seconds, *budget, cmd = line.split("\t")
        out.append(f"| {name} | {STEP_ENDS.get(rc, rc)} | {seconds} | {''.join(budget) or '-'} | `{cmd}` |")
    return out


def tests(d: str) -> list[str]:
    if not os.path.exists(f"{d}/tests.xml"):
        ran = os.path.exists(f"{d}/tests.log")
        return ["No tests.xml: killed before pytest wrote it, see tests.log." if ran else "Not run."]
    cases = list(ET.parse(f"{d}/tests.xml").getroot().iter("testcase"))

    def outcome(c) -> str:
        return next((t.tag for t in c if t.tag in ("failure", "error", "skipped")), "passed")

    counts = {k: sum(outcome(c) == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    counts["failed"] = sum(outcome(c) == "failure" for c in cases)
    gpu = [c for c in cases if any(w in c.get("name").lower() for w in ("cuda", "nccl", "gpu"))]
    selected = re.search(r"^tests selected: (\d+)", read(f"{d}/env.txt"), re.M)  # more than ran if stopped
    lines = [
        ", ".join(f"{v} {k}" for k, v in counts.items() if v) + f" of {len(cases)} tests"
        f"{f' ({selected[1]} selected)' if selected else ''}; "
        f"{sum(outcome(c) == 'passed' for c in gpu)} of {len(gpu)} tests named for CUDA/NCCL/GPU passed."
    ]
    for c in cases:
        if outcome(c) in ("failure", "error"):
            msg = next(t for t in c if t.tag in ("failure", "error")).get("message", "")[:300].replace("\n", " ")
            lines.append(f"- FAILED `{c.get('classname')}::{c.get('name')}`: {msg}")
    return lines


def bench(d: str) -> list[str]:
    runs = [json.load(open(p)) for p in sorted(glob.glob(f"{d}/bench-*.json"))]
    if not runs:
        return ["Not run."]
    lines = [
        "| arch (params) | compiled | project img/s | textbook img/s | speedup | s per CIFAR-10 epoch | h per 110 "
        "epochs | TFLOP/s | share of bf16 peak | peak GiB (textbook) | first step s | PGD-20 img/s | "
        "APGD-CE img/s | sovr_loss / CE, 512x10 |",
        "|" + "---|" * 14,
    ]
    lines += [bench_row(r) for r in runs]
    first = runs[0]["settings"]
    lines += [
        "",
        f"Batch {first['batch']}, `--loss {first['loss']}`, PGD-{first['pgd_steps']} (training), "
        f"{precision(runs)}, channels_last; median of {first['repeats']} timed steps after {first['warmup']} "
        "untimed. Commands and every figure: the bench-*.json files.",
    ]
    wrn = [r for r in runs if r["settings"]["arch"] == "wrn34"]
    if wrn:
        best = max(wrn, key=lambda r: r["train"]["img_s"])
        epoch_s = EPOCH_IMAGES / best["train"]["img_s"]
        ok = best["speedup"] >= 3 and epoch_s <= 60
        lines += [
            "",
            f"Target for WRN-34-10 (at least 3x the textbook loop, at most 60 s per CIFAR-10 epoch): "
            f"**{'met' if ok else 'not met'}**, best {best['speedup']:.2f}x and {epoch_s:.1f} s per epoch "
            f"({'compiled' if best['settings'].get('compile') else 'eager'}, "
            f"{best.get('cuda', {}).get('train_tflops', float('nan')):.0f} TFLOP/s).",
        ]
    return lines


def bench_row(r: dict) -> str:
    """One bench-*.json's row; a figure it lacks (the CUDA ones on a CPU, the first step's before bench.py timed
    it) is nan."""
    s, c, t = r["settings"], r.get("cuda", {}), r["train"]
    return (
        f"| {s['arch']} ({s['params'] / 1e6:.1f}M) | {'yes' if s.get('compile') else 'no'} | {t['img_s']:.0f} | "
        f"{r['textbook']['img_s']:.0f} | {r['speedup']:.2f}x | {EPOCH_IMAGES / t['img_s']:.1f} | "
        f"{c.get('hours_110_epochs', float('nan')):.2f} | {c.get('train_tflops', float('nan')):.0f} | "
        f"{c.get('mfu', float('nan')):.1%} | {c.get('train_peak_mem_gib', float('nan')):.2f} "
        f"({c.get('textbook_peak_mem_gib', float('nan')):.2f}) | {t.get('first_step_s', float('nan')):.1f} | "
        f"{r['eval']['pgd20_img_s']:.0f} | {r['eval']['apgd_ce_img_s']:.0f} | "
        f"{r['loss_cost']['512x10']['ratio']:.1f}x |"
    )


def precision(runs: list[dict]) -> str:
    """The training step's precision as bench.py ran it (bf16 autocast from Ampere on, fp32 before)."""
    ran = {r["settings"].get("amp_bf16") for r in runs}
    if ran == {True}:
        return "bf16 autocast"
    if ran == {False}:
        return "fp32 (this GPU has no bf16 tensor cores)"
    return "precision as each bench-*.json's settings.amp_bf16 says (not the same in every run)"


def trained_in(d: str) -> str:
    """The training's precision, as train.py's first line says it ('bf16 autocast training', or 'amp True' before)."""
    ran = re.search(r"(bf16 autocast|fp32) training|amp (True|False)", read(f"{d}/train.log"))
    if not ran:
        return "precision not in train.log"
    return ran[1] or ("bf16 autocast" if ran[2] == "True" else "fp32")


def end_to_end(d: str) -> list[str]:
    recs = [json.loads(line) for line in read(f"{d}/train-log.jsonl").splitlines() if line]
    if not recs:
        return ["Not run."]
    epochs = [r for r in recs if "epoch" in r]
    lines = [
        f"train.py, ResNet-18, {trained_in(d)}, {len(epochs)} epochs: "
        f"{statistics.median(r['time'] for r in epochs):.1f} s per "
        f"epoch (median; first {epochs[0]['time']:.1f} s), last epoch train adversarial accuracy "
        f"{epochs[-1]['train_adv_acc']:.1%}, "
        f"val clean {epochs[-1]['val_clean']:.1%} / PGD-20 {epochs[-1]['val_pgd']:.1%}."
    ]
    final = next((r["final"] for r in recs if "final" in r), {})
    for name, f in final.items():
        lines.append(f"test {name}.pt (epoch {f['epoch']}): clean {f['test_clean']:.1%}, PGD-20 {f['test_pgd']:.1%}")
    for p in sorted(glob.glob(f"{d}/best.*.json")):
        a = json.load(open(p))
        lines.append(
            f"attack.py ({a['settings']['mode']}, n={a['settings']['n']}): clean {a['clean_acc']:.1%}, "
            f"robust {a['robust_acc']:.1%}, {a['time_s']:.0f} s"
        )
    return lines


def section(fn, d: str) -> list[str]:
    """A section, or one line saying why it could not be read: one broken file does not lose the others."""
    try:
        return fn(d)
    except Exception as e:  # a truncated XML or JSON file from a run that was cut short
        return [f"Could not be summarized ({type(e).__name__}: {e}); see the files beside this one."]


def main(d: str) -> None:
    out = [
        f"# GPU check: {os.path.basename(d.rstrip('/'))}",
        "",
        "```",
        read(f"{d}/env.txt").strip(),
        "```",
        "",
        "Produced by `bash .ci/gpu DATA.npz`; the logs and JSON files beside this file hold every figure.",
        "",
        "## Steps",
        "",
        *section(steps, d),
        "",
        "## Tests",
        "",
        *section(tests, d),
        "",
        "## Training step (bench.py)",
        "",
        *section(bench, d),
        "",
        "## End to end (train.py, attack.py)",
        "",
        *section(end_to_end, d),
        "",
    ]
    with open(f"{d}/summary.md", "w") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
