"""CIFAR models that take images in [0, 1]: input normalization is a buffer inside each model; and the
checkpoint I/O beside them: `models.load(path)` rebuilds a train.py checkpoint's model in eval mode.

    import models
    model = models.load("runs/cifar10-wrn34-sovr-s0/best.pt", device="cuda")  # images in [0, 1], eval mode

resnet18 (He et al., CIFAR variant used by MART/MAIL: 3x3 stem, no max-pool), preact18 (Rice et al.
2020), wrn34 (WRN-34-10, Madry/TRADES) and wrn16 (WRN-16-k, a small net for CPU studies).
`width` is the first stage's channel count for the ResNets (default 64) and the widen factor k for
the WRNs (default 10 for wrn34, 4 for wrn16).
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), body, nn.BatchNorm2d(c), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


ARCHS = {
    "resnet18": lambda n, w: resnet(n, w or 64, preact=False),
    "preact18": lambda n, w: resnet(n, w or 64, preact=True),
    "wrn34": lambda n, w: wrn(n, 34, w or 10),
    "wrn16": lambda n, w: wrn(n, 16, w or 4),
}


def build(arch: str, num_classes: int, mean: tuple = STATS["cifar10"][0], std: tuple = STATS["cifar10"][1],
          width: int | None = None) -> nn.Module:
    """Rebuilds a model from what a checkpoint stores; raises ValueError on an unknown arch."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    return Normalized(ARCHS[arch](num_classes, width), tuple(mean), tuple(std))


# ---- checkpoints: written by train.py, read by attack.py and by anyone using a trained model ----

CHECKPOINT_KEYS = ("model", "arch", "num_classes", "mean", "std", "eps", "dataset")


def pick_device(name: str | None) -> torch.device:
    """--device, defaulting to CUDA when present; ValueError for a name torch or this machine lacks."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:N)")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"--device {name}: no such CUDA device on this machine")
    return device


def read_checkpoint(path: str) -> dict:
    """torch.load(weights_only=True) of an existing file; ValueError with a readable message otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e):
            raise ValueError(f"{path} holds pickled objects that torch.load(weights_only=True) refuses to run; "
                             "it is not a train.py checkpoint (load it only if you trust its source)")
        raise ValueError(f"{path} is not a PyTorch checkpoint ({type(e).__name__})")


def from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> nn.Module:
    """The model a train.py checkpoint dict describes, with its weights, on `device`, in eval mode."""
    model = build(ckpt["arch"], ckpt["num_classes"], ckpt["mean"], ckpt["std"], ckpt.get("width"))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise ValueError(f"its weights do not fit arch {ckpt['arch']} with {ckpt['num_classes']} classes")
    return model.to(device).eval()


def read(path: str) -> dict:
    """A train.py checkpoint as a dict (weights_only); ValueError with a readable message for anything else."""
    if not os.path.isfile(path):
        raise ValueError(f"no such checkpoint: {path}")
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise ValueError(f"{path} is not a train.py checkpoint (it lacks {', '.join(CHECKPOINT_KEYS)})")
    return ckpt


def load(path: str, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a train.py checkpoint, in eval mode: images in [0, 1], normalization inside, nothing else to do."""
    ckpt = read(path)
    try:
        return from_checkpoint(ckpt, pick_device(str(device)))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _cpu(obj):
    """obj with every tensor in it copied to the CPU: checkpoints written on a GPU load on any machine."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    return type(obj)(_cpu(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


def save(obj: dict, path: str) -> None:
    """Atomic, with CPU tensors: a crash during the write leaves the previous file intact."""
    tmp = f"{path}.tmp"
    torch.save(_cpu(obj), tmp)
    os.replace(tmp, path)


def write_json(obj: dict, path: str, indent: int | None = None) -> None:
    """Atomic, like save()."""
    with open(f"{path}.tmp", "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(f"{path}.tmp", path)


