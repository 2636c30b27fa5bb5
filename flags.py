"""The policy of train.py's and attack.py's command lines in one place: every flag with its default (and, once, where
the default comes from), what values it refuses, which losses read each objective flag, what --resume may change,
and a run's name. fill() gives the defaults that depend on other flags; check() is the one function that refuses."""

import argparse
import itertools
import math
import os
import re
import shlex
import sys

import cli
import losses
import models
import runlog
from sovr import DEFAULT_RATIO

EMA_DECAY = 0.995  # DM-Improves-AT's train-wa.py: --tau default
AUX_FRACTION = 0.7  # DM-Improves-AT's core/utils/parser.py: --unsup-fraction default
VAL = 1000  # training images held out for model selection: our choice
# EMR's softmax temperature by loss, as the official scripts set it (train-AT-EMR.sh: 40; train-TRADES-EMR.sh: 1;
# src/argument.py, kept by train-MAIL-AT-EMR.sh: 0.1); the other losses take AT's
EMR_TEMP, EMR_TEMP_AT = {"trades": 1.0, "trades-sovr": 1.0, "mail": 0.1}, 40.0
SMOKE = dict(dataset="synthetic", train_limit=256, val=64, epochs=2, batch=64, steps=2, eval_steps=2, width=8)
# The recipe of a threat model (--norm) and dataset family: --eps and --step in 1/255 units and --lr, filled in where
# not given, and where each comes from. CIFAR's L-inf values are the Bag of Tricks baseline's, as before --norm; the
# others are robust_overfitting's (Rice et al. 2020) PreAct ResNet-18 runs, as the first line of each run's log says
# (experiments/<name>/preactresnet18*/output.log: epsilon, pgd_alpha, lr_max; its train_cifar.py attack_pgd is
# losses.pgd's L2 start and step). SVHN's L2 run is there too, so no row is ours.
RECIPES = {
    ("Linf", "cifar"): (8, 2, 0.1, "Bag of Tricks: P2333/Bag-of-Tricks-for-AT's README and train_cifar.py"),
    ("L2", "cifar"): (128, 15, 0.1, "robust_overfitting experiments/cifar10_standard_l2"),
    ("Linf", "svhn"): (8, 1, 0.01, "robust_overfitting experiments/svhn_standard"),
    ("L2", "svhn"): (128, 15, 0.01, "robust_overfitting experiments/svhn_standard_l2"),
}
RECIPE_KEYS = ("eps", "step", "lr")
# Each family's lr drops (x0.1 each) as fractions of the run, scaled to --epochs: Bag of Tricks' 100 and 105 of 110
# epochs; robust_overfitting's train_svhn.py's piecewise schedule, at a half and three quarters of its 200 epochs
DROPS = {"cifar": ((100, 110), (105, 110)), "svhn": ((1, 2), (3, 4))}


def by_recipe(key: str) -> str:
    """A help's list of a recipe value by dataset family and norm: "CIFAR Linf 8, L2 128; SVHN Linf 8, L2 128"."""
    i = RECIPE_KEYS.index(key)
    families = dict.fromkeys(f for _, f in RECIPES)
    return "; ".join(
        f"{f.upper()} " + ", ".join(f"{n} {RECIPES[n, f][i]:g}" for n, g in RECIPES if g == f) for f in families
    )


def _ints(value: str) -> list[int]:
    try:
        return [int(m) for m in value.replace(" ", "").split(",") if m]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, not {value!r}") from None


def radius(value: str) -> int | float:
    """A radius or PGD step in 1/255 units, as every such flag takes it: 8, or 8/255 (the same 8), or a decimal such
    as 127.5 (L2's 0.5); an int when it is whole, so that 8 is stored, named and compared as the integer it always
    was. A value between 0 and 1, the fraction form that AutoAttack's users write by habit, is refused by check()."""
    number, _, per = value.replace(" ", "").partition("/")
    try:
        if per not in ("", "255"):
            raise ValueError
        v = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number in 1/255 units (8 or 8/255), not {value!r}") from None
    return int(v) if v.is_integer() else v


def _auto(value: str) -> str:
    if value != "auto":
        raise argparse.ArgumentTypeError(f"takes no value or 'auto', not {value!r}")
    return value


ON_OFF, ON = argparse.BooleanOptionalAction, "store_true"
# The rule of every radius and step: not in (0, 1), where a value is almost surely 8/255 written as 0.031 (the
# fraction form of AutoAttack and RobustBench), which here would be 0.031/255 and test next to no perturbation.
UNITS = "in 1/255 units"


def F(name: str, kind, default, rule: str | tuple = "", text: str = "", **kw) -> tuple:
    """A row of a flag table: its names (an alias after a space), type (or argparse action), default, rule and help;
    argparse's other keywords."""
    return name, default, text, rule, {("action" if kind in (ON_OFF, ON) else "type"): kind, **kw} if kind else kw


def dest(row: tuple) -> str:
    return row[0].split()[0].lstrip("-").replace("-", "_")


# A string starts a group of flags. A rule says what a value must be, as the refusal says it: ">= a" and "> a"
# (which also refuse inf and nan), "<= a", an interval, "finite", "a positive number", UNITS, then any words; None
# values (a default filled in later or an absent flag) are not checked. %(default)s in a help is the default, so it
# is written once. Rules between flags follow each table: (when, flag, rule, why): where `when` holds ("name": the
# flag is set; "name=value"), `flag` must meet `rule` (a rule of the table, "given", "=value", or "absent": not set);
# a flag "a|b" is met by either.
# fmt: off
TRAIN = [
    "data and model",
    F("--dataset", None, "cifar10", "", "cifar10 (default) | cifar100 | svhn | synthetic | .npz with x_train, "
      "y_train, x_test, y_test"),
    F("--data-dir", None, "./data", "", "where torchvision downloads CIFAR and SVHN (default %(default)s)"),
    F("--val", int, None, "", f"training images held out for model selection (default {VAL}; for a set of fewer "
      f"than {2 * VAL}, half of it, leaving at least --batch)"),  # its range needs the data: data.train_val
    F("--train-limit", int, 0, ">= 0", "use only the first N training images, 0 = all (for quick checks)"),
    F("--aux-data", None, None, "", "generated images mixed into every batch (default none)", metavar="NPZ"),
    F("--aux-fraction", float, None, "[0, 1)", f"share of each batch from --aux-data (default {AUX_FRACTION})"),
    F("--arch", None, "resnet18", "", "network (default %(default)s)", choices=sorted(models.ARCHS)),
    F("--width", int, None, ">= 1", "ResNet base channels / WRN widen factor (default: the arch's standard)"),
    "recipe",  # Pang et al.'s Bag of Tricks baseline: P2333/Bag-of-Tricks-for-AT's README and train_cifar.py
    F("--norm", None, "Linf", "", "threat model of the training attack, validation and test (default %(default)s); "
      "it chooses the defaults of --eps, --step and --lr", choices=list(losses.NORMS)),
    F("--epochs", int, 110, ">= 1", "epochs (default %(default)s)"),
    F("--milestones", _ints, None, ">= 1 (a drop after epoch 0 would lower the lr from the start)",
      "epochs after which lr and EMR lambda x0.1 (default: 100/110, 105/110 of --epochs; SVHN 1/2, 3/4)"),
    F("--lr", float, None, "a positive number", "SGD learning rate for the global batch (default by --norm and "
      f"dataset: {by_recipe('lr')})"),
    F("--momentum", float, 0.9, "[0, 1)", "SGD momentum (default %(default)s)"),
    F("--wd", float, 5e-4, ">= 0", "weight decay (default %(default)s)"),
    F("--batch", int, 128, ">= 1", "global batch size (default %(default)s)"),
    F("--eps", radius, None, (">= 0", UNITS), "radius of the --norm ball in 1/255 "
      f"units: 8 or 8/255, not 0.031 (default by --norm and dataset: {by_recipe('eps')})"),
    F("--step", radius, None, (">= 0", UNITS), "PGD step in 1/255 units (default by --norm and dataset: "
      f"{by_recipe('step')})"),
    F("--steps", int, 10, ">= 1", "PGD steps in training (default %(default)s)"),
    F("--eval-steps", int, 20, ">= 1", "PGD steps for validation and test (default %(default)s)"),
    F("--eval-batch", int, 500, ">= 1", "validation and test batch (default %(default)s; fp32 PGD keeps WRN-34-10's "
      "activations, 23 MB an image: 11.5 GB at 500)"),
    F("--attack-bn", None, "eval", "", "BatchNorm mode while attacking (default %(default)s)",
      choices=["eval", "train"]),
    F("--ema", float, None, "(0, 1)", f"evaluate and save a moving average of the weights (default off; --ema "
      f"alone: {EMA_DECAY})", nargs="?", const=EMA_DECAY, metavar="DECAY"),
    "objective (each flag: the losses that read it)",
    F("--loss", None, "sovr", "", "training objective (default %(default)s)", choices=sorted(losses.OBJECTIVES)),
    F("--ratio", float, DEFAULT_RATIO, "[0, 1]", "sovr, trades-sovr: share of the batch that uses OVR (default "
      "%(default)s)"),  # why 0.4: sovr.py
    F("--beta", float, 6.0, ">= 0", "trades, trades-sovr, mart: weight of the KL term (default %(default)g)"),
    # TRADES' train_trades_cifar10.py; MART's train_wideresnet.py
    F("--burn-in", int, None, ">= 0", "mail, gairat: unweighted epochs first (default: 60/110 of --epochs)"),
    # ours: GAIRAT.py reweights after 59 of 120 epochs, MAIL's train.py after 76 of 120
    F("--mail-slope", float, 10.0, "finite", "mail: weight 3 sigmoid(slope (bias - PM)) (default %(default)g)"),
    F("--mail-bias", float, -0.5, "finite", "mail: weight bias (default %(default)g)"),
    # MAIL-AT's recommendation as reported from MAIL's README (its train.py argparse has 1 and -1.5)
    F("--gairat-lambda", float, -1.0, "finite", "gairat: tanh shift lambda (default %(default)g)"),
    # GAIRAT.py's --Lambda with its fixed schedule
    F("--tau", float, 1.0, ">= 0", "comp-sum: tau >= 0; 0 sum-exp, 1 CE, 2 MAE (default %(default)g)"),  # ours
    F("--nu", float, 1.0, ">= 0", "comp-sum: weight of the logit-difference distance (default %(default)g)"),  # ours
    F("--emr", float, 0.0, ">= 0", "any loss: EMR lambda (default 0 = off)"),
    F("--emr-temp", float, None, "> 0", f"EMR softmax temperature (default {EMR_TEMP_AT:g}; "
      + ", ".join(f"{v:g} for {k}" for k, v in EMR_TEMP.items()) + ")"),
    F("--emr-decay", float, 0.1, ">= 0", "EMR lambda factor at each milestone (default %(default)g)"),
    # EMR_decay in EMR's src/argument.py
    "run",
    F("--seed", int, 0, "", "random seed (default %(default)s)"),
    F("--out", None, None, "", "run folder (default runs/<dataset>-<arch>-<objective>-s<seed>)"),
    F("--resume", _auto, False, "", "continue <out>/last.pt with its flags (those given must match, but "
      "--stop-after, --device, --compile, --deterministic, --data-dir, --eval-batch), on this machine's default "
      "device unless --device is given; 'auto': continue if it exists, else start (safe to requeue)", nargs="?",
      const=True, metavar="auto"),
    F("--init", None, None, "", "start from this checkpoint's weights, with a fresh optimizer and schedule"),
    F("--stop-after", int, 0, ">= 0", "train at most N epochs in this invocation, then exit (0 = all)"),
    F("--device", None, None, "", "cpu | cuda | cuda:N (default cuda if available)"),
    F("--amp", ON_OFF, None, "", "bf16 autocast in training (default on for GPUs of compute capability 8.0, Ampere, "
      "or later; fp32 elsewhere: the CPU, V100, T4)"),
    F("--channels-last", ON_OFF, True, "", "NHWC memory format (default on)"),
    F("--compile", ON_OFF, False, "", "torch.compile the model (default off)"),
    F("--deterministic", ON_OFF, False, "", "deterministic CUDA kernels: bit for bit (default off)"),
    F("--sync-bn", ON, False, "", "SyncBatchNorm under torchrun (default off)"),
    F("--smoke", ON, False, "", f"defaults for a seconds-long CPU check: {SMOKE}"),
]
# fmt: on
LINF_EPS = ("norm=Linf", "eps", "<= 255", "the whole pixel range")  # --norm Linf (attack.py: a checkpoint's, threat())
TRAIN_WITH = [LINF_EPS, ("aux_fraction", "aux_data", "given", "")]

# The objective flags each loss reads (the others are refused: they would do nothing), and their tags in run names.
READS = {
    "sovr": ("ratio",),
    "trades": ("beta",),
    "trades-sovr": ("ratio", "beta"),
    "mart": ("beta",),
    "mail": ("mail_slope", "mail_bias", "burn_in"),
    "gairat": ("gairat_lambda", "burn_in"),
    "comp-sum": ("tau", "nu"),
}
TAGS = dict(
    ratio="r", beta="b", mail_slope="slope", mail_bias="bias", gairat_lambda="lambda", burn_in="burnin", tau="tau",
    nu="nu", emr="emr", emr_temp="emrtemp", emr_decay="emrdecay",
)  # fmt: skip
# Flags that may change between a run and its --resume without changing the result (--compile and --deterministic
# change CUDA's float rounding, as another run of a nondeterministic kernel does; --eval-batch batches validation
# and test otherwise, never what is trained); --resume takes every flag not given from last.pt, except those of one
# invocation and --device: a run begun on the CPU continues on the GPU of the machine it resumes on unless --device
# says otherwise (and --amp's default follows the device: last.pt keeps None, not what it resolved to).
RESUMABLE = {"resume", "stop_after", "device", "compile", "deterministic", "data_dir", "out", "smoke", "eval_batch"}
ONCE = {"resume", "stop_after", "out", "device"}

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")  # the package's names


def _attacks(value: str) -> str:
    names = value.split(",")
    twice, unknown = sorted({a for a in names if names.count(a) > 1}), sorted(set(names) - set(ATTACKS) - {""})
    if "" in names:
        raise argparse.ArgumentTypeError(f"takes attack names separated by commas, got {value!r}")
    if twice or unknown:
        raise argparse.ArgumentTypeError(
            f"names {', '.join(twice)} twice"
            if twice
            else f"unknown attack(s) {', '.join(unknown)}; choose from " + ", ".join(ATTACKS)
        )
    return value


def normalization(value: str | None) -> tuple[str, tuple, tuple] | None:
    """--normalize as (what it is, mean, std); None where not given. ArgumentTypeError for a value it cannot be."""
    if value is None:
        return None
    if value == "none":
        return models.NO_NORMALIZATION
    if value in models.STATS:
        mean, std = models.STATS[value]
        return f"{value} (mean {mean}, std {std})", mean, std
    try:
        parts = [[float(v) for v in part.split(",")] for part in value.split("/")]
    except ValueError:
        parts = []
    if (
        len(parts) != 2
        or any(len(p) not in (1, 3) for p in parts)
        or not all(0 < s < math.inf for s in parts[1])
        or not all(math.isfinite(m) for m in parts[0])
    ):
        raise argparse.ArgumentTypeError(
            f"takes none, {', '.join(models.STATS)} or MEAN/STD (1 or 3 numbers each, STD > 0), not {value!r}"
        )
    mean, std = (tuple(p * 3 if len(p) == 1 else p) for p in parts)
    return f"mean {mean}, std {std}", mean, std


def _normalize(value: str) -> str:
    normalization(value)  # refused here, at parsing
    return value


# fmt: off
ATTACK = [
    F("checkpoints", None, None, "", "train.py checkpoints (best.pt or last.pt), or with --arch state_dicts",
      nargs="+"),
    F("--n --points", int, 0, ">= 0", "first N test points (default 0 = all); give it as --points, which torchrun's "
      "parser also passes on (it takes --n for an abbreviation of its own options)", dest="n"),
    F("--bs", int, 500, ">= 1", "batch size (default %(default)s)"),
    F("--eps", radius, None, ("> 0 (in 1/255 units)", UNITS), "radius in 1/255 units: 8 or 8/255, not 0.031 "
      "(default: the training eps; another --norm than the training one needs it, e.g. 127.5 for L2's 0.5)"),
    F("--norm", None, None, "", "threat model (default: the checkpoint's; Linf for a state_dict)",
      choices=list(losses.NORMS)),
    F("--version", None, "standard", "", "AutoAttack version (default %(default)s, as RobustBench)",
      choices=["standard", "plus", "rand"]),
    F("--attacks", _attacks, None, "", "comma-separated custom subset, e.g. apgd-ce,apgd-t, with the version's "
      "settings"),
    F("--seed", int, 0, ">= 0", "AutoAttack's and --margins' seed (default %(default)s)"),
    F("--dataset", None, None, "", "test data (default: the checkpoint's dataset; a state_dict's: cifar10 or "
      "cifar100 by its class count); cifar10 | cifar100 | svhn | .npz"),
    F("--data-dir", None, "./data", "", "where torchvision downloads CIFAR and SVHN (default %(default)s)"),
    F("--device", None, None, "", "cpu | cuda | cuda:N (default cuda if available)"),
    F("--margins", ON, False, "", "instead of AutoAttack: logit margins of PGD-20 examples and a histogram"),
    F("--sweep", ON, False, "", "instead of AutoAttack: APGD-CE then APGD-T at 1, 2, 4 and 8 x eps, and PGD-20 "
      "against PGD-100, with a verdict and a plot"),
    F("--plot", None, None, "", "where --margins or --sweep draws (default margins.png or sweep.png beside the first "
      "result)", metavar="PNG"),
    F("--out", None, None, "", "the folder of the result files (default: beside each checkpoint)", metavar="DIR"),
    F("--verbose", ON, False, "", "the AutoAttack package's own log lines (off by default)"),
    "a state_dict that train.py did not write, of a network as models.py defines it (bare, or under 'state_dict'; "
    "DataParallel's 'module.' is taken off)",
    F("--arch", None, None, "", "its network (default: none; a train.py checkpoint names its own)",
      choices=sorted(models.ARCHS)),
    F("--width", int, None, ">= 1", "ResNet base channels / WRN widen factor (default: the arch's standard)"),
    F("--normalize", _normalize, None, "", "the input normalization it expects: none (images in [0, 1] as they "
      f"are, as TRADES' and MART's networks take them), {', '.join(models.STATS)}, or MEAN/STD, e.g. "
      "0.5,0.5,0.5/0.25,0.25,0.25 (default: the file's own mean and std where it holds them, else none)"),
]
ATTACK_WITH = [
    LINF_EPS,
    ("plot", "margins|sweep", "given", "it draws their figure; or drop --plot"),
    ("sweep", "margins", "absent", "two modes: choose one"),
    ("sweep", "attacks", "absent", "it runs its own, APGD-CE then APGD-T"),
    ("arch", "eps", "given", "a state_dict holds no training eps; in 1/255 units, e.g. 8 for 8/255"),
    ("width", "arch", "given", "the network of a state_dict; a train.py checkpoint names its own"),
    ("normalize", "arch", "given", "the network of a state_dict; a train.py checkpoint names its own"),
]
# fmt: on


def parser(doc: str, table: list, prog: str | None = None) -> argparse.ArgumentParser:
    """A program's parser from its table; `prog` names it in its errors, wherever it is called from."""
    p, group = cli.parser(doc, allow_abbrev=False, prog=prog), None
    for row in table:
        if isinstance(row, str):
            group = p.add_argument_group(row)
            continue
        name, default, text, _, kw = row
        (group or p).add_argument(*name.split(), default=default, help=text, **kw)
    return p


def rules(table: list) -> dict[str, tuple[str, ...]]:
    out = {}
    for row in table:
        if not isinstance(row, str) and row[3]:
            out[dest(row)] = (row[3],) if isinstance(row[3], str) else row[3]
    return out


def train_args(
    argv: list[str] | None = None, doc: str = "", claim: bool = False
) -> tuple[argparse.Namespace, dict | None]:
    """train.py's flags, and last.pt's contents when the run resumes (read once, here): with --resume (or --resume
    auto finding last.pt), the flags not given are last.pt's. With `claim` (train.py's own command line, not a caller
    that only wants the run's name), a fresh run into a folder that holds a run is refused here, with the command
    that works."""
    argv = sys.argv[1:] if argv is None else argv
    p, args, given = parse(argv, doc)
    name = os.path.splitext(os.path.basename(args.dataset))[0]
    args.out = args.out or os.path.join("runs", f"{name}-{args.arch}-{label(vars(args))}-s{args.seed}")
    args.resume = args.resume is True or (args.resume == "auto" and os.path.isfile(os.path.join(args.out, "last.pt")))
    try:
        state = read_last(args, given, argv) if args.resume else None
        if state:
            take(args, state, given)
        check(fill(args), given)
        if claim:
            runlog.claim(args.out, args.resume, lambda has_last: instead(args, argv, has_last))
    except ValueError as e:
        cli.refuse(p, str(e))
    return args, state


def parse(argv: list[str], doc: str = "") -> tuple[argparse.ArgumentParser, argparse.Namespace, set[str]]:
    """train.py's parser, the flags of argv (--smoke's defaults where it is given) and the dests argv gives."""
    p = parser(doc, TRAIN, "train.py")
    given = cli.given(p, argv)
    if "smoke" in given:
        p.set_defaults(**SMOKE)  # explicit flags still win
    return p, p.parse_args(argv), given


def attack_args(argv: list[str] | None = None, doc: str = "") -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    p = parser(doc, ATTACK, "attack.py")
    args = p.parse_args(argv)
    try:
        check(args, set(), ATTACK, ATTACK_WITH)
    except ValueError as e:
        cli.refuse(p, str(e))
    return args


def family(dataset: str) -> str:
    """The dataset family whose recipe a run takes: "svhn" for SVHN, "cifar" for every other set."""
    return "svhn" if dataset == "svhn" else "cifar"


def recipe(args: argparse.Namespace) -> str:
    """The header's line of the run's recipe: which it is and the values of it the run takes, e.g. "recipe: L2
    (robust_overfitting experiments/cifar10_standard_l2): eps 128/255, step 15/255, lr 0.1"; "" for none."""
    *values, source = RECIPES[args.norm, family(args.dataset)]
    unit = dict(eps="/255", step="/255", lr="")
    taken = [f"{k} {v:g}{unit[k]}" for k, v in zip(RECIPE_KEYS, values) if getattr(args, k) == v]
    return f"recipe: {args.norm} ({source}): {', '.join(taken)}" if taken else ""


def fill(args: argparse.Namespace) -> argparse.Namespace:
    """The defaults that depend on other flags: --eps, --step and --lr by --norm and dataset (RECIPES), the
    schedule's by dataset (DROPS, scaled to --epochs), EMR's temperature by loss."""
    for k, v in zip(RECIPE_KEYS, RECIPES[args.norm, family(args.dataset)]):
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.milestones is None:  # the recipe's drops, scaled, each before the last epoch
        drops = DROPS[family(args.dataset)]
        args.milestones = sorted({min(round(args.epochs * a / b), args.epochs - 1) for a, b in drops} - {0})
    if args.burn_in is None:
        args.burn_in = round(args.epochs * 60 / 110)
    if args.emr_temp is None:
        args.emr_temp = EMR_TEMP.get(args.loss, EMR_TEMP_AT)
    if args.aux_data and args.aux_fraction is None:
        args.aux_fraction = AUX_FRACTION
    return args


def threat(ckpt: dict, args: argparse.Namespace, path: str) -> tuple[str, int | float]:
    """attack.py's threat model and radius (1/255 units) for a checkpoint: --norm, else the norm it was trained
    under (models.read: L-inf for a file older than --norm; L-inf for a state_dict); --eps, else its training eps.
    ValueError for another norm than the training one without --eps (the training radius is another norm's), and
    for an L-inf radius over the pixel range."""
    trained = ckpt.get("norm") or "Linf"
    norm = args.norm or trained
    if args.eps is None and norm != trained:
        raise ValueError(
            f"--norm {norm} needs --eps (in 1/255 units, e.g. {'127.5 for 0.5' if norm == 'L2' else '8 for 8/255'}): "
            f"{path} was trained at {trained} {ckpt['eps']}/255"
        )
    eps = ckpt["eps"] if args.eps is None else args.eps
    check(argparse.Namespace(norm=norm, eps=eps), set(), [], [LINF_EPS])
    return norm, eps


def check(args: argparse.Namespace, given: set[str], table: list = TRAIN, relations: list = TRAIN_WITH) -> None:
    """ValueError for an objective flag among `given` (the command line's) that the run's loss does not read, a
    value the table's rules refuse, and a broken rule between flags."""
    if unread := [k for k in TAGS if k in given and k not in reads(args.loss, args.emr)]:
        raise ValueError(f"--loss {args.loss} does not read " + ", ".join(f"{_flag(k)} ({readers(k)})" for k in unread))
    for k, says in rules(table).items():
        values = getattr(args, k)
        for v in values if isinstance(values, list) else [values]:
            if bad := next((say for say in says if v is not None and not holds(say, v)), None):
                raise ValueError(
                    fraction(_flag(k), v)
                    if bad == UNITS
                    else f"{_flag(k)} must {'lie in' if bad[0] in '[(' else 'be'} {bad}, got {v}"
                )
    for when, k, rule, why in relations:
        name, _, value = when.partition("=")
        v, w, flag = (
            [getattr(args, x) for x in k.split("|")],
            getattr(args, name),
            " or ".join(map(_flag, k.split("|"))),
        )
        if _meets(f"={value}" if value else "given", w) and not any(_meets(rule, u) for u in v):
            when, why = _flag(name) + f" {value}" * bool(value), f" ({why})" * bool(why)
            if rule == "absent":
                raise ValueError(f"{when} takes no {flag}{why}")
            if rule == "given" or rule[0] == "=":
                raise ValueError(f"{when} needs {flag}{' ' + rule[1:] if rule[0] == '=' else ''}{why}")
            raise ValueError(f"{flag} must be {rule} with {when}{why}, got {v[0]}")


def _meets(rule: str, v) -> bool:
    if rule in ("given", "absent"):
        return (v not in (None, False)) == (rule == "given")
    return v == rule[1:] if rule[0] == "=" else v is None or holds(rule, v)


def _flag(k: str) -> str:
    return "--" + k.replace("_", "-")


def fraction(flag: str, v: float) -> str:
    """The refusal of a radius or step in (0, 1): what it means here and what was likely meant (8 for 0.031, 127.5
    for L2's 0.5)."""
    meant = v * 255
    meant = round(meant) if abs(meant - round(meant)) < 0.1 else float(f"{meant:.4g}")
    return f"{flag} {v} is {v}/255; for {meant:g}/255 give {flag} {meant:g} (radii and steps are in 1/255 units)"


def holds(rule: str, v: float) -> bool:
    """Whether v meets a rule of the table: "finite", "a positive number", UNITS, an interval "[a, b)" (any
    brackets), or ">= a", "> a", "<= a" followed by any words; the bounds >= and > also refuse inf and nan."""
    if rule == UNITS:
        return not 0 < v < 1
    if rule in ("finite", "a positive number"):
        return math.isfinite(v) and (rule == "finite" or v > 0)
    if rule[0] in "[(":
        lo, hi = (float(b) for b in rule[1:-1].split(","))
        return (lo <= v if rule[0] == "[" else lo < v) and (v <= hi if rule[-1] == "]" else v < hi)
    op, bound = rule.split()[:2]
    b = float(bound)
    return {">=": b <= v < math.inf, ">": b < v < math.inf, "<=": v <= b}[op]


def read_last(args: argparse.Namespace, given: set[str], argv: list[str] = ()) -> dict:
    """--resume: last.pt, read once; ValueError for a file that is not one, a run that has finished its epochs (with
    the command that trains it longer), and every given flag that would change the result."""
    path = os.path.join(args.out, "last.pt")
    state = models.read(path, "--resume")
    if "optimizer" not in state:
        raise ValueError(f"--resume: {path} is not a train.py last.pt")
    old = state.get("args", {})  # a flag it lacks is newer than the run and keeps its default
    diff = sorted(k for k in given - RESUMABLE if k in old and old[k] != getattr(args, k))
    if "epochs" in diff and state["epoch"] >= old["epochs"] and not MODEL & set(diff):
        raise ValueError(
            f"--resume: {path} has finished its {old['epochs']} epochs; to train it longer, start a new run from "
            f"its weights (a fresh schedule of {args.epochs} epochs): {longer(args, argv, given, old)}"
        )
    if diff:
        raise ValueError(
            f"--resume: {path} was trained with {cli.as_flags(old, diff)}, not {cli.as_flags(vars(args), diff)} "
            "(leave them out to continue it)"
        )
    return state


def take(args: argparse.Namespace, state: dict, given: set[str]) -> None:
    """--resume: every flag not among `given` from last.pt's, but those of one invocation."""
    for k, v in state.get("args", {}).items():
        if hasattr(args, k) and k not in given | ONCE:
            setattr(args, k, v)


# ---- what works instead: the commands that the refusals of a run folder give, each one that runs

MODEL = {"arch", "width", "dataset"}  # what --init's weights fix: a run that changes them is not trained longer
# fill()'s, compared only where a command set them
FILLED = ("milestones", "burn_in", "emr_temp", "aux_fraction", *RECIPE_KEYS)


def instead(args: argparse.Namespace, argv: list[str], has_last: bool) -> str:
    """What a fresh run into args.out, which holds a run, can do instead: continue it (the same settings, not
    finished), or the same command into a free folder, named by the settings that differ from the run's there."""
    state = _last(args.out) if has_last else None
    if state is None:
        return "choose another --out: " + command(_without(argv, ("--out",)) + ["--out", free(args.out)])
    old = state.get("args", {})
    differ = _differ(old, vars(args))
    if not differ and state["epoch"] < old.get("epochs", 0):
        return "continue it: " + command([*argv, "--resume"])
    if not differ:
        done = f"it is this run, finished: its test results are in {os.path.join(args.out, 'log.jsonl')}"
        return done + "; to train it again: " + command(_without(argv, ("--out",)) + ["--out", free(args.out)])
    stem = f"{args.out}-{_tag(vars(args), differ)}"
    return (
        f"it trained {cli.as_flags(old, differ)}, not {cli.as_flags(vars(args), differ)}; give this run a folder of "
        f"its own: " + command(_without(argv, ("--out",)) + ["--out", free(stem)])
    )


def longer(args: argparse.Namespace, argv: list[str], given: set[str], old: dict) -> str:
    """The command that trains a finished run longer: argv's flags, the run's other settings, --init its last.pt."""
    base = _without(argv, ("--out", "--resume", "--init"))
    a, b = _explicit(old), _explicit(vars(fill(parse(base)[1])))
    keep = sorted((a.keys() & b.keys()) - RESUMABLE - given - {"init"})
    extra = [t for k in keep if a[k] is not None and a[k] != b[k] for t in _tokens(k, old[k])]
    stem = f"{args.out}-{_tag(vars(args), ['epochs'])}-init"
    return command([*base, *extra, "--init", os.path.join(args.out, "last.pt"), "--out", free(stem)])


def _last(out: str) -> dict | None:
    """out/last.pt's contents where it is a run's to continue (read_last would take it), else None."""
    try:
        state = models.read(os.path.join(out, "last.pt"))
    except ValueError:
        return None
    return state if "optimizer" in state else None


def _explicit(a: dict) -> dict:
    """A run's settings (missing ones at their defaults) with fill()'s values None where fill() gives them."""
    a = {**DEFAULTS, **a}
    filled = vars(fill(argparse.Namespace(**{**a, **dict.fromkeys(FILLED)})))
    return {k: None if k in FILLED and v == filled[k] else v for k, v in a.items()}


def _differ(old: dict, new: dict) -> list[str]:
    """The settings that change the result in which a run's `new` flags differ from `old`, a run's last.pt's; not
    those that take a value only later (--val: from the data)."""
    a, b = _explicit(old), _explicit(new)
    keys = sorted((old.keys() & b.keys()) - RESUMABLE)
    return [k for k in keys if a[k] != b[k] and (b[k] is not None or k in FILLED)]


def _without(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the flags `names` and their values (--resume's: auto, when given)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        name = a.split("=")[0]
        if name in names:
            skip = "=" not in a and (name != "--resume" or argv[i + 1 : i + 2] == ["auto"])
            continue
        out.append(a)
    return out


def _tokens(k: str, v) -> list[str]:
    """The flag that sets k to v."""
    flag, kind = _flag(k), KINDS.get(k)
    if kind is ON_OFF:
        return [flag if v else "--no-" + flag[2:]]
    if kind == ON:
        return [flag] * bool(v)
    return [flag, ",".join(map(str, v)) if isinstance(v, list) else str(v)]


def _tag(a: dict, keys: list[str]) -> str:
    """A folder name's part for settings: epochs5, lr0.05-batch64, datasetcifar10_subset (a file's name)."""
    short = {k: os.path.splitext(os.path.basename(a[k]))[0] if isinstance(a[k], str) else a[k] for k in keys}
    short = {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in short.items()}
    return re.sub(r"[^\w.,+-]", "", "-".join(f"{k.replace('_', '-')}{v}" for k, v in short.items()))


def free(stem: str) -> str:
    """stem, or stem-2, stem-3...: the first folder that holds no run's files."""
    names = itertools.chain([stem], (f"{stem}-{i}" for i in itertools.count(2)))
    return next(n for n in names if not runlog.held(n) and not os.path.isfile(n))


def command(argv: list[str]) -> str:
    return "python train.py " + shlex.join(argv)


def reads(loss: str, emr: float) -> tuple[str, ...]:
    """The objective flags a run of `loss` reads: its own, --emr, and EMR's with --emr > 0."""
    return READS.get(loss, ()) + ("emr",) + ("emr_temp", "emr_decay") * bool(emr)


def readers(k: str) -> str:
    by = [loss for loss, ks in READS.items() if k in ks]  # none: one of EMR's
    return "read by " + ", ".join(by) if by else "read with --emr > 0"


def label(a: dict) -> str:
    """A run's objective as a name: --loss, then every flag it reads that differs from its default for the run (None
    is the default), e.g. sovr, sovr-r0.2, trades-b1-emr3, then the norm but L-inf (-l2), -ema for weight averaging
    and -aux for generated data; so that runs of different objectives never share a name."""
    d = vars(fill(argparse.Namespace(**{**DEFAULTS, "loss": a["loss"], "epochs": a["epochs"]})))
    ema = "" if a.get("ema") is None else "-ema" + (f"{a['ema']:g}" if a["ema"] != EMA_DECAY else "")
    aux = "" if not a.get("aux_data") else "-aux"
    aux += f"{a['aux_fraction']:g}" if aux and a.get("aux_fraction") not in (None, AUX_FRACTION) else ""
    tags = [f"-{TAGS[k]}{a[k]:g}" for k in reads(a["loss"], a.get("emr")) if a.get(k) not in (None, d[k])]
    norm = "" if a.get("norm", "Linf") == "Linf" else "-" + a["norm"].lower()  # a run older than --norm: L-inf
    return a["loss"] + "".join(tags) + norm + ema + aux


DEFAULTS = {dest(row): row[1] for row in TRAIN if not isinstance(row, str)}
KINDS = {dest(row): row[4].get("action") for row in TRAIN if not isinstance(row, str)}
