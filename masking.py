"""The gradient-masking diagnostics of attack.py: --sweep (APGD-CE then APGD-T at growing radii, PGD-20 against
PGD-100, its verdict in one line and its picture), and the checks of the AutoAttack package over a whole evaluation
(every process's messages, and its Square check on the robust accuracy after each attack). Under a sound defence the
accuracy falls to 0 as the radius grows and PGD-100 leaves no more points robust than PGD-20; a model that masks its
gradients shows otherwise."""

import copy

import torch

import aa_run
import cli
import losses

# --sweep: the radius (--eps, else the training eps) times these, each attacked by the package's APGD-CE then APGD-T
# (standard AutoAttack's first two attacks, the strong white-box part); an L-inf ball of 64/255 holds images of every
# class, so a sound defence keeps next to no point there: more than SWEEP_FLOOR left at the largest radius fails
SWEEP_SCALES, SWEEP_ATTACKS, SWEEP_FLOOR = (1, 2, 4, 8), "apgd-ce,apgd-t", 0.01


def sweep(
    model, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, clean_acc: float, e: dict, args
) -> tuple[dict, float]:
    """--sweep's figures with what the package's checks said (`checks`: once each, over every radius), and the
    seconds of the parts of a resumed run before this one: APGD-CE then APGD-T through aa_run.autoattack (the
    package's attacks, each radius resumable from a state file of its own) at each SWEEP_SCALES multiple of the
    radius, then PGD-20 and PGD-100 at the radius, in the evaluation's norm, on the same points; the verdict."""
    run, n, found, earlier = copy.copy(args), e["settings"]["n"], [], 0.0  # found: every radius's, printed once
    run.attacks = SWEEP_ATTACKS
    acc, after, robust = {}, {}, {}
    for k in SWEEP_SCALES:
        r = f"{round(e['eps'] * 255 * k, 4):g}/255"
        if args.rank == 0:
            print(f"sweep: {SWEEP_ATTACKS.replace(',', ' then ')} at {r}", flush=True)
        settings = {**e["settings"], "eps": r, "mode": SWEEP_ATTACKS.replace(",", "+")}
        state = f"{e['state']}.eps{k}"
        hit, left, t, _ = aa_run.autoattack(model, x, y, clean, e["eps"] * k, run, state, settings, said=found)
        (robust[r], after[r]), earlier = aa_run.gathered(hit, left, n), earlier + t
        acc[r] = sum(robust[r]) / n
    pgd = pgd_pair(model, x, y, e["eps"], e["settings"]["norm"], args)
    holds, verdict = sweep_verdict(acc, pgd)
    figures = dict(sweep=dict(radii=list(acc), attacks=SWEEP_ATTACKS, robust_acc=acc, robust_after=after, **pgd))
    figures.update(sweep_robust=robust, sweep_holds=holds, sweep_verdict=verdict)
    return {**figures, "checks": checks(found, clean_acc, {}, args)}, earlier


def pgd_pair(model, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, args) -> dict:
    """PGD-20 and PGD-100 accuracy (losses.worst_of: the clean image counts too) in the `norm` ball of `eps`, step
    eps/4 (as --margins' PGD-20), from the same random starts (seeded from --seed): they differ only in the 80 more
    steps."""
    out = {}
    for steps in (20, 100):
        torch.manual_seed(args.seed)
        z, z_adv = losses.pgd_logits(model, x, y, eps, eps / 4, steps, args.bs, norm=norm)
        robust = losses.worst_of(z.cpu(), z_adv.cpu(), y.cpu())[0]
        out[f"pgd{steps}"] = sum(cli.gather(robust.int().tolist())) / sum(cli.gather([len(y)]))
    return dict(**out, pgd_step=f"{round(eps * 255 / 4, 4):g}/255")


def sweep_verdict(acc: dict[str, float], pgd: dict) -> tuple[bool, str]:
    """Whether the sweep holds, in one line: the accuracy never rises with the radius and is at most SWEEP_FLOOR at
    the largest, and PGD-100's is at most PGD-20's."""
    radii, why = list(acc), []
    rises = [(a, b) for a, b in zip(radii, radii[1:]) if acc[b] > acc[a]]
    why += [f"acc rises from {acc[a]:.1%} at {a} to {acc[b]:.1%} at {b}" for a, b in rises]
    last = radii[-1]
    if acc[last] > SWEEP_FLOOR:
        why.append(f"acc stays at {acc[last]:.1%} at {last} (more than {SWEEP_FLOOR:.0%})")
    if pgd["pgd100"] > pgd["pgd20"]:
        why.append(f"PGD-100 {pgd['pgd100']:.1%} > PGD-20 {pgd['pgd20']:.1%} by {pgd['pgd100'] - pgd['pgd20']:.1%}")
    if why:
        return False, f"sweep: fails ({'; '.join(why)})"
    steps = f"PGD-100 {pgd['pgd100']:.1%} <= PGD-20 {pgd['pgd20']:.1%}"
    return True, f"sweep: holds (acc falls to {acc[last]:.1%} at {last}; {steps})"


def plot_sweep(results: list[dict], path: str):
    """--sweep's accuracy against the radius, one line per checkpoint."""
    fig, ax = cli.figure("--sweep", "figures")
    ticks = {}
    for r in results:  # at each checkpoint's own radii (its training eps, or --eps, times SWEEP_SCALES)
        s, sw = r["settings"], r["sweep"]
        at = {float(k.split("/")[0]): k for k in sw["radii"]}
        ax.plot(list(at), [100 * v for v in sw["robust_acc"].values()], marker="o", label=aa_run.label_of(s))
        ticks |= at
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks), list(ticks.values()))
    ax.minorticks_off()
    what = sw["attacks"].upper().replace(",", " + ")
    ax.set(xlabel=f"{s['norm']} radius", ylabel=f"accuracy under {what}, %", ylim=(0, None))
    return cli.save_figure(fig, ax, path)


def checks(found: list[str], clean_acc: float, after: dict[str, float], args) -> list[str]:
    """The checks' messages of every process's attacks, once each, and the package's Square check on the whole
    evaluation's robust accuracy after each attack (its check_square_sr, applied by run_standard_evaluation to one
    call's {clean, each attack}: aa_run.autoattack calls it one attack at a time, so it sees them together only
    here). What this process has not printed yet is printed."""
    every = list(found)
    with aa_run.caught(every, args.rank):
        for m in cli.gather(found):  # the other processes' messages
            aa_run.add(every, m)
        aa_run.package_checks().check_square_sr({"clean": clean_acc, **after})
    return every
