"""AutoAttack, run and named. The package (pyautoattack, or upstream `autoattack`) run one attack at a time on the
points still robust, resumably, for attack.py's evaluation and masking.py's sweep alike, with what its own checks say
captured and printed once each; and what names a result: the attacks that made a robust accuracy (attack_name, the
one place that decides whether it is called AutoAttack), its label in tables and pictures, the model a state_dict
was taken as, its RobustBench model card, and the versions it ran under."""

import contextlib
import importlib
import json
import logging
import os
import platform
import re
import time
import warnings
from importlib import metadata

import torch

import cli
import models


def make_autoattack(model, eps: float, norm: str, args):
    """The package's own AutoAttack under `norm` (the evaluation's settings'): pyautoattack (requirements.txt) or
    upstream `autoattack` if installed."""
    try:
        from pyautoattack import AutoAttack

        aa = AutoAttack(model, eps=eps, norm=norm, version=args.version, device=args.device, seed=args.seed)
        aa.verbose = args.verbose
        return aa, lambda x, y: aa.run_standard_evaluation(x, y, batch_size=args.bs)
    except ImportError:
        try:
            from autoattack import AutoAttack
        except ImportError:
            raise ValueError("AutoAttack is not installed: pip install pyautoattack==0.2.0") from None
        aa = AutoAttack(model, norm, eps, args.seed, verbose=args.verbose, version=args.version, device=args.device)
        return aa, lambda x, y: aa.run_standard_evaluation(x, y, bs=args.bs, return_labels=True)


def saved(state_path: str, settings: dict) -> dict | None:
    """The progress an interrupted evaluation of the same settings saved, if any; ValueError for another's."""
    if not os.path.exists(state_path):
        return None
    with open(state_path) as f:
        st = json.load(f)
    if st.get("settings") != settings:
        raise ValueError(
            f"{state_path} holds the progress of an evaluation with other settings than this one; "
            "finish that one with its own flags, or delete the file"
        )
    return st


def autoattack(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    clean: torch.Tensor,
    eps: float,
    args,
    state_path: str,
    settings: dict,
    said: list[str] | None = None,
) -> tuple[torch.Tensor, dict, float, list[str]]:
    """Per-point robust flags, how many points stay robust after each attack, the seconds of the parts of a resumed
    run before this one, and what the package's checks said (printed unless in `said`): the version's attacks (or
    --attacks) in order, each on the points still robust, in batches of --bs as the package batches them (it
    reseeds every batch: in one process the flags equal one direct call's); saved after each attack, for a rerun."""
    t0, (aa, run) = time.time(), make_autoattack(model, eps, settings["norm"], args)
    st = saved(state_path, settings) or dict(robust=clean.tolist(), after={})
    robust, after, earlier = torch.tensor(st["robust"], dtype=torch.bool), st["after"], st.get("time_s", 0.0)
    found = st.get("checks", [])  # what the package's checks said before a resume
    if after:
        print(f"resuming from {state_path}: {', '.join(after)} already run", flush=True)
        tell(found, args.rank, said)
    for name in [a for a in (args.attacks.split(",") if args.attacks else list(aa.attacks_to_run)) if a not in after]:
        idx = robust.nonzero().flatten()
        aa.attacks_to_run = [name]  # keeps the version's settings for that attack
        with caught(found, args.rank, said), cli.progress(len(idx), name, "pt", args.rank) as bar:
            for k in range(0, len(idx), args.bs):
                part = idx[k : k + args.bs]
                robust[part] = run(x[part], y[part])[1].cpu() == y[part]
                bar.update(len(part))
                bar.set_postfix_str(f"robust so far {robust.float().mean():.2%}")
        after[name] = int(robust.sum())
        if args.rank == 0:
            shard = f" on this process's {len(robust)} points" * (args.world > 1)
            print(f"after {name}: robust accuracy {robust.float().mean():.2%}{shard}", flush=True)
        st = dict(
            settings=settings, robust=robust.tolist(), after=after, checks=found, time_s=earlier + time.time() - t0
        )
        models.write_json(st, state_path)
    return robust, after, earlier, found


def package_checks():
    """The AutoAttack package's checks module (make_autoattack's package)."""
    try:
        from pyautoattack import checks
    except ImportError:
        from autoattack import checks
    return checks


def add(found: list[str], message: str) -> None:
    """`message` appended unless `found` holds it already, whatever numbers it holds: the package runs its checks at
    every call, one batch of one attack, so a check says the same at every batch (the zero-gradient count is a
    batch's): each is kept once, as first said."""
    if all(_key(m) != _key(message) for m in found):
        found.append(message)


def _key(message: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "#", message)


def tell(messages: list[str], rank: int, said: list[str] | None = None) -> None:
    """Prints (rank 0) each of `messages` that is not in `said` (as add() tells them apart), then adds it there."""
    said = [] if said is None else said
    for m in messages:
        known = len(said)
        add(said, m)
        if len(said) > known and rank == 0:
            print(f"AutoAttack's check: {m}", flush=True)


@contextlib.contextmanager
def caught(found: list[str], rank: int = 0, said: list[str] | None = None):
    """The messages of the package's checks (its checks.py) raised inside, added to `found` (add) and printed, the
    new ones (tell), on leaving. pyautoattack logs them to its logger, at each call: taken there, they are printed once
    here instead; a check called without a logger warns (warnings.warn): taken too. Every other log line and warning
    passes as before. (Upstream autoattack's run_standard_evaluation prints its checks' messages itself.)"""
    before, shown = len(found), warnings.showwarning

    def logged(record: logging.LogRecord) -> bool:
        if os.path.basename(record.pathname) != "checks.py":
            return True
        add(found, record.getMessage())
        return False  # printed once, on leaving, not at every call of the package

    def warned(message, category, filename, lineno, file=None, line=None) -> None:
        if os.path.basename(filename) == "checks.py":
            add(found, str(message))
        else:
            shown(message, category, filename, lineno, file, line)

    log = logging.getLogger("auto-attack")
    with warnings.catch_warnings():
        warnings.filterwarnings("always", module=r"(py)?autoattack\.checks")  # every time, not once per place
        warnings.showwarning = warned
        log.addFilter(logged)
        try:
            yield found
        finally:
            log.removeFilter(logged)
    tell(found[before:], rank, said)


def gathered(robust: torch.Tensor, after: dict[str, int], n: int) -> tuple[list[int], dict[str, float]]:
    """Every process's robust flags, and the share of all n points robust after each attack."""
    return cli.gather(robust.int().tolist()), {k: sum(cli.gather([v])) / n for k, v in after.items()}


# The package's attack set of each version (pyautoattack 0.2.0's and upstream's _set_version): a figure is called
# AutoAttack only when its version's full set ran
VERSION_ATTACKS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
NAMES = {"apgd-ce": "APGD-CE", "apgd-dlr": "APGD-DLR", "apgd-t": "APGD-T", "fab": "FAB", "fab-t": "FAB-T"}


def attack_name(s: dict) -> str:
    """What made a robust accuracy, from its settings: `AutoAttack` only when the version's full attack set ran
    (--version alone, or --attacks naming all of them), else the attacks that ran, e.g. `APGD-CE+APGD-T`. The one
    place that decides it: the summary line, the model card, compare.py's table and figure, late.py and study.py."""
    ran, version = s["mode"].split("+"), s.get("version", "standard")
    if s["mode"] == version or set(ran) == set(VERSION_ATTACKS.get(version, ())):
        return "AutoAttack"
    return "+".join(NAMES.get(a, a.capitalize()) for a in ran)


def attack_label(s: dict, unit: str = "", threat: bool = False) -> str:
    """attack_name with what else its figure depends on: the points, the version (a subset runs with its settings)
    and, with `threat`, the norm and radius; e.g. `APGD-CE % (n=20, standard's settings)` or `AutoAttack %
    (standard, n=10000)`."""
    name, version = attack_name(s), s.get("version", "standard")
    how = [f"{s.get('norm')} {s.get('eps')}"] * (threat and "norm" in s) + [f"n={s['n']}"]
    how = [version, *how] if name == "AutoAttack" else [*how, f"{version}'s settings"]
    return f"{name}{unit} ({', '.join(how)})"


def model_card(ckpt: dict, model, res: dict, eps: float, args) -> dict:
    """What a RobustBench model card asks for, so that a result is reported without retyping."""
    s = res["settings"]
    return dict(
        standard_autoattack_full_test_set=args.version == "standard" and not args.attacks and not args.n,
        dataset=s["dataset"],
        threat_model=s["norm"],
        eps=eps,
        eps_str=s["eps"],
        clean_acc=res["clean_acc"],
        robust_acc=res["robust_acc"],
        autoattack_acc=res["robust_acc"] if attack_name(s) == "AutoAttack" else None,  # not a subset's figure
        attacks=attack_label(s),
        n_points=s["n"],
        architecture=ckpt["arch"] + (f" width {ckpt['width']}" if ckpt.get("width") else ""),
        params=sum(p.numel() for p in model.parameters()),
        training_loss=s["objective"],
        # a state_dict has none; models.read gives every train.py checkpoint its norm (L-inf before --norm)
        eps_training=None if ckpt["eps"] is None else f"{ckpt['norm']} {ckpt['eps']}/255",
    )


def label_of(s: dict) -> str:
    """A result's label in a picture: its objective, run folder and file."""
    name = s.get("objective") or s["loss"] or s.get("assumed", {}).get("arch")  # a state_dict's: its arch
    return f"{name} ({os.path.join(*s['checkpoint'].split(os.sep)[-2:])})"


def assumed(s: dict) -> str:
    """What the result line says of a state_dict's model: the arch, width, classes and normalization taken for it."""
    if not (a := s.get("assumed")):
        return ""
    return (
        f" (a state_dict taken as {a['arch']} width {a['width']} with {a['num_classes']} classes, normalization "
        f"{a['normalization']}, test set {s['dataset']})"
    )


def versions() -> dict:
    """Python's, torch's and the AutoAttack package's versions (each of pyautoattack and upstream autoattack found)."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("pyautoattack", "autoattack"):
        version = package_version(pkg)
        if version:
            found[pkg] = version
    return found


def package_version(pkg: str) -> str | None:
    """The version of the package this process imports: its __version__, else its installed metadata, else
    "unknown (<its folder>)" (a copy of its files on PYTHONPATH has no metadata); None where it is absent."""
    try:
        module = importlib.import_module(pkg)
    except ImportError:
        module = None
    if getattr(module, "__version__", None):
        return str(module.__version__)
    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version(pkg)
    if module is None:
        return None
    where = [*getattr(module, "__path__", []), getattr(module, "__file__", None)]  # a package's folder, or its file
    return f"unknown ({where[0]})"
