"""Model shapes, parameter counts against the literature, normalization inside, PGD behaviour."""

import pytest
import torch
import torch.nn.functional as F

import models
from losses import bn_mode, pgd


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("resnet18", 11_173_962),  # CIFAR ResNet-18 as in MART/MAIL code: 11.17M
        ("preact18", 11_172_170),  # PreAct ResNet-18 (Rice et al.)
        ("wrn34", 46_160_474),  # WRN-34-10 (Madry/TRADES): 46.16M
        ("wrn28", 36_479_194),  # WRN-28-10 (Gowal et al., DM-Improves-AT with Swish): 36.48M
    ],
)
def test_parameter_counts(arch: str, expected: int) -> None:
    assert n_params(models.build(arch, 10)) == expected


@pytest.mark.parametrize("arch", ["resnet18", "preact18", "wrn16"])
@pytest.mark.parametrize("classes", [10, 100])
def test_shapes(arch: str, classes: int) -> None:
    m = models.build(arch, classes, width=4 if arch != "wrn16" else 1).eval()
    assert m(torch.rand(3, 3, 32, 32)).shape == (3, classes)


def test_unknown_arch() -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        models.build("vgg", 10)


def test_normalization_is_inside_the_model() -> None:
    m = models.build("wrn16", 10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), width=1).eval()
    assert {"mean", "std"} <= {k.split(".")[-1] for k in m.state_dict()}
    x = torch.rand(2, 3, 32, 32)
    expected = m.net(
        (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    )
    torch.testing.assert_close(m(x), expected)
    assert models.build("resnet18", 10).mean.flatten().tolist() == pytest.approx(models.STATS["cifar10"][0])
    assert models.build("resnet18", 10).std.flatten().tolist() == pytest.approx([0.2470, 0.2435, 0.2616])


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build("preact18", 10, width=4)


def test_pgd_stays_in_ball_and_image_range_and_raises_loss() -> None:
    m = tiny().eval()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    eps = 8 / 255
    x_adv, kappa = pgd(m, x, y, eps, 2 / 255, 10)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert kappa.min() >= 0 and kappa.max() <= 10
    with torch.no_grad():
        assert F.cross_entropy(m(x_adv), y) > F.cross_entropy(m(x), y)


def test_pgd_restores_bn_mode_keeps_running_stats_and_skips_weight_grads() -> None:
    m = tiny().train()
    m.net[0].weight.requires_grad_(False)  # frozen by the user (fine-tuning): stays frozen
    before = {k: v.clone() for k, v in m.state_dict().items()}
    pgd(m, torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)), 8 / 255, 2 / 255, 3, bn="eval")
    assert m.training and all(mod.training for mod in m.modules())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())
    assert [p.requires_grad for p in m.parameters()] == [False] + [True] * (len(list(m.parameters())) - 1)


def test_bn_mode_restores_mixed_modes() -> None:
    m = tiny().train()
    m.net[1][0].bn1.eval()
    with bn_mode(m, "train"):
        assert m.net[1][0].bn1.training
    assert not m.net[1][0].bn1.training and m.net[1][0].bn2.training


def test_load_rebuilds_in_eval_mode_and_refuses_clearly(tmp_path) -> None:
    model = models.build("wrn16", 10, width=1)
    ckpt = dict(
        model=model.state_dict(),
        arch="wrn16",
        width=1,
        num_classes=10,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        eps=8,
        dataset="synthetic",
    )
    models.save(ckpt, str(tmp_path / "good.pt"))
    loaded = models.load(str(tmp_path / "good.pt"))
    assert not loaded.training and all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values())
    )
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(torch.zeros(1), tmp_path / "tensor.pt")
    torch.save({k: v for k, v in ckpt.items() if k not in ("eps", "dataset")}, tmp_path / "settings.pt")
    models.save(ckpt, str(tmp_path / "best.pt"))
    models.save({**ckpt, "arch": "vgg"}, str(tmp_path / "arch.pt"))
    models.save({**ckpt, "num_classes": 100}, str(tmp_path / "classes.pt"))
    for name, message in [
        ("missing.pt", "no such checkpoint"),
        ("text.pt", "is not a file torch.save wrote"),
        ("empty.pt", "is empty: not a train.py checkpoint"),
        ("tensor.pt", "holds a Tensor, not a dict with a model: not a train.py checkpoint"),
        ("other.pt", "holds no model: not a train.py checkpoint"),
        ("settings.pt", "lacks eps, dataset: not a train.py checkpoint"),
        ("", "is a folder, not a checkpoint: give .*best.pt$"),
        ("arch.pt", "unknown arch 'vgg'"),
        ("classes.pt", "weights do not fit arch wrn16 with 100 classes"),
    ]:
        with pytest.raises(ValueError, match=message):
            models.load(str(tmp_path / name))


def test_mismatch_names_the_first_key_at_fault() -> None:
    model = models.ARCHS["wrn16"](10, 2)
    weights = model.state_dict()
    assert models.mismatch(model, weights) is None
    fewer = {k: v for k, v in weights.items() if k != "1.0.short.weight"}
    assert models.mismatch(model, {**fewer, "fc.weight": torch.zeros(1)}) == (
        "missing key 1.0.short.weight, unexpected key fc.weight"
    )
    wider = models.ARCHS["wrn16"](10, 3).state_dict()
    said = models.mismatch(model, wider)
    assert said == "1.0.conv1.weight is [48, 16, 3, 3] in the file, [32, 16, 3, 3] in the model"


def test_read_state_dict_takes_the_forms_others_save_and_refuses_clearly(tmp_path) -> None:
    """A state_dict with torch.compile's and DataParallel's prefixes and without BatchNorm's batch counts (older
    torch); one of build()'s model, normalization inside: the file's; the refusals, each naming what is wrong."""
    torch.manual_seed(0)
    net = models.ARCHS["wrn16"](100, 1).eval()
    old = {f"module._orig_mod.{k}": v for k, v in net.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(old, tmp_path / "old.pt")
    ckpt = models.read_state_dict(str(tmp_path / "old.pt"), "wrn16", 1)
    said = (ckpt["num_classes"], ckpt["dataset"], ckpt["eps"], ckpt["mean"], ckpt["std"])
    assert said == (100, "cifar100", None, [0.0] * 3, [1.0] * 3)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(models.from_checkpoint(ckpt)(x), net(x))
    full = models.build("wrn16", 10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), width=1).eval()
    torch.save(full.state_dict(), tmp_path / "full.pt")
    ckpt = models.read_state_dict(str(tmp_path / "full.pt"), "wrn16", 1)
    assert ckpt["assumed"]["normalization"] == "the file's (mean (0.5, 0.4, 0.3), std (0.2, 0.25, 0.3))"
    with torch.no_grad():
        assert torch.equal(models.from_checkpoint(ckpt)(x), full(x))
    torch.save(torch.zeros(1), tmp_path / "tensor.pt")
    torch.save({"state_dict": {"0.weight": torch.zeros(3, 3, 3, 3)}}, tmp_path / "conv.pt")
    models.save(dict(model=full.state_dict(), arch="wrn16", width=1, num_classes=10, mean=[0.5] * 3,
                     std=[0.25] * 3, eps=8, dataset="synthetic"), str(tmp_path / "train.pt"))  # fmt: skip
    for name, normalize, message in [
        ("full.pt", ("none", (0,) * 3, (1,) * 3), "--normalize would do nothing: .*full.pt holds its own mean and std"),
        ("tensor.pt", None, "holds no state_dict"),
        ("conv.pt", None, "holds no linear layer"),
        ("train.pt", None, "--arch would do nothing: .*train.pt is a train.py checkpoint"),
    ]:
        with pytest.raises(ValueError, match=message):
            models.read_state_dict(str(tmp_path / name), "wrn16", 1, normalize)
    with pytest.raises(ValueError, match="classes.pt: its weights do not fit arch wrn16 with 100 classes, width 1: "):
        models.fits(dict(ckpt, num_classes=100), str(tmp_path / "classes.pt"))
