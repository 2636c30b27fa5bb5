"""CIFAR models that take images in [0, 1]: input normalization is a buffer inside each model; the weight average
of train.py --ema; and the checkpoint I/O: `models.load(path)` rebuilds a train.py checkpoint's model in eval mode.

    import models
    model = models.load("runs/cifar10-wrn34-sovr-s0/best.pt", device="cuda")  # images in [0, 1], eval mode

resnet18 (He et al., CIFAR variant used by MART/MAIL: 3x3 stem, no max-pool), preact18 (Rice et al. 2020), wrn34
(WRN-34-10, Madry/TRADES), wrn28 (WRN-28-10, Gowal et al., with ReLU) and wrn16 (WRN-16-k, a small net for CPU
studies). `width` is the first stage's channel count for the ResNets (default 64) and the widen factor k for the
WRNs (default 10, 4 for wrn16).
"""

import copy
import io
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import runlog

STATS = {  # per-channel mean and true (population) std of each training set
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class Normalized(nn.Module):
    """Wraps a network so that it reads [0, 1] images: eps is then in pixel units for every attack."""

    def __init__(self, net: nn.Module, mean: tuple, std: tuple):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


class Basic(nn.Module):  # post-activation block of ResNet-18
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class PreAct(nn.Module):  # pre-activation block of PreAct ResNet-18 and of the WRNs
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        short = x if self.short is None else self.short(out)
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + short


def _stages(block: type, cin: int, widths: list, depths: list) -> tuple[nn.Sequential, int]:
    layers = []
    for i, (w, n) in enumerate(zip(widths, depths)):
        for j in range(n):
            layers.append(block(cin, w, 2 if i > 0 and j == 0 else 1))
            cin = w
    return nn.Sequential(*layers), cin


def resnet(num_classes: int, width: int, preact: bool) -> nn.Module:
    body, c = _stages(PreAct if preact else Basic, width, [width, 2 * width, 4 * width, 8 * width], [2, 2, 2, 2])
    head = [nn.BatchNorm2d(c), nn.ReLU()] if preact else []
    stem = [nn.Conv2d(3, width, 3, 1, 1, bias=False)] + ([] if preact else [nn.BatchNorm2d(width), nn.ReLU()])
    return nn.Sequential(*stem, body, *head, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def wrn(num_classes: int, depth: int, k: int) -> nn.Module:
    n = (depth - 4) // 6
    body, c = _stages(PreAct, 16, [16 * k, 32 * k, 64 * k], [n, n, n])
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        body,
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, num_classes),
    )


ARCHS = {
    "resnet18": lambda n, w: resnet(n, w or 64, preact=False),
    "preact18": lambda n, w: resnet(n, w or 64, preact=True),
    "wrn34": lambda n, w: wrn(n, 34, w or 10),
    "wrn28": lambda n, w: wrn(n, 28, w or 10),
    "wrn16": lambda n, w: wrn(n, 16, w or 4),
}


def build(
    arch: str,
    num_classes: int,
    mean: tuple = STATS["cifar10"][0],
    std: tuple = STATS["cifar10"][1],
    width: int | None = None,
) -> nn.Module:
    """Rebuilds a model from what a checkpoint stores; raises ValueError on an unknown arch."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    return Normalized(ARCHS[arch](num_classes, width), tuple(mean), tuple(std))


# ---- the weight average that train.py --ema evaluates and saves


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


# ---- checkpoints: written by train.py, read here for training, resuming, --init, attack.py and anyone else ----

CHECKPOINT_KEYS = ("model", "arch", "num_classes", "mean", "std", "eps", "dataset")


def read(path: str, flag: str | None = None) -> dict:
    """A train.py checkpoint as a dict of CPU tensors and primitives (torch.load with weights_only=True);
    ValueError with a readable message (after "--flag: " where a flag named the file) for a missing file, a folder,
    a file that is no checkpoint, or any other dict."""
    said, no = f"{flag}: " if flag else "", "not a train.py checkpoint"
    if os.path.isdir(path):
        inside = [f for f in (os.path.join(path, "best.pt"), os.path.join(path, "last.pt")) if os.path.isfile(f)]
        raise ValueError(f"{said}{path} is a folder, not a checkpoint" + f": give {' or '.join(inside)}" * bool(inside))
    if not os.path.isfile(path):
        raise ValueError(f"{said}no such checkpoint: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e):
            raise ValueError(
                f"{said}{path} holds pickled objects that torch.load(weights_only=True) refuses to run; "
                "it is not a train.py checkpoint (load it only if you trust its source)"
            ) from None
        what = "is empty" if os.path.getsize(path) == 0 else "is not a file torch.save wrote (or one cut short)"
        raise ValueError(f"{said}{path} {what}: {no}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{said}{path} holds a {type(ckpt).__name__}, not a dict with a model: {no}")
    lacks = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if lacks:
        raise ValueError(f"{said}{path} {'holds no model' if 'model' in lacks else 'lacks ' + ', '.join(lacks)}: {no}")
    return ckpt


def with_weights(model: nn.Module, weights: dict, error: str) -> nn.Module:
    """model with `weights` loaded; ValueError(error) where they do not fit it."""
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise ValueError(error) from None
    return model


def from_checkpoint(ckpt: dict, device: str | torch.device = "cpu", path: str = "checkpoint") -> nn.Module:
    """The model a train.py checkpoint describes, with its weights (the average, for a run with --ema), on
    `device`, in eval mode."""
    model = build(ckpt["arch"], ckpt["num_classes"], ckpt["mean"], ckpt["std"], ckpt.get("width"))
    error = f"{path}: its weights do not fit arch {ckpt['arch']} with {ckpt['num_classes']} classes"
    return with_weights(model, ckpt["model"], error).to(device).eval()


def load(path: str, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a train.py checkpoint, in eval mode: images in [0, 1], normalization inside, nothing else to do."""
    return from_checkpoint(read(path), cli.pick_device(str(device)), path)


def _cpu(obj):
    """obj with every tensor in it copied to the CPU: checkpoints written on a GPU load on any machine."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    return type(obj)(_cpu(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


def save(obj: dict, path: str) -> None:
    """Atomic (runlog.write), with CPU tensors: a crash, a full disk or a signal during the write leaves the previous
    file intact. Serialized in memory first: torch.save writing to a file turns a full disk into a RuntimeError of its
    C++ stream (basic_ios::clear); written by runlog.write, it is an OSError with its errno."""
    buf = io.BytesIO()
    torch.save(_cpu(obj), buf)
    runlog.write(path, buf.getbuffer())


def write_json(obj: dict, path: str, indent: int | None = None) -> None:
    """Atomic, like save()."""
    runlog.write(path, json.dumps(obj, indent=indent))
