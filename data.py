"""The data: CIFAR-10/100 (torchvision's download), a synthetic set for checks, or any .npz with x_train,
y_train, x_test, y_test; and the training augmentation as batched tensor ops on the device.

Images stay uint8 NCHW until a batch is used; models normalize inside, so every consumer feeds [0, 1] images.
"""

from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import models


def load_data(name: str, data_dir: str) -> dict:
    """uint8 NCHW images and int64 labels; ValueError with a readable message on bad input. Under torchrun rank 0
    reads (and downloads) first, then the others, so that no two processes download into one folder."""
    later = dist.is_initialized() and dist.get_rank() > 0
    if later:
        dist.barrier()
    try:
        return _read(name, data_dir)
    finally:  # also after an error: the others then meet it themselves
        if dist.is_initialized() and not later:
            dist.barrier()


def _read(name: str, data_dir: str) -> dict:
    if name == "synthetic":  # learnable: the class sets the mean colour of the image
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 10, (1200,), generator=g)
        x = torch.rand(1200, 3, 32, 32, generator=g) * 128 + y.view(-1, 1, 1, 1) * torch.tensor([12, 5, 2]).view(
            1, 3, 1, 1
        )
        d = dict(x_train=x[:1000], y_train=y[:1000], x_test=x[1000:], y_test=y[1000:])
        d = {k: v.to(torch.uint8) if k[0] == "x" else v for k, v in d.items()}
    elif name in ("cifar10", "cifar100"):
        import torchvision  # only needed on this path

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        d = {}
        for split, train in (("train", True), ("test", False)):
            try:
                ds = cls(data_dir, train=train, download=True)
            except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError
                raise ValueError(
                    f"could not download {name} into {data_dir} ({e}). Without network, put torchvision's "
                    f"{cls.filename} (from {cls.url}) into {data_dir}, or train on an offline copy: "
                    "--dataset file.npz with x_train, y_train, x_test, y_test"
                ) from None
            d[f"x_{split}"] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            d[f"y_{split}"] = torch.tensor(ds.targets)
    elif name.endswith(".npz"):
        d = _read_npz(name)
    else:
        raise ValueError(f"unknown dataset {name!r}: use cifar10, cifar100, synthetic or a .npz file")
    d["num_classes"] = 100 if name == "cifar100" else int(max(d["y_train"].max(), d["y_test"].max())) + 1
    if name in models.STATS:
        d["mean"], d["std"] = models.STATS[name]
    else:
        pix = d["x_train"].float().div(255).transpose(0, 1).reshape(3, -1)
        d["mean"], d["std"] = tuple(pix.mean(1).tolist()), tuple(pix.std(1).tolist())
    return d


def _read_npz(path: str) -> dict:
    try:
        raw = np.load(path)
        d = {k: torch.from_numpy(np.ascontiguousarray(raw[k])) for k in ("x_train", "y_train", "x_test", "y_test")}
    except FileNotFoundError:
        raise ValueError(f"no such dataset file: {path}") from None
    except KeyError as e:
        raise ValueError(f"{path} lacks array {e}; it needs x_train, y_train, x_test, y_test") from None
    except Exception as e:
        raise ValueError(f"{path} is not a readable .npz file ({type(e).__name__})") from None
    for s in ("train", "test"):
        x, y = d[f"x_{s}"], d[f"y_{s}"]
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3 or len(x) != len(y) or y.dim() != 1:
            raise ValueError(f"{path}: x_{s} must be uint8 [N, 3, H, W] and y_{s} [N] labels of the same length")
        d[f"y_{s}"] = y.long()
        if len(y) == 0 or y.min() < 0:
            raise ValueError(f"{path}: y_{s} must hold labels 0..K-1")
    return d


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and horizontal flip, as batched tensor ops; uint8 -> [0, 1]."""
    b, _, h, w = x.shape
    pad = F.pad(x.float().div_(255), (4, 4, 4, 4))
    i, j = torch.randint(0, 9, (2, b, 1), device=x.device, generator=g)
    rows = (i + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (j + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    out = pad[
        torch.arange(b, device=x.device).view(b, 1, 1, 1), torch.arange(3, device=x.device).view(1, 3, 1, 1), rows, cols
    ]
    flip = torch.rand(b, device=x.device, generator=g) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), out.flip(3), out)


def train_val(d: dict, val: int, train_limit: int, batch: int, device: torch.device) -> tuple[tuple, tuple]:
    """The training and validation tensors on the device: the same `val` held-out training images for every seed
    (a permutation seeded 0), and the first `train_limit` of the rest (0 = all)."""
    n = len(d["x_train"])
    if not 0 < val < n:
        raise ValueError(f"--val must lie in [1, {n - 1}] for {n} training images, got {val}")
    split = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    val_idx, tr_idx = split[:val], split[val:]
    if train_limit:
        tr_idx = tr_idx[:train_limit]
    if len(tr_idx) < batch:
        raise ValueError(f"--batch {batch} is larger than the {len(tr_idx)} training images")
    return tuple((d["x_train"][idx].to(device), d["y_train"][idx].to(device)) for idx in (tr_idx, val_idx))


def load_aux(path: str, d: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated training images and labels for --aux-data: DM-Improves-AT's file (its core/data/semisup.py reads
    `image`, uint8 N x 32 x 32 x 3, and `label`) or this project's .npz layout (x_train, y_train), checked against
    the dataset `d`. On the device where they fit in half its free memory; on the host otherwise (a batch's share
    then moves to the device per step)."""
    try:
        raw = np.load(path)
    except FileNotFoundError:
        raise ValueError(f"--aux-data: no such file: {path}") from None
    except Exception as e:
        raise ValueError(f"--aux-data: {path} is not a readable .npz file ({type(e).__name__})") from None
    keys = ("image", "label") if "image" in raw.files else ("x_train", "y_train")
    if any(k not in raw.files for k in keys):
        raise ValueError(
            f"--aux-data: {path} lacks array '{[k for k in keys if k not in raw.files][0]}'; it needs "
            "image and label (DM-Improves-AT's format) or x_train and y_train"
        )
    x, y = (torch.from_numpy(np.ascontiguousarray(raw[k])) for k in keys)
    x = x.permute(0, 3, 1, 2) if keys[0] == "image" and x.dim() == 4 else x  # a view: NHWC stays where it is
    shape, k = tuple(d["x_train"].shape[1:]), d["num_classes"]
    if x.dtype != torch.uint8 or tuple(x.shape[1:]) != shape or y.dim() != 1 or len(x) != len(y) or not len(y):
        raise ValueError(
            f"--aux-data: {path}: {keys[0]} must be uint8 images of the dataset's size ({shape[1]} x "
            f"{shape[2]} x 3) and {keys[1]} as many labels"
        )
    if y.min() < 0 or int(y.max()) + 1 != k:
        raise ValueError(
            f"--aux-data: {path}: its labels run from {int(y.min())} to {int(y.max())}; the dataset's "
            f"classes are 0..{k - 1}"
        )
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")
    where = device if 2 * x.numel() < free else torch.device("cpu")
    return x.to(where), y.long().to(where)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    fmt: torch.memory_format = torch.channels_last,
    aux: tuple | None = None,
    aux_fraction: float = 0.0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of this process's training batches: len(x) // batch global batches, their real images drawn without
    replacement from a permutation seeded by (seed, epoch), so that a resumed run repeats an uninterrupted one;
    crops and flips are drawn for the global batch, then each of `world` processes takes its share.
    With `aux` (images, labels), int(aux_fraction * batch) images of each batch are drawn from it with replacement
    and the rest from x, and the batch is shuffled, as DM-Improves-AT's SemiSupervisedSampler (core/data/semisup.py)
    does; its epoch also counts the batches of one pass over the real set without generated data."""
    g = torch.Generator(x.device).manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(x), device=x.device, generator=g)
    n_aux = int(batch * aux_fraction) if aux else 0
    g_aux = torch.Generator(aux[0].device).manual_seed(seed * 100_003 + epoch) if n_aux else None
    share, real = batch // world, batch - n_aux
    for s in range(len(x) // batch):
        idx = perm[s * real : (s + 1) * real]
        xb, yb = x[idx], y[idx]
        if n_aux:
            j = torch.randint(len(aux[0]), (n_aux,), device=aux[0].device, generator=g_aux)
            order = torch.randperm(batch, device=x.device, generator=g)  # every process's share mixes both
            xb = torch.cat([xb, _on(aux[0][j], x.device)])[order]
            yb = torch.cat([yb, _on(aux[1][j], x.device)])[order]
        mine = slice(rank * share, (rank + 1) * share)
        yield augment(xb, g)[mine].contiguous(memory_format=fmt), yb[mine]


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on the device, from pinned host memory without a host-device synchronisation."""
    return (
        t.pin_memory().to(device, non_blocking=True) if t.device != device and device.type == "cuda" else t.to(device)
    )
