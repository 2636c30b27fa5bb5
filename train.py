"""PGD adversarial training on CIFAR-10/100 with SOVR and its baselines.

    python train.py --loss sovr --arch wrn34           # downloads CIFAR-10, trains to the end
    python train.py --dataset ../shared/data/cifar10_subset.npz --arch wrn16 --width 1 --epochs 5
    python train.py --smoke                            # a few seconds on CPU, synthetic data
    torchrun --nproc_per_node=4 train.py ...           # DistributedDataParallel, --batch is global

Writes <out>/last.pt (resumable), <out>/best.pt (best validation PGD-20), <out>/log.jsonl, <out>/curves.png.
Where each default comes from: README.md, Objectives.
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist

import cli
import data
import losses
import models
import runlog
from losses import OBJECTIVES

# Flags that may change between a run and its --resume without changing the result (--compile and --deterministic
# change CUDA's float rounding, as another run of a nondeterministic kernel does); --resume takes every flag not
# given from last.pt, except those of one invocation.
RESUMABLE = {"resume", "stop_after", "device", "compile", "deterministic", "data_dir", "out", "smoke"}
ONCE = {"resume", "stop_after", "out"}
LAST_ONLY = ("optimizer", "best", "improved", "scheduler", "unaveraged")  # last.pt's keys that best.pt lacks
EMA_DECAY = 0.995  # DM-Improves-AT's train-wa.py: --tau default
VAL = 1000  # training images held out for model selection: our choice
AUX_FRACTION = 0.7  # DM-Improves-AT's core/utils/parser.py: --unsup-fraction default
ON_OFF = argparse.BooleanOptionalAction
SMOKE = dict(dataset="synthetic", train_limit=256, val=64, epochs=2, batch=64, steps=2, eval_steps=2, width=8)


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; with --resume (or --resume auto finding last.pt), those not given taken from last.pt."""
    argv = sys.argv[1:] if argv is None else argv
    p = cli.parser(__doc__, allow_abbrev=False)
    data_flags(p.add_argument_group("data and model").add_argument)
    recipe_flags(p.add_argument_group("recipe").add_argument)
    losses.flags(p.add_argument_group("objective (each flag: the losses that read it)").add_argument)
    run_flags(p.add_argument_group("run").add_argument)
    given = cli.given(p, argv)
    if "smoke" in given:
        p.set_defaults(**SMOKE)  # explicit flags still win
    args = p.parse_args(argv)
    name = os.path.splitext(os.path.basename(args.dataset))[0]
    args.out = args.out or os.path.join("runs", f"{name}-{args.arch}-{losses.label(vars(args))}-s{args.seed}")
    args.resume = args.resume is True or (args.resume == "auto" and os.path.isfile(os.path.join(args.out, "last.pt")))
    try:
        if args.resume:
            take(args, given)
        check(args, given)
    except ValueError as e:
        p.error(str(e))
    return args


def data_flags(a) -> None:
    a(
        "--dataset",
        default="cifar10",
        help="cifar10 (default) | cifar100 | synthetic | .npz with x_train, y_train, x_test, y_test",
    )
    a("--data-dir", default="./data", help="where torchvision downloads CIFAR (default ./data)")
    a(
        "--val",
        type=int,
        default=None,
        help=f"training images held out for model selection (default {VAL}; for a set of fewer than {2 * VAL}, half "
        "of it, leaving at least --batch)",
    )
    a("--train-limit", type=int, default=0, help="use only the first N training images, 0 = all (for quick checks)")
    a("--aux-data", default=None, metavar="NPZ", help="generated images mixed into every batch (default none)")
    a("--aux-fraction", type=float, default=None, help=f"share of each batch from --aux-data (default {AUX_FRACTION})")
    a("--arch", default="resnet18", choices=sorted(models.ARCHS), help="network (default resnet18)")
    a("--width", type=int, default=None, help="ResNet base channels / WRN widen factor (default: the arch's standard)")


def recipe_flags(a) -> None:
    a("--epochs", type=int, default=110, help="epochs (default 110)")
    a(
        "--milestones",
        type=_ints,
        default=None,
        help="epochs after which lr and EMR lambda x0.1 (default: 100/110, 105/110 of --epochs)",
    )
    a("--lr", type=float, default=0.1, help="SGD learning rate for the global batch (default 0.1)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    a("--wd", type=float, default=5e-4, help="weight decay (default 5e-4)")
    a("--batch", type=int, default=128, help="global batch size (default 128)")
    a("--eps", type=int, default=8, help="L-inf radius in 1/255 units (default 8, i.e. 8/255)")
    a("--step", type=int, default=2, help="PGD step in 1/255 units (default 2)")
    a("--steps", type=int, default=10, help="PGD steps in training (default 10)")
    a("--eval-steps", type=int, default=20, help="PGD steps for validation and test (default 20)")
    a("--attack-bn", default="eval", choices=["eval", "train"], help="BatchNorm mode while attacking (default eval)")
    a(
        "--ema",
        type=float,
        nargs="?",
        const=EMA_DECAY,
        default=None,
        metavar="DECAY",
        help=f"evaluate and save a moving average of the weights (default off; --ema alone: {EMA_DECAY})",
    )


def run_flags(a) -> None:
    a("--seed", type=int, default=0, help="random seed (default 0)")
    a("--out", default=None, help="run folder (default runs/<dataset>-<arch>-<objective>-s<seed>)")
    a(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        type=_auto,
        metavar="auto",
        help="continue <out>/last.pt with its flags (those given must match, but --stop-after, --device, --compile, "
        "--deterministic, --data-dir); 'auto': continue if it exists, else start (safe to requeue)",
    )
    a("--init", default=None, help="start from this checkpoint's weights, with a fresh optimizer and schedule")
    a("--stop-after", type=int, default=0, help="train at most N epochs in this invocation, then exit (0 = all)")
    a("--device", default=None, help="cpu | cuda | cuda:N (default cuda if available)")
    a("--amp", action=ON_OFF, default=None, help="bf16 autocast in training (default on for CUDA)")
    a("--channels-last", action=ON_OFF, default=True, help="NHWC memory format (default on)")
    a("--compile", action=ON_OFF, default=False, help="torch.compile the model (default off)")
    a("--deterministic", action=ON_OFF, default=False, help="deterministic CUDA kernels: bit for bit (default off)")
    a("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun (default off)")
    a("--smoke", action="store_true", help=f"defaults for a seconds-long CPU check: {SMOKE}")


def _ints(value: str) -> list[int]:
    try:
        return [int(m) for m in value.replace(" ", "").split(",") if m]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, not {value!r}") from None


def _auto(value: str) -> str:
    if value != "auto":
        raise argparse.ArgumentTypeError(f"takes no value or 'auto', not {value!r}")
    return value


def check(args: argparse.Namespace, given: set[str] = frozenset()) -> None:
    """Fills in the defaults that depend on other flags; ValueError for values no run can use and for an objective
    flag among `given` (the command line's) that the objective does not read."""
    for names, low in (
        (("epochs", "batch", "steps", "eval_steps"), 1),
        (("eps", "step", "train_limit", "stop_after"), 0),
    ):
        for name in names:
            if getattr(args, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}")
    losses.resolve(args, given)
    for bad, message in [
        (args.eps > 255, f"--eps must be <= 255 (it is in 1/255 units), got {args.eps}"),
        (not 0 < args.lr < math.inf, f"--lr must be a positive number, got {args.lr}"),
        (not 0 <= args.momentum < 1, f"--momentum must lie in [0, 1), got {args.momentum}"),
        (not 0 <= args.wd < math.inf, f"--wd must be >= 0, got {args.wd}"),
        (args.width is not None and args.width < 1, "--width must be >= 1"),
        (args.ema is not None and not 0 < args.ema < 1, f"--ema must lie in (0, 1), got {args.ema}"),
        (args.aux_fraction is not None and not args.aux_data, "--aux-fraction needs --aux-data"),
    ]:
        if bad:
            raise ValueError(message)
    args.aux_fraction = (AUX_FRACTION if args.aux_fraction is None else args.aux_fraction) if args.aux_data else None
    if args.aux_data and not 0 <= args.aux_fraction < 1:
        raise ValueError(f"--aux-fraction must lie in [0, 1), got {args.aux_fraction:g}")
    if args.milestones is None:  # the recipe's 100 and 105 of 110 epochs, scaled, each before the last epoch
        args.milestones = sorted({min(round(args.epochs * f / 110), args.epochs - 1) for f in (100, 105)} - {0})
    if any(m < 1 for m in args.milestones):
        raise ValueError("--milestones must be >= 1 (a drop after epoch 0 would lower the lr from the start)")


# ---- the step


def train_step(
    net,
    atk,
    opt: torch.optim.Optimizer,
    objective,
    x: torch.Tensor,
    y: torch.Tensor,
    args,
    epoch: int,
    amp: bool,
    ema: models.EMA | None = None,
    step: int = 0,
) -> torch.Tensor:
    """One optimizer step of `objective` (it crafts its own adversarial examples), bf16 autocast if amp, then the
    average's update (run step `step`). [loss, adversarial accuracy] stays on the device: the step never waits for
    the GPU (tests run it under torch.cuda.set_sync_debug_mode("error"))."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        loss, z = objective(net, atk, x, y, args, epoch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if ema is not None:
        ema.update(step)
    return torch.stack([loss.detach().float(), (z.argmax(1) == y).float().mean()])


def evaluate(model, x: torch.Tensor, y: torch.Tensor, args, bs: int = 500) -> tuple[float, float]:
    """Clean and PGD-<--eval-steps> accuracy as attack.py computes (losses.precision), seeded, summed over ranks."""
    return losses.pgd_accuracy(model, x, y, args.eps / 255, args.step / 255, args.eval_steps, args.seed, bs)


# ---- the run: its model, its epochs, what it saves


def checkpoint(model, args, d: dict, epoch: int, metrics: dict) -> dict:
    dataset = os.path.abspath(args.dataset) if args.dataset.endswith(".npz") else args.dataset  # found from anywhere
    return dict(
        model=model.state_dict(),
        arch=args.arch,
        width=args.width,
        num_classes=d["num_classes"],
        dataset=dataset,
        mean=list(d["mean"]),
        std=list(d["std"]),
        eps=args.eps,
        epoch=epoch,
        metrics=metrics,
        args=vars(args),
    )


def take(args, given: set[str]) -> dict:
    """--resume: last.pt, and from it every flag not among `given` (but those of one invocation); ValueError naming
    every given flag that would change the result."""
    path = os.path.join(args.out, "last.pt")
    state = models.read(path, "--resume")
    if "optimizer" not in state:
        raise ValueError(f"--resume: {path} is not a train.py last.pt")
    old = state.get("args", {})  # a flag it lacks is newer than the run and keeps its default
    diff = sorted(k for k in given - RESUMABLE if k in old and old[k] != getattr(args, k))
    if "epochs" in diff and state["epoch"] >= old["epochs"]:
        raise ValueError(
            f"--resume: {path} has finished its {old['epochs']} epochs; to train it longer, start a new run from "
            f"its weights: --init {path} --out NEW_FOLDER"
        )
    if diff:
        raise ValueError(
            f"--resume: {path} was trained with {cli.as_flags(old, diff)}, not {cli.as_flags(vars(args), diff)} "
            "(leave them out to continue it)"
        )
    for k, v in old.items():
        if hasattr(args, k) and k not in given | ONCE:
            setattr(args, k, v)
    return state


def make_model(args, d: dict, device: torch.device, world: int, steps: int, state: dict | None) -> tuple:
    """Model, weight average (None without --ema), optimizer, scheduler, first epoch and best validation score:
    fresh, from --init, or resumed from last.pt's `state` (`steps` per epoch)."""
    init = models.read(args.init, "--init") if args.init and not args.resume else None
    if init and (init["arch"], init["num_classes"]) != (args.arch, d["num_classes"]):
        raise ValueError(
            f"--init: {args.init} holds a {init['arch']} with {init['num_classes']} classes, "
            f"not a {args.arch} with {d['num_classes']}"
        )
    if state or init:  # the model keeps the normalization it was first trained with
        d["mean"], d["std"] = (state or init)["mean"], (state or init)["std"]
        args.width = init.get("width") if init and args.width is None else args.width
    model = models.build(args.arch, d["num_classes"], d["mean"], d["std"], args.width)
    if init:
        models.with_weights(
            model,
            init["model"],
            f"--init: the weights of {args.init} do not fit --arch {args.arch} --width {args.width}",
        )
    model = model.to(device).to(memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    if world > 1 and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, 0.1)
    ema = models.EMA(model, args.ema, args.epochs * steps) if args.ema else None
    if not state:
        return model, ema, opt, sched, 0, -1.0
    model.load_state_dict(state.get("unaveraged", state["model"]))  # with --ema, "model" holds the average
    if ema:
        ema.model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"]), sched.load_state_dict(state["scheduler"])
    return model, ema, opt, sched, state["epoch"], state["best"]


def wrap(model, args, world: int) -> tuple:
    """(net, atk): what the optimizer steps through (DDP under torchrun) and the plain model the attack runs on,
    so that attack steps carry no DDP gradient hooks; both compiled with --compile."""
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if not args.compile:
        return net, model
    atk = torch.compile(model)
    return (torch.compile(net) if world > 1 else atk), atk


def train_epoch(
    net,
    atk,
    opt,
    ema: models.EMA | None,
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    aux: tuple | None,
    args,
    epoch: int,
    amp: bool,
    rank: int,
    world: int,
) -> torch.Tensor:
    """One epoch of steps, with a live line on a terminal (it reads the loss every 10 steps); [steps, 2] losses
    and adversarial accuracies, left on the device. Every epoch reseeds from --seed and its number, so that a
    resumed run repeats exactly what an uninterrupted one does."""
    torch.manual_seed((args.seed * 100_003 + epoch) * 1009 + rank)
    steps, objective = len(x_tr) // args.batch, OBJECTIVES[args.loss]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    net.train()
    stats = torch.zeros(steps, 2, device=x_tr.device)
    with cli.progress(steps * args.batch, f"epoch {epoch + 1}/{args.epochs}", "img", rank) as bar:
        for s, (x, y) in enumerate(
            data.batches(x_tr, y_tr, args.batch, args.seed, epoch, rank, world, fmt, aux, args.aux_fraction)
        ):
            stats[s] = train_step(net, atk, opt, objective, x, y, args, epoch, amp, ema, epoch * steps + s + 1)
            bar.update(args.batch)
            if not bar.disable and ((s + 1) % 10 == 0 or s + 1 == steps):
                left = bar.format_dict["elapsed"] / (s + 1) * (steps - s - 1 + steps * (args.epochs - epoch - 1))
                bar.set_postfix_str(f"loss {stats[s, 0].item():.3f}, run left {left / 60:.1f}m")
    steps_at = torch.arange(steps, device=stats.device)
    first = torch.where(torch.isfinite(stats[:, 0]), steps, steps_at).min()  # the first non-finite loss, or steps
    if world > 1:
        dist.all_reduce(first, dist.ReduceOp.MIN)  # all processes stop together, none waits in a collective
    if first < steps:
        v = stats[first, 0].item()
        kept = f"{args.out}/last.pt keeps epoch {epoch}" if epoch else "no checkpoint was written"
        what = "not finite on another process" if math.isfinite(v) else v
        raise FloatingPointError(f"loss is {what} at epoch {epoch + 1}, step {int(first) + 1}; {kept}")
    return stats


def validate(
    model,
    atk,
    ema: models.EMA | None,
    opt,
    sched,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    args,
    world: int,
    epoch: int,
    stats: torch.Tensor,
    t0: float,
) -> dict:
    """After an epoch's steps: the schedule steps, every rank takes rank 0's BN statistics (they drift apart per
    rank; rank 0's are the ones evaluated and saved), validation clean and PGD accuracy; the epoch's record,
    with the training loss and accuracy averaged over every rank's shard."""
    lr, train_stats = opt.param_groups[0]["lr"], stats.mean(0)
    sched.step()
    if world > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)
        dist.all_reduce(train_stats)
        train_stats /= world
    t_val = time.time()
    clean, rob = evaluate(ema.take_buffers(model) if ema else atk, x_val, y_val, args)
    return dict(
        epoch=epoch + 1,
        lr=lr,
        time=time.time() - t0,
        val_time=time.time() - t_val,
        **dict(zip(("train_loss", "train_adv_acc"), train_stats.tolist())),
        val_clean=clean,
        val_pgd=rob,
    )


def end_epoch(model, ema: models.EMA | None, opt, sched, args, d: dict, rec: dict, best: float) -> float:
    """Rank 0's bookkeeping: the epoch's line, last.pt, then from it best.pt if validation PGD improved, log.jsonl
    and curves.png. "model" is the evaluated model (the average with --ema); last.pt also keeps the trained weights."""
    print(
        f"epoch {rec['epoch']:3d}/{args.epochs} lr {rec['lr']:.4f} {rec['time']:6.1f}s eta "
        f"{rec['time'] * (args.epochs - rec['epoch']) / 60:6.1f}m | train loss {rec['train_loss']:.4f} adv "
        f"{rec['train_adv_acc']:6.2%} | val clean {rec['val_clean']:6.2%} pgd{args.eval_steps} {rec['val_pgd']:6.2%}"
    )
    last = {
        **checkpoint(ema.model if ema else model, args, d, rec["epoch"], rec),
        "optimizer": opt.state_dict(),
        "best": max(best, rec["val_pgd"]),
        "improved": rec["val_pgd"] > best,
        "scheduler": sched.state_dict(),
        **({"unaveraged": model.state_dict()} if ema else {}),
    }
    models.save(last, os.path.join(args.out, "last.pt"))  # first: a resume redoes the rest from it
    finish(args, last)
    return last["best"]


def finish(args, last: dict, redo: bool = False) -> None:
    """What follows last.pt at the end of an epoch, from last.pt alone: best.pt if the epoch improved on it, the
    epoch's log record, the curves. A resume redoes what a kill left undone (`redo`)."""
    path = os.path.join(args.out, "best.pt")
    if last.get("improved") and not (redo and os.path.isfile(path) and models.read(path)["epoch"] == last["epoch"]):
        models.save({k: v for k, v in last.items() if k not in LAST_ONLY}, path)
    if not (redo and any(r.get("epoch") == last["epoch"] for r in runlog.records(args.out))):
        runlog.append(args.out, last["metrics"])
    runlog.curves(args.out, title(args))


def title(args) -> str:
    return f"{args.out}: {losses.label(vars(args))}, {args.arch}, eps {args.eps}/255"


def describe(args, n_train: int, n_val: int, aux: tuple | None, start: int, world: int, device, amp: bool) -> str:
    """The run in a few lines: where it writes, what it starts from, what it trains, and what a combination of
    flags means that their names do not say (a schedule that never takes effect)."""
    late = ",".join(str(m) for m in args.milestones if m >= args.epochs)
    notes = [f"note: the lr drops after epochs {late} (--milestones) never happen in --epochs {args.epochs}"] * bool(
        late
    ) + [
        f"note: --burn-in {args.burn_in} >= --epochs {args.epochs}: {args.loss} never reweights, this run is "
        "plain PGD-AT"
    ] * (args.loss in ("mail", "gairat") and args.burn_in >= args.epochs)
    return "\n".join(
        [
            f"run folder {args.out}"
            + (f", resumed after epoch {start}" if start else "")
            + (f", starting from the weights of {args.init}" if args.init and not start else ""),
            f"{losses.label(vars(args))} {args.arch} on {args.dataset}: {n_train} train / {n_val} val images"
            + (
                f" + {len(aux[0])} from {args.aux_data} ({args.aux_fraction:g} of each batch, on {aux[0].device})"
                if aux
                else ""
            )
            + f", {n_train // args.batch} steps/epoch, global batch {args.batch} = {world} x {args.batch // world}, lr "
            f"{args.lr} (x0.1 after epochs {','.join(map(str, args.milestones)) or 'none'}), eps {args.eps}/255, "
            f"device {device}, bf16 training {amp}, {losses.precision(device)} evaluation",
            *notes,
        ]
    )


def train(args) -> dict:
    runlog.claim(args.out, args.resume)
    device, rank, world = cli.setup(args.device, deterministic=args.deterministic)
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must be divisible by the {world} processes")
    torch.manual_seed(args.seed)
    d = data.load_data(args.dataset, args.data_dir)  # under torchrun, one rank downloads, the others wait (a lock)
    if args.val is None:  # a small set (the synthetic one has 1,000 images) keeps at least one batch to train on
        args.val = max(1, min(VAL, len(d["x_train"]) // 2, len(d["x_train"]) - args.batch))
    (x_tr, y_tr), (x_val, y_val) = data.train_val(d, args.val, args.train_limit, args.batch, device)
    aux = data.load_aux(args.aux_data, d, device) if args.aux_data else None  # validation stays on real images
    state = models.read(os.path.join(args.out, "last.pt"), "--resume") if args.resume else None  # checked: take()
    model, ema, opt, sched, start, best = make_model(args, d, device, world, len(x_tr) // args.batch, state)
    if start >= args.epochs and runlog.final(args.out):
        log(f"{args.out} has finished its {args.epochs} epochs; its test results are in log.jsonl")
        return runlog.final(args.out)
    if rank == 0:
        runlog.begin(args.out, start)  # only now: a refused --init or --resume leaves no folder
        if state:
            finish(args, state, redo=True)
    del state  # its tensors, a copy of the model and optimizer, are not kept through the run
    amp = device.type == "cuda" if args.amp is None else args.amp
    log(describe(args, len(x_tr), len(x_val), aux, start, world, device, amp))
    net, atk = wrap(model, args, world)
    end = args.epochs if not args.stop_after else min(args.epochs, start + args.stop_after)
    for epoch in range(start, end):
        t0 = time.time()
        stats = train_epoch(net, atk, opt, ema, x_tr, y_tr, aux, args, epoch, amp, rank, world)
        rec = validate(model, atk, ema, opt, sched, x_val, y_val, args, world, epoch, stats, t0)
        if rank == 0:
            best = end_epoch(model, ema, opt, sched, args, d, rec, best)
    if end < args.epochs:
        log(f"stopped after epoch {end} (--stop-after); continue with --resume")
        return {}
    if world > 1:
        dist.barrier()  # rank 0 has written best.pt and last.pt
    judged = (ema.model, ema.model) if ema else (model, atk)  # the module that loads weights, and how it is run
    return final_report(args, *judged, d, log, rank)


def final_report(args, model, atk, d: dict, log, rank: int) -> dict:
    """Test accuracy of best.pt (chosen on validation) and last.pt; the test set never selects a model."""
    out = {}
    for name in ("best", "last"):
        state = models.read(os.path.join(args.out, f"{name}.pt"))
        model.load_state_dict(state["model"])
        clean, rob = evaluate(atk, d["x_test"], d["y_test"], args)
        precision = losses.precision(next(atk.parameters()).device)  # the flags as evaluate() ran
        out[name] = dict(epoch=state["epoch"], test_clean=clean, test_pgd=rob, precision=precision)
        log(f"test {name}.pt (epoch {state['epoch']}): clean {clean:.2%} pgd{args.eval_steps} {rob:.2%}")
    if rank == 0:
        runlog.append(args.out, {"final": out})
    return out


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    cli.run(
        "train.py",
        lambda: train(args),
        lambda: (
            f"at --batch {args.batch}: lower --batch (a new run: --resume needs the same --batch), or spread it "
            f"over GPUs with torchrun; {runlog.kept(args.out)}"
        ),
        lambda: runlog.kept(args.out),
    )


if __name__ == "__main__":
    main()
