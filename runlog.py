"""A run folder's log.jsonl, written by train.py (one record per epoch, then the test report) and read by it on
--resume and by the studies in results/; and curves.png, drawn from it after every epoch."""

import contextlib
import json
import os
import sys


def records(out: str) -> list[dict]:
    """log.jsonl's records, without a line that a killed run left half-written."""
    path, recs = os.path.join(out, "log.jsonl"), []
    with open(path) if os.path.exists(path) else contextlib.nullcontext([]) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                recs.append(json.loads(line))
    return recs


def append(out: str, rec: dict) -> None:
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def trim(out: str, epochs_done: int) -> None:
    """Keeps the records of the epochs last.pt holds: none for a fresh run, and on resume not the one a killed run
    may have logged after its last checkpoint."""
    keep = [json.dumps(r) + "\n" for r in records(out) if r.get("epoch", epochs_done + 1) <= epochs_done]
    with open(os.path.join(out, "log.jsonl.tmp"), "w") as f:
        f.writelines(keep)
    os.replace(os.path.join(out, "log.jsonl.tmp"), os.path.join(out, "log.jsonl"))


def final(out: str) -> dict | None:
    """The test report of a finished run ({"best": ..., "last": ...}), or None."""
    return next((r["final"] for r in reversed(records(out)) if "final" in r), None)


_SAID = []


def curves(out: str) -> None:
    """curves.png: validation clean and PGD accuracy with the best epoch marked, training adversarial accuracy
    and loss, learning rate. Robust overfitting shows as a falling PGD curve."""
    import cli  # here, not at the top: reading a log needs no torch (results/runner.py's links)

    plt = cli.pyplot()
    if plt is None:
        if not _SAID:
            print("matplotlib is not installed: no curves.png is drawn (pip install matplotlib)", file=sys.stderr)
            _SAID.append(True)
        return
    recs = [r for r in records(out) if "epoch" in r]
    e, best = [r["epoch"] for r in recs], max(recs, key=lambda r: r["val_pgd"])
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.3))
    for key, name, style in (
        ("val_clean", "val clean", "-"),
        ("val_pgd", "val PGD", "-"),
        ("train_adv_acc", "train adversarial", ":"),
    ):
        a1.plot(e, [100 * r[key] for r in recs], label=name, linestyle=style)
    a1.axvline(best["epoch"], color="gray", linewidth=0.8)
    a1.annotate(f"best.pt: epoch {best['epoch']}", (best["epoch"], 100 * best["val_pgd"]), fontsize=8)
    a1.legend(fontsize=8)
    a2.plot(e, [r["train_loss"] for r in recs])
    a3.plot(e, [r["lr"] for r in recs])
    for ax, name in ((a1, "accuracy %"), (a2, "training loss"), (a3, "learning rate")):
        ax.set(xlabel="epoch", ylabel=name)
    a3.set_yscale("log" if min(r["lr"] for r in recs) > 0 else "linear")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)
