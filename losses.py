"""PGD and the figures measured with it, the per-sample formulas of every objective, and the training objectives
that train.py selects with --loss (their flags and defaults: flags.py).

Every objective is a plain function (net, atk, x, y, args, epoch) -> (loss, adversarial logits) whose body shows its
method: the attack, the loss, and emr(), --emr's term, which every loss adds. `net` runs the training forward pass
(DDP-wrapped or compiled), `atk` is the plain model the attack runs on. The formulas are pure functions of logits,
one value per sample ([B], float32, float64 if given).
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from sovr import logit_margin, ovr_loss, sovr_loss


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


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad for the duration: an attack's backward then computes the input gradient
    alone. Eager autograd skips unneeded weight gradients anyway; a torch.compile'd backward computes every
    gradient its graph was traced with, and ran slower than eager on an H100 until the attack froze them."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def ce_sum(z_adv: torch.Tensor, y: torch.Tensor, z_clean: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(z_adv.float(), y, reduction="sum")


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    *,
    objective: Callable = ce_sum,
    bn: str = "eval",
    start: str = "uniform",
    norm: str = "Linf",
    z_clean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD ascent on objective(model(x_adv), y, z_clean) in the `norm` ball of radius eps ("Linf" or "L2") and the
    [0, 1] box; returns (x_adv, kappa).

    kappa counts the steps at which x_adv was still classified correctly (GAIRAT's statistic).
    Only the input gradient is taken (the parameters are frozen), so no weight gradients are computed in attack steps.
    """
    x_adv = (x + first_delta(x, eps, start, norm)).clamp(0, 1)
    kappa = torch.zeros_like(y)
    with bn_mode(model, bn), frozen(model):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            z = model(x_adv)
            kappa += (z.argmax(1) == y).long()
            (grad,) = torch.autograd.grad(objective(z, y, z_clean), x_adv)
            x_adv = ascend(x, x_adv.detach(), grad, eps, step, norm)
    return x_adv.detach(), kappa


NORMS = ("Linf", "L2")  # the threat models of train.py --norm and attack.py --norm


def _l2(v: torch.Tensor) -> torch.Tensor:
    """Each example's L2 norm of v, [B, 1, 1, 1] for images: it broadcasts over each example."""
    return v.flatten(1).norm(p=2, dim=1).view(-1, *[1] * (v.dim() - 1))


def first_delta(x: torch.Tensor, eps: float, start: str, norm: str) -> torch.Tensor:
    """PGD's start: "uniform" in the ball (L2: robust_overfitting's train_cifar.py attack_pgd, a normal direction
    at a radius uniform in [0, eps]), "normal" TRADES' 0.001 N(0, 1) under either norm (TRADES' trades.py starts its
    l_2 attack there too), else zero; the caller clamps x + delta into the box."""
    if start == "normal":
        return 0.001 * torch.randn_like(x)
    if start != "uniform":
        return torch.zeros_like(x)
    if norm == "Linf":
        return torch.empty_like(x).uniform_(-eps, eps)
    d = torch.randn_like(x)
    n = _l2(d)
    return d * torch.rand_like(n) / n * eps  # drawn in attack_pgd's order: the direction, then the radius


def ascend(x: torch.Tensor, x_adv: torch.Tensor, g: torch.Tensor, eps: float, step: float, norm: str) -> torch.Tensor:
    """One PGD step from x_adv along the gradient g, back into the ball around x and the [0, 1] box, per example:
    L-inf the sign step; L2 (robust_overfitting's attack_pgd) step * g / (||g||_2 + 1e-10), then renorm onto the ball,
    then the box (a clamp towards x in [0, 1] only shortens delta: it stays in the ball)."""
    if norm == "Linf":
        x_adv = x_adv + step * g.sign()
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    delta = x_adv - x + step * g / (_l2(g) + 1e-10)
    return (x + delta.renorm(p=2, dim=0, maxnorm=eps)).clamp(0, 1)


def pgd_logits(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    bs: int = 500,
    tick: Callable[[int], object] | None = None,
    norm: str = "Linf",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the clean and of the PGD images (in the `norm` ball), in fp32 batches of bs moved to the model's
    device; x in [0, 1] or uint8 (divided by 255 per batch); tick(n) after each batch of n points (a progress line).
    An empty x (a rank without points) gives [0, classes] logits."""
    device, out = next(model.parameters()).device, []
    for k in range(0, max(len(x), 1), bs):
        xb, yb = x[k : k + bs].to(device), y[k : k + bs].to(device)
        xb = xb.float() / 255 if xb.dtype == torch.uint8 else xb
        x_adv, _ = pgd(model, xb, yb, eps, step, steps, norm=norm)
        with torch.no_grad():
            out.append((model(xb), model(x_adv)))
        if tick:
            tick(len(xb))
    return torch.cat([z for z, _ in out]), torch.cat([z for _, z in out])


def worst_of(z: torch.Tensor, z_adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A point's PGD figures are those of the worse of its clean and PGD image (the clean image lies in its own
    eps-ball; AutoAttack's robust flags start from the clean-correct points): robust iff both are classified
    correctly, margin the smaller of their logit margins."""
    robust = (z.argmax(1) == y) & (z_adv.argmax(1) == y)
    return robust, torch.minimum(logit_margin(z, y), logit_margin(z_adv, y))


def pgd_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    seed: int,
    bs: int = 500,
    tick: Callable[[int], object] | None = None,
    norm: str = "Linf",
) -> tuple[float, float]:
    """Clean and PGD accuracy (worst_of, PGD in the `norm` ball) in eval mode, train.py's validation and test
    figures; random starts seeded, so the same weights give the same figures; under torchrun each rank's counts (of
    none) are summed. tick(n) after each batch of this rank's n points."""
    model.eval()
    torch.manual_seed(seed)  # train.py reseeds every epoch, so this draws nothing away from training
    r, w = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    x, y = x[r::w], y[r::w]
    z, z_adv = pgd_logits(model, x, y, eps, step, steps, bs, tick, norm)
    y = y.to(z.device)
    robust = worst_of(z, z_adv, y)[0]
    counts = torch.stack([(z.argmax(1) == y).sum(), robust.sum(), y.new_tensor(len(y))]).float()
    if w > 1:
        dist.all_reduce(counts)
    if counts[2] == 0:
        raise ValueError("no points to evaluate")
    return (counts[0] / counts[2]).item(), (counts[1] / counts[2]).item()


def pgd_margins(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, bs: int = 500, norm: str = "Linf"
) -> torch.Tensor:
    """Each point's margin (worst_of: the smaller of its clean and its PGD-20 image's, step eps/4, CE, in the `norm`
    ball), on the CPU: the margin diagnostic of attack.py --margins and results/."""
    z, z_adv = pgd_logits(model, x, y, eps, eps / 4, 20, bs, norm=norm)
    return worst_of(z.cpu(), z_adv.cpu(), y.cpu())[1]


def precision(device: torch.device | str) -> str:
    """What "fp32" evaluation on `device` computes in, from the torch.backends flags at this moment: "fp32" on the
    CPU and on GPUs before Ampere, else "fp32", "tf32 convolutions" (PyTorch's default), "tf32 matmuls" or "tf32"."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return "fp32"
    b, tf32 = torch.backends, lambda *chain: next((p for p in chain if p != "none"), "ieee") == "tf32"
    if hasattr(b.cudnn, "conv"):  # torch >= 2.9 ("none" defers to the next setting); legacy flags may raise here
        conv = tf32(b.cudnn.conv.fp32_precision, b.cudnn.fp32_precision, b.fp32_precision)
        matmul = tf32(b.cuda.matmul.fp32_precision, b.fp32_precision)
    else:
        conv, matmul = b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32
    return {(0, 0): "fp32", (1, 0): "tf32 convolutions", (0, 1): "tf32 matmuls", (1, 1): "tf32"}[conv, matmul]


# ---- per-sample formulas: logits [B, K] in, [B] out ----


def _fp(z: torch.Tensor) -> torch.Tensor:
    return z.to(torch.promote_types(z.dtype, torch.float32))  # bf16 -> float32, float64 stays


def _others(z: torch.Tensor, y: torch.Tensor, fill: float) -> torch.Tensor:
    """z with the true class's entry replaced by `fill`."""
    return z.scatter(1, y[:, None], fill)


def kl_rows(z_p: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """KL(softmax z_p || softmax z_q) = sum_k p_k (log p_k - log q_k), per sample."""
    lp, lq = F.log_softmax(_fp(z_p), 1), F.log_softmax(_fp(z_q), 1)
    return (lp.exp() * (lp - lq)).sum(1)


def trades_loss(z_clean, z_adv, y, beta: float) -> torch.Tensor:
    """TRADES: CE(f(x), y) + beta * KL(p(x) || p(x')); its mean is the paper's batchmean form."""
    return F.cross_entropy(_fp(z_clean), y, reduction="none") + beta * kl_rows(z_clean, z_adv)


def trades_sovr_loss(z_clean, z_adv, y, beta: float, ratio: float) -> torch.Tensor:
    """This project's combination: SOVR(f(x'), y) + beta * KL(p(x) || p(x'))."""
    return sovr_loss(_fp(z_adv), y, ratio, reduction="none") + beta * kl_rows(z_clean, z_adv)


def mart_loss(z_clean, z_adv, y, beta: float) -> torch.Tensor:
    """MART: BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x)), with
    BCE = -log p_y(x') - log(1 - max_{k != y} p_k(x')); log(1 - p_k) is the log-sum-exp of the
    other log-probabilities, finite even where p_k rounds to 1 (the official code adds 1e-12)."""
    la = F.log_softmax(_fp(z_adv), 1)
    k = _others(la, y, float("-inf")).argmax(1, keepdim=True)
    log_1m_pk = la.scatter(1, k, float("-inf")).logsumexp(1)
    bce = -la.gather(1, y[:, None]).squeeze(1) - log_1m_pk
    p_y = F.softmax(_fp(z_clean), 1).gather(1, y[:, None]).squeeze(1)
    return bce + beta * kl_rows(z_clean, z_adv) * (1 - p_y)


def prob_margin(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MAIL's PM = p_y - max_{k != y} p_k, in [-1, 1]."""
    p = F.softmax(_fp(z), 1)
    return p.gather(1, y[:, None]).squeeze(1) - _others(p, y, -1.0).amax(1)


def _mean_one(w: torch.Tensor) -> torch.Tensor:
    return w / w.mean()


MAIL_SCALE = 3.0  # mail_loss.py: normalized_reweight = reweight * 3


def mail_weights(z_adv, y, slope: float, bias: float) -> torch.Tensor:
    """MAIL, as the official mail_loss.py computes it: w = 3 sigmoid(slope (PM' + bias)), PM' = p_2nd - p_y =
    -prob_margin, without gradient and without rescaling to mean 1, so that the step scales with the batch's
    mean weight (near 3 lr for badly misclassified points, near 0 for well-fitted ones)."""
    return MAIL_SCALE * torch.sigmoid(slope * (bias - prob_margin(z_adv.detach(), y)))


def gair_weights(kappa: torch.Tensor, steps: int, lam: float) -> torch.Tensor:
    """GAIRAT: w = (1 + tanh(lam + 5 (h - kappa) / h)) / 2 with h = int(K / 2), K = PGD steps, rescaled to mean 1,
    as the official GAIR.py (for odd K, h rounds down there too; K = 1, where GAIR.py divides by zero, takes h = 1).
    Computed as sigmoid(2 (...)), the same function without float32 cancellation near tanh = -1."""
    h = max(steps // 2, 1)
    return _mean_one(torch.sigmoid(2 * (lam + 5 * (h - kappa.float()) / h)))


def comp_sum_loss(z: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """Comp-sum Phi_tau(u), u = sum_{k != y} exp(z_k - z_y): log(1 + u) (CE) for tau = 1, else
    ((1 + u)^(1 - tau) - 1) / (1 - tau): u at tau 0, generalized CE in (1, 2), 1 - 1/(1 + u) at 2."""
    log1pu = F.cross_entropy(_fp(z), y, reduction="none")  # log(1 + u) = logsumexp(z - z_y)
    return log1pu if tau == 1 else torch.expm1((1 - tau) * log1pu) / (1 - tau)


def logit_diff_distance(z_adv, z_clean, y) -> torch.Tensor:
    """|| Delta(x') - Delta(x) ||_2 with Delta_k = z_k - z_y over k != y (the y entry is 0 in both)."""
    za, zc = _fp(z_adv), _fp(z_clean)
    d = (za - za.gather(1, y[:, None])) - (zc - zc.gather(1, y[:, None]))
    return torch.linalg.vector_norm(d, dim=1)


def emr_penalty(model: nn.Module, x_adv: torch.Tensor, temp: float) -> torch.Tensor:
    """EMR: || grad_x s_i(x') ||_2^2 per sample, s_i = sum_k stopgrad(softmax(z_i / temp))_k z_i,k,
    eval-mode BN, graph kept (create_graph) so that the penalty trains the weights."""
    x_adv = x_adv.detach().requires_grad_(True)
    with bn_mode(model, "eval"):
        z = _fp(model(x_adv))
    s = (F.softmax(z.detach() / temp, 1) * z).sum()  # samples are independent in eval mode
    (g,) = torch.autograd.grad(s, x_adv, create_graph=True)
    return g.flatten(1).pow(2).sum(1)


def emr_regularizer(model: nn.Module, x_adv: torch.Tensor, temp: float, batch: int) -> torch.Tensor:
    """The official AT-EMR regularizer: the gradient of the batch mean of s, squared and summed, i.e.
    (1/B^2) sum_i ||grad_x s_i||^2 for the global batch B (--batch; x_adv is this process's share). Under torchrun
    each rank adds sum_local / (B_local B) and DDP averages over ranks: exactly the one-process value."""
    return emr_penalty(model, x_adv, temp).sum() / (len(x_adv) * batch)


def emr_lambda(args, epoch: int) -> float:
    """--emr, multiplied by --emr-decay at each --milestones epoch, as the learning rate is."""
    return args.emr * args.emr_decay ** sum(epoch >= m for m in args.milestones)


# ---- the objectives: (net, atk, x, y, args, epoch) -> (loss, adversarial logits) ----


def attack(atk: nn.Module, x: torch.Tensor, y: torch.Tensor, args, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The training attack: PGD --steps in the --norm ball of --eps, step --step, BatchNorm in --attack-bn mode;
    (x', kappa). Every objective's attack is this one, so every inner attack (TRADES' KL ascent included) follows
    --norm. Under L2, TRADES' own trades.py steps eps / steps * 2 and clamps into the box before the ball, with a
    random direction where the gradient is 0; here every objective takes --step and robust_overfitting's step."""
    return pgd(atk, x, y, args.eps / 255, args.step / 255, args.steps, bn=args.attack_bn, norm=args.norm, **kw)


def attack_from_clean(atk, x, y, args, distance: Callable, start: str) -> torch.Tensor:
    """PGD ascent on sum_i distance(z_adv_i, z_clean_i), z_clean = atk(x) in the attack's BN mode."""
    with torch.no_grad(), bn_mode(atk, args.attack_bn):
        z_clean = atk(x)
    objective = lambda za, y_, zc: distance(za, zc, y_).sum()  # noqa: E731
    return attack(atk, x, y, args, objective=objective, start=start, z_clean=z_clean)[0]


def emr(atk: nn.Module, x_adv: torch.Tensor, args, epoch: int) -> torch.Tensor | float:
    """--emr's term at x': emr_lambda * emr_regularizer, on the uncompiled model (torch.compile has no double
    backward); 0 without --emr."""
    if args.emr <= 0:
        return 0.0
    plain = getattr(atk, "_orig_mod", atk)
    return emr_lambda(args, epoch) * emr_regularizer(plain, x_adv, args.emr_temp, args.batch)


def ce(net, atk, x, y, args, epoch):
    """Madry et al. 2018, PGD-AT: CE(f(x'), y), x' from PGD on CE."""
    x_adv, _ = attack(atk, x, y, args)
    z = net(x_adv)
    return F.cross_entropy(z.float(), y) + emr(atk, x_adv, args, epoch), z


def sovr(net, atk, x, y, args, epoch):
    """Kanai et al. 2023, SOVR: OVR on the --ratio share of x' with the smallest logit margins, CE on the rest."""
    x_adv, _ = attack(atk, x, y, args)
    z = net(x_adv)
    return sovr_loss(z, y, args.ratio) + emr(atk, x_adv, args, epoch), z


def ovr(net, atk, x, y, args, epoch):
    """OVR on every x': SOVR without its switch (--loss sovr --ratio 1)."""
    x_adv, _ = attack(atk, x, y, args)
    z = net(x_adv)
    return ovr_loss(z, y) + emr(atk, x_adv, args, epoch), z


def trades(net, atk, x, y, args, epoch):
    """Zhang et al. 2019, TRADES: mean of CE(f(x), y) + beta KL(p(x) || p(x')) (batchmean KL), x' from PGD on
    the KL from 0.001 N(0, 1)."""
    x_adv = attack_from_clean(atk, x, y, args, lambda za, zc, _: kl_rows(zc, za), start="normal")
    z_nat, z_adv = net(x), net(x_adv)
    return trades_loss(z_nat, z_adv, y, args.beta).mean() + emr(atk, x_adv, args, epoch), z_adv


def trades_sovr(net, atk, x, y, args, epoch):
    """This project's combination: TRADES with its CE term replaced by SOVR(f(x'), y)."""
    x_adv = attack_from_clean(atk, x, y, args, lambda za, zc, _: kl_rows(zc, za), start="normal")
    z_nat, z_adv = net(x), net(x_adv)
    return trades_sovr_loss(z_nat, z_adv, y, args.beta, args.ratio).mean() + emr(atk, x_adv, args, epoch), z_adv


def mart(net, atk, x, y, args, epoch):
    """Wang et al. 2020, MART: mean BCE(f(x'), y) + beta KL(p(x) || p(x')) (1 - p_y(x)), x' from PGD on CE from
    0.001 N(0, 1)."""
    x_adv, _ = attack(atk, x, y, args, start="normal")
    z_nat, z_adv = net(x), net(x_adv)
    return mart_loss(z_nat, z_adv, y, args.beta).mean() + emr(atk, x_adv, args, epoch), z_adv


def mail(net, atk, x, y, args, epoch):
    """Wang, Liu et al. 2021, MAIL-AT: mean w CE(f(x'), y), w = mail_weights, after --burn-in epochs (plain PGD-AT
    before); x' as for ce (every objective shares one PGD, so that comparisons are paired)."""
    x_adv, _ = attack(atk, x, y, args)
    z = net(x_adv)
    w = mail_weights(z, y, args.mail_slope, args.mail_bias) if epoch >= args.burn_in else 1.0
    return (w * F.cross_entropy(z.float(), y, reduction="none")).mean() + emr(atk, x_adv, args, epoch), z


def gairat(net, atk, x, y, args, epoch):
    """Zhang et al. 2021, GAIRAT: mean w CE(f(x'), y), w = gair_weights of kappa, the PGD steps (of --steps) that
    began correctly classified (as GA_PGD counts them), after --burn-in epochs (plain PGD-AT before)."""
    x_adv, kappa = attack(atk, x, y, args)
    z = net(x_adv)
    w = gair_weights(kappa, args.steps, args.gairat_lambda) if epoch >= args.burn_in else 1.0
    return (w * F.cross_entropy(z.float(), y, reduction="none")).mean() + emr(atk, x_adv, args, epoch), z


def comp_sum(net, atk, x, y, args, epoch):
    """Mao, Mohri, Zhong 2023, smooth adversarial comp-sum: mean Phi_tau(f(x), y) + nu ||Delta(x') - Delta(x)||_2,
    x' from PGD on that distance, uniform start."""
    x_adv = attack_from_clean(atk, x, y, args, logit_diff_distance, start="uniform")
    z_nat, z_adv = net(x), net(x_adv)
    loss = comp_sum_loss(z_nat, y, args.tau) + args.nu * logit_diff_distance(z_adv, z_nat, y)
    return loss.mean() + emr(atk, x_adv, args, epoch), z_adv


OBJECTIVES: dict[str, Callable] = {
    "ce": ce,
    "sovr": sovr,
    "ovr": ovr,
    "trades": trades,
    "trades-sovr": trades_sovr,
    "mart": mart,
    "mail": mail,
    "gairat": gairat,
    "comp-sum": comp_sum,
}
