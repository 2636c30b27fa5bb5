"""The data: CIFAR-10/100 (torchvision's download), a synthetic set for checks, or any .npz with x_train,
y_train, x_test, y_test; and the training augmentation as batched tensor ops on the device.

Images stay uint8 NCHW until a batch is used; models normalize inside, so every consumer feeds [0, 1] images.
"""
import numpy as np
import torch
import torch.nn.functional as F

import models


def load_data(name: str, data_dir: str) -> dict:
    """uint8 NCHW images and int64 labels; ValueError with a readable message on bad input."""
    if name == "synthetic":  # learnable: the class sets the mean colour of the image
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 10, (1200,), generator=g)
        x = (torch.rand(1200, 3, 32, 32, generator=g) * 128 + y.view(-1, 1, 1, 1) * torch.tensor([12, 5, 2]).view(1, 3, 1, 1))
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
                raise ValueError(f"could not download {name} into {data_dir} ({e}). Without network, put torchvision's "
                                 f"{cls.filename} (from {cls.url}) into {data_dir}, or train on an offline copy: "
                                 "--dataset file.npz with x_train, y_train, x_test, y_test") from None
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
        raise ValueError(f"no such dataset file: {path}")
    except KeyError as e:
        raise ValueError(f"{path} lacks array {e}; it needs x_train, y_train, x_test, y_test")
    except Exception as e:
        raise ValueError(f"{path} is not a readable .npz file ({type(e).__name__})")
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
    out = pad[torch.arange(b, device=x.device).view(b, 1, 1, 1), torch.arange(3, device=x.device).view(1, 3, 1, 1), rows, cols]
    flip = torch.rand(b, device=x.device, generator=g) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), out.flip(3), out)
