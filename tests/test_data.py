"""Tests of data.py: the .npz checks, generated data (--aux-data: memory-mapped, drawn from a stream of its own
wherever it lives), the held-out split's limits, what a failed download leaves behind, and CIFAR's download by
processes started together and from a broken archive (a small fake archive of torchvision's layout, served here)."""

import hashlib
import http.server
import io
import multiprocessing
import os
import pickle
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
import data

CPU = torch.device("cpu")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def aux_file(path: Path, n: int = 60, compressed: bool = False) -> Path:
    """Generated images that say which they are: image i is uniformly i + 1 (the centre pixel survives every crop)."""
    x = np.broadcast_to(np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None], (n, 32, 32, 3))
    (np.savez_compressed if compressed else np.savez)(path, image=x, label=np.arange(n) % 10)
    return path


def mapped(t: torch.Tensor, path: Path) -> bool:
    """Whether t's memory lies in a memory map of the file at `path` (Linux's /proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in fields[0].split("-"))
        if len(fields) == 6 and fields[5] == str(path.resolve()) and lo <= t.data_ptr() < hi:
            return True
    return False


def epoch(aux: tuple, seed: int = 3, n: int = 256) -> list:
    """One epoch of batches on black real images, half of each batch generated."""
    x, y = torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.arange(n) % 10
    return list(data.batches(x, y, 64, seed, 2, aux=aux, aux_fraction=0.5))


def test_generated_images_are_memory_mapped_and_give_the_batches_of_a_full_read(tmp_path: Path, capsys) -> None:
    d = data.load_data("synthetic", "")
    plain, packed = aux_file(tmp_path / "plain.npz"), aux_file(tmp_path / "packed.npz", compressed=True)
    mapped_aux = data.load_aux(str(plain), d, CPU)
    assert capsys.readouterr().out == ""
    read_aux = data.load_aux(str(packed), d, CPU)
    assert f"note: --aux-data {packed} is compressed: each process reads all of it" in capsys.readouterr().out
    assert mapped(mapped_aux[0], plain) and mapped(mapped_aux[1], plain)  # no copy: the page cache's pages
    assert not mapped(read_aux[0], packed)  # np.savez_compressed: read into memory
    assert all(torch.equal(a, b) for a, b in zip(mapped_aux, read_aux))
    for (xa, ya), (xb, yb) in zip(epoch(mapped_aux), epoch(read_aux), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_generated_draws_come_from_their_own_cpu_stream_wherever_the_images_live(tmp_path: Path, monkeypatch) -> None:
    """Host memory or the device (simulated here: the free-memory query decides): the same batches, and the
    generated images each step takes are the draws of the CPU generator seeded apart from the permutation's."""
    d, path = data.load_data("synthetic", ""), aux_file(tmp_path / "aux.npz")
    runs = []
    for free in (0.0, float("inf")):
        monkeypatch.setattr(data, "_free_memory", lambda device, free=free: free)
        runs.append(epoch(data.load_aux(str(path), d, CPU)))
    for (xa, ya), (xb, yb) in zip(*runs, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    g = torch.Generator().manual_seed((3 * 100_003 + 2) ^ data.AUX_STREAM)
    want = torch.randint(60, (4, 32), generator=g)
    shared = torch.randint(60, (4, 32), generator=torch.Generator().manual_seed(3 * 100_003 + 2))
    assert not torch.equal(want, shared)  # a CPU generator keeps the low 32 bits of a seed: they differ
    for (xb, _), drawn in zip(runs[0], want, strict=True):
        which = (xb[:, 0, 16, 16] * 255).round().long() - 1  # -1: a real image
        assert torch.equal(which[which >= 0].sort().values, drawn.sort().values)


@CUDA
def test_cuda_generated_data_on_host_or_device_gives_the_same_batches_without_waiting(tmp_path: Path, monkeypatch):
    d, path, dev = data.load_data("synthetic", ""), aux_file(tmp_path / "aux.npz"), torch.device("cuda")
    x, y = d["x_train"][:256].to(dev), d["y_train"][:256].to(dev)
    runs = []
    for free, where in ((0.0, "cpu"), (float("inf"), "cuda")):
        monkeypatch.setattr(data, "_free_memory", lambda device, free=free: free)
        aux = data.load_aux(str(path), d, dev)
        assert aux[0].device.type == where
        batches = data.batches(x, y, 64, 0, 0, aux=aux, aux_fraction=0.5)
        runs.append([next(batches)])  # the epoch's first batch may synchronise (its permutation and draws)
        torch.cuda.set_sync_debug_mode("error")
        try:
            runs[-1] += list(batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for (xa, ya), (xb, yb) in zip(*runs, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def npz(path: Path, **arrays) -> str:
    full = dict(
        x_train=np.zeros((4, 3, 8, 8), np.uint8),
        y_train=np.arange(4),
        x_test=np.zeros((2, 3, 8, 8), np.uint8),
        y_test=np.arange(2),
    )
    np.savez(path, **{k: v for k, v in {**full, **arrays}.items() if v is not None})
    return str(path)


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(x_test=None), "lacks array 'x_test' (it holds x_train, y_train, y_test); it needs x_train, y_train"),
        (dict(y_train=np.arange(4) / 2), "y_train must hold integer class labels, got float64"),
        (dict(x_train=np.zeros((4, 3, 8, 8), np.float32)), "x_train must be uint8 images, got float32"),
        (
            dict(x_test=np.zeros((2, 8, 8, 3), np.uint8)),
            "x_test must be uint8 images of shape N x 3 x H x W, got 2 x 8",
        ),
        (dict(y_test=np.arange(3)), "y_test must hold one label per image (2 in x_test), got shape (3,)"),
        (dict(y_test=np.array([0, -1])), "y_test must hold labels 0..K-1, got -1"),
    ],
)
def test_a_bad_dataset_file_says_which_array_and_what(tmp_path: Path, arrays: dict, match: str) -> None:
    with pytest.raises(ValueError) as e:
        data.load_data(npz(tmp_path / "bad.npz", **arrays), "")
    assert match in str(e.value)


@pytest.mark.parametrize(
    "arrays, match",
    [
        (
            dict(image=np.zeros((10, 32, 32, 3), np.uint8)),
            "lacks array 'label' (it holds image); it needs image, label",
        ),
        (dict(image=np.zeros((10, 32, 32, 3), np.uint8), label=np.arange(10) + 0.0), "label must hold integer class"),
        (dict(x_train=np.zeros((10, 32, 32, 3), np.uint8), y_train=np.arange(10)), "N x 3 x 32 x 32, got 10 x 32"),
    ],
)
def test_a_bad_generated_file_says_which_array_and_what(tmp_path: Path, arrays: dict, match: str) -> None:
    np.savez(tmp_path / "aux.npz", **arrays)
    with pytest.raises(ValueError) as e:
        data.load_aux(str(tmp_path / "aux.npz"), data.load_data("synthetic", ""), CPU)
    assert str(e.value).startswith(f"--aux-data: {tmp_path / 'aux.npz'}") and match in str(e.value)


def test_val_limits_are_the_runs() -> None:
    """--smoke: 1000 training images, --train-limit 256, --batch 64: --val may hold out up to 936 of the 1000."""
    d = data.load_data("synthetic", "")
    for val in (0, 937):
        with pytest.raises(ValueError) as e:
            data.train_val(d, val, 256, 64, CPU)
        assert str(e.value).startswith(f"--val must lie in [1, 936] for the 1000 training images, got {val}")
        assert "--train-limit 256" in str(e.value)
    (x_tr, _), (x_val, _) = data.train_val(d, 936, 256, 64, CPU)
    assert len(x_tr) == 64 and len(x_val) == 936


def test_failed_download_removes_the_empty_folders_it_made_and_only_those(tmp_path: Path, monkeypatch) -> None:
    def no_network(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    (tmp_path / "kept").mkdir()
    for folder in (tmp_path / "new" / "data", tmp_path / "kept"):
        with pytest.raises(ValueError, match="could not download cifar10"):
            data.load_data("cifar10", str(folder))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


IMAGES = np.random.default_rng(0).integers(0, 256, (24, 3072), dtype=np.uint8)  # 5 training batches, then the test's


def fake_archive(cut: int = 0, broken: str = "") -> tuple[bytes, dict]:
    """cifar-10-python.tar.gz in torchvision's layout (cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta,
    pickles), 4 of IMAGES a batch, labels i % 10; and the md5s that torchvision's CIFAR10 checks, fitted to it.
    `cut`: the archive's last bytes dropped (its md5 fitted to what is left); `broken`: that file's bytes no pickle."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    files = {
        n: pickle.dumps(dict(data=IMAGES[4 * i : 4 * i + 4], labels=[(4 * i + j) % 10 for j in range(4)]))
        for i, n in enumerate(names)
    }
    files["batches.meta"] = pickle.dumps(dict(label_names=[f"class{k}" for k in range(10)]))
    files = {n: b"no pickle" if n == broken else b for n, b in files.items()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for n, b in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{n}")
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
    archive = buf.getvalue()[: -cut or None]
    md5 = {n: hashlib.md5(b).hexdigest() for n, b in files.items()}
    return archive, dict(
        tgz_md5=hashlib.md5(archive).hexdigest(),
        train_list=[[n, md5[n]] for n in names[:5]],
        test_list=[["test_batch", md5["test_batch"]]],
        meta=dict(filename="batches.meta", key="label_names", md5=md5["batches.meta"]),
    )


@pytest.fixture
def cifar(monkeypatch) -> dict:
    """torchvision's CIFAR10 pointed at a local HTTP server that serves cifar["body"] (the fake archive, its md5s
    patched in) slowly, in 6 parts 50 ms apart, and counts the downloads it finished in cifar["gets"]."""
    import torchvision

    archive, attrs = fake_archive()
    served = dict(body=archive, gets=0)

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # torchvision follows redirects first
            self.send_response(200)
            self.send_header("Content-Length", str(len(served["body"])))
            self.end_headers()

        def do_GET(self) -> None:
            self.do_HEAD()
            step = len(served["body"]) // 6 + 1
            try:
                for k in range(0, len(served["body"]), step):
                    self.wfile.write(served["body"][k : k + step])
                    self.wfile.flush()
                    time.sleep(0.05)
            except ConnectionError:  # torchvision's look for a redirect: a GET whose body it does not read
                return
            served["gets"] += 1

        def log_message(self, *a) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "url", f"http://127.0.0.1:{server.server_port}/{cls.filename}")
    for k, v in attrs.items():
        monkeypatch.setattr(cls, k, v)
    yield served
    server.shutdown()
    server.server_close()


def load_in_child(i: int, folder: str, result: Path) -> None:
    """A forked process: load_data after i * 0.2 s, past half of another's download; what it got, in `result`."""
    torch.set_num_threads(1)  # the OpenMP pool a fork inherits from the tests before hangs its first parallel op
    time.sleep(i * 0.2)
    try:
        d = data.load_data("cifar10", folder)
        same = [
            np.array_equal(d[k].numpy().reshape(-1, 3072), IMAGES[s])
            for k, s in (("x_train", slice(20)), ("x_test", slice(20, None)))
        ]
        result.write_text(repr([tuple(d[k].shape) for k in ("x_train", "y_train", "x_test", "y_test")] + same))
    except Exception as e:  # noqa: BLE001  (a traceback of a child is no answer: what it raised is)
        result.write_text(f"{type(e).__name__}: {e}")


def test_processes_started_together_on_one_folder_download_once_and_all_read_it(cifar: dict, tmp_path: Path):
    """Four processes on one new data folder, each starting while the one before downloads: without a lock each
    truncates the archive the one before is writing (its md5 then fails, or its read meets a half-written file)."""
    fork = multiprocessing.get_context("fork")
    results = [tmp_path / f"{i}.txt" for i in range(4)]
    procs = [
        fork.Process(target=load_in_child, args=(i, str(tmp_path / "data"), r), daemon=True)
        for i, r in enumerate(results)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 30
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        p.kill()  # one that hangs: its result is missing
    want = repr([(20, 3, 32, 32), (20,), (4, 3, 32, 32), (4,), True, True])  # the shapes; the images put in
    assert [r.read_text() if r.exists() else "no result" for r in results] == [want] * 4
    assert cifar["gets"] == 1  # the others waited, then read what the first wrote
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        ".cifar10.lock",
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
    ]


@pytest.mark.parametrize(
    "kw, served, says",
    [
        (dict(), True, "{dir}/cifar-10-python.tar.gz is truncated or corrupt (its md5 is not torchvision's; Runtime"),
        (dict(), False, "{dir}/cifar-10-python.tar.gz is truncated or corrupt (its md5 is not torchvision's; URLError"),
        (dict(cut=100), False, "could not read cifar10 from {dir} (EOFError: Compressed file ended"),
        (dict(broken="data_batch_3"), False, "could not read cifar10 from {dir} (UnpicklingError: "),
    ],
    ids=["served-truncated", "truncated-offline", "truncated-md5-fits", "batch-no-pickle"],
)
def test_a_broken_archive_is_one_line_naming_it(cifar, tmp_path, monkeypatch, kw, served, says) -> None:
    """Half an archive (its md5 the whole's), served (a download cut short) or left in the folder without network;
    and what torchvision's md5 checks let through (md5s fitted to a broken archive: its extraction or read raises)."""
    import torchvision

    folder, cls = tmp_path / "data", torchvision.datasets.CIFAR10
    archive, attrs = fake_archive(**kw)
    body = archive if kw else archive[: len(archive) // 2]
    for k, v in attrs.items():
        monkeypatch.setattr(cls, k, v)
    if served:
        cifar["body"] = body
    else:
        folder.mkdir()
        (folder / cls.filename).write_bytes(body)
        monkeypatch.setattr(cls, "url", "http://127.0.0.1:9/none")  # no network: nothing listens there
    with pytest.raises(SystemExit) as e:
        cli.run("train.py", lambda: data.load_data("cifar10", str(folder)), "", "")
    assert str(e.value.code).startswith("train.py: error: " + says.format(dir=folder)), e.value.code
    assert "\n" not in e.value.code and "delete " in e.value.code
    assert f"put torchvision's cifar-10-python.tar.gz (from {cls.url}) into {folder}" in e.value.code


def svhn_standin(folder: Path, monkeypatch, sizes: tuple[int, int] = (160, 40)) -> dict:
    """SVHN's two files as torchvision reads them (train_32x32.mat, test_32x32.mat: X uint8 32 x 32 x 3 x N, y N x 1
    with labels 1..10, 10 for the digit 0), small, in `folder`, their md5s patched into torchvision's SVHN; the
    images as N x 3 x 32 x 32 and the labels 0..9 that the loader should give, by split. Image i's labels run
    i % 10 + 1, so every class is there and 10 stands for 0."""
    import scipy.io
    import torchvision

    cls, rng, want, split_list = torchvision.datasets.SVHN, np.random.default_rng(0), {}, {}
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "test"), sizes):
        x, y = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), np.arange(n) % 10 + 1
        scipy.io.savemat(folder / f"{split}_32x32.mat", dict(X=x, y=y.reshape(-1, 1).astype(np.uint8)))
        url, name, _ = cls.split_list[split]
        split_list[split] = [url, name, hashlib.md5((folder / name).read_bytes()).hexdigest()]
        want[split] = (x.transpose(3, 2, 0, 1), y % 10)
    monkeypatch.setattr(cls, "split_list", {**cls.split_list, **split_list})
    return want


def test_svhn_loads_both_splits_as_nchw_uint8_with_labels_0_to_9_and_its_own_statistics(tmp_path, monkeypatch):
    want = svhn_standin(tmp_path / "svhn", monkeypatch)
    d = data.load_data("svhn", str(tmp_path / "svhn"))
    for split in ("train", "test"):
        x, y = d[f"x_{split}"], d[f"y_{split}"]
        assert x.dtype == torch.uint8 and x.is_contiguous() and y.dtype == torch.int64
        assert np.array_equal(x.numpy(), want[split][0]) and np.array_equal(y.numpy(), want[split][1])
    assert tuple(d["x_train"].shape) == (160, 3, 32, 32) and tuple(d["x_test"].shape) == (40, 3, 32, 32)
    assert d["num_classes"] == 10 and (d["mean"], d["std"]) == data.models.STATS["svhn"]
    assert (tmp_path / "svhn" / ".svhn.lock").exists()  # the download's lock, as CIFAR's


@pytest.mark.parametrize("there", ["nothing", "a truncated train_32x32.mat"])
def test_svhn_that_cannot_be_had_offline_is_one_line_saying_what_to_do(tmp_path, monkeypatch, there) -> None:
    """No network: the folder it made is gone again; a file whose md5 is not torchvision's is named."""
    import torchvision

    def no_network(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    folder = tmp_path / "data"
    if there != "nothing":
        svhn_standin(folder, monkeypatch)
        (folder / "train_32x32.mat").write_bytes((folder / "train_32x32.mat").read_bytes()[:1000])
    with pytest.raises(SystemExit) as e:
        cli.run("train.py", lambda: data.load_data("svhn", str(folder)), "", "")
    url = os.path.dirname(torchvision.datasets.SVHN.split_list["train"][0])
    get = f"put torchvision's train_32x32.mat and test_32x32.mat (from {url}/) into {folder}"
    said = str(e.value.code)
    assert "\n" not in said and get in said, said
    if there == "nothing":
        assert said.startswith(f"train.py: error: could not download svhn into {folder} (<urlopen error")
        assert "--dataset file.npz" in said and not folder.exists()
    else:
        assert said.startswith(f"train.py: error: {folder / 'train_32x32.mat'} is truncated or corrupt")


def test_svhn_without_scipy_says_so_in_one_line_and_leaves_its_files(tmp_path, monkeypatch) -> None:
    svhn_standin(tmp_path, monkeypatch, (10, 10))
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ValueError, match=r"^svhn needs scipy, which reads its .mat files: pip install scipy$"):
        data.load_data("svhn", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_32x32.mat", "train_32x32.mat"]


def test_a_smoke_run_on_svhn_trains_uncropped_unflipped_with_svhns_normalization(tmp_path, monkeypatch, capsys):
    """One step of train.py on the stand-in: SVHN's statistics inside the model, no crop or flip (robust_overfitting's
    train_svhn.py); attack.py's test points of its checkpoint are SVHN's test images."""
    import attack
    import models
    import train

    want, seen = svhn_standin(tmp_path / "svhn", monkeypatch, (96, 8)), []
    augment = data.augment
    monkeypatch.setattr(
        data, "augment", lambda x, g, crop_flip=True: seen.append(crop_flip) or augment(x, g, crop_flip)
    )
    argv = ["--smoke", "--device", "cpu", "--dataset", "svhn", "--data-dir", tmp_path / "svhn", "--epochs", 1]
    train.main([str(a) for a in [*argv, "--batch", 32, "--train-limit", 32, "--val", 16, "--out", tmp_path / "run"]])
    ckpt = models.read(str(tmp_path / "run" / "best.pt"))
    assert (tuple(ckpt["mean"]), tuple(ckpt["std"])) == models.STATS["svhn"] and ckpt["dataset"] == "svhn"
    model = models.from_checkpoint(ckpt, CPU)
    assert torch.allclose(model.mean.flatten(), torch.tensor(models.STATS["svhn"][0]))
    assert seen == [False]  # one step, its batch neither cropped nor flipped
    assert "note: svhn trains without crops or flips, as robust_overfitting's train_svhn.py" in capsys.readouterr().out
    args = attack.get_args([str(tmp_path / "run" / "best.pt"), "--data-dir", str(tmp_path / "svhn"), "--points", "8"])
    x, y = attack.test_points(ckpt, args)
    assert torch.equal(x, torch.from_numpy(want["test"][0][:8]).float() / 255) and y.tolist() == [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
    ]
