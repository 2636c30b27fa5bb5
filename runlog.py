"""A run folder's rules and writes: the files it holds (a fresh run refuses a folder with any of them); what an
epoch writes, last.pt first, then from it best.pt, the log record and curves.png, so that a resume redoes what a kill
cut; log.jsonl (one record per epoch, then the test report), read on --resume and by the studies in results/. And
`write`, the one writer of every file the project keeps (checkpoints, logs, results, tables, figures)."""

import contextlib
import errno
import io
import json
import os
import sys
from collections.abc import Callable


class WriteError(OSError):
    """A file that could not be written, as one line: `cannot write PATH: no space left on device`. The file as it
    was before stays, and no temporary file is left."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (cli.run's handler), raised in the main thread as Ctrl-C's KeyboardInterrupt is: whatever a Ctrl-C
    cleans up (a write's temporary file), a SIGTERM cleans up too. Here, beside WriteError, for results/runner.py's
    queue, which needs no torch."""


FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}  # the disk-full errors


def write(path: str, data: bytes | memoryview | str) -> None:
    """Atomic: data into PATH.tmp, synced, then renamed over PATH, so that a reader, a crash, a full disk or a
    signal finds the old file or the new one, whole. Any failure (an interruption included) removes PATH.tmp; an
    OSError becomes a WriteError naming PATH. The sync is where a network filesystem or a quota reports that the
    data did not fit (write() may have taken it into the page cache): before the rename, the old file stays."""
    data = data.encode() if isinstance(data, str) else data
    special = os.path.exists(path) and not os.path.isfile(path)  # /dev/null, a pipe: written to, never replaced
    tmp = path if special else f"{path}.tmp"
    try:
        _put(tmp, data, sync=not special)
        if not special:
            os.replace(tmp, path)
    except BaseException as e:
        if not special:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if isinstance(e, OSError):
            raise WriteError(e.errno, FULL.get(e.errno) or (e.strerror or str(e)).lower(), path) from None
        raise


def _put(path: str, data: bytes | memoryview, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        _write_all(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """The one low-level write of every file (os.write until all is written): what a test makes fail."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def png(fig, path: str, dpi: int) -> None:
    """A matplotlib figure written as a PNG through `write`, then closed, written or not."""
    import matplotlib.pyplot as plt  # the figure's own: matplotlib is there

    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        write(path, buf.getvalue())
    finally:
        plt.close(fig)


def records(out: str) -> list[dict]:
    """log.jsonl's records, without a line that a killed run left half-written."""
    path, recs = os.path.join(out, "log.jsonl"), []
    with open(path) if os.path.exists(path) else contextlib.nullcontext([]) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                recs.append(json.loads(line))
    return recs


def append(out: str, rec: dict) -> None:
    """rec as log.jsonl's last line: the whole log rewritten (a record an epoch: small), so that a full disk leaves
    it as it was, never a half line that the next record would run into."""
    path = os.path.join(out, "log.jsonl")
    with open(path, "rb") if os.path.exists(path) else contextlib.nullcontext(None) as f:
        old = f.read() if f else b""
    write(path, old + (b"\n" * (not old.endswith(b"\n") and bool(old))) + (json.dumps(rec) + "\n").encode())


def trim(out: str, epochs_done: int) -> None:
    """Keeps the records of the epochs last.pt holds (a run that logged before it wrote last.pt may have logged an
    epoch more)."""
    keep = [json.dumps(r) + "\n" for r in records(out) if r.get("epoch", epochs_done + 1) <= epochs_done]
    write(os.path.join(out, "log.jsonl"), "".join(keep))


LAST_ONLY = ("optimizer", "best", "improved", "scheduler", "unaveraged")  # last.pt's keys that best.pt lacks


def begin(out: str, epochs_done: int, last: dict | None = None, title: str = "") -> None:
    """Makes the run folder (ValueError where it cannot); on resume from `last` (last.pt's contents), trims the log
    to the epochs last.pt holds and redoes what a kill cut after it was written."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"output directory {out} is not writable")
    if epochs_done:
        trim(out, epochs_done)
    if last:
        after_last(out, last, title, redo=True)


def checkpoint(model, args, d: dict, epoch: int, metrics: dict) -> dict:
    """What rebuilds the model (models.from_checkpoint) and says how it was trained."""
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
        norm=args.norm,
        epoch=epoch,
        metrics=metrics,
        args=vars(args),
    )


def save_last(out: str, last: dict, title: str) -> None:
    """An epoch's files: last.pt first (a resume redoes the rest from it), then what follows from it."""
    import models  # here, not at the top: reading a log needs no torch (results/runner.py's links)

    models.save(last, os.path.join(out, "last.pt"))
    after_last(out, last, title)


def after_last(out: str, last: dict, title: str, redo: bool = False) -> None:
    """What follows last.pt at the end of an epoch, from last.pt alone: best.pt if the epoch improved on it, the
    epoch's log record, the curves. A resume redoes what a kill left undone (`redo`)."""
    import models

    path = os.path.join(out, "best.pt")
    if last.get("improved") and not (redo and os.path.isfile(path) and models.read(path)["epoch"] == last["epoch"]):
        models.save({k: v for k, v in last.items() if k not in LAST_ONLY}, path)
    if not (redo and any(r.get("epoch") == last["epoch"] for r in records(out))):
        append(out, last["metrics"])
    curves(out, title)


def final(out: str) -> dict | None:
    """The test report of a finished run ({"best": ..., "last": ...}), or None."""
    return next((r["final"] for r in reversed(records(out)) if "final" in r), None)


def held(out: str) -> list[str]:
    """The files of a run that the folder `out` holds: train.py's, and attack.py's beside its checkpoints; not a
    .tmp that a killed write left (the next write replaces it)."""
    names = [f for f in (os.listdir(out) if os.path.isdir(out) else []) if not f.endswith(".tmp")]
    return sorted(
        f for f in names if f in ("log.jsonl", "curves.png", "margins.png") or f.startswith(("best.", "last."))
    )


def claim(out: str, resume: bool, instead: Callable[[bool], str] | None = None) -> None:
    """Refuses an --out that is a file, and a fresh run into a folder that holds a run's files: it would replace or
    empty them (ValueError). instead(whether there is a last.pt) says what to do instead (train.py's command line
    knows the command; flags.instead)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder")
    files = held(out)
    if files and not resume:
        has_last = "last.pt" in files
        how = "continue it with --resume (or --resume auto), or choose another --out"
        if not has_last:
            how = "choose another --out"
            files[-1] += "; no last.pt to continue from"
        raise ValueError(f"{out} holds a run already ({', '.join(files)}): {instead(has_last) if instead else how}")


def kept(out: str) -> str:
    """What an interrupted run has left, said when it is interrupted."""
    path = os.path.join(out, "last.pt")
    if os.path.isfile(path):
        return f"{path} keeps the last finished epoch (continue with --resume)"
    return "no epoch had finished: nothing was saved"


_SAID = []


def curves(out: str, title: str) -> None:
    """curves.png under `title`: validation clean and PGD accuracy with the best epoch marked, training adversarial
    accuracy and loss, learning rate. Robust overfitting shows as a falling PGD curve."""
    import cli  # here, not at the top: reading a log needs no torch (results/runner.py's links)

    plt = cli.pyplot()
    if plt is None:
        if not _SAID:
            print("matplotlib is not installed: no curves.png is drawn (pip install matplotlib)", file=sys.stderr)
            _SAID.append(True)
        return
    png(figure(plt, [r for r in records(out) if "epoch" in r], title), os.path.join(out, "curves.png"), dpi=100)


def figure(plt, recs: list[dict], title: str):
    """curves.png's figure of the epochs' records: whole epochs on every axis, the lr as the steps it takes."""
    from matplotlib.ticker import MaxNLocator

    e, best = [r["epoch"] for r in recs], max(recs, key=lambda r: r["val_pgd"])
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.5))
    for key, name, style in (
        ("val_clean", "val clean", "-"),
        ("val_pgd", "val PGD", "-"),
        ("train_adv_acc", "train adversarial", ":"),
    ):
        a1.plot(e, [100 * r[key] for r in recs], label=name, linestyle=style)
    a1.axvline(best["epoch"], color="gray", linewidth=0.8)
    right = best["epoch"] > (e[0] + e[-1]) / 2  # the label reads away from the nearer edge, at the panel's foot
    a1.annotate(
        f"best.pt: epoch {best['epoch']}",
        (best["epoch"], 0.03),
        xycoords=a1.get_xaxis_transform(),
        xytext=(-3 if right else 3, 0),
        textcoords="offset points",
        ha="right" if right else "left",
        fontsize=8,
    )
    a1.legend(fontsize=8)
    a2.plot(e, [r["train_loss"] for r in recs])
    lr = [r["lr"] for r in recs]
    a3.plot([e[0] - 1] + e, lr[:1] + lr, drawstyle="steps-pre")  # epoch k's lr holds on (k - 1, k]
    for ax, name in ((a1, "accuracy %"), (a2, "training loss"), (a3, "learning rate")):
        ax.set(xlabel="epoch", ylabel=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    a3.set_yscale("log" if min(lr) > 0 else "linear")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
