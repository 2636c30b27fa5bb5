"""Tests of losses.py's objectives: per-sample formulas against plain Python loops on hand-made
logits, the special cases that reduce to cross-entropy, the EMR wrapper, and short training runs."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attack
import flags
import losses
import models
import train
from conftest import child_pythonpath
from losses import (
    OBJECTIVES,
    attack_from_clean,
    comp_sum_loss,
    emr_lambda,
    emr_penalty,
    emr_regularizer,
    gair_weights,
    kl_rows,
    logit_diff_distance,
    mail_weights,
    mart_loss,
    prob_margin,
    trades_loss,
    trades_sovr_loss,
)
from sovr import sovr_loss

SHAPES = [(1, 2), (7, 10), (5, 100)]  # (batch, classes)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops gain nothing from threads, and on a busy 2-core machine 2 threads ran 50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def logits(b: int, k: int, seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    zc, za = (scale * torch.randn(2, b, k, generator=g, dtype=torch.float64)).unbind(0)
    return zc, za, torch.randint(0, k, (b,), generator=g)


# ---- plain-Python references, one sample (a list of floats) at a time ----


def softmax(row: list) -> list:
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def ce(row: list, t: int) -> float:
    top = max(row)
    return top + math.log(sum(math.exp(v - top) for v in row)) - row[t]


def kl(a: list, b: list) -> float:
    p, q = softmax(a), softmax(b)
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def pm(row: list, t: int) -> float:
    p = softmax(row)
    return p[t] - max(v for j, v in enumerate(p) if j != t)


def close(got: torch.Tensor, want: list, rel: float = 1e-9) -> None:
    assert got.shape == (len(want),)
    for g, w in zip(got.tolist(), want):
        assert g == pytest.approx(w, rel=rel, abs=1e-12)


@pytest.mark.parametrize("b,k", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 1.0, 6.0])
def test_trades_matches_loop(b: int, k: int, beta: float) -> None:
    zc, za, y = logits(b, k)
    C, A, Y = zc.tolist(), za.tolist(), y.tolist()
    close(kl_rows(zc, za), [kl(c, a) for c, a in zip(C, A)])
    close(trades_loss(zc, za, y, beta), [ce(c, t) + beta * kl(c, a) for c, a, t in zip(C, A, Y)])
    ratio = 0.4
    close(
        trades_sovr_loss(zc, za, y, beta, ratio),
        [s + beta * kl(c, a) for s, c, a in zip(sovr_loss(za, y, ratio, reduction="none").tolist(), C, A)],
    )


@pytest.mark.parametrize("b,k", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 6.0])
def test_mart_matches_loop(b: int, k: int, beta: float) -> None:
    zc, za, y = logits(b, k)
    want = []
    for c, a, t in zip(zc.tolist(), za.tolist(), y.tolist()):
        p = softmax(a)
        p_other = max(v for j, v in enumerate(p) if j != t)
        want.append(-math.log(p[t]) - math.log(1 - p_other) + beta * kl(c, a) * (1 - softmax(c)[t]))
    close(mart_loss(zc, za, y, beta), want, rel=1e-7)


def test_mart_is_finite_when_a_wrong_class_takes_all_the_probability() -> None:
    za = torch.tensor([[0.0, 80.0, -5.0]], dtype=torch.float32, requires_grad=True)
    loss = mart_loss(torch.zeros(1, 3), za, torch.tensor([0]), 6.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(za.grad).all()
    assert loss.item() > 80  # -log p_y alone is 80; the boosted term adds about 80 more


@pytest.mark.parametrize("b,k", SHAPES)
@pytest.mark.parametrize("slope,bias", [(1.0, -1.5), (10.0, -0.5), (0.0, 0.0)])
def test_mail_weights_match_loop(b: int, k: int, slope: float, bias: float) -> None:
    _, za, y = logits(b, k)
    margins = [pm(a, t) for a, t in zip(za.tolist(), y.tolist())]
    close(prob_margin(za, y), margins)
    raw = [3 / (1 + math.exp(slope * (m - bias))) for m in margins]
    close(mail_weights(za, y, slope, bias), raw)


@pytest.mark.parametrize(
    "slope, bias, want", [(10.0, -0.5, [0.000301538, 0.933369, 2.03891]), (1.0, -1.5, [0.383413, 0.760809, 0.851949])]
)
def test_mail_weights_by_hand(slope: float, bias: float, want: list) -> None:
    """Logits (2, 1, 0): p = (0.665241, 0.244728, 0.090031). The official mail_loss.py takes PM' = p_2nd - p_y,
    i.e. -0.420512, 0.420512, 0.575210 for y = 0, 1, 2, and w = sigmoid((PM' + bias) * slope) * 3."""
    z = torch.tensor([[2.0, 1.0, 0.0]] * 3, dtype=torch.float64)
    close(mail_weights(z, torch.tensor([0, 1, 2]), slope, bias), want, rel=1e-5)


def test_mail_defaults_are_mail_at() -> None:
    args = train.get_args([])
    assert (args.mail_slope, args.mail_bias) == (10.0, -0.5)


def test_mail_weights_favour_small_margins_and_take_no_gradient() -> None:
    za = torch.tensor([[4.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 3.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0, 0])
    w = mail_weights(za, y, 10.0, -0.5)
    assert w[0] < w[1] < w[2] and 0 < w.min() and w.max() < 3 and not w.requires_grad  # no rescaling to mean 1
    assert mail_weights(za, y, 0.0, -0.5).tolist() == [1.5, 1.5, 1.5]  # constant weights: CE times 1.5


@pytest.mark.parametrize("steps", [2, 5, 10])
@pytest.mark.parametrize("lam", [-1.0, 0.0, 2.0])
def test_gair_weights_match_loop_and_have_mean_one(steps: int, lam: float) -> None:
    kappa = torch.arange(steps + 1).repeat(2)[:-1]  # every count, unbalanced batch
    h = steps // 2  # GAIR.py: (Lambda + (int(num_steps/2) - Kappa) * 5 / int(num_steps/2)).tanh()
    raw = [(1 + math.tanh(lam + 5 * (h - kp) / h)) / 2 for kp in kappa.tolist()]
    w = gair_weights(kappa, steps, lam)
    close(w.double(), [v * len(raw) / sum(raw) for v in raw], rel=1e-5)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-6)
    assert (w[:steps].diff() <= 0).all()  # more steps correctly classified: smaller weight
    assert gair_weights(torch.full((4,), 3), steps, lam).tolist() == [1.0] * 4


@pytest.mark.parametrize("b,k", SHAPES)
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
def test_comp_sum_matches_loop(b: int, k: int, tau: float) -> None:
    _, z, y = logits(b, k, scale=2.0)
    want = []
    for row, t in zip(z.tolist(), y.tolist()):
        u = sum(math.exp(v - row[t]) for j, v in enumerate(row) if j != t)
        want.append(math.log1p(u) if tau == 1 else ((1 + u) ** (1 - tau) - 1) / (1 - tau))
    close(comp_sum_loss(z, y, tau), want)


def test_comp_sum_special_cases() -> None:
    _, z, y = logits(6, 10)
    u = (z - z.gather(1, y[:, None])).exp().sum(1) - 1
    assert torch.allclose(comp_sum_loss(z, y, 1.0), F.cross_entropy(z, y, reduction="none"))
    assert torch.allclose(comp_sum_loss(z, y, 0.0), u)
    assert torch.allclose(comp_sum_loss(z, y, 2.0), 1 - 1 / (1 + u))
    with pytest.raises(SystemExit):  # refused where it is given: train.py's flags (flags.py)
        args("--loss", "comp-sum", "--tau", "-0.5")


@pytest.mark.parametrize("b,k", SHAPES)
def test_logit_diff_distance_matches_loop(b: int, k: int) -> None:
    zc, za, y = logits(b, k)
    want = [
        math.sqrt(sum(((a[j] - a[t]) - (c[j] - c[t])) ** 2 for j in range(k) if j != t))
        for c, a, t in zip(zc.tolist(), za.tolist(), y.tolist())
    ]
    close(logit_diff_distance(za, zc, y), want)
    assert logit_diff_distance(zc + 5.0, zc, y).abs().max() < 1e-12  # a shift of all logits changes no difference


def test_trades_with_beta_zero_is_clean_ce() -> None:
    zc, za, y = logits(8, 10)
    assert torch.equal(trades_loss(zc, za, y, 0.0), F.cross_entropy(zc, y, reduction="none"))


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_emr_penalty_on_a_linear_model(temp: float) -> None:
    """For z = W x + b the input gradient of sum_k p_k z_k (p held constant) is W^T p."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 5)
    x = torch.rand(4, 12)
    p = F.softmax(lin(x).detach() / temp, 1)
    want = (p @ lin.weight).pow(2).sum(1)
    got = emr_penalty(lin, x, temp)
    assert torch.allclose(got, want, atol=1e-6)
    got.sum().backward()  # the penalty reaches the weights through the double backward
    assert lin.weight.grad.abs().sum() > 0
    with pytest.raises(SystemExit):  # refused where it is given: train.py's flags (flags.py)
        args("--emr", "1", "--emr-temp", "0")


# ---- objectives on a tiny BatchNorm conv net ----


def tiny(classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, classes)
    )


def data(classes: int = 10, b: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(b, 3, 8, 8, generator=g), torch.randint(0, classes, (b,), generator=g)


def args(*flags: str):
    return train.get_args(["--device", "cpu", "--steps", "3", *flags])


def burn_in(name: str, epochs: int) -> list[str]:
    """--burn-in for the losses that read it (train.py refuses a flag that the loss does not read)."""
    return ["--burn-in", str(epochs)] if "burn_in" in flags.READS.get(name, ()) else []


def run(name: str, a, model: nn.Module, x, y, epoch: int = 0, seed: int = 0):
    """One call of the objective on a copy of `model` (its BN statistics stay untouched) with a fixed seed."""
    m = copy.deepcopy(model).train()
    torch.manual_seed(seed)
    return (*OBJECTIVES[name](m, m, x, y, a, epoch), m)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_emr_term(name: str, monkeypatch) -> None:
    """Every objective adds losses.emr's term at its own x': nothing at lambda 0, the official regularizer else."""
    model, (x, y) = tiny(), data()
    seen, term = [], losses.emr

    def spy(atk, x_adv, a, epoch):
        seen.append((x_adv, term(atk, x_adv, a, epoch)))
        return seen[-1][1]

    monkeypatch.setattr(losses, "emr", spy)
    loss0, z0, _ = run(name, args("--loss", name, *burn_in(name, 0)), model, x, y)
    x_adv, added = seen[-1]
    loss, z, _ = run(name, args("--loss", name, *burn_in(name, 0), "--emr", "0"), model, x, y)
    assert added == 0.0 and torch.equal(loss, loss0) and torch.equal(z, z0) and z.shape == (8, 10)  # the base loss
    a = args("--loss", name, *burn_in(name, 0), "--emr", "0.5", "--batch", "8")
    loss, _, m = run(name, a, model, x, y)
    want = 0.5 * emr_penalty(m, x_adv, a.emr_temp).sum() / 8**2
    assert torch.allclose(loss - loss0, want, rtol=1e-4, atol=1e-7) and want > 0
    assert all(mod.training for mod in m.modules())  # BN back in train mode after the attacks


def official_emr(model: nn.Module, x_adv: torch.Tensor, temp: float) -> torch.Tensor:
    """Written as main-AT-EMR.py computes it: eval-mode forward, s = batch mean of sum_k sg(softmax(z/T))_k z_k,
    its input gradient with create_graph, then the sum of squares over the batch and every pixel."""
    x_adv = x_adv.clone().requires_grad_(True)
    model.eval()
    out = model(x_adv)
    prob = F.softmax(out / temp, dim=1).detach()
    s = torch.mean(torch.sum(out * prob, dim=1))
    grad = torch.autograd.grad(s, x_adv, create_graph=True)[0]
    model.train()
    return torch.sum(torch.square(grad))


@pytest.mark.parametrize("b", [8, 32])
@pytest.mark.parametrize("temp", [40.0, 1.0])
def test_emr_regularizer_equals_the_official_form(b: int, temp: float) -> None:
    model = tiny().train()
    for _ in range(3):  # BN running statistics away from their initial values, so that eval mode matters
        model(torch.rand(16, 3, 8, 8) * 2)
    x, _ = data(b=b)
    want = official_emr(model, x, temp)
    got = emr_regularizer(model, x, temp, batch=b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    # torchrun with 4 ranks: each adds sum_local / (B_local * B); the mean over ranks is the 1-process value
    shards = [emr_regularizer(model, xs, temp, batch=b) for xs in x.chunk(4)]
    torch.testing.assert_close(sum(shards) / 4, want, rtol=1e-5, atol=0)
    g_got, g_want = (torch.autograd.grad(v, model[0].weight, retain_graph=True)[0] for v in (got, want))
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-9)  # it trains the weights the same way


def test_emr_lambda_decays_at_the_milestones() -> None:
    a = args("--emr", "3", "--milestones", "2,4", "--epochs", "6")
    assert [emr_lambda(a, e) for e in range(6)] == pytest.approx([3, 3, 0.3, 0.3, 0.03, 0.03])
    model, (x, y) = tiny(), data()
    base = run("ce", args("--milestones", "2,4"), model, x, y, epoch=2)[0]
    before, after = (run("ce", a, model, x, y, epoch=e)[0] - base for e in (1, 2))
    torch.testing.assert_close(after, 0.1 * before, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "loss, temp", [("ce", 40.0), ("sovr", 40.0), ("trades", 1.0), ("trades-sovr", 1.0), ("mail", 0.1), ("gairat", 40.0)]
)
def test_emr_temperature_defaults_follow_the_official_scripts(loss: str, temp: float) -> None:
    assert args("--loss", loss).emr_temp == temp
    assert args("--loss", loss, "--emr", "1", "--emr-temp", "2").emr_temp == 2.0


@pytest.mark.parametrize(
    "name,flags,scale",
    [
        ("mail", ["--mail-slope", "0", "--burn-in", "0"], 1.5),  # constant weights 3 sigmoid(0)
        ("mail", ["--burn-in", "1"], 1.0),  # burn-in epoch
        ("gairat", ["--gairat-lambda", "100", "--burn-in", "0"], 1.0),  # tanh saturates: all weights 1
        ("gairat", ["--burn-in", "1"], 1.0),
    ],
)
def test_reweighting_reduces_to_pgd_at(name: str, flags: list, scale: float) -> None:
    model, (x, y) = tiny(), data()
    want, z_want, _ = run("ce", args(), model, x, y)
    got, z_got, _ = run(name, args("--loss", name, *flags), model, x, y)
    assert torch.allclose(got, scale * want, rtol=1e-6) and torch.equal(z_got, z_want)


@pytest.mark.parametrize("distance", [lambda za, zc, _: kl_rows(zc, za), logit_diff_distance])
def test_attacks_on_clean_logits_ascend(distance) -> None:
    """TRADES' and comp-sum's PGD moves away from the clean logits: more than the start, in eval-mode BN."""
    model, (x, y) = tiny().eval(), data()
    x_adv = attack_from_clean(model, x, y, args(), distance, start="uniform")
    with torch.no_grad():
        zc = model(x)
        start = distance(model((x + torch.empty_like(x).uniform_(-8 / 255, 8 / 255)).clamp(0, 1)), zc, y).mean()
        assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
        assert distance(model(x_adv), zc, y).mean() > 2 * start


@pytest.mark.parametrize("name,flags", [("trades", ["--beta", "0"]), ("comp-sum", ["--tau", "1", "--nu", "0"])])
def test_clean_ce_special_cases(name: str, flags: list) -> None:
    model, (x, y) = tiny(), data()
    got, _, m = run(name, args("--loss", name, *flags), model, x, y)
    assert torch.allclose(got, F.cross_entropy(copy.deepcopy(model).train()(x), y), rtol=1e-6)


# ---- the PGD figures: a point is robust only if its clean image is classified correctly too ----


class WrongOnlyAtTheCenter(nn.Module):
    """Logits [0.5, 100 max|x - 0.5|]: class 0 at the image x = 0.5 itself, class 1 anywhere in its eps-ball that
    PGD reaches (its random start moves most pixels, and each of its steps moves one pixel back)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(100.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.scale * (x - 0.5).abs().flatten(1).amax(1)
        return torch.stack([torch.full_like(d, 0.5), d], 1)


def test_pgd_figures_take_the_worse_of_the_clean_and_the_pgd_image() -> None:
    model, x, y = WrongOnlyAtTheCenter(), torch.full((4, 3, 8, 8), 0.5), torch.ones(4, dtype=torch.long)
    z, z_adv = losses.pgd_logits(model, x, y, 8 / 255, 2 / 255, 5)
    assert (z.argmax(1) == 0).all() and (z_adv.argmax(1) == 1).all()  # PGD's image is right, the clean one wrong
    assert losses.pgd_accuracy(model, x, y, 8 / 255, 2 / 255, 5, seed=0) == (0.0, 0.0)  # not robust
    torch.testing.assert_close(losses.pgd_margins(model, x, y, 8 / 255), torch.full((4,), -0.5))  # the clean margin
    z, z_adv, y = torch.tensor([[3.0, 0], [0, 3], [3, 0]]), torch.tensor([[1.0, 0], [3, 0], [0, 3]]), torch.zeros(3)
    robust, margin = losses.worst_of(z, z_adv, y.long())
    assert robust.tolist() == [True, False, False] and margin.tolist() == [1.0, -3.0, -3.0]


def test_an_empty_shard_gives_empty_logits() -> None:
    x, y = torch.zeros(0, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    z, z_adv = losses.pgd_logits(tiny().eval(), x, y, 8 / 255, 2 / 255, 2)
    assert z.shape == z_adv.shape == (0, 10) and losses.pgd_margins(tiny(), x.float(), y, 8 / 255).shape == (0,)
    with pytest.raises(ValueError, match="no points"):
        losses.pgd_accuracy(tiny(), x, y, 8 / 255, 2 / 255, 2, seed=0)


SHARDS = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])  # tests/, where test_losses is
import losses, test_losses
dist.init_process_group("gloo")
x, y = test_losses.data(b=int(sys.argv[1]))
sys.stdout.write(f"{losses.pgd_accuracy(test_losses.tiny(), x, y, 8 / 255, 2 / 255, 2, seed=0)}\\n")  # one write
sys.stdout.flush()  # per rank: lines of three processes in one pipe stay whole
dist.destroy_process_group()  # as cli.run does: gloo's threads left running at exit can abort a process
"""


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="gloo")
def test_more_processes_than_points(tmp_path: Path) -> None:
    """3 processes, 2 points: the third rank has no points and still joins the sum (it used to fail, and the
    others to wait for it); every rank reports the one-process figures."""
    (tmp_path / "shards.py").write_text(SHARDS)
    outer = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in outer}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=child_pythonpath())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=3",
        "shards.py",
        "2",
        str(Path(__file__).parent),
    ]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    x, y = data(b=2)
    expected = str(losses.pgd_accuracy(tiny(), x, y, 8 / 255, 2 / 255, 2, seed=0))
    assert run.stdout.split("\n")[:3] == [expected] * 3


def test_precision_follows_the_backend_flags(monkeypatch) -> None:
    """fp32 on the CPU and before Ampere; on Ampere and later what the flags say (PyTorch's default: TF32 convs)."""
    assert losses.precision("cpu") == "fp32"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert losses.precision("cuda") == "fp32"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    b = torch.backends
    if hasattr(b.cudnn, "conv"):  # torch >= 2.9: the fp32_precision settings, "ieee" or "tf32"
        flags, on, off = [(b.cudnn.conv, "fp32_precision"), (b.cuda.matmul, "fp32_precision")], "tf32", "ieee"
    else:
        flags, on, off = [(b.cudnn, "allow_tf32"), (b.cuda.matmul, "allow_tf32")], True, False
    before = [getattr(m, k) for m, k in flags]
    try:
        for (conv, matmul), expected in [
            ((on, off), "tf32 convolutions"),
            ((off, off), "fp32"),
            ((off, on), "tf32 matmuls"),
            ((on, on), "tf32"),
        ]:
            for (m, k), v in zip(flags, (conv, matmul)):
                setattr(m, k, v)
            assert losses.precision("cuda:0") == expected
    finally:
        for (m, k), v in zip(flags, before):
            setattr(m, k, v)


# ---- a few training steps of every loss through train.main ----


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict:
    root, out = tmp_path_factory.mktemp("data"), {}
    rng = np.random.default_rng(0)
    for k in (10, 100):
        y = rng.permutation(np.arange(112) % k)  # every class occurs, so num_classes is k
        x = (rng.random((112, 3, 8, 8)) * 128 + (y % 10)[:, None, None, None] * 12).astype(np.uint8)
        out[k] = str(root / f"tiny{k}.npz")
        np.savez(out[k], x_train=x[:96], y_train=y[:96], x_test=x[96:], y_test=y[96:])
    out["aux"] = str(root / "aux100.npz")  # generated images for the 100-class data, in DM-Improves-AT's format
    np.savez(out["aux"], image=(rng.random((200, 8, 8, 3)) * 255).astype(np.uint8), label=np.arange(200) % 100)
    return out


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# On CUDA (bf16 autocast, channels_last), eagerly and compiled, every objective runs once, on the 100-class data
# with EMR, weight averaging and generated data riding along: enough to catch a dtype or device error without
# doubling the GPU suite's time. Compiling costs about 45 s a process on an H100, so .ci/gpu compiles one of them by
# default, sovr (the ids name the compiled runs: ...-cuda-compile).
RUNS = [(c, d, []) for c in (10, 100) for d in ("cpu",)] + [
    pytest.param(100, "cuda", flags, marks=CUDA, id=f"100-cuda{'-compile' * bool(flags)}")
    for flags in ([], ["--compile"])
]


@pytest.mark.parametrize("classes, device, flags", RUNS)
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_trains_without_nan_and_writes_checkpoints(
    name: str, classes: int, device: str, flags: list, datasets: dict, tmp_path
) -> None:
    emr = ["--emr", "0.1", "--ema", "--aux-data", datasets["aux"]] if classes == 100 else []  # ride along
    train.main(
        [
            "--dataset",
            datasets[classes],
            "--arch",
            "wrn16",
            "--width",
            "1",
            "--val",
            "16",
            "--epochs",
            "2",
            "--milestones",
            "1",
            "--batch",
            "32",
            "--steps",
            "2",
            "--eval-steps",
            "1",
            *burn_in(name, 1),
            "--loss",
            name,
            "--device",
            device,
            "--out",
            str(tmp_path),
            *emr,
            *flags,
        ]
    )
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["epoch"] for r in log[:2]] == [1, 2] and all(math.isfinite(r["train_loss"]) for r in log[:2])
    for ckpt in ("best.pt", "last.pt"):
        state = torch.load(tmp_path / ckpt, weights_only=True)  # no map_location: CPU tensors, wherever trained
        assert all(v.device.type == "cpu" for v in state["model"].values())
        assert state["num_classes"] == classes and state["args"]["loss"] == name
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
        models.load(str(tmp_path / ckpt))  # rebuilds on a machine without the GPU
    attack.main([str(tmp_path / "best.pt"), "--n", "8", "--bs", "8", "--attacks", "apgd-ce", "--device", device])
    (result,) = tmp_path.glob("best.apgd-ce-*.json")
    res = json.loads(result.read_text())
    assert 0 <= res["robust_acc"] <= res["clean_acc"] and res["settings"]["loss"] == name
    precision = losses.precision(device)  # recorded by the test report and by attack.py: "fp32" on the CPU
    assert log[-1]["final"]["best"]["precision"] == res["settings"]["precision"] == precision


# ---- L2 PGD (train.py --norm L2) ----


def reference_l2_pgd(model: nn.Module, X: torch.Tensor, y: torch.Tensor, epsilon: float, alpha: float, iters: int):
    """robust_overfitting's train_cifar.py attack_pgd with norm "l_2" and one restart, as written there (its model
    normalizes inside; images in [0, 1]): a normal direction at a radius uniform in [0, eps], clamped into the box;
    each step alpha * g / (||g|| + 1e-10), renorm onto the ball, clamp into the box."""
    delta = torch.zeros_like(X)
    delta.normal_()
    n = delta.view(delta.size(0), -1).norm(p=2, dim=1).view(delta.size(0), 1, 1, 1)
    r = torch.zeros_like(n).uniform_(0, 1)
    delta *= r / n * epsilon
    delta = torch.max(torch.min(delta, 1 - X), 0 - X)
    delta.requires_grad = True
    for _ in range(iters):
        F.cross_entropy(model(X + delta), y).backward()
        g = delta.grad.detach()
        g_norm = torch.norm(g.view(g.shape[0], -1), dim=1).view(-1, 1, 1, 1)
        d = (delta + g / (g_norm + 1e-10) * alpha).view(delta.size(0), -1).renorm(p=2, dim=0, maxnorm=epsilon)
        delta.data = torch.max(torch.min(d.view_as(delta), 1 - X), 0 - X)
        delta.grad.zero_()
    return (X + delta).detach()


def test_l2_pgd_is_robust_overfittings_attack_pgd() -> None:
    """The same random start (the same seed: the same draws in the same order), the same steps, the same x'."""
    model, (x, y) = tiny().eval(), data()
    torch.manual_seed(3)
    want = reference_l2_pgd(model, x, y, 0.5, 0.1, 5)
    torch.manual_seed(3)
    got, _ = losses.pgd(model, x, y, 0.5, 0.1, 5, norm="L2")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - x).flatten(1).norm(dim=1).min() > 0.1  # it moved: the comparison is not of two clean images


def test_l2_pgd_stays_in_the_ball_and_the_box() -> None:
    """Every example's start lies in the ball (at radii spread over it), and every step's x' in the ball and the box,
    where steps far longer than the radius and pixels at 0 and 1 push it out of both."""
    model, (x, y) = tiny().eval(), data(b=32)
    x, eps = torch.cat([x[:16], x[16:].round()]), 0.5
    torch.manual_seed(0)
    start, _ = losses.pgd(model, x, y, eps, 0.1, 0, norm="L2")
    r = (start - x).flatten(1).norm(dim=1)
    assert (r <= eps + 1e-6).all() and r.max() - r.min() > 0.1 and start.min() >= 0 and start.max() <= 1
    x_adv, _ = losses.pgd(model, x, y, eps, 2.0, 3, norm="L2")
    r = (x_adv - x).flatten(1).norm(dim=1)
    assert (r <= eps + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (r[:16] > 0.9 * eps).all()  # steps of 2 taken back to the sphere (the box shortens them a little)


def test_every_objectives_attack_follows_the_norm(monkeypatch) -> None:
    """Under --norm L2 every objective's x' (TRADES', MART's and comp-sum's from their own start and distance
    included) lies in the L2 ball of --eps; at 8/255 an L-inf attack's lies far outside it (its start alone: about
    8/255 * sqrt(192 / 3) for these 192 pixels)."""
    model, (x, y) = tiny(), data()
    seen, original = [], losses.attack

    def spy(atk, x_, y_, a, **kw):
        out = original(atk, x_, y_, a, **kw)
        seen.append((a.norm, out[0]))
        return out

    monkeypatch.setattr(losses, "attack", spy)
    for name in sorted(OBJECTIVES):
        run(name, args("--loss", name, "--norm", "L2", "--eps", "8", "--step", "2", *burn_in(name, 0)), model, x, y)
    assert len(seen) == len(OBJECTIVES) and {n for n, _ in seen} == {"L2"}
    assert max((x_adv - x).flatten(1).norm(dim=1).max().item() for _, x_adv in seen) <= 8 / 255 + 1e-6
    run("ce", args("--loss", "ce", "--eps", "8", "--step", "2"), model, x, y)
    assert (seen[-1][1] - x).flatten(1).norm(dim=1).min() > 4 * 8 / 255
