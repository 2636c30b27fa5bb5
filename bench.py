"""Speed of this project's PGD adversarial training against the same work written the textbook way.

    python bench.py                                        # CPU-sized defaults: a few minutes at most on 2 cores
    python bench.py --device cuda --batch 512 --repeats 10 # the standard-width model on a GPU

Measured in one run on one device, by the same code for CPU and CUDA. Times are medians of --repeats timed
repeats after --warmup untimed ones; the model is untrained, which does not change its speed.
  train      one step of train.py's loop, by its own code: data.batches() (crop and flip on the device) and
             train.train_step() (PGD-10 taking only input gradients, the training forward, backward, SGD, and
             with --ema the average's update); channels_last, bf16 autocast as train.py (GPUs from Ampere on)
  textbook   the same step as most public repos write it: a DataLoader with PIL transforms, fp32, NCHW, and
             PGD steps that call loss.backward() (parameter gradients too) and model.zero_grad()
  loss cost  sovr_loss against F.cross_entropy, forward + backward, on float32 logits [512, 10] and [512, 100]
  eval       PGD-20 (losses.pgd in fp32, as train.evaluate() runs it) and AutoAttack APGD-CE (fp32, 100 iterations,
             1 restart as in standard AutoAttack; one timed run, its input checks and clean pass included)
             on the same model. AutoAttack attacks only correctly classified images, so the labels for both
             attacks are the model's own predictions.
  CUDA only  peak memory, achieved TFLOP/s of the train step against the device's bf16 dense peak, and
             hours of a 110-epoch CIFAR-10 run at this batch size (49,000 images per epoch, no evaluation).
Prints a table and writes the figures to --out (JSON, written atomically).
"""

import argparse
import contextlib
import itertools
import logging
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import cli
import data
import models
import train
from losses import OBJECTIVES, pgd
from sovr import sovr_loss

# bf16 dense tensor-core peak in TFLOP/s, matched in this order against torch.cuda.get_device_name() (peak_tflops).
BF16_PEAK_TFLOPS = [
    ("H100 PCIe", 756),
    ("H100 NVL", 835),
    ("H100", 989),
    ("H200", 989),
    ("A100", 312),
    ("L40S", 362),
    ("L4", 121),
]
EPOCH_IMAGES, EPOCHS = 50_000 - 1_000, 110  # CIFAR-10 less train.py's validation images; train.py's epochs


def get_args(argv: list[str]) -> argparse.Namespace:
    """The command line, parsed and checked: counts >= 1, sizes and threads >= 0."""
    p = parser()
    args = p.parse_args(argv)
    for name in ("batch", "repeats", "warmup"):
        if getattr(args, name) < 1:
            cli.refuse(p, f"--{name} must be >= 1")
    for name in ("eval_batch", "workers", "threads"):
        if (getattr(args, name) or 0) < 0:
            cli.refuse(p, f"--{name.replace('_', '-')} must be >= 0")
    return args


def parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, prog="bench.py")
    a = p.add_argument
    a("--arch", default="preact18", choices=sorted(models.ARCHS), help="network (default preact18)")
    a(
        "--width",
        type=int,
        help="ResNet base channels / WRN widen factor (default: the arch's "
        "standard on CUDA, 16 on CPU, which keeps the default CPU run short)",
    )
    a("--loss", default="sovr", choices=["ce", "sovr"], help="training objective (default sovr)")
    a("--batch", type=int, default=32, help="training batch size (default 32)")
    a("--eval-batch", type=int, default=None, help="batch size of the evaluation attacks (default: --batch)")
    a("--device", default=None, help="cpu | cuda | cuda:N (default cuda if available, else cpu)")
    a("--repeats", type=int, default=3, help="timed repeats of each figure; the median is reported (default 3)")
    a(
        "--warmup",
        type=int,
        default=1,
        help="untimed training steps of each loop before timing, >= 1: the first "
        "one compiles and autotunes, and its time is reported apart (default 1)",
    )
    a("--workers", type=int, default=2, help="DataLoader workers of the textbook loop (default 2, as most repos)")
    a(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: steady figures on a machine shared "
        "with other jobs, where two threads can run 10x slower; 0 = torch's default)",
    )
    a(
        "--compile",
        action="store_true",
        help="torch.compile the project's model, as train.py --compile (the "
        "compile time is reported apart; the textbook loop stays eager)",
    )
    a("--ema", type=float, default=None, help="the project's step with train.py --ema DECAY's update (default off)")
    a("--quick", action="store_true", help="tiny counts for tests (APGD 2 iterations, 3 loss calls); no benchmark")
    a("--out", default="bench.json", help="JSON file for the figures (default bench.json)")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, int]:
    """Seconds of one call of fn, and on CUDA the peak bytes allocated during it (all live tensors counted)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    n = torch.get_num_threads()
    return f"{name} ({n} thread{'s' * (n != 1)})"


# ---- the project's training step: train.py's own batches and step


def project_step(net, opt, targs: argparse.Namespace, x_pool, y_pool, amp: bool, ema=None):
    """train.py's step on its own batches (data.batches, train.train_step); `net` is the model, or
    torch.compile(model) as train.py --compile uses it."""
    objective = OBJECTIVES[targs.loss]
    batches = itertools.chain.from_iterable(data.batches(x_pool, y_pool, targs.batch, 0, e) for e in itertools.count())
    steps = itertools.count(1)

    def step() -> None:
        train.train_step(net, net, opt, objective, *next(batches), targs, 0, amp, ema, next(steps))

    return step


# ---- the textbook training step


class PILDataset(torch.utils.data.Dataset):
    """uint8 HWC images handed out as PIL images through transforms, as torchvision.datasets.CIFAR10 does."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def textbook_pgd(model, x, y, eps: float, step: float, steps: int) -> torch.Tensor:
    model.eval()  # as train.py's default --attack-bn eval
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1).detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        loss.backward()  # fills every parameter's .grad as well as x_adv.grad
        x_adv = x_adv.detach() + step * x_adv.grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
        model.zero_grad()
    model.train()
    return x_adv.detach()


def textbook_step(model, opt, batches, targs: argparse.Namespace, device: torch.device):
    loss_fn = F.cross_entropy if targs.loss == "ce" else (lambda z, y: sovr_loss(z, y, targs.ratio))

    def step() -> None:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x_adv = textbook_pgd(model, x, y, targs.eps / 255, targs.step / 255, targs.steps)
        loss = loss_fn(model(x_adv), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


# ---- the other figures


def loss_calls(fn: Callable, logits: torch.Tensor, y: torch.Tensor, calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn(logits.detach().requires_grad_(True), y).backward()

    return run


class _GlobalOnly(contextlib.nullcontext):
    """Stands in for FlopCounterMode's module tracker, whose hooks reject torch.autograd.grad on a leaf (PGD's)."""

    parents = ("Global",)


def count_flops(fn: Callable[[], None]) -> int:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return counter.get_total_flops()


def time_training(args, targs, model, net, pool: tuple, width: int | None, device: torch.device) -> tuple[dict, tuple]:
    """The project's step against the textbook one, warmed up, then alternated so that a change of load on a shared
    machine hits both; the figures, and the peak memory of each (CUDA)."""
    cuda, amp = device.type == "cuda", cli.bf16_default(device)  # train.py's default
    ema = models.EMA(model, targs.ema, 1000) if targs.ema else None
    ours = project_step(net, sgd(model, targs), targs, *pool, amp, ema)
    n_steps = args.warmup + args.repeats
    rng = np.random.default_rng(0)
    loader = torch.utils.data.DataLoader(
        PILDataset(
            rng.integers(0, 256, (args.batch * n_steps, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, args.batch * n_steps),
            T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()]),
        ),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=cuda,
    )
    tb_model = models.build(args.arch, 10, width=width).to(device).train()  # fp32, NCHW
    batches = iter(loader)
    theirs = textbook_step(tb_model, sgd(tb_model, targs), batches, targs, device)
    t_first = timed(ours, device)[0]  # compilation (and cuDNN autotuning) happen here
    theirs()
    for _ in range(args.warmup - 1):
        ours(), theirs()
    runs = [(timed(ours, device), timed(theirs, device)) for _ in range(args.repeats)]
    del batches  # ends the DataLoader workers
    step_s, tb_step_s = statistics.median(r[0][0] for r in runs), statistics.median(r[1][0] for r in runs)
    result = dict(
        train=dict(img_s=args.batch / step_s, step_s=[r[0][0] for r in runs], first_step_s=t_first),
        textbook=dict(img_s=args.batch / tb_step_s, step_s=[r[1][0] for r in runs]),
        speedup=tb_step_s / step_s,
    )
    return result, (max(r[0][1] for r in runs), max(r[1][1] for r in runs))


def time_loss(args, targs, device: torch.device) -> dict:
    """Blocks of sovr_loss and F.cross_entropy calls, forward + backward, alternating."""
    calls, out = 3 if args.quick else 100, {}
    for k in (10, 100):
        logits, y = torch.randn(512, k, device=device), torch.randint(0, k, (512,), device=device)
        ce = loss_calls(F.cross_entropy, logits, y, calls)
        sovr = loss_calls(lambda z, t: sovr_loss(z, t, targs.ratio), logits, y, calls)
        ce(), sovr()  # warm-up
        t = [(timed(ce, device)[0] / calls, timed(sovr, device)[0] / calls) for _ in range(args.repeats)]
        ce_us, sovr_us = 1e6 * statistics.median(a for a, _ in t), 1e6 * statistics.median(b for _, b in t)
        out[f"512x{k}"] = dict(ce_us=ce_us, sovr_us=sovr_us, ratio=sovr_us / ce_us)
    return out


def time_eval(args, targs, model, net, x_pool: torch.Tensor, device: torch.device) -> dict:
    """PGD-20 as train.evaluate() runs it and AutoAttack's APGD-CE, on the model in eval mode, with its own
    predictions as labels (AutoAttack attacks only correctly classified images)."""
    eval_batch, iters = args.eval_batch or args.batch, 2 if args.quick else 100
    model.eval()
    x_eval = x_pool[:eval_batch].float() / 255
    with torch.no_grad():
        y_eval = model(x_eval).argmax(1)
    pgd20 = lambda: pgd(net, x_eval, y_eval, targs.eps / 255, targs.step / 255, targs.eval_steps)  # noqa: E731
    pgd20()  # warm-up: under --compile, eval mode is a graph of its own
    t_pgd = statistics.median(timed(pgd20, device)[0] for _ in range(args.repeats))
    from pyautoattack import AutoAttack  # imported here: slow to import, and only this figure needs it

    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    adversary = AutoAttack(
        model, eps=targs.eps / 255, norm="Linf", version="custom", attacks=["apgd-ce"], device=device, seed=0
    )
    adversary.apgd.n_restarts, adversary.apgd.n_iter = 1, iters  # "custom" keeps the class default of 5
    t_aa, _ = timed(lambda: adversary.run_standard_evaluation(x_eval, y_eval, batch_size=eval_batch), device)
    return dict(pgd20_img_s=eval_batch / t_pgd, apgd_ce_img_s=eval_batch / t_aa, apgd_iters=iters)


def peak_tflops(name: str) -> float | None:
    """The bf16 peak of the first BF16_PEAK_TFLOPS entry whose words are words of the device name, in a row (words
    split at spaces and hyphens: "NVIDIA A100-SXM4-80GB"), so that "L4" is not found in "NVIDIA L40"; None if none."""
    words = re.split(r"[\s-]+", name)
    for key, value in BF16_PEAK_TFLOPS:
        k = key.split()
        if any(words[i : i + len(k)] == k for i in range(len(words))):
            return value
    return None


def cuda_figures(result: dict, memory: tuple, targs, model, pool: tuple, device: torch.device) -> dict:
    """Peak memory, achieved TFLOP/s against the device's bf16 dense peak, hours of a 110-epoch run."""
    model.train()
    flops = count_flops(project_step(model, sgd(model, targs), targs, *pool, True))
    tflops = flops / statistics.median(result["train"]["step_s"]) / 1e12
    peak = peak_tflops(device_name(device))
    mem, tb_mem = memory
    return dict(
        train_peak_mem_gib=mem / 2**30,
        textbook_peak_mem_gib=tb_mem / 2**30,
        train_flops_per_step=flops,
        train_tflops=tflops,
        **(dict(bf16_peak_tflops=peak, mfu=tflops / peak) if peak else {}),
        hours_110_epochs=EPOCH_IMAGES * EPOCHS / result["train"]["img_s"] / 3600,
    )


def sgd(model: torch.nn.Module, targs) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=targs.lr, momentum=targs.momentum, weight_decay=targs.wd)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args(argv)
    device = setup(args)
    targs = train.get_args(
        ["--loss", args.loss, "--arch", args.arch, "--batch", str(args.batch)]
        + (["--ema", str(args.ema)] if args.ema else [])
    )  # train.py's defaults
    width = args.width or (None if device.type == "cuda" else 16)
    model, net, pool = workload(args, width, device)
    result, memory = time_training(args, targs, model, net, pool, width, device)
    result.update(loss_cost=time_loss(args, targs, device), eval=time_eval(args, targs, model, net, pool[0], device))
    if device.type == "cuda":
        result["cuda"] = cuda_figures(result, memory, targs, model, pool, device)
    report = dict(
        device=str(device),
        device_name=device_name(device),
        torch=torch.__version__,
        command=shlex.join(["python", "bench.py", *argv]),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        settings=settings(args, targs, width, model, device),
        **result,
    )
    print_table(report)
    models.write_json(report, args.out, indent=2)
    return report


def setup(args: argparse.Namespace) -> torch.device:
    """The device (one line and exit 1 for one this machine lacks), torch's threads and the seed."""
    try:
        device = cli.pick_device(args.device)
    except ValueError as e:
        sys.exit(f"bench.py: error: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return device


def workload(args: argparse.Namespace, width: int | None, device: torch.device) -> tuple:
    """The project's model (channels_last; `net` compiled under --compile) and a pool of synthetic CIFAR-sized uint8
    images and labels on the device, enough for 4 batches of training or evaluation."""
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as train.py sets it; the textbook loop gets it too
    model = models.build(args.arch, 10, width=width).to(device).to(memory_format=torch.channels_last).train()
    net = torch.compile(model) if args.compile else model
    n_pool = 4 * max(args.batch, args.eval_batch or args.batch)
    pool = (
        torch.randint(0, 256, (n_pool, 3, 32, 32), dtype=torch.uint8).to(device),
        torch.randint(0, 10, (n_pool,)).to(device),
    )
    return model, net, pool


def settings(args: argparse.Namespace, targs: argparse.Namespace, width, model, device: torch.device) -> dict:
    """What was measured and how: the report's settings."""
    return dict(
        arch=args.arch,
        width=width or "standard",
        params=sum(p.numel() for p in model.parameters()),
        loss=args.loss,
        ratio=targs.ratio,
        ema=targs.ema,
        batch=args.batch,
        eval_batch=args.eval_batch or args.batch,
        compile=args.compile,
        repeats=args.repeats,
        warmup=args.warmup,
        workers=args.workers,
        threads=torch.get_num_threads(),
        amp_bf16=cli.bf16_default(device),
        eps=targs.eps,
        pgd_steps=targs.steps,
        eval_steps=targs.eval_steps,
        quick=args.quick,
    )


def print_table(r: dict) -> None:
    s, table = r["settings"], rows(r) + (cuda_rows(r["cuda"]) if r.get("cuda") else [])
    print(
        f"{r['device_name']} | torch {r['torch']} | {s['arch']} width {s['width']} ({s['params'] / 1e6:.2f}M "
        f"params) | batch {s['batch']} | median of {s['repeats']}"
    )
    for name, value, note in table:
        print(f"  {name:<44} {value:<20} {note}")


def rows(r: dict) -> list[tuple[str, str, str]]:
    """The table's rows of every device: (figure, value, note)."""
    s = r["settings"]
    return [
        (
            f"train step, project (PGD-{s['pgd_steps']}, {s['loss']}{', compiled' * s['compile']})",
            f"{r['train']['img_s']:10.2f} img/s",
            f"{statistics.median(r['train']['step_s']):.3f} s/step, first {r['train']['first_step_s']:.1f} s",
        ),
        (
            "train step, textbook loop",
            f"{r['textbook']['img_s']:10.2f} img/s",
            f"{statistics.median(r['textbook']['step_s']):.3f} s/step",
        ),
        ("speedup, project / textbook", f"{r['speedup']:10.2f} x", ""),
        *[
            (
                f"sovr_loss / cross_entropy, {shape}",
                f"{v['ratio']:10.2f} x",
                f"{v['sovr_us']:.0f} vs {v['ce_us']:.0f} us forward+backward",
            )
            for shape, v in r["loss_cost"].items()
        ],
        (f"eval PGD-{s['eval_steps']}", f"{r['eval']['pgd20_img_s']:10.2f} img/s", ""),
        (
            f"eval AutoAttack APGD-CE, {r['eval']['apgd_iters']} iterations",
            f"{r['eval']['apgd_ce_img_s']:10.2f} img/s",
            "",
        ),
    ]


def cuda_rows(c: dict) -> list[tuple[str, str, str]]:
    """The rows of the CUDA figures: peak memory, achieved TFLOP/s, hours of a 110-epoch run."""
    return [
        (
            "peak memory, project (textbook)",
            f"{c['train_peak_mem_gib']:10.2f} GiB",
            f"({c['textbook_peak_mem_gib']:.2f} GiB)",
        ),
        (
            "train step, achieved",
            f"{c['train_tflops']:10.1f} TFLOP/s",
            f"{c['mfu']:.1%} of the {c['bf16_peak_tflops']} bf16 peak" if "mfu" in c else "bf16 peak unknown",
        ),
        ("110-epoch CIFAR-10 run", f"{c['hours_110_epochs']:10.2f} h", "training only"),
    ]


if __name__ == "__main__":  # cli.run: one line and the exit codes of every script (Ctrl-C 130, SIGTERM 143)
    cli.run("bench.py", main, "at --batch or --eval-batch: lower them", "nothing was written")
