"""CIFAR models that take images in [0, 1]: input normalization is a buffer inside each model; the weight average
of train.py --ema; and the checkpoint I/O: `models.load(path)` rebuilds a train.py checkpoint's model in eval mode,
`models.read_state_dict` takes a state_dict of these networks that train.py did not write.

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
    # torchvision's SVHN train split (73,257 images, extra not included): not recomputed here (written offline), the
    # values published for it, e.g. PatrickZH/DeepCore's deepcore/datasets/svhn.py; repositories that print more
    # digits of np.mean and np.std over it (population std) give 0.43768, 0.44377, 0.47280 and 0.19803, 0.20102, 0.19704
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
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


WIDTHS = {"resnet18": 64, "preact18": 64, "wrn34": 10, "wrn28": 10, "wrn16": 4}  # each arch's standard width
ARCHS = {
    "resnet18": lambda n, w: resnet(n, w or WIDTHS["resnet18"], preact=False),
    "preact18": lambda n, w: resnet(n, w or WIDTHS["preact18"], preact=True),
    "wrn34": lambda n, w: wrn(n, 34, w or WIDTHS["wrn34"]),
    "wrn28": lambda n, w: wrn(n, 28, w or WIDTHS["wrn28"]),
    "wrn16": lambda n, w: wrn(n, 16, w or WIDTHS["wrn16"]),
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
PREFIXES = ("module.", "_orig_mod.")  # (Distributed)DataParallel's and torch.compile's, on the keys of its state_dict
DATASETS = {10: "cifar10", 100: "cifar100"}  # a state_dict's test set by its class count, where no other is given
NO_NORMALIZATION = ("none (images in [0, 1] as they are)", (0.0,) * 3, (1.0,) * 3)  # (name, mean, std)


def _torch_load(path: str, said: str) -> object:
    """What torch.load(weights_only=True) reads from `path` to the CPU; ValueError with a readable message (after
    `said`) for a missing file, a folder, a file that torch.save did not write, or pickled objects."""
    no = "not a train.py checkpoint"
    if os.path.isdir(path):
        inside = [f for f in (os.path.join(path, "best.pt"), os.path.join(path, "last.pt")) if os.path.isfile(f)]
        raise ValueError(f"{said}{path} is a folder, not a checkpoint" + f": give {' or '.join(inside)}" * bool(inside))
    if not os.path.isfile(path):
        raise ValueError(f"{said}no such checkpoint: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e):
            raise ValueError(
                f"{said}{path} holds pickled objects that torch.load(weights_only=True) refuses to run; "
                "it is not a train.py checkpoint (load it only if you trust its source)"
            ) from None
        what = "is empty" if os.path.getsize(path) == 0 else "is not a file torch.save wrote (or one cut short)"
        raise ValueError(f"{said}{path} {what}: {no}") from None


def read(path: str, flag: str | None = None, plain: str = "") -> dict:
    """A train.py checkpoint as a dict of CPU tensors and primitives (torch.load with weights_only=True);
    ValueError with a readable message (after "--flag: " where a flag named the file) for a missing file, a folder,
    a file that is no checkpoint, or any other dict; `plain` (a program's way to read a state_dict) is added to the
    refusal of a state_dict. A checkpoint older than train.py --norm was trained under L-inf: its norm says so."""
    said, no = f"{flag}: " if flag else "", "not a train.py checkpoint"
    ckpt = _torch_load(path, said)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{said}{path} holds a {type(ckpt).__name__}, not a dict with a model: {no}")
    lacks = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if lacks:
        hint = f" ({plain})" * bool(plain and state_dict_of(ckpt) is not None)
        raise ValueError(
            f"{said}{path} {'holds no model' if 'model' in lacks else 'lacks ' + ', '.join(lacks)}: {no}{hint}"
        )
    ckpt.setdefault("norm", "Linf")
    if isinstance(ckpt.get("args"), dict):
        ckpt["args"].setdefault("norm", "Linf")  # what --resume takes and compares
    return ckpt


def state_dict_of(obj: object) -> dict | None:
    """The weights of a file that train.py did not write: a state_dict, bare or under "state_dict" (as TRADES' and
    MART's scripts save theirs), its keys without the prefixes of PREFIXES; None where `obj` is neither."""
    weights = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        return None
    for prefix in PREFIXES:
        if all(str(k).startswith(prefix) for k in weights):
            weights = {k[len(prefix) :]: v for k, v in weights.items()}
    return weights


def read_state_dict(
    path: str, arch: str, width: int | None = None, normalize: tuple | None = None, given: str = "--arch"
) -> dict:
    """A state_dict of one of ARCHS (a file that train.py did not write) as a checkpoint like read()'s, for
    from_checkpoint: the weights of the bare network, or of build()'s with its normalization inside (keys "net.*",
    "mean", "std"); `width` None is the arch's standard; the class count is the last linear layer's rows;
    `normalize` is (name, mean, std), None where not given: no normalization (images in [0, 1] as they are, as
    TRADES' and MART's networks take them), or the file's own. eps is None (a state_dict has none); dataset is
    DATASETS' by the class count (None for another); "assumed" says what was taken for what. ValueError (after
    `given`, the flags that name the model, where it is a train.py checkpoint) for a file that is not a state_dict,
    and for weights that do not fit: naming the first missing or unexpected key, or the first of another shape."""
    obj, width = _torch_load(path, ""), width or WIDTHS[arch]
    if isinstance(obj, dict) and all(k in obj for k in CHECKPOINT_KEYS):
        raise ValueError(
            f"{given} would do nothing: {path} is a train.py checkpoint, which names its own arch, width and "
            f"normalization (drop {given})"
        )
    weights = state_dict_of(obj)
    if weights is None:
        raise ValueError(f"{path} holds no state_dict (a dict of tensors, bare or under 'state_dict')")
    rows = [v.shape[0] for v in weights.values() if v.dim() == 2]  # linear layers' weights, the classifier last
    if not rows:
        raise ValueError(f"{path}: its state_dict holds no linear layer, whose rows would be the classes")
    name, mean, std = _normalization(path, weights, normalize)
    with torch.device("meta"):  # only its keys and shapes: no memory, no time
        model = build(arch, rows[-1], mean, std, width)
    inside = "mean" in weights
    weights = weights if inside else {**_unread(model.net), **weights}
    if why := mismatch(model if inside else model.net, weights):
        raise ValueError(f"{path}: its weights do not fit arch {arch} with {rows[-1]} classes, width {width}: {why}")
    if not inside:
        weights = {**{f"net.{k}": v for k, v in weights.items()}, **_buffers(mean, std)}
    mean, std = list(mean), list(std)  # as train.py writes them, and JSON reads them back
    assumed = dict(arch=arch, width=width, num_classes=rows[-1], normalization=name, mean=mean, std=std)
    return dict(model=weights, arch=arch, width=width, num_classes=rows[-1], mean=mean, std=std, eps=None,
                norm=None, dataset=DATASETS.get(rows[-1]), assumed=assumed)  # fmt: skip


def _unread(net: nn.Module) -> dict:
    """What a network never reads in eval mode, and older state_dicts lack: BatchNorm's count of batches."""
    return {k: torch.tensor(0) for k in net.state_dict() if k.endswith("num_batches_tracked")}


def _normalization(path: str, weights: dict, normalize: tuple | None) -> tuple[str, tuple, tuple]:
    """A state_dict's normalization: its own mean and std (then `normalize` is refused), else `normalize`, else none."""
    if "mean" in weights and "std" in weights:
        if normalize is not None:
            raise ValueError(f"--normalize would do nothing: {path} holds its own mean and std (drop --normalize)")
        mean, std = (tuple(round(v, 6) for v in weights[k].flatten().tolist()) for k in ("mean", "std"))
        return f"the file's (mean {mean}, std {std})", mean, std
    return normalize or NO_NORMALIZATION


def _buffers(mean: tuple, std: tuple) -> dict:
    return {k: torch.tensor(v).view(1, 3, 1, 1) for k, v in (("mean", mean), ("std", std))}


def mismatch(model: nn.Module, weights: dict) -> str | None:
    """What keeps `weights` from loading into `model`, naming the first key at fault: one the model has and they
    lack, one they have and the model lacks, else one of another shape; None where they fit."""
    mine = model.state_dict()
    missing, extra = [k for k in mine if k not in weights], [k for k in weights if k not in mine]
    why = [f"{what} key {ks[0]}" + f" (and {len(ks) - 1} more)" * (len(ks) > 1)
           for what, ks in (("missing", missing), ("unexpected", extra)) if ks]  # fmt: skip
    if not why:
        shaped = [k for k, v in mine.items() if tuple(weights[k].shape) != tuple(v.shape)]
        why += [f"{k} is {list(weights[k].shape)} in the file, {list(mine[k].shape)} in the model" for k in shaped[:1]]
    return ", ".join(why) or None


def with_weights(model: nn.Module, weights: dict, error: str) -> nn.Module:
    """model with `weights` loaded; ValueError(error and the first key at fault: mismatch) where they do not fit."""
    if why := mismatch(model, weights):
        raise ValueError(f"{error}: {why}")
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise ValueError(error) from None
    return model


def _unfit(ckpt: dict, path: str) -> str:
    width = f", width {ckpt['width']}" * bool(ckpt.get("width"))
    return f"{path}: its weights do not fit arch {ckpt['arch']} with {ckpt['num_classes']} classes{width}"


def fits(ckpt: dict, path: str = "checkpoint") -> None:
    """from_checkpoint's refusals without building the model (on the meta device: no memory, no time), for a
    program that checks its checkpoints before it builds their models one at a time; ValueError as from_checkpoint."""
    with torch.device("meta"):
        model = build(ckpt["arch"], ckpt["num_classes"], ckpt["mean"], ckpt["std"], ckpt.get("width"))
    if why := mismatch(model, ckpt["model"]):
        raise ValueError(f"{_unfit(ckpt, path)}: {why}")


def from_checkpoint(ckpt: dict, device: str | torch.device = "cpu", path: str = "checkpoint") -> nn.Module:
    """The model a train.py checkpoint (or read_state_dict's) describes, with its weights (the average, for a run
    with --ema), on `device`, in eval mode."""
    model = build(ckpt["arch"], ckpt["num_classes"], ckpt["mean"], ckpt["std"], ckpt.get("width"))
    return with_weights(model, ckpt["model"], _unfit(ckpt, path)).to(device).eval()


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
