"""PGD and the training objectives that train.py selects with --loss.

Every objective has the signature (net, atk, x, y, args, epoch) -> (loss, adversarial logits):
`net` is the model used for the training forward pass (DDP-wrapped or compiled),
`atk` the plain model the attack runs on, `args` train.py's flags. It crafts its own
adversarial examples, so the training loop is the same for all of them.
"""
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from sovr import sovr_loss


@contextmanager
def bn_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Puts every BatchNorm in `mode` ("eval" or "train") and restores each one's previous mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    before = [m.training for m in bns]
    for m in bns:
        m.train(mode == "train")
    try:
        yield
    finally:
        for m, was in zip(bns, before):
            m.train(was)


def ce_sum(z_adv: torch.Tensor, y: torch.Tensor, z_clean: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(z_adv.float(), y, reduction="sum")


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int, *,
        objective: Callable = ce_sum, bn: str = "eval", start: str = "uniform",
        z_clean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L-inf PGD ascent on objective(model(x_adv), y, z_clean); returns (x_adv, kappa).

    kappa counts the steps at which x_adv was still classified correctly (GAIRAT's statistic).
    Only the input gradient is taken, so no weight gradients are computed in attack steps.
    """
    if start == "uniform":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    elif start == "normal":  # TRADES' start: 0.001 * N(0, 1)
        delta = 0.001 * torch.randn_like(x)
    else:
        delta = torch.zeros_like(x)
    x_adv = (x + delta).clamp(0, 1)
    kappa = torch.zeros_like(y)
    with bn_mode(model, bn):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            z = model(x_adv)
            kappa += (z.argmax(1) == y).long()
            (grad,) = torch.autograd.grad(objective(z, y, z_clean), x_adv)
            x_adv = x_adv.detach() + step * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach(), kappa


def _attack(atk: nn.Module, x: torch.Tensor, y: torch.Tensor, args, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    return pgd(atk, x, y, args.eps / 255, args.step / 255, args.steps, bn=args.attack_bn, **kw)


def ce(net, atk, x, y, args, epoch):
    """Madry et al. 2018, PGD-AT: CE(f(x'), y)."""
    x_adv, _ = _attack(atk, x, y, args)
    z = net(x_adv)
    return F.cross_entropy(z.float(), y), z


def sovr(net, atk, x, y, args, epoch):
    """Kanai et al. 2023: OVR for the round(ratio * B) smallest-margin x', CE for the rest (--ratio)."""
    x_adv, _ = _attack(atk, x, y, args)
    z = net(x_adv)
    return sovr_loss(z, y, args.ratio), z


OBJECTIVES = {"ce": ce, "sovr": sovr}
