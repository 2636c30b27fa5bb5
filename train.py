"""PGD adversarial training on CIFAR-10/100 with SOVR and its baselines.

    python train.py --loss sovr --arch wrn34           # downloads CIFAR-10, trains to the end
    python train.py --dataset ../shared/data/cifar10_subset.npz --arch wrn16 --width 1 --epochs 5
    python train.py --smoke                            # a few seconds on CPU, synthetic data
    torchrun --nproc_per_node=4 train.py ...           # DistributedDataParallel, --batch is global

Writes <out>/last.pt (resumable), <out>/best.pt (best validation PGD-20), <out>/log.jsonl.
"""
import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import losses
import models
from data import augment, load_data
from losses import OBJECTIVES, pgd
from sovr import DEFAULT_RATIO

# Flags that may change between a run and its --resume without changing the result.
RESUMABLE = {"resume", "stop_after", "device", "compile", "data_dir", "out"}
EMA_DECAY = 0.995  # DM-Improves-AT's train-wa.py: --tau default
SMOKE = dict(dataset="synthetic", train_limit=256, val=64, epochs=2, batch=64, steps=2, eval_steps=2, width=8)


def _auto(value: str) -> str:
    if value != "auto":
        raise argparse.ArgumentTypeError(f"takes no value or 'auto', not {value!r}")
    return value


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # --smoke is looked up by its full name
    a = p.add_argument
    d = losses.defaults("", 110)  # the objectives' defaults; where each comes from: README, Objectives
    a("--loss", default="sovr", choices=sorted(OBJECTIVES), help="training objective (default sovr; README, Objectives)")
    a("--ratio", type=float, default=None, help=f"sovr, trades-sovr: share of the batch that uses OVR (default {d['ratio']})")
    a("--arch", default="resnet18", choices=sorted(models.ARCHS), help="network (default resnet18)")
    a("--width", type=int, default=None, help="ResNet base channels / WRN widen factor (default: the arch's standard)")
    a("--dataset", default="cifar10", help="cifar10 (default) | cifar100 | synthetic | .npz with x_train, y_train, x_test, y_test")
    a("--data-dir", default="./data", help="where torchvision downloads CIFAR (default ./data)")
    a("--val", type=int, default=1000, help="training images held out for model selection (default 1000)")
    a("--train-limit", type=int, default=0, help="use only the first N training images, 0 = all (for quick checks)")
    a("--epochs", type=int, default=110, help="epochs (default 110; the recipe: README, Objectives)")
    a("--milestones", default=None, help="epochs after which lr and EMR lambda x0.1 (default: 100/110 and 105/110 of --epochs)")
    a("--lr", type=float, default=0.1, help="SGD learning rate for the global batch (default 0.1)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    a("--wd", type=float, default=5e-4, help="weight decay (default 5e-4)")
    a("--batch", type=int, default=128, help="global batch size (default 128)")
    a("--eps", type=int, default=8, help="L-inf radius in 1/255 units (default 8, i.e. 8/255)")
    a("--step", type=int, default=2, help="PGD step in 1/255 units (default 2)")
    a("--steps", type=int, default=10, help="PGD steps in training (default 10)")
    a("--eval-steps", type=int, default=20, help="PGD steps for validation and test (default 20)")
    a("--attack-bn", default="eval", choices=["eval", "train"], help="BatchNorm mode while attacking (default eval)")
    a("--ema", type=float, nargs="?", const=EMA_DECAY, default=None, metavar="DECAY",
      help=f"evaluate and save an exponential moving average of the weights (off by default; --ema: {EMA_DECAY})")
    a("--beta", type=float, default=None, help=f"trades, trades-sovr, mart: weight of the KL term (default {d['beta']:g})")
    a("--burn-in", type=int, default=None, help="mail, gairat: unweighted epochs first (default: 60/110 of --epochs)")
    a("--mail-slope", type=float, default=None, help=f"mail: weight 3 sigmoid(slope (bias - PM)) (default {d['mail_slope']:g})")
    a("--mail-bias", type=float, default=None, help=f"mail: weight bias (default {d['mail_bias']:g})")
    a("--gairat-lambda", type=float, default=None, help=f"gairat: tanh shift lambda (default {d['gairat_lambda']:g})")
    a("--tau", type=float, default=None, help=f"comp-sum: tau >= 0; 0 sum-exp, 1 CE, 2 MAE (default {d['tau']:g})")
    a("--nu", type=float, default=None, help=f"comp-sum: weight of the logit-difference distance (default {d['nu']:g})")
    a("--emr", type=float, default=None, help="EMR lambda, added to any --loss (default 0 = off)")
    a("--emr-temp", type=float, default=None, help=f"EMR softmax temperature (default {losses.EMR_TEMP_AT:g}; "
      + ", ".join(f"{v:g} for {k}" for k, v in losses.EMR_TEMP.items()) + ")")
    a("--emr-decay", type=float, default=None, help=f"EMR lambda factor at each milestone (default {d['emr_decay']:g})")
    a("--seed", type=int, default=0, help="random seed (default 0)")
    a("--out", default=None, help="run folder (default runs/<dataset>-<arch>-<objective>-s<seed>)")
    a("--resume", nargs="?", const=True, default=False, type=_auto, metavar="auto",
      help="continue from <out>/last.pt; 'auto': continue if it exists, else start (safe to requeue)")
    a("--init", default=None, help="start from this checkpoint's weights, with a fresh optimizer and schedule")
    a("--stop-after", type=int, default=0, help="train at most N epochs in this invocation, then exit (0 = all)")
    a("--device", default=None, help="cpu | cuda | cuda:N (default cuda if available)")
    a("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast in training (default on for CUDA)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory format (default on)")
    a("--compile", action="store_true", help="torch.compile the model (off by default)")
    a("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun (off by default)")
    a("--smoke", action="store_true", help=f"defaults for a seconds-long CPU check: {SMOKE}")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**SMOKE)  # explicit flags still win
    args = p.parse_args(argv)
    try:
        check(args)
    except ValueError as e:
        p.error(str(e))
    args.out = args.out or os.path.join("runs", f"{data_name(args.dataset)}-{args.arch}-{losses.label(vars(args))}-s{args.seed}")
    if args.resume == "auto":
        args.resume = os.path.isfile(os.path.join(args.out, "last.pt"))
    return args


def check(args: argparse.Namespace) -> None:
    """Fills in the defaults that depend on other flags and refuses values no run can use (ValueError)."""
    for name in ("epochs", "batch", "steps", "eval_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    for k, v in losses.defaults(args.loss, args.epochs).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if not 0 <= args.ratio <= 1:
        raise ValueError("--ratio must lie in [0, 1]")
    if args.ema is not None and not 0 < args.ema < 1:
        raise ValueError(f"--ema must lie in (0, 1), got {args.ema:g}")
    for name in ("eps", "step", "train_limit", "tau", "burn_in"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    if args.width is not None and args.width < 1 or args.emr_temp <= 0 or args.emr < 0 or args.emr_decay < 0:
        raise ValueError("--width must be >= 1, --emr-temp > 0, --emr and --emr-decay >= 0")
    if args.milestones is None:  # the recipe's 100 and 105 of 110 epochs, scaled, each before the last epoch
        args.milestones = sorted({min(round(args.epochs * f / 110), args.epochs - 1) for f in (100, 105)} - {0})
    else:
        try:
            args.milestones = [int(m) for m in args.milestones.replace(" ", "").split(",") if m]
        except ValueError:
            raise ValueError(f"--milestones must be comma-separated integers, got {args.milestones!r}") from None
    if any(m < 1 for m in args.milestones):
        raise ValueError("--milestones must be >= 1 (a drop after epoch 0 would lower the lr from the start)")


def data_name(dataset: str) -> str:
    return os.path.splitext(os.path.basename(dataset))[0]


def data_path(dataset: str) -> str:
    """The dataset as a checkpoint stores it: a file by its absolute path, so that it is found from anywhere."""
    return os.path.abspath(dataset) if dataset.endswith(".npz") else dataset


def notes(args: argparse.Namespace) -> list[str]:
    """What a combination of flags means that its names do not say: a schedule that never takes effect."""
    out = []
    late = [m for m in args.milestones if m >= args.epochs]
    if late:
        out.append(f"note: the lr drops after epochs {','.join(map(str, late))} (--milestones) never happen in "
                   f"--epochs {args.epochs}")
    if args.loss in ("mail", "gairat") and args.burn_in >= args.epochs:
        out.append(f"note: --burn-in {args.burn_in} >= --epochs {args.epochs}: {args.loss} never reweights, this run "
                   "is plain PGD-AT")
    return out


class EMA:
    """Weight averaging as DM-Improves-AT's gowal21uncovering/utils/watrain.py does it (ema_update, update_bn):
    a copy of the model whose parameters follow p_ema = d p_ema + (1 - d) p after every optimizer step, with
    d = 0 (a plain copy) for the first 2.5% of the run's steps, then d = min(decay, (1 + t) / (10 + t)) t steps
    later; the BatchNorm statistics are not averaged but taken from the trained model before each use."""

    def __init__(self, model: torch.nn.Module, decay: float, steps: int):
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.source, self.decay, self.warmup = list(model.parameters()), decay, 0.025 * steps

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1 for the run's first); no host-device synchronisation."""
        t = step - self.warmup
        d = 0.0 if t < 0 else min(self.decay, (1 + t) / (10 + t))
        params = list(self.model.parameters())
        torch._foreach_mul_(params, d)
        torch._foreach_add_(params, self.source, alpha=1 - d)

    @torch.no_grad()
    def take_buffers(self, model: torch.nn.Module) -> torch.nn.Module:
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)
        return self.model


def train_step(net, atk, opt: torch.optim.Optimizer, objective, x: torch.Tensor, y: torch.Tensor, args, epoch: int,
               amp: bool, ema: EMA | None = None, step: int = 0) -> torch.Tensor:
    """One optimizer step of `objective` (which crafts its own adversarial examples) under bf16 autocast if amp,
    then the weight average's update (run step `step`). Returns [loss, adversarial accuracy] as a device tensor:
    reading it is left to the caller, so that the step never waits for the GPU (tests run it under
    torch.cuda.set_sync_debug_mode("error"))."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        loss, z = objective(net, atk, x, y, args, epoch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if ema is not None:
        ema.update(step)
    return torch.stack([loss.detach().float(), (z.argmax(1) == y).float().mean()])


def evaluate(model, x: torch.Tensor, y: torch.Tensor, args, bs: int = 500) -> tuple[float, float]:
    """Clean and PGD accuracy in fp32 (as attack.py), eval-mode BN, --eval-steps, random starts seeded from --seed
    (the same weights give the same figures); counts are summed over ranks."""
    model.eval()
    torch.manual_seed(args.seed)  # training reseeds every epoch, so this draws nothing away from it
    if dist.is_initialized():  # each rank evaluates its shard
        x, y = x[dist.get_rank()::dist.get_world_size()], y[dist.get_rank()::dist.get_world_size()]
    counts = torch.zeros(2, device=x.device)
    for k in range(0, len(x), bs):
        xb, yb = x[k:k + bs].float() / 255, y[k:k + bs]
        x_adv, _ = pgd(model, xb, yb, args.eps / 255, args.step / 255, args.eval_steps)
        with torch.no_grad():
            counts += torch.stack([(model(xb).argmax(1) == yb).sum(), (model(x_adv).argmax(1) == yb).sum()])
    n = torch.tensor(float(len(x)), device=x.device)
    if dist.is_initialized():
        dist.all_reduce(counts), dist.all_reduce(n)
    return tuple((counts / n).tolist())


def checkpoint(model, args, data: dict, epoch: int, metrics: dict) -> dict:
    return dict(model=model.state_dict(), arch=args.arch, width=args.width, num_classes=data["num_classes"],
                dataset=data_path(args.dataset), mean=list(data["mean"]), std=list(data["std"]), eps=args.eps,
                epoch=epoch, metrics=metrics, args=vars(args))


def setup(args) -> tuple[torch.device, int, int]:
    """Device, rank and world size; under torchrun one process per GPU (or CPU process with gloo)."""
    if "RANK" not in os.environ:
        device = models.pick_device(args.device)
        torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: cuDNN times its kernels once
        return device, 0, 1
    cuda = torch.cuda.is_available() and args.device != "cpu"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must be divisible by the {world} processes")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    return device, rank, world


def resume_state(args, path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"--resume: no checkpoint at {path}")
    state = models.read_checkpoint(path)
    if not isinstance(state, dict) or not isinstance(state.get("args"), dict):
        raise ValueError(f"--resume: {path} is not a train.py checkpoint")
    old = state["args"]
    if args.init and args.width is None:
        args.width = old.get("width")  # --init filled it in from its checkpoint when the run started
    diff = [k for k, v in vars(args).items() if k not in RESUMABLE and k in old and old[k] != v]  # absent: older flag set
    if diff:
        k = diff[0]
        raise ValueError(f"--resume: {path} was trained with --{k.replace('_', '-')} {old.get(k)}, not {getattr(args, k)}")
    return state


def init_state(args, num_classes: int) -> dict:
    """The --init checkpoint, refused with a readable message unless its arch and class count match this run."""
    if not os.path.isfile(args.init):
        raise ValueError(f"--init: no checkpoint at {args.init}")
    state = models.read_checkpoint(args.init)
    if not isinstance(state, dict) or not all(k in state for k in ("model", "arch", "num_classes", "mean", "std")):
        raise ValueError(f"--init: {args.init} is not a train.py checkpoint")
    if (state["arch"], state["num_classes"]) != (args.arch, num_classes):
        raise ValueError(f"--init: {args.init} holds a {state['arch']} with {state['num_classes']} classes, "
                         f"not a {args.arch} with {num_classes}")
    return state


def load_split(args, device: torch.device, rank: int, world: int) -> tuple[dict, tuple, tuple]:
    """The dataset, and its training and validation tensors on the device (the validation images are the same
    --val images for every seed; --train-limit keeps the first N of the rest)."""
    if rank > 0:
        dist.barrier()  # rank 0 downloads first
    data = load_data(args.dataset, args.data_dir)
    if rank == 0 and world > 1:
        dist.barrier()
    n_train = len(data["x_train"])
    if not 0 < args.val < n_train:
        raise ValueError(f"--val must lie in [1, {n_train - 1}] for {n_train} training images, got {args.val}")
    split = torch.randperm(n_train, generator=torch.Generator().manual_seed(0))
    val_idx, tr_idx = split[:args.val], split[args.val:]
    if args.train_limit:
        tr_idx = tr_idx[:args.train_limit]
    if len(tr_idx) < args.batch:
        raise ValueError(f"--batch {args.batch} is larger than the {len(tr_idx)} training images")
    on = lambda idx: (data["x_train"][idx].to(device), data["y_train"][idx].to(device))  # noqa: E731
    return data, on(tr_idx), on(val_idx)


def make_model(args, data: dict, device: torch.device, world: int, steps: int) -> tuple:
    """Model, weight average (None without --ema), optimizer, scheduler, first epoch and best validation score:
    fresh, from --init, or resumed (`steps` per epoch)."""
    state = resume_state(args, os.path.join(args.out, "last.pt")) if args.resume else None
    init = init_state(args, data["num_classes"]) if args.init and not args.resume else None
    if state or init:  # the model keeps the normalization it was first trained with
        data["mean"], data["std"] = (state or init)["mean"], (state or init)["std"]
    if init:
        args.width = init.get("width") if args.width is None else args.width
    model = models.build(args.arch, data["num_classes"], data["mean"], data["std"], args.width)
    if init:
        try:
            model.load_state_dict(init["model"])
        except RuntimeError:
            raise ValueError(f"--init: the weights of {args.init} do not fit --arch {args.arch} --width {args.width}")
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=fmt)
    if world > 1 and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.milestones, 0.1)
    ema = EMA(model, args.ema, args.epochs * steps) if args.ema else None
    if not state:
        return model, ema, opt, sched, 0, -1.0
    model.load_state_dict(state.get("unaveraged", state["model"]))  # with --ema, "model" holds the average
    if ema:
        ema.model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"]), sched.load_state_dict(state["scheduler"])
    return model, ema, opt, sched, state["epoch"], state["best"]


def train_epoch(net, atk, opt, ema: EMA | None, x_tr: torch.Tensor, y_tr: torch.Tensor, args, epoch: int, amp: bool,
                rank: int, world: int) -> torch.Tensor:
    """One epoch of steps, with the live line on a terminal; [steps, 2] losses and adversarial accuracies, left on
    the device. Every epoch reseeds from --seed and its number, so that a resumed run repeats exactly what an
    uninterrupted one does."""
    torch.manual_seed((args.seed * 100_003 + epoch) * 1009 + rank)
    device = x_tr.device
    g = torch.Generator(device).manual_seed(args.seed * 100_003 + epoch)
    perm = torch.randperm(len(x_tr), device=device, generator=g)
    objective, per_rank, steps = OBJECTIVES[args.loss], args.batch // world, len(x_tr) // args.batch
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    net.train()
    stats = torch.zeros(steps, 2, device=device)
    bar = progress(args, epoch, rank, steps)
    try:
        for s in range(steps):
            idx = perm[s * args.batch:(s + 1) * args.batch]  # global batch: crops as in a 1-process run
            x = augment(x_tr[idx], g)[rank * per_rank:(rank + 1) * per_rank].contiguous(memory_format=fmt)
            y = y_tr[idx][rank * per_rank:(rank + 1) * per_rank]
            stats[s] = train_step(net, atk, opt, objective, x, y, args, epoch, amp, ema, epoch * steps + s + 1)
            if bar is not None:
                bar.step(s + 1, steps, stats)
    finally:
        if bar is not None:
            bar.close()
    if not torch.isfinite(stats[:, 0]).all():
        bad = int((~torch.isfinite(stats[:, 0])).nonzero()[0])
        kept = f"{args.out}/last.pt keeps epoch {epoch}" if epoch else "no checkpoint was written"
        raise FloatingPointError(f"loss is {stats[bad, 0].item()} at epoch {epoch + 1}, step {bad + 1}; {kept}")
    return stats


class Progress:
    """A live line within each epoch (tqdm): images/s, loss, time left in the epoch and in the run. Only on a
    terminal and on rank 0, so logs and CI output keep one line per epoch; it reads the loss every 10 steps."""

    def __init__(self, args, epoch: int, steps: int):
        from tqdm import tqdm
        self.left = args.epochs - epoch - 1
        self.bar = tqdm(total=steps * args.batch, unit="img", leave=False, dynamic_ncols=True,
                        desc=f"epoch {epoch + 1}/{args.epochs}")

    def step(self, done: int, steps: int, stats: torch.Tensor) -> None:
        self.bar.update(self.bar.total // steps)
        if done % 10 == 0 or done == steps:
            epoch_s = self.bar.format_dict["elapsed"] * steps / done
            self.bar.set_postfix_str(f"loss {stats[done - 1, 0].item():.3f}, run left "
                                     f"{(epoch_s * (steps - done) / steps + epoch_s * self.left) / 60:.1f}m")

    def close(self) -> None:
        self.bar.close()


def progress(args, epoch: int, rank: int, steps: int) -> Progress | None:
    if rank > 0 or not sys.stderr.isatty():
        return None
    try:
        return Progress(args, epoch, steps)
    except ImportError:  # tqdm is in requirements.txt; without it training just has no live line
        return None


def end_epoch(model, ema: EMA | None, opt, sched, args, data: dict, rec: dict, best: float) -> float:
    """Rank 0's bookkeeping: best.pt if validation PGD improved, last.pt, log.jsonl and curves.png. "model" is
    the evaluated model (the average with --ema); last.pt also keeps the trained weights for --resume."""
    judged = ema.model if ema else model
    if rec["val_pgd"] > best:
        best = rec["val_pgd"]
        models.save(checkpoint(judged, args, data, rec["epoch"], rec), os.path.join(args.out, "best.pt"))
    last = checkpoint(judged, args, data, rec["epoch"], rec)
    with open(os.path.join(args.out, "log.jsonl"), "a") as f:  # before last.pt: a restart trims what last.pt lacks
        f.write(json.dumps(rec) + "\n")
    models.save({**last, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "best": best,
                 **({"unaveraged": model.state_dict()} if ema else {})}, os.path.join(args.out, "last.pt"))
    draw_curves(args.out)
    return best


def trim_log(out: str, epochs_done: int) -> None:
    """Keep the log records of the epochs last.pt holds: none for a fresh run, and on resume not the one a
    killed run may have logged after its last checkpoint (nor a line it left half-written)."""
    path = os.path.join(out, "log.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if _epoch(line) <= epochs_done]
        with open(f"{path}.tmp", "w") as f:
            f.writelines(keep)
        os.replace(f"{path}.tmp", path)


FINAL = 10**9  # where the final report sorts among the epochs of a log


def _epoch(line: str) -> int:
    try:
        rec = json.loads(line)
        return FINAL if "final" in rec else rec["epoch"]
    except (ValueError, KeyError, TypeError):
        return FINAL + 1  # a line cut short


_NO_MATPLOTLIB = []


def draw_curves(out: str) -> None:
    """curves.png from log.jsonl: validation clean and PGD accuracy with the best epoch marked, training
    adversarial accuracy and loss, learning rate. Robust overfitting shows as a falling PGD curve."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _NO_MATPLOTLIB:
            print("matplotlib is not installed: no curves.png is drawn (pip install matplotlib)", file=sys.stderr)
            _NO_MATPLOTLIB.append(True)
        return
    with open(os.path.join(out, "log.jsonl")) as f:
        recs = [r for r in map(json.loads, f) if "epoch" in r]
    e = [r["epoch"] for r in recs]
    best = max(recs, key=lambda r: r["val_pgd"])
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.3))
    a1.plot(e, [100 * r["val_clean"] for r in recs], label="val clean")
    a1.plot(e, [100 * r["val_pgd"] for r in recs], label="val PGD")
    a1.plot(e, [100 * r["train_adv_acc"] for r in recs], label="train adversarial", linestyle=":")
    a1.axvline(best["epoch"], color="gray", linewidth=0.8)
    a1.annotate(f"best.pt: epoch {best['epoch']}", (best["epoch"], 100 * best["val_pgd"]), fontsize=8)
    a1.set(xlabel="epoch", ylabel="accuracy %")
    a1.legend(fontsize=8)
    a2.plot(e, [r["train_loss"] for r in recs])
    a2.set(xlabel="epoch", ylabel="training loss")
    a3.plot(e, [r["lr"] for r in recs])
    a3.set(xlabel="epoch", ylabel="learning rate", yscale="log" if min(r["lr"] for r in recs) > 0 else "linear")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)


def wrap(model, args, world: int) -> tuple:
    """(net, atk): what the optimizer steps through (DDP under torchrun) and the plain model the attack runs on,
    so that attack steps carry no DDP gradient hooks; both compiled with --compile."""
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if not args.compile:
        return net, model
    atk = torch.compile(model)
    return (torch.compile(net) if world > 1 else atk), atk


def validate(model, atk, ema: EMA | None, opt, sched, x_val: torch.Tensor, y_val: torch.Tensor, args, world: int,
             epoch: int, stats: torch.Tensor, t0: float) -> dict:
    """After an epoch's steps: the schedule steps, every rank takes rank 0's BN statistics (they drift apart per
    rank; rank 0's are the ones evaluated and saved), validation clean and PGD accuracy; the epoch's record,
    with the training loss and accuracy averaged over every rank's shard."""
    lr = opt.param_groups[0]["lr"]
    sched.step()
    train_stats = stats.mean(0)
    if world > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)
        dist.all_reduce(train_stats)
        train_stats /= world
    t_val = time.time()
    clean, rob = evaluate(ema.take_buffers(model) if ema else atk, x_val, y_val, args)
    tr_loss, tr_acc = train_stats.tolist()
    return dict(epoch=epoch + 1, lr=lr, time=time.time() - t0, val_time=time.time() - t_val, train_loss=tr_loss,
                train_adv_acc=tr_acc, val_clean=clean, val_pgd=rob)


def train(args) -> dict:
    device, rank, world = setup(args)
    amp = device.type == "cuda" if args.amp is None else args.amp
    log = print if rank == 0 else (lambda *a, **k: None)
    if not args.resume and os.path.isfile(os.path.join(args.out, "last.pt")):
        raise ValueError(f"{args.out} holds a run already (last.pt): continue it with --resume (or --resume auto), "
                         "or choose another --out")
    torch.manual_seed(args.seed)
    data, (x_tr, y_tr), (x_val, y_val) = load_split(args, device, rank, world)
    steps = len(x_tr) // args.batch
    model, ema, opt, sched, start, best = make_model(args, data, device, world, steps)  # refuses a bad --init, --resume
    if start >= args.epochs and final_record(args.out):
        log(f"{args.out} has finished its {args.epochs} epochs; its test results are in log.jsonl")
        return final_record(args.out)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        if not os.access(args.out, os.W_OK):
            raise ValueError(f"output directory {args.out} is not writable")
        trim_log(args.out, start)  # a fresh start empties an old log; a resume drops epochs last.pt lacks
    net, atk = wrap(model, args, world)
    log(f"run folder {args.out}" + (f", resumed after epoch {start}" if start else "") +
        (f", starting from the weights of {args.init}" if args.init and not start else ""))
    log(f"{losses.label(vars(args))} {args.arch} on {args.dataset}: {len(x_tr)} train / {len(x_val)} val images, "
        f"{steps} steps/epoch, global batch {args.batch} = {world} x {args.batch // world}, lr {args.lr} (x0.1 after "
        f"epochs {','.join(map(str, args.milestones)) or 'none'}), eps {args.eps}/255, device {device}, bf16 training {amp}, fp32 evaluation")
    for line in notes(args):
        log(line)
    end = args.epochs if not args.stop_after else min(args.epochs, start + args.stop_after)
    t_run = time.time()
    for epoch in range(start, end):
        t0 = time.time()
        stats = train_epoch(net, atk, opt, ema, x_tr, y_tr, args, epoch, amp, rank, world)
        rec = validate(model, atk, ema, opt, sched, x_val, y_val, args, world, epoch, stats, t0)
        eta = (time.time() - t_run) / (epoch + 1 - start) * (args.epochs - epoch - 1)
        log(f"epoch {epoch + 1:3d}/{args.epochs} lr {rec['lr']:.4f} {rec['time']:6.1f}s eta {eta / 60:6.1f}m | "
            f"train loss {rec['train_loss']:.4f} adv {rec['train_adv_acc']:6.2%} | val clean {rec['val_clean']:6.2%} "
            f"pgd{args.eval_steps} {rec['val_pgd']:6.2%}")
        if rank == 0:
            best = end_epoch(model, ema, opt, sched, args, data, rec, best)
    if end < args.epochs:
        log(f"stopped after epoch {end} (--stop-after); continue with --resume")
        return {}
    if world > 1:
        dist.barrier()  # rank 0 has written best.pt and last.pt
    judged = (ema.model, ema.model) if ema else (model, atk)  # the module that loads weights, and how it is run
    return final_report(args, *judged, data, device, log, rank)


def final_record(out: str) -> dict | None:
    """The test report a finished run appended to its log.jsonl, if any."""
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        finals = [line for line in f if _epoch(line) == FINAL]
    return json.loads(finals[-1])["final"] if finals else None


def final_report(args, model, atk, data: dict, device, log, rank: int) -> dict:
    """Test accuracy of best.pt (chosen on validation) and last.pt; the test set never selects a model."""
    x, y = data["x_test"].to(device), data["y_test"].to(device)
    out = {}
    for name in ("best", "last"):
        state = models.read_checkpoint(os.path.join(args.out, f"{name}.pt"))
        model.load_state_dict(state["model"])
        clean, rob = evaluate(atk, x, y, args)
        out[name] = dict(epoch=state["epoch"], test_clean=clean, test_pgd=rob)
        log(f"test {name}.pt (epoch {state['epoch']}): clean {clean:.2%} pgd{args.eval_steps} {rob:.2%}")
    if rank == 0:
        with open(os.path.join(args.out, "log.jsonl"), "a") as f:
            f.write(json.dumps({"final": out}) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    try:
        train(args)
    except (ValueError, FloatingPointError, OSError) as e:
        sys.exit(f"train.py: error: {e}")
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"train.py: error: CUDA out of memory at --batch {args.batch}: lower --batch (a new run: --resume "
                 f"needs the same --batch), or spread it over GPUs with torchrun; "
                 f"{os.path.join(args.out, 'last.pt')} keeps the last finished epoch, if any")
    except KeyboardInterrupt:
        sys.exit("train.py: interrupted; the last finished epoch is in last.pt (continue with --resume)")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
