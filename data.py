"""The data: CIFAR-10/100 or SVHN (torchvision's download), a synthetic set for checks, or any .npz with x_train,
y_train, x_test, y_test; and the training augmentation as batched tensor ops on the device.

Images stay uint8 NCHW until a batch is used; models normalize inside, so every consumer feeds [0, 1] images.
"""

import contextlib
import fcntl
import os
import warnings
import zipfile
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import models

# The sets torchvision downloads: its class, and the keyword and values that pick the training and the test split.
# SVHN's extra split (531,131 more training images) is not read.
TORCHVISION = {
    "cifar10": ("CIFAR10", "train", (True, False)),
    "cifar100": ("CIFAR100", "train", (True, False)),
    "svhn": ("SVHN", "split", ("train", "test")),
}
NAMES = (*TORCHVISION, "synthetic")  # every --dataset but a .npz file
# Trained without crops and flips: robust_overfitting's train_svhn.py (its transform is ToTensor alone), as SVHN
# is usually trained; a flipped digit is another digit or none.
UNAUGMENTED = {"svhn"}


def load_data(name: str, data_dir: str) -> dict:
    """uint8 NCHW images and int64 labels; ValueError with a readable message on bad input. Any number of processes
    may call it at once on one data folder (torchrun's ranks, a grid's runs): a download is locked (_torchvision)."""
    if name == "synthetic":  # learnable: the class sets the mean colour of the image
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 10, (1200,), generator=g)
        x = torch.rand(1200, 3, 32, 32, generator=g) * 128 + y.view(-1, 1, 1, 1) * torch.tensor([12, 5, 2]).view(
            1, 3, 1, 1
        )
        d = dict(x_train=x[:1000], y_train=y[:1000], x_test=x[1000:], y_test=y[1000:])
        d = {k: v.to(torch.uint8) if k[0] == "x" else v for k, v in d.items()}
    elif name in TORCHVISION:
        d = _torchvision(name, data_dir)
    elif name.endswith(".npz"):
        d = _read_npz(name)
    else:
        raise ValueError(f"unknown dataset {name!r}: use {', '.join(NAMES)} or a .npz file")
    d["num_classes"] = 100 if name == "cifar100" else int(max(d["y_train"].max(), d["y_test"].max())) + 1
    if name in models.STATS:
        d["mean"], d["std"] = models.STATS[name]
    else:
        pix = d["x_train"].float().div(255).transpose(0, 1).reshape(3, -1)
        d["mean"], d["std"] = tuple(pix.mean(1).tolist()), tuple(pix.std(1).tolist())
    return d


def _torchvision(name: str, data_dir: str) -> dict:
    """torchvision's CIFAR-10/100 or SVHN from data_dir, downloaded (and extracted) there first where missing, all
    under an exclusive lock on data_dir/.<name>.lock: processes started together (a grid's runs, torchrun's ranks,
    SLURM jobs on one filesystem) download it once, the others wait for it (a file lock has no timeout, unlike a
    collective under NCCL's watchdog) and then read what it wrote."""
    import torchvision  # only needed on this path

    if name == "svhn":  # else its ImportError would read as a broken file, and the advice be to delete good ones
        try:
            import scipy.io  # noqa: F401
        except ImportError:
            raise ValueError("svhn needs scipy, which reads its .mat files: pip install scipy") from None
    kind, key, splits = TORCHVISION[name]
    cls = getattr(torchvision.datasets, kind)
    root = os.path.abspath(os.path.expanduser(data_dir))  # as torchvision reads it
    made, path = [], root  # made: the folders about to be created, deepest first
    while not os.path.exists(path):
        made, path = [*made, path], os.path.dirname(path)
    lock = os.path.join(root, f".{name}.lock")
    with _locked(lock):
        try:
            sets = [cls(data_dir, download=True, **{key: split}) for split in splits]
        except Exception as e:  # urllib's URLError, md5's RuntimeError, gzip's EOFError, tarfile's, pickle's, ...
            error = _fetch_error(name, cls, data_dir, e)
            if made and os.listdir(made[0]) == [os.path.basename(lock)]:
                os.remove(lock)  # held: a process waiting for it locks the next one (_locked)
            for folder in made:  # left empty by the failed download: remove them, never one that was there
                if os.listdir(folder):
                    break
                os.rmdir(folder)
            raise error from None
    d = {}
    for split, ds in zip(("train", "test"), sets):
        x = torch.from_numpy(ds.data)  # SVHN's are N x 3 x H x W already (labels 0-9: torchvision maps its 10 to 0)
        d[f"x_{split}"] = (x if name == "svhn" else x.permute(0, 3, 1, 2)).contiguous()
        d[f"y_{split}"] = torch.as_tensor(np.asarray(ds.labels if name == "svhn" else ds.targets), dtype=torch.int64)
    return d


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Runs the block holding an exclusive flock on the file at path (made, with its folder, where missing). The
    lock must be on the file that is still there: one removed meanwhile (by a holder, see _torchvision) is locked anew.
    Where none can be had (a read-only folder, a filesystem without flock), the block runs unlocked, as before."""
    fd = None
    while fd is None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # its folder was removed between the two calls
            continue
        except OSError:  # nothing can be written there: torchvision reads what is there, or says why not
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # e.g. Lustre mounted without flock
            break
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)  # again, on the file now at path
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _fetch_error(name: str, cls: type, data_dir: str, e: Exception) -> ValueError:
    """The one line for a failed download, extraction or read of torchvision's CIFAR or SVHN files: the first of
    them in data_dir that is not torchvision's (its md5 differs: truncated or corrupt) and what to do; where all that
    are there are, the download's error and the offline ways, or (an error torchvision's checks let through) the
    error."""
    from torchvision.datasets.utils import check_integrity

    files, get, delete = _files(name, cls, data_dir)
    bad = next((f for f, md5 in files if os.path.isfile(f) and not check_integrity(f, md5)), None)
    said = f"{type(e).__name__}: {e}"
    if bad:
        return ValueError(
            f"{bad} is truncated or corrupt (its md5 is not torchvision's; {said}): delete it to "
            f"download it again, or {get}"
        )
    if isinstance(e, OSError):  # urllib's URLError is one
        return ValueError(
            f"could not download {name} into {data_dir} ({e}). Without network, {get}, or train on an offline copy: "
            "--dataset file.npz with x_train, y_train, x_test, y_test"
        )
    return ValueError(
        f"could not read {name} from {data_dir} ({said}): delete {delete} to download them again, or {get}"
    )


def _files(name: str, cls: type, data_dir: str) -> tuple[list[tuple[str, str]], str, str]:
    """torchvision's files of the set in data_dir with their md5s, each downloaded one first; how to put them there
    by hand; and what to delete to download them again."""
    if name == "svhn":  # a .mat file a split, read as downloaded
        parts = [cls.split_list[split] for split in TORCHVISION[name][2]]
        files = [(os.path.join(data_dir, f), md5) for _, f, md5 in parts]
        get = f"put torchvision's {' and '.join(f for _, f, _ in parts)} (from {os.path.dirname(parts[0][0])}/) into"
        return files, f"{get} {data_dir}", " and ".join(f for f, _ in files)
    folder = os.path.join(data_dir, cls.base_folder)
    parts = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
    files = [(os.path.join(data_dir, cls.filename), cls.tgz_md5), *((os.path.join(folder, f), m) for f, m in parts)]
    return files, f"put torchvision's {cls.filename} (from {cls.url}) into {data_dir}", f"{files[0][0]} and {folder}"


def _read_npz(path: str) -> dict:
    keys = ("x_train", "y_train", "x_test", "y_test")
    a = _npz(path, "", keys)
    for x, y in (keys[:2], keys[2:]):
        _check(f"{path}: ", x, a[x], y, a[y])
        if a[y].min() < 0:
            raise ValueError(f"{path}: {y} must hold labels 0..K-1, got {a[y].min()}")
    return {k: torch.from_numpy(np.array(v, np.int64 if k[0] == "y" else np.uint8)) for k, v in a.items()}  # a copy


def _npz(path: str, pre: str, *layouts: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of the first layout (array names) whose first array the .npz file holds (else of the last), as
    read-only memory maps where np.savez stored them (uncompressed), read into memory where np.savez_compressed
    packed them; ValueError (after `pre`) naming the missing array or the unreadable file."""
    key, arrays = "", {}
    try:
        with zipfile.ZipFile(path) as z:
            names = [n.removesuffix(".npy") for n in z.namelist()]
            keys = next((ks for ks in layouts if ks[0] in names), layouts[-1])
            missing = [k for k in keys if k not in names]
            for key in () if missing else keys:
                arrays[key] = _member(path, z, z.getinfo(key + ".npy"))
    except FileNotFoundError:
        raise ValueError(f"{pre}no such dataset file: {path}") from None
    except Exception as e:
        where = f"array '{key}': " if key else ""
        raise ValueError(f"{pre}{path} is not a readable .npz file ({where}{type(e).__name__}: {e})") from None
    if missing:
        raise ValueError(
            f"{pre}{path} lacks array '{missing[0]}' (it holds {', '.join(names) or 'none'}); it needs "
            + " or ".join(", ".join(ks) for ks in layouts)
        )
    return arrays


def _member(path: str, z: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One .npy inside the .npz: mapped from the file where it is stored as is, else read."""
    with z.open(info) as f:
        one = np.lib.format.read_magic(f) == (1, 0)  # 2.0 and 3.0 headers differ from 1.0 in their length field
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if one else np.lib.format.read_array_header_2_0)(f)
        start = f.tell()  # where the data begins inside the member
    if info.compress_type != zipfile.ZIP_STORED or dtype.hasobject or not dtype.isnative or not np.prod(shape):
        with z.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    with open(path, "rb") as f:  # the member's data follows its local header (30 bytes, its name, its extra field)
        f.seek(info.header_offset + 26)
        name, extra = np.frombuffer(f.read(4), "<u2")
    offset = info.header_offset + 30 + int(name) + int(extra) + start
    return np.memmap(path, dtype, "r", offset, shape, "F" if fortran else "C")


def _check(pre: str, xk: str, x: np.ndarray, yk: str, y: np.ndarray, image: tuple | None = None) -> None:
    """ValueError naming the array and what is wrong with it unless `x` holds uint8 images, each of shape `image`
    (None: 3 x H x W), and `y` one integer label per image."""
    got = " x ".join(map(str, x.shape)) or "a scalar"
    if x.dtype != np.uint8:
        raise ValueError(f"{pre}{xk} must be uint8 images, got {x.dtype} ({got})")
    if x.ndim != 4 or (tuple(x.shape[1:]) != image if image else x.shape[1] != 3):
        size = f"the dataset's size, N x {' x '.join(map(str, image))}" if image else "shape N x 3 x H x W"
        raise ValueError(f"{pre}{xk} must be uint8 images of {size}, got {got}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"{pre}{yk} must hold integer class labels, got {y.dtype}")
    if not len(x):
        raise ValueError(f"{pre}{xk} holds no images")
    if y.shape != (len(x),):
        raise ValueError(f"{pre}{yk} must hold one label per image ({len(x)} in {xk}), got shape {y.shape}")


def augment(x: torch.Tensor, g: torch.Generator, crop_flip: bool = True) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and horizontal flip, as batched tensor ops (none without `crop_flip`);
    uint8 -> [0, 1]."""
    if not crop_flip:
        return x.float().div_(255)
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
    if batch > min(n - 1, train_limit or n):
        raise ValueError(f"--batch {batch} is larger than the {min(n - 1, train_limit or n)} training images")
    if not 0 < val <= n - batch:  # held out of all n, before --train-limit cuts the rest
        limit = f" (--train-limit {train_limit} then keeps at most {train_limit} of them)" if train_limit else ""
        raise ValueError(
            f"--val must lie in [1, {n - batch}] for the {n} training images, got {val}: it holds images out of all "
            f"{n} and leaves at least --batch {batch} to train on{limit}"
        )
    split = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    val_idx, tr_idx = split[:val], split[val:]
    if train_limit:
        tr_idx = tr_idx[:train_limit]
    return tuple((d["x_train"][idx].to(device), d["y_train"][idx].to(device)) for idx in (tr_idx, val_idx))


def load_aux(path: str, d: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated training images and labels for --aux-data: DM-Improves-AT's file (its core/data/semisup.py reads
    `image`, uint8 N x 32 x 32 x 3, and `label`) or this project's .npz layout (x_train, y_train), checked against
    the dataset `d`. On the device where they fit in half its free memory; on the host otherwise (a batch's share
    then moves to the device per step), memory-mapped from the file where np.savez stored it uncompressed, so
    that every process of a machine reads the same pages of the page cache."""
    pre = f"--aux-data: {path}: "
    a = _npz(path, "--aux-data: ", ("image", "label"), ("x_train", "y_train"))
    (xk, x), (yk, y) = a.items()
    h, w = d["x_train"].shape[2:]
    _check(pre, xk, x, yk, y, (h, w, 3) if xk == "image" else (3, h, w))
    k, low, high = d["num_classes"], int(y.min()), int(y.max())
    if low < 0 or high + 1 != k:
        raise ValueError(f"{pre}its labels run from {low} to {high}; the dataset's classes are 0..{k - 1}")
    if not isinstance(x, np.memmap) and not (dist.is_initialized() and dist.get_rank()):
        print(
            f"note: --aux-data {path} is compressed: each process reads all of it into memory ({x.nbytes / 1e9:.1f} "
            "GB); np.savez's uncompressed files are memory-mapped instead, one copy per machine"
        )
    with warnings.catch_warnings():  # a read-only map: nothing writes to these tensors (batches index them)
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        x, y = torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(y, np.int64))
    x = x.permute(0, 3, 1, 2) if xk == "image" else x  # a view: NHWC stays where it is
    where = device if 2 * x.numel() < _free_memory(device) else torch.device("cpu")
    return x.to(where), y.to(where)


def _free_memory(device: torch.device) -> float:
    """Bytes free on the device (where the generated images may go)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")


# XORed into the permutation's seed for the generated draws' own stream: a CPU generator keeps only the low 32 bits
# of its seed, which this moves by more than 2**30, so that no epoch's permutation of a run shares the stream
AUX_STREAM = 0x9E3779B9


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
    crop_flip: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of this process's training batches: len(x) // batch global batches, their real images drawn without
    replacement from a permutation seeded by (seed, epoch), so that a resumed run repeats an uninterrupted one;
    crops and flips (unless not `crop_flip`: UNAUGMENTED's sets) are drawn for the global batch, then each of
    `world` processes takes its share.
    With `aux` (images, labels), int(aux_fraction * batch) images of each batch are drawn from it with replacement
    and the rest from x, and the batch is shuffled, as DM-Improves-AT's SemiSupervisedSampler (core/data/semisup.py)
    does; its epoch also counts the batches of one pass over the real set without generated data."""
    g = torch.Generator(x.device).manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(x), device=x.device, generator=g)
    steps, n_aux = len(x) // batch, int(batch * aux_fraction) if aux else 0
    if n_aux:  # on the CPU wherever the images live (their place depends on the device's free memory)
        g_aux = torch.Generator().manual_seed((seed * 100_003 + epoch) ^ AUX_STREAM)
        draws = _on(torch.randint(len(aux[0]), (steps, n_aux), generator=g_aux), aux[0].device)
    share, real = batch // world, batch - n_aux
    for s in range(steps):
        idx = perm[s * real : (s + 1) * real]
        xb, yb = x[idx], y[idx]
        if n_aux:
            j = draws[s]
            order = torch.randperm(batch, device=x.device, generator=g)  # every process's share mixes both
            xb = torch.cat([xb, _on(aux[0][j], x.device)])[order]
            yb = torch.cat([yb, _on(aux[1][j], x.device)])[order]
        mine = slice(rank * share, (rank + 1) * share)
        yield augment(xb, g, crop_flip)[mine].contiguous(memory_format=fmt), yb[mine]


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on the device, from pinned host memory without a host-device synchronisation."""
    return (
        t.pin_memory().to(device, non_blocking=True) if t.device != device and device.type == "cuda" else t.to(device)
    )
