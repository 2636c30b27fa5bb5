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
import glob
import json
import logging
import os
import time

import torch
import torch.distributed as dist

import aa_run
import cli
import flags
import losses
import masking
import models
from data import load_data


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
    aa_run.saved(e["state"], e["settings"])
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
    """e's evaluation (prepare's): AutoAttack, --margins or --sweep (masking.py), its result written and printed;
    its model is on the device only meanwhile."""
    model, x, y, s, eps = model_of(path, e, args), e["x"], e["y"], e["settings"], e["eps"]
    t0, clean = time.time(), predict(model, x, args.bs, args.device) == y
    res, earlier, every = dict(settings=s, versions=aa_run.versions()), 0.0, cli.gather(clean.int().tolist())
    clean_acc = sum(every) / s["n"]  # every: every process's clean flags
    if args.margins:
        torch.manual_seed(args.seed)  # PGD's random starts
        m = torch.tensor(cli.gather(losses.pgd_margins(model, x, y, eps, args.bs, s["norm"]).tolist()))
        small = m.sort().values[: max(1, round(0.3 * len(m)))]
        res.update(margins=m.tolist(), mean_margin=m.mean().item(), mean_margin_smallest30=small.mean().item())
    elif args.sweep:
        figures, earlier = masking.sweep(model, x, y, clean, clean_acc, e, args)
        res.update(figures)
    else:
        robust, after, earlier, found = aa_run.autoattack(model, x, y, clean, eps, args, e["state"], s)
        robust, after = aa_run.gathered(robust, after, s["n"])
        res.update(robust_acc=sum(robust) / s["n"], robust=robust, robust_after=after)
        res["checks"] = masking.checks(found, clean_acc, after, args)
    res.update(clean_acc=clean_acc, clean=every, time_s=earlier + time.time() - t0)
    if not (args.margins or args.sweep):
        res["robustbench"] = aa_run.model_card(e["ckpt"], model, res, eps, args)
    if args.rank == 0:
        models.write_json(res, e["out"])
        print(f"{line(path, res)}\nwrote {e['out']}")
    if dist.is_initialized():
        dist.barrier()  # the result is written: every shard's state can go
    for state in glob.glob(glob.escape(e["state"]) + "*"):  # --sweep's radii each have one of their own
        os.remove(state)
    return res


def line(path: str, res: dict) -> str:
    """What a run prints of its result, and a rerun of a finished one."""
    s, on = res["settings"], f" on {res['settings']['processes']} processes" * (res["settings"]["processes"] > 1)
    if s["mode"] == "margins":
        what = f"mean margin {res['mean_margin']:.3f}, mean of the 30% smallest {res['mean_margin_smallest30']:.3f}"
    elif s["mode"] == "sweep":
        what = f"{s['norm']}, n={s['n']}, {res['sweep_verdict']}"
    else:
        what = f"{aa_run.attack_label(s, threat=True)} {res['robust_acc']:.2%}"
    k = len(res.get("checks", []))
    warned = f", {k} warning{'s' * (k > 1)} of AutoAttack's checks (the JSON's checks)" * (k > 0)
    return f"{path}{aa_run.assumed(s)}: clean {res['clean_acc']:.2%}, {what}{warned}, {res['time_s']:.0f}s{on}"


def plot(results: list[dict], path: str):
    """The margin histograms of `results` in one picture."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = cli.figure("--margins", "margins")
    lo, hi = min(min(r["margins"]) for r in results), max(max(r["margins"]) for r in results)
    for r in results:
        label = aa_run.label_of(r["settings"])
        ax.hist(r["margins"], bins=60, range=(lo, hi), histtype="step", linewidth=1.5, label=label)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of points
    ax.axvline(0, color="gray", linewidth=0.8)
    ax.set(xlabel="logit margin $z_y - \\max_{k \\neq y} z_k$, the lower of clean and PGD-20", ylabel="test points")
    return cli.save_figure(fig, ax, path)


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
            if len(norms := sorted({e["settings"]["norm"] for e in todo})) > 1:  # one picture has one radius axis
                raise ValueError(f"the checkpoints were trained under {' and '.join(norms)}: give --norm and --eps")
        os.makedirs(args.out or ".", exist_ok=True)
        results = []
        for p, e in zip(args.checkpoints, todo):
            if e["done"] and args.rank == 0:
                print(f"{e['out']} is finished (move it away to evaluate again)\n{line(p, e['done'])}")
            results.append(e["done"] or evaluate(p, e, args))
        if (args.margins or args.sweep) and args.rank == 0:
            (masking.plot_sweep if args.sweep else plot)(results, png)

    kept = "the attacks finished so far are kept"
    oom = f"at --bs {args.bs}: lower --bs (a new evaluation: {kept} for a rerun with the same --bs)"
    cli.run("attack.py", job, oom, f"{kept} (a .state file beside the result): rerun the same command to continue")


if __name__ == "__main__":
    main()
