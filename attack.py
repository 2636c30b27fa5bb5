"""AutoAttack evaluation of a train.py checkpoint, and the logit-margin diagnostic.

    python attack.py runs/cifar10-resnet18-sovr-s0/best.pt          # standard AA, the training eps, full test set
    python attack.py best.pt --points 200 --attacks apgd-ce         # quick check with a subset of attacks
    python attack.py ce/best.pt mail/best.pt sovr/best.pt --margins --plot m.png   # margin histograms, PGD-20
    python attack.py ce/best.pt sovr/best.pt --sweep --points 1000 --plot sweep.png # is the robustness real?
    python attack.py other.pt --arch wrn34 --eps 8      # a state_dict of models.py's WRN-34-10, on [0, 1] images

Results go to <checkpoint>.<settings>.json beside each checkpoint (or in --out DIR). AutoAttack runs in fp32 (with
TF32 convolutions on Ampere and later GPUs, PyTorch's default; the JSON records which), in eval mode, one attack
after another on the points still robust (as the package does internally), and records each finished attack with
its settings, so an interrupted run continues where it stopped; a finished one is not run again, its result is
printed. Every checkpoint, its test points and its files are checked before the first attack; each model is on
the device only while it is evaluated. A state_dict that train.py did not write names no arch, normalization, eps
or dataset: --arch (--width) and --eps say them, --normalize if it expects normalized inputs, --dataset if not the
CIFAR set of its class count; the result line and the JSON's settings ("assumed") say what was taken. The package's own
checks (a randomized or dynamic model, softmax outputs, zero gradients, the class count, and Square beating the
white-box attacks, a sign of gradient masking) are printed once each and kept in the JSON's `checks`. --sweep: APGD-CE
then APGD-T at 1, 2, 4 and 8 times the radius (8, 16, 32, 64/255 by default) and PGD-20 against PGD-100 at the radius,
on the same points, with one line per checkpoint saying whether the accuracy falls to 0 and more steps never help.
"""

import argparse
import contextlib
import copy
import glob
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
import torch.distributed as dist

import cli
import flags
import losses
import models
import runlog
from data import load_data

# --sweep: the radius (--eps, else the training eps) times these, each attacked by the package's APGD-CE then APGD-T
# (standard AutoAttack's first two attacks, the strong white-box part); an L-inf ball of 64/255 holds images of every
# class, so a sound defence keeps next to no point there: more than SWEEP_FLOOR left at the largest radius fails
SWEEP_SCALES, SWEEP_ATTACKS, SWEEP_FLOOR = (1, 2, 4, 8), "apgd-ce,apgd-t", 0.01


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    return flags.attack_args(argv, __doc__)  # the flags, their defaults and refusals: flags.ATTACK


def checkpoint(path: str, args) -> dict:
    """path's checkpoint: train.py's, or with --arch a state_dict's as models.read_state_dict takes it (with what was
    assumed); ValueError for a file that is neither, and for --arch and its flags given with a train.py one."""
    if args.arch is None:
        return models.read(path, plain="for a state_dict, give --arch and --eps")
    given = ", ".join(f"--{k}" for k in ("arch", "width", "normalize") if getattr(args, k) is not None)
    return models.read_state_dict(path, args.arch, args.width, flags.normalization(args.normalize), given)


def test_points(ckpt: dict, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The first --n test points of --dataset, else of the checkpoint's dataset; ValueError for a set of another class
    count, and for another set than a train.py checkpoint's own (but an .npz): it was trained on that one."""
    name, plain = args.dataset or ckpt["dataset"], "assumed" in ckpt  # a state_dict's: no set of its own
    if name is None:
        raise ValueError(f"the weights have {ckpt['num_classes']} classes, neither CIFAR's 10 nor 100: give --dataset")
    npz = name.endswith(".npz") or str(ckpt["dataset"]).endswith(".npz")  # e.g. the offline CIFAR-10 subset
    try:
        data = load_data(name, args.data_dir) if plain or name == ckpt["dataset"] or npz else None
    except ValueError as e:
        raise ValueError(f"{e} (the checkpoint's dataset: point --dataset at it)" if not args.dataset else e) from None
    if plain and data["num_classes"] != ckpt["num_classes"]:
        raise ValueError(f"--dataset {name} has {data['num_classes']} classes, the weights {ckpt['num_classes']}")
    if data is None or data["num_classes"] != ckpt["num_classes"]:
        raise ValueError(f"the checkpoint was trained on {ckpt['dataset']} ({ckpt['num_classes']} classes), not {name}")
    n = args.n or len(data["y_test"])
    if n > len(data["y_test"]):
        raise ValueError(f"--n {n} is larger than the {len(data['y_test'])} test points of {name}")
    return data["x_test"][:n].float() / 255, data["y_test"][:n]


def predict(model, x: torch.Tensor, bs: int, device: str) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[k : k + bs].to(device)).argmax(1).cpu() for k in range(0, len(x), bs)])


def make_autoattack(model, eps: float, args, norm: str = "Linf"):
    """The package's own AutoAttack under `norm`: pyautoattack (requirements.txt) or upstream `autoattack` if
    installed."""
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
    t0, (aa, run) = time.time(), make_autoattack(model, eps, args, settings["norm"])
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


def checks_of(found: list[str], clean_acc: float, after: dict[str, float], args) -> list[str]:
    """The checks' messages of every process's attacks, once each, and the package's Square check on the whole
    evaluation's robust accuracy after each attack (its check_square_sr, applied by run_standard_evaluation to one
    call's {clean, each attack}: attack.py calls it one attack at a time, so it sees them together only here). What
    this process has not printed yet is printed."""
    every = list(found)
    with caught(every, args.rank):
        for m in cli.gather(found):  # the other processes' messages
            add(every, m)
        package_checks().check_square_sr({"clean": clean_acc, **after})
    return every


def result_path(
    checkpoint: str,
    mode: str,
    norm: str,
    eps_int: float,
    n: int,
    seed: int,
    bs: int = 500,
    dataset: str | None = None,
    version: str = "standard",
    processes: int = 1,
    device: str = "cpu",
) -> str:
    """Where evaluate() writes its JSON, named by every setting that can change a per-point result (the device by
    its rounding); those at their defaults stay out of the name (results/study.py and late.py look results up by it)."""
    extra = [
        f"-{version}" * (version not in ("standard", mode)),
        f"-bs{bs}" * (bs != 500),
        f"-{os.path.splitext(os.path.basename(dataset))[0]}" if dataset else "",
        f"-p{processes}" * (processes > 1),
        f"-{device}" * (device != "cpu"),
    ]
    return f"{os.path.splitext(checkpoint)[0]}.{mode}-{norm}-eps{eps_int}-n{n}-seed{seed}{''.join(extra)}.json"


def settings_of(path: str, ckpt: dict, n: int, eps: float, args, norm: str = "Linf") -> dict:
    """Every setting of an evaluation that can change its per-point result (`norm`: its threat model, flags.threat
    resolves it per checkpoint), and the training objective's name."""
    trained = ckpt.get("args", {})
    return dict(
        checkpoint=os.path.abspath(path),
        loss=trained.get("loss"),
        objective=flags.label(trained) if "epochs" in trained else trained.get("loss"),
        dataset=args.dataset or ckpt["dataset"],
        n=n,
        eps=f"{eps}/255",
        norm=norm,
        mode="margins" if args.margins else "sweep" if args.sweep else (args.attacks or args.version).replace(",", "+"),
        version=args.version,
        bs=args.bs,
        seed=args.seed,
        processes=args.world,
        device=torch.device(args.device).type,
        precision=losses.precision(args.device),
        **({"assumed": ckpt["assumed"]} if "assumed" in ckpt else {}),  # a state_dict's model: what was taken
    )


def prepare(path: str, args) -> dict:
    """What one evaluation needs, checked before any attack: the checkpoint (its weights fit the model it names),
    this process's share of its test points, its settings, its files, and its result if this evaluation is finished
    ("done"); ValueError for anything wrong with them. It keeps no weights: evaluate() reads them again and builds
    the model, one model at a time."""
    ckpt = checkpoint(path, args)
    models.fits(ckpt, path)
    x, y = test_points(ckpt, args)
    norm, eps_int = flags.threat(ckpt, args, path)  # --norm and --eps, else the checkpoint's
    eps_int = int(eps_int) if float(eps_int).is_integer() else eps_int
    s = settings_of(path, ckpt, len(y), eps_int, args, norm)
    if len(y) < args.world:
        raise ValueError(f"{len(y)} points for {args.world} processes: every process needs at least one")
    mine = slice(len(y) * args.rank // args.world, len(y) * (args.rank + 1) // args.world)  # contiguous shards
    other = args.dataset if args.dataset and args.dataset != ckpt["dataset"] else None
    where = os.path.join(args.out, os.path.basename(path)) if args.out else path
    out = result_path(
        where, s["mode"], norm, eps_int, s["n"], args.seed, args.bs, other, args.version, args.world, s["device"]
    )
    state = out + ".state" + (f".rank{args.rank}-of-{args.world}" if args.world > 1 else "")
    about = {k: v for k, v in ckpt.items() if k not in ("model", "unaveraged", "optimizer")}
    e = dict(ckpt=about, stamp=stamp(path), x=x[mine], y=y[mine], eps=eps_int / 255, settings=s, out=out, state=state)
    return {**e, "done": cli.agreed(finished(e, args))}  # rank 0's read: whether every process enters the gathers


def stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def model_of(path: str, e: dict, args):
    """e's model on the device, from path read again (prepare kept no weights); ValueError if the file is not the
    one prepare checked."""
    if stamp(path) != e["stamp"]:
        raise ValueError(f"{path} changed after it was checked: rerun to evaluate it as it is now")
    return models.from_checkpoint(checkpoint(path, args), args.device, path)


def finished(e: dict, args) -> dict | None:
    """The result in e's result file, if this evaluation is finished; else None once its result and state can be
    written. ValueError for another evaluation's result or state there."""
    if os.path.exists(e["out"]):
        with open(e["out"]) as f:
            res = json.load(f)
        # beside its checkpoint, a result is that checkpoint's wherever the folder has moved; in --out, it may not be
        differ = [k for k, v in e["settings"].items() if res.get("settings", {}).get(k) != v]
        differ = [k for k in differ if k != "checkpoint" or args.out]
        if differ:
            raise ValueError(f"{e['out']} holds the result of other settings ({', '.join(differ)}): move it away")
        return res
    writable(os.path.dirname(e["out"]) or ".", "results", "--out")
    saved(e["state"], e["settings"])
    return None


def writable(folder: str, what: str, flag: str) -> None:
    """ValueError unless this process can write files in `folder`, or make it: checked before the attacks."""
    up = os.path.abspath(folder)
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up) or not os.access(up, os.W_OK | os.X_OK):
        it, why = "it" if up == os.path.abspath(folder) else up, "read-only" if os.path.isdir(up) else "not a folder"
        raise ValueError(f"cannot write {what} in {folder}: {it} is {why} (choose another {flag})")


def evaluate(path: str, e: dict, args) -> dict:
    """e's evaluation (prepare's): AutoAttack or --margins, its result written and printed; its model is on the
    device only meanwhile."""
    model, x, y, s, eps = model_of(path, e, args), e["x"], e["y"], e["settings"], e["eps"]
    t0, clean, res = time.time(), predict(model, x, args.bs, args.device) == y, dict(settings=s, versions=versions())
    earlier, every = 0.0, cli.gather(clean.int().tolist())  # every process's clean flags
    clean_acc = sum(every) / s["n"]
    if args.margins:
        torch.manual_seed(args.seed)  # PGD's random starts
        m = torch.tensor(cli.gather(losses.pgd_margins(model, x, y, eps, args.bs, s["norm"]).tolist()))
        small = m.sort().values[: max(1, round(0.3 * len(m)))]
        res.update(margins=m.tolist(), mean_margin=m.mean().item(), mean_margin_smallest30=small.mean().item())
    elif args.sweep:
        figures, earlier, found = sweep(model, x, y, clean, e, args)
        res.update(figures, checks=checks_of(found, clean_acc, {}, args))
    else:
        robust, after, earlier, found = autoattack(model, x, y, clean, eps, args, e["state"], s)
        robust, after = gathered(robust, after, s["n"])
        res.update(robust_acc=sum(robust) / s["n"], robust=robust, robust_after=after)
        res["checks"] = checks_of(found, clean_acc, after, args)
    res.update(clean_acc=clean_acc, clean=every, time_s=earlier + time.time() - t0)
    if not (args.margins or args.sweep):
        res["robustbench"] = model_card(e["ckpt"], model, res, eps, args)
    if args.rank == 0:
        models.write_json(res, e["out"])
        print(f"{line(path, res)}\nwrote {e['out']}")
    if dist.is_initialized():
        dist.barrier()  # the result is written: every shard's state can go
    for state in glob.glob(glob.escape(e["state"]) + "*"):  # --sweep's radii each have one of their own
        os.remove(state)
    return res


def gathered(robust: torch.Tensor, after: dict[str, int], n: int) -> tuple[list[int], dict[str, float]]:
    """Every process's robust flags, and the share of all n points robust after each attack."""
    return cli.gather(robust.int().tolist()), {k: sum(cli.gather([v])) / n for k, v in after.items()}


def sweep(model, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, e: dict, args) -> tuple[dict, float, list]:
    """--sweep's figures, the seconds of the parts of a resumed run before this one, and what the package's checks
    said (once each, over every radius): APGD-CE then APGD-T through
    autoattack() (the package's attacks, each radius resumable from a state file of its own) at each SWEEP_SCALES
    multiple of the radius, then PGD-20 and PGD-100 at the radius (L-inf) on the same points; the verdict."""
    run, n, found, earlier = copy.copy(args), e["settings"]["n"], [], 0.0  # found: every radius's, printed once
    run.attacks = SWEEP_ATTACKS
    acc, after, robust = {}, {}, {}
    for k in SWEEP_SCALES:
        r = f"{round(e['eps'] * 255 * k, 4):g}/255"
        if args.rank == 0:
            print(f"sweep: {SWEEP_ATTACKS.replace(',', ' then ')} at {r}", flush=True)
        settings = {**e["settings"], "eps": r, "mode": SWEEP_ATTACKS.replace(",", "+")}
        state = f"{e['state']}.eps{k}"
        hit, left, t, _ = autoattack(model, x, y, clean, e["eps"] * k, run, state, settings, said=found)
        (robust[r], after[r]), earlier = gathered(hit, left, n), earlier + t
        acc[r] = sum(robust[r]) / n
    pgd = pgd_pair(model, x, y, e["eps"], args) if e["settings"]["norm"] == "Linf" else {}
    holds, verdict = sweep_verdict(acc, pgd)
    figures = dict(sweep=dict(radii=list(acc), attacks=SWEEP_ATTACKS, robust_acc=acc, robust_after=after, **pgd))
    figures.update(sweep_robust=robust, sweep_holds=holds, sweep_verdict=verdict)
    return figures, earlier, found


def pgd_pair(model, x: torch.Tensor, y: torch.Tensor, eps: float, args) -> dict:
    """PGD-20 and PGD-100 accuracy (losses.worst_of: the clean image counts too) at `eps`, step eps/4 (as
    --margins' PGD-20), from the same random starts (seeded from --seed): they differ only in the 80 more steps."""
    out = {}
    for steps in (20, 100):
        torch.manual_seed(args.seed)
        z, z_adv = losses.pgd_logits(model, x, y, eps, eps / 4, steps, args.bs)
        robust = losses.worst_of(z.cpu(), z_adv.cpu(), y.cpu())[0]
        out[f"pgd{steps}"] = sum(cli.gather(robust.int().tolist())) / sum(cli.gather([len(y)]))
    return dict(**out, pgd_step=f"{round(eps * 255 / 4, 4):g}/255")


def sweep_verdict(acc: dict[str, float], pgd: dict) -> tuple[bool, str]:
    """Whether the sweep holds, in one line: the accuracy never rises with the radius and is at most SWEEP_FLOOR at
    the largest, and PGD-100's is at most PGD-20's (L-inf only: losses.pgd is L-inf PGD)."""
    radii, why = list(acc), []
    rises = [(a, b) for a, b in zip(radii, radii[1:]) if acc[b] > acc[a]]
    why += [f"acc rises from {acc[a]:.1%} at {a} to {acc[b]:.1%} at {b}" for a, b in rises]
    last = radii[-1]
    if acc[last] > SWEEP_FLOOR:
        why.append(f"acc stays at {acc[last]:.1%} at {last} (more than {SWEEP_FLOOR:.0%})")
    if pgd and pgd["pgd100"] > pgd["pgd20"]:
        why.append(f"PGD-100 {pgd['pgd100']:.1%} > PGD-20 {pgd['pgd20']:.1%} by {pgd['pgd100'] - pgd['pgd20']:.1%}")
    if why:
        return False, f"sweep: fails ({'; '.join(why)})"
    steps = f"PGD-100 {pgd['pgd100']:.1%} <= PGD-20 {pgd['pgd20']:.1%}" if pgd else "no PGD pair under L2"
    return True, f"sweep: holds (acc falls to {acc[last]:.1%} at {last}; {steps})"


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


def line(path: str, res: dict) -> str:
    """What a run prints of its result, and a rerun of a finished one."""
    s, on = res["settings"], f" on {res['settings']['processes']} processes" * (res["settings"]["processes"] > 1)
    if s["mode"] == "margins":
        what = f"mean margin {res['mean_margin']:.3f}, mean of the 30% smallest {res['mean_margin_smallest30']:.3f}"
    elif s["mode"] == "sweep":
        what = f"{s['norm']}, n={s['n']}, {res['sweep_verdict']}"
    else:
        what = f"{attack_label(s, threat=True)} {res['robust_acc']:.2%}"
    k = len(res.get("checks", []))
    warned = f", {k} warning{'s' * (k > 1)} of AutoAttack's checks (the JSON's checks)" * (k > 0)
    return f"{path}{assumed(s)}: clean {res['clean_acc']:.2%}, {what}{warned}, {res['time_s']:.0f}s{on}"


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
        eps_training=None if ckpt["eps"] is None else f"{ckpt['eps']}/255",  # a state_dict has none
    )


def figure(flag: str, what: str):
    """A new figure and axes for `flag`'s picture; ValueError without matplotlib (`what` is in the JSON files)."""
    plt = cli.pyplot()
    if plt is None:
        raise ValueError(f"{flag} draws with matplotlib: pip install matplotlib (the {what} are in the JSON files)")
    return plt.subplots(figsize=(6, 3.5))


def label_of(s: dict) -> str:
    """A result's label in a picture: its objective, run folder and file."""
    name = s.get("objective") or s["loss"] or s.get("assumed", {}).get("arch")  # a state_dict's: its arch
    return f"{name} ({os.path.join(*s['checkpoint'].split(os.sep)[-2:])})"


def save(fig, ax, path: str):
    ax.legend(fontsize=8)
    fig.tight_layout()
    runlog.png(fig, path, dpi=120)
    print(f"wrote {path}")
    return fig


def plot(results: list[dict], path: str):
    """The margin histograms of `results` in one picture."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = figure("--margins", "margins")
    lo, hi = min(min(r["margins"]) for r in results), max(max(r["margins"]) for r in results)
    for r in results:
        ax.hist(r["margins"], bins=60, range=(lo, hi), histtype="step", linewidth=1.5, label=label_of(r["settings"]))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of points
    ax.axvline(0, color="gray", linewidth=0.8)
    ax.set(xlabel="logit margin $z_y - \\max_{k \\neq y} z_k$, the lower of clean and PGD-20", ylabel="test points")
    return save(fig, ax, path)


def plot_sweep(results: list[dict], path: str):
    """--sweep's accuracy against the radius, one line per checkpoint."""
    fig, ax = figure("--sweep", "figures")
    ticks = {}
    for r in results:  # at each checkpoint's own radii (its training eps, or --eps, times SWEEP_SCALES)
        s, sw = r["settings"], r["sweep"]
        at = {float(k.split("/")[0]): k for k in sw["radii"]}
        ax.plot(list(at), [100 * v for v in sw["robust_acc"].values()], marker="o", label=label_of(s))
        ticks |= at
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks), list(ticks.values()))
    ax.minorticks_off()
    what = sw["attacks"].upper().replace(",", " + ")
    ax.set(xlabel=f"{s['norm']} radius", ylabel=f"accuracy under {what}, %", ylim=(0, None))
    return save(fig, ax, path)


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("auto-attack").setLevel(logging.DEBUG if args.verbose else logging.WARNING)

    def job() -> None:
        # cuDNN's fixed kernels: per-point repeatable
        device, args.rank, args.world = cli.setup(args.device, benchmark=False)
        args.device = str(device)
        todo = [prepare(p, args) for p in args.checkpoints]  # all of them before any attack
        outs = [e["out"] for e in todo]
        for out in outs:
            if outs.count(out) > 1:
                same = [p for p, o in zip(args.checkpoints, outs) if o == out]
                raise ValueError(f"{' and '.join(same)} would both write {out}: evaluate them with different --out")
        png = f"{'sweep' if args.sweep else 'margins'}.png"
        png = args.plot or os.path.join(args.out or os.path.dirname(args.checkpoints[0]) or ".", png)
        if args.margins or args.sweep:
            writable(os.path.dirname(png) or ".", "the plot", "--plot")
        os.makedirs(args.out or ".", exist_ok=True)
        results = []
        for p, e in zip(args.checkpoints, todo):
            if e["done"] and args.rank == 0:
                print(f"{e['out']} is finished (move it away to evaluate again)\n{line(p, e['done'])}")
            results.append(e["done"] or evaluate(p, e, args))
        if args.margins and args.rank == 0:
            plot(results, png)
        if args.sweep and args.rank == 0:
            plot_sweep(results, png)

    cli.run(
        "attack.py",
        job,
        f"at --bs {args.bs}: lower --bs (a new evaluation: the attacks finished so far are "
        "kept for a rerun with the same --bs)",
        "the attacks finished so far are kept (a .state file beside the result): rerun the same command to continue",
    )


if __name__ == "__main__":
    main()
