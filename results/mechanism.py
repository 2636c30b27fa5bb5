"""The paper's mechanism on a problem small enough to be exact: logit margins of important and other points
under CE, MAIL- and GAIRAT-weighted CE, OVR and SOVR, all trained from one adversarially pre-trained start.

    python results/mechanism.py          # seconds on a CPU; writes results/mechanism.png and mechanism.json
    python results/mechanism.py --out /tmp/m   # the same figures elsewhere, the published ones left as they are

A linear model z = W x + b on a 10-class Gaussian problem whose points differ in difficulty (noise scale).
For a linear model the L-inf worst case of each pairwise margin is closed-form:
    min_{|d|_inf <= eps} (w_y - w_k).(x + d) = (w_y - w_k).x - eps |w_y - w_k|_1,
so the "adversarial logits" z'_k = z_k + eps |w_k - w_y|_1 (k != y), z'_y = z_y give the exact robust margin
m = z'_y - max_{k != y} z'_k, and every loss is taken on z' (an upper bound of its robust value; exact for the
margin, the paper's measure). GAIRAT's kappa, the number of K = 10 PGD steps (step eps/4) at which the point
is still classified correctly, is the same closed form along the path: after t steps the perturbation is
min(t/4, 1) of the worst case. Full-batch gradient descent, so SOVR's OVR set is the 40% smallest margins of
the whole set at each step. The important points are the 30% with the smallest robust margin at the start.
"""

import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
from losses import gair_weights, mail_weights  # noqa: E402  (the project's own weight formulas)
from sovr import sovr_loss  # noqa: E402

K, D, N, EPS = 10, 32, 600, 0.5
PRETRAIN, STEPS, LR = 300, 2000, 0.5
HERE = os.path.dirname(os.path.abspath(__file__))
RATIO = 0.4  # SOVR's switching ratio here (sovr.DEFAULT_RATIO), pinned; at 1.0 it is the OVR curve


def problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, D, generator=g, dtype=torch.float64)
    y = torch.arange(N) % K
    noise = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)[torch.arange(N) % 3]  # easy, medium, hard points
    return means[y] + noise[:, None] * torch.randn(N, D, generator=g, dtype=torch.float64), y


def adv_logits(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, frac: float = 1.0) -> torch.Tensor:
    """z' with each wrong class raised by frac * eps |w_k - w_y|_1: the worst case of every pairwise margin."""
    z = x @ W.T + b
    shift = frac * EPS * (W[None, :, :] - W[y][:, None, :]).abs().sum(2)  # [N, K], zero at k = y
    return z + shift


def margin(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return z.gather(1, y[:, None]).squeeze(1) - z.scatter(1, y[:, None], -math.inf).amax(1)


def kappa(W, b, x, y, steps: int = 10) -> torch.Tensor:
    return sum((margin(adv_logits(W, b, x, y, min(t / 4, 1.0)), y) > 0).long() for t in range(steps))


def loss_fn(name: str, W, b, x, y) -> torch.Tensor:
    z = adv_logits(W, b, x, y)
    ce = F.cross_entropy(z, y, reduction="none")
    if name == "ce":
        return ce.mean()
    if name == "mail":  # the project's MAIL-AT weights: 3 sigmoid(10 (-0.5 - PM))
        return (mail_weights(z, y, 10.0, -0.5) * ce).mean()
    if name == "gairat":
        return (gair_weights(kappa(W.detach(), b.detach(), x, y), 10, -1.0) * ce).mean()
    return sovr_loss(z, y, 1.0 if name == "ovr" else RATIO)


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--out", default=HERE, help="the folder of mechanism.json and mechanism.png (default: results/)")
    out_dir = p.parse_args(argv).out
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    x, y = problem()
    W = torch.zeros(K, D, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    for _ in range(PRETRAIN):  # the common start: adversarial CE training, as the study's pre-training
        W, b = descend("ce", W, b, x, y)
    with torch.no_grad():
        m0 = margin(adv_logits(W, b, x, y), y)
    important = torch.zeros(N, dtype=torch.bool)
    important[m0.argsort()[: round(0.3 * N)]] = True
    curves = {name: curve(name, W, b, x, y, important) for name in ("ce", "mail", "gairat", "ovr", "sovr")}
    report(summary(curves, m0, important), out_dir)
    plot(curves, out_dir)


def descend(name: str, W, b, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """One full-batch gradient step of the loss `name`."""
    gw, gb = torch.autograd.grad(loss_fn(name, W, b, x, y), (W, b))
    return (W - LR * gw).detach().requires_grad_(), (b - LR * gb).detach().requires_grad_()


def curve(name: str, W, b, x, y, important: torch.Tensor) -> list[list[float]]:
    """Training from the common start under the loss `name`: every 20 steps [step, mean margin of the important
    points, of the others, robust share]."""
    w, c, rec = W.clone().requires_grad_(), b.clone().requires_grad_(), []
    for step in range(STEPS + 1):
        if step % 20 == 0:
            with torch.no_grad():
                m = margin(adv_logits(w, c, x, y), y)
            rec.append([step, m[important].mean().item(), m[~important].mean().item(), (m > 0).double().mean().item()])
        w, c = descend(name, w, c, x, y)
    return rec


def summary(curves: dict, m0: torch.Tensor, important: torch.Tensor) -> dict:
    """mechanism.json's contents: the settings, the start's margins, each loss's final figures and its curve."""
    return dict(
        settings=dict(
            K=K,
            D=D,
            N=N,
            eps=EPS,
            pretrain_steps=PRETRAIN,
            steps=STEPS,
            lr=LR,
            ratio=RATIO,
            robust_share_at_start=(m0 > 0).double().mean().item(),
        ),
        start=dict(important=m0[important].mean().item(), rest=m0[~important].mean().item()),
        final={k: dict(important=v[-1][1], rest=v[-1][2], robust_share=v[-1][3]) for k, v in curves.items()},
        curves=curves,
    )


def report(out: dict, out_dir: str) -> None:
    """mechanism.json, and its start and final margins printed."""
    with open(os.path.join(out_dir, "mechanism.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(
        f"start: important {out['start']['important']:.3f}, rest {out['start']['rest']:.3f}, "
        f"robust {out['settings']['robust_share_at_start']:.1%}"
    )
    for k, v in out["final"].items():
        print(
            f"{k:7s} after {STEPS} steps: important {v['important']:7.3f}  "
            f"rest {v['rest']:7.3f}  robust {v['robust_share']:.1%}"
        )


def plot(curves: dict, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    for name, rec in curves.items():
        steps = [r[0] for r in rec]
        for ax, col in zip(axes, (1, 2)):
            ax.plot(steps, [r[col] for r in rec], label=name, linewidth=1.5)
    for ax, title in zip(axes, ("important points (30% smallest margin at the start)", "the other 70%")):
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set(title=title, xlabel="gradient steps after the common start", ylabel="mean robust logit margin")
        ax.title.set_fontsize(9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "mechanism.png"), dpi=120)


if __name__ == "__main__":  # cli.run: one line and the exit codes of every script (Ctrl-C 130, SIGTERM 143)
    cli.run("mechanism.py", main, "", "rerun it: it writes its files only at its end")
