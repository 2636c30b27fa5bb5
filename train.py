"""PGD adversarial training on CIFAR-10/100 or SVHN with SOVR and its baselines.

    python train.py --loss sovr --arch wrn34           # downloads CIFAR-10, trains to the end
    python train.py --dataset ../shared/data/cifar10_subset.npz --arch wrn16 --width 1 --epochs 5
    python train.py --smoke                            # a few seconds on CPU, synthetic data
    torchrun --nproc_per_node=4 train.py ...           # DistributedDataParallel, --batch is global

Writes <out>/last.pt (resumable), <out>/best.pt (best validation PGD-20), <out>/log.jsonl, <out>/curves.png.
Every flag, its default and where the default comes from: flags.py.
"""

import argparse
import gc
import math
import os
import time

import torch
import torch.distributed as dist

import cli
import data
import flags
import losses
import models
import runlog


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The run's flags (flags.py's table), as main() reads them."""
    return flags.train_args(argv, __doc__)[0]


def main(argv: list[str] | None = None) -> None:
    args, *held = flags.train_args(argv, __doc__, claim=True)  # held: [last.pt's contents on --resume, else None]
    PHASE[0] = "train"
    # train takes the contents out of `held`: nothing here keeps them (optimizer state included) through the run
    cli.run("train.py", lambda: train(args, held.pop()), lambda: out_of_memory(args), lambda: runlog.kept(args.out))


def out_of_memory(args) -> str:
    """Advice for the batch of the phase (train_epoch's or evaluate's) in which the memory ran out."""
    return f"{OUT_OF_MEMORY[PHASE[0]].format(**vars(args))}; {runlog.kept(args.out)}"


OUT_OF_MEMORY = {
    "train": "at --batch {batch}: lower --batch (a new run: --resume needs the same --batch), or spread it over "
    "GPUs with torchrun",
    "eval": "in evaluation (fp32 PGD in batches of its own) at --eval-batch {eval_batch}: lower --eval-batch",
}
PHASE = ["train"]  # where the run is: train_epoch and evaluate set it


# ---- the run: its data and model, its epochs, its test


def train(args: argparse.Namespace, state: dict | None = None) -> dict:
    """The whole run; `state`: last.pt's contents when it resumes. Returns the test report (or {} if stopped)."""
    runlog.claim(args.out, args.resume)
    device, rank, world = cli.setup(args.device, deterministic=args.deterministic)
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must be divisible by the {world} processes")
    torch.manual_seed(args.seed)
    d, (x_tr, y_tr), (x_val, y_val), aux = make_data(args, device)
    model, ema, opt, sched, start, best = make_model(args, d, device, world, len(x_tr) // args.batch, state)
    final = runlog.final(args.out) if start >= args.epochs else None
    same_run(rank, start=start, epochs=args.epochs, train=len(x_tr), val=len(x_val), finished=final is not None)
    if final is not None:
        log(f"{args.out} has finished its {args.epochs} epochs; its test results are in log.jsonl")
        return final
    if rank == 0:
        runlog.begin(args.out, start, state, title(args))  # only now: a refused --init or --resume leaves no folder
    del state  # its tensors, a copy of the model and optimizer, are not kept through the run
    gc.collect()  # nor by garbage cycles that reach a dead frame which held it (matplotlib's text parser leaves some)
    amp = cli.bf16_default(device) if args.amp is None else args.amp
    log(describe(args, len(x_tr), len(x_val), aux, start, world, device, amp))
    net, atk = wrap(model, args, world)
    end = args.epochs if not args.stop_after else min(args.epochs, start + args.stop_after)
    for epoch in range(start, end):
        t0 = time.time()
        stats = train_epoch(net, atk, opt, ema, x_tr, y_tr, aux, args, epoch, amp, rank, world)
        lr = sched.get_last_lr()[0]
        sched.step()
        rec = validate(model, atk, ema, x_val, y_val, args, world, epoch, stats, lr, t0)
        if rank == 0:
            best = save_epoch(model, ema, opt, sched, args, d, rec, best)
    if end < args.epochs:
        log(f"stopped after epoch {end} (--stop-after); continue with --resume")
        return {}
    if world > 1:
        dist.barrier()  # rank 0 has written best.pt and last.pt
    judged = (ema.model, ema.model) if ema else (model, atk)  # the module that loads weights, and how it is run
    return test(args, *judged, d, log, rank)


def same_run(rank: int, **plan) -> None:
    """ValueError on a process whose `plan` (its first epoch, its epochs, its data's sizes: how many collectives
    it will enter) is not rank 0's (cli.agreed): its own read of last.pt, log.jsonl or the data differed, a stale
    copy on a network filesystem. That process ends, and torchrun the others, where they would wait in a collective
    for the process group's timeout (a day); weights and optimizer state read from another file are not mended."""
    first = cli.agreed(plan)
    if first != plan:
        differ = ", ".join(f"{k} {plan[k]} (process 0: {first[k]})" for k in plan if plan[k] != first[k])
        raise ValueError(
            f"process {rank} read another run than process 0: {differ}; a stale last.pt, log.jsonl or data file on "
            "its node? Run again once every node sees the same files"
        )


def make_data(args, device: torch.device) -> tuple:
    """The dataset, its training and validation points on the device, and --aux-data's images (None without)."""
    d = data.load_data(args.dataset, args.data_dir)  # a file lock keeps concurrent downloads apart
    if args.val is None:  # a default that needs the data: a small set (synthetic: 1,000) keeps a batch to train on
        args.val = max(1, min(flags.VAL, len(d["x_train"]) // 2, len(d["x_train"]) - args.batch))
    (x_tr, y_tr), (x_val, y_val) = data.train_val(d, args.val, args.train_limit, args.batch, device)
    aux = data.load_aux(args.aux_data, d, device) if args.aux_data else None  # validation stays on real images
    return d, (x_tr, y_tr), (x_val, y_val), aux


def make_model(args, d: dict, device: torch.device, world: int, steps: int, state: dict | None) -> tuple:
    """Model, weight average (None without --ema), optimizer, scheduler, first epoch and best validation score:
    fresh, from --init, or resumed from last.pt's `state` (`steps` per epoch). A model keeps the normalization it
    was first trained with, and the width of its --init."""
    init = models.read(args.init, "--init") if args.init and not args.resume else None
    if init and (init["arch"], init["num_classes"]) != (args.arch, d["num_classes"]):
        raise ValueError(
            f"--init: {args.init} holds a {init['arch']} with {init['num_classes']} classes, "
            f"not a {args.arch} with {d['num_classes']}"
        )
    if state or init:
        d["mean"], d["std"] = (state or init)["mean"], (state or init)["std"]
        args.width = init.get("width") if init and args.width is None else args.width
    model = models.build(args.arch, d["num_classes"], d["mean"], d["std"], args.width)
    if init:
        why = f"--init: the weights of {args.init} do not fit --arch {args.arch} --width {args.width}"
        models.with_weights(model, init["model"], why)
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


# ---- an epoch and its step


def train_epoch(net, atk, opt, ema, x_tr, y_tr, aux, args, epoch: int, amp: bool, rank: int, world: int):
    """One epoch of steps, with a live line on a terminal (it reads the loss every 10 steps); [steps, 2] losses
    and adversarial accuracies, left on the device. Every epoch reseeds from --seed and its number, so that a
    resumed run repeats exactly what an uninterrupted one does."""
    PHASE[0] = "train"
    torch.manual_seed((args.seed * 100_003 + epoch) * 1009 + rank)
    steps, objective = len(x_tr) // args.batch, losses.OBJECTIVES[args.loss]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    net.train()
    stats = torch.zeros(steps, 2, device=x_tr.device)
    crop_flip = args.dataset not in data.UNAUGMENTED
    batches = data.batches(
        x_tr, y_tr, args.batch, args.seed, epoch, rank, world, fmt, aux, args.aux_fraction, crop_flip
    )
    with cli.progress(steps * args.batch, f"epoch {epoch + 1}/{args.epochs}", "img", rank) as bar:
        for s, (x, y) in enumerate(batches):
            stats[s] = train_step(net, atk, opt, objective, x, y, args, epoch, amp, ema, epoch * steps + s + 1)
            bar.update(args.batch)
            if not bar.disable and ((s + 1) % 10 == 0 or s + 1 == steps):
                left = bar.format_dict["elapsed"] / (s + 1) * (steps - s - 1 + steps * (args.epochs - epoch - 1))
                bar.set_postfix_str(f"loss {stats[s, 0].item():.3f}, run left {left / 60:.1f}m")
    stop_if_not_finite(stats, args, epoch, world)
    return stats


def train_step(net, atk, opt, objective, x, y, args, epoch: int, amp: bool, ema=None, step: int = 0) -> torch.Tensor:
    """One optimizer step of `objective` (losses.py: it crafts its own adversarial examples), bf16 autocast if amp,
    then the average's update (run step `step`). [loss, adversarial accuracy] stays on the device: the step never
    waits for the GPU (tests run it under torch.cuda.set_sync_debug_mode("error"))."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        loss, z = objective(net, atk, x, y, args, epoch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if ema is not None:
        ema.update(step)
    return torch.stack([loss.detach().float(), (z.argmax(1) == y).float().mean()])


def stop_if_not_finite(stats: torch.Tensor, args, epoch: int, world: int) -> None:
    """FloatingPointError at the epoch's first non-finite loss, on every process at once (none waits in a
    collective), before anything of the epoch is saved."""
    steps = len(stats)
    first = torch.where(torch.isfinite(stats[:, 0]), steps, torch.arange(steps, device=stats.device)).min()
    if world > 1:
        dist.all_reduce(first, dist.ReduceOp.MIN)
    if first < steps:
        v = stats[first, 0].item()
        kept = f"{args.out}/last.pt keeps epoch {epoch}" if epoch else "no checkpoint was written"
        what = "not finite on another process" if math.isfinite(v) else v
        raise FloatingPointError(f"loss is {what} at epoch {epoch + 1}, step {int(first) + 1}; {kept}")


# ---- evaluation: validation after every epoch, the test at the end


def evaluate(model, x: torch.Tensor, y: torch.Tensor, args, tick=None) -> tuple[float, float]:
    """Clean and PGD-<--eval-steps> accuracy under --norm as attack.py computes (losses.precision), seeded, summed
    over ranks, in batches of --eval-batch; tick(n) after each batch of n points."""
    PHASE[0] = "eval"
    eps, step = args.eps / 255, args.step / 255
    return losses.pgd_accuracy(
        model, x, y, eps, step, args.eval_steps, args.seed, args.eval_batch, tick=tick, norm=args.norm
    )


def validate(model, atk, ema, x_val, y_val, args, world: int, epoch: int, stats, lr: float, t0: float) -> dict:
    """Validation clean and PGD accuracy of the model saved (the average with --ema), after every rank takes rank
    0's BN statistics (they drift apart per rank; rank 0's are the ones saved); the epoch's record, with the
    training loss and accuracy averaged over every rank's shard."""
    train_stats = stats.mean(0)
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


def test(args, model, atk, d: dict, log, rank: int) -> dict:
    """Test accuracy of best.pt (chosen on validation) and last.pt, each with its seconds (test_time); the test set
    never selects a model. A last.pt holding best.pt's weights (the last epoch was the best) takes best.pt's
    figures: the seeded test, run once. Rank 0 reads the files and decides (cli.agreed), and every process tests
    rank 0's weights: no process's own read decides whether it enters the evaluation's collective."""
    out, seen = {}, {}  # seen (rank 0): the weights that clean and rob are the figures of
    for name in ("best", "last"):
        state = models.read(os.path.join(args.out, f"{name}.pt")) if rank == 0 else {"model": {}, "epoch": None}
        same = state["model"].keys() == seen.keys() and all(torch.equal(v, seen[k]) for k, v in state["model"].items())
        (epoch, same), t0 = cli.agreed((state["epoch"], same)), time.time()
        if not same:
            n = len(d["y_test"])
            log(f"test {name}.pt (epoch {epoch}): clean and PGD-{args.eval_steps} accuracy of {n} test images ...")
            clean, rob = tested(args, model, atk, state["model"], d, f"test {name}.pt", rank)
            seen = state["model"]
        precision = losses.precision(next(atk.parameters()).device)  # the flags as evaluate() ran
        out[name] = dict(epoch=epoch, test_clean=clean, test_pgd=rob, precision=precision, test_time=time.time() - t0)
        out[name].update({"same_weights_as": "best.pt"} if same else {})
        took = "best.pt's figures (the same weights)" if same else f"{out[name]['test_time']:.1f}s"
        log(f"test {name}.pt (epoch {epoch}): clean {clean:.2%} pgd{args.eval_steps} {rob:.2%}, {took}")
    if rank == 0:
        runlog.append(args.out, {"final": out})
    return out


def tested(args, model, atk, weights: dict, d: dict, desc: str, rank: int) -> tuple[float, float]:
    """Clean and PGD test accuracy of rank 0's `weights` (the others take them from it), with a live line on a
    terminal as an epoch has."""
    if rank == 0:
        model.load_state_dict(weights)
    if dist.is_initialized():
        for t in model.state_dict().values():  # the module's own tensors: the broadcast writes into them
            dist.broadcast(t, 0)
    world = dist.get_world_size() if dist.is_initialized() else 1
    with cli.progress(len(range(rank, len(d["y_test"]), world)), desc, "img", rank) as bar:
        return evaluate(atk, d["x_test"], d["y_test"], args, bar.update)


# ---- what an epoch saves (rank 0): the run folder's rules are runlog.py's


def save_epoch(model, ema, opt, sched, args, d: dict, rec: dict, best: float) -> float:
    """The epoch's line, then last.pt and what follows from it (runlog.after_last: best.pt, log, curves). "model"
    is the evaluated model (the average with --ema); last.pt also keeps the trained weights."""
    print(
        f"epoch {rec['epoch']:3d}/{args.epochs} lr {rec['lr']:.4f} {rec['time']:6.1f}s eta "
        f"{rec['time'] * (args.epochs - rec['epoch']) / 60:6.1f}m | train loss {rec['train_loss']:.4f} adv "
        f"{rec['train_adv_acc']:6.2%} | val clean {rec['val_clean']:6.2%} pgd{args.eval_steps} {rec['val_pgd']:6.2%}"
    )
    last = {
        **runlog.checkpoint(ema.model if ema else model, args, d, rec["epoch"], rec),
        "optimizer": opt.state_dict(),
        "best": max(best, rec["val_pgd"]),
        "improved": rec["val_pgd"] > best,
        "scheduler": sched.state_dict(),
        **({"unaveraged": model.state_dict()} if ema else {}),
    }
    runlog.save_last(args.out, last, title(args))
    return last["best"]


def title(args) -> str:
    return f"{args.out}: {flags.label(vars(args))}, {args.arch}, eps {args.eps}/255"


def schedule(args) -> str:
    """The lr schedule in words: "lr 0.1 (constant)", "lr 0.1 (x0.1 after epoch 1)", "lr 0.1 (x0.1 after epochs 100
    and 105)"."""
    m = [str(e) for e in args.milestones]
    if not m:
        return f"lr {args.lr} (constant)"
    when = f"epoch {m[0]}" if len(m) == 1 else f"epochs {', '.join(m[:-1])} and {m[-1]}"
    return f"lr {args.lr} (x0.1 after {when})"


def describe(args, n_train: int, n_val: int, aux: tuple | None, start: int, world: int, device, amp: bool) -> str:
    """The run in a few lines: where it writes, what it starts from, what it trains, the recipe its --eps, --step
    and --lr are (flags.recipe), and what a combination of flags means that their names do not say (a schedule that
    never takes effect)."""
    late = ",".join(str(m) for m in args.milestones if m >= args.epochs)
    never = args.loss in ("mail", "gairat") and args.burn_in >= args.epochs
    recipe = flags.recipe(args)  # "" where every value of it was given otherwise
    origin = f", resumed after epoch {start}" if start else ""
    origin += f", starting from the weights of {args.init}" if args.init and not start else ""
    share = f"{args.aux_fraction:g} of each batch, on {aux[0].device}" if aux else ""
    mixed = f" + {len(aux[0])} from {args.aux_data} ({share})" if aux else ""
    return "\n".join(
        [
            f"run folder {args.out}{origin}",
            f"{flags.label(vars(args))} {args.arch} on {args.dataset}: {n_train} train / {n_val} val images"
            + mixed
            + f", {n_train // args.batch} steps/epoch, global batch {args.batch} = {world} x {args.batch // world}, "
            f"{schedule(args)}, {args.norm} eps {args.eps}/255, device {device}, "
            f"{'bf16 autocast' if amp else 'fp32'} training, {losses.precision(device)} evaluation",
            *[recipe] * bool(recipe),
            *["note: this GPU has no bf16 tensor cores (it is older than Ampere): fp32 training; --amp forces bf16 "
              "autocast"] * (device.type == "cuda" and args.amp is None and not amp),
            *[f"note: the lr drops after epochs {late} (--milestones) never happen in --epochs {args.epochs}"] * (
                late != ""
            ),
            *[f"note: --burn-in {args.burn_in} >= --epochs {args.epochs}: {args.loss} never reweights, this run is "
              "plain PGD-AT"] * never,
            *[f"note: {args.dataset} trains without crops or flips, as robust_overfitting's train_svhn.py"] * (
                args.dataset in data.UNAUGMENTED
            ),
        ]
    )  # fmt: skip


if __name__ == "__main__":
    main()
