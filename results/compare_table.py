"""The table and figures of a results/compare.py grid, from its finished links only: table.md (per loss, mean ±
std over seeds, each seed, and the paired difference against ce of the same seed), table.csv (one row per run),
aa.png and margins.png. A run's links are [train, AutoAttack on best.pt, APGD-CE+T on last.pt, margins, and unless
--sweep-points 0 attack.py --sweep on best.pt]."""

import contextlib
import csv
import glob
import io
import json
import math
import statistics
import sys
from pathlib import Path

import runner

import aa_run
import cli
import runlog

IMPORTANT = 0.3  # the share of points with the smallest margins, as attack.py's mean_margin_smallest30
COLS = ["clean", "pgd20", "aa", "gap", "last_minus_best", "train_imp", "train_rest", "test_imp", "test_rest"]
TIMES = ("s_epoch", "s_aa")
# as attack.py's histogram: the margins files hold losses.worst_of's margin
MARGIN = "logit margin $z_y - \\max_{k \\neq y} z_k$, the lower of clean and PGD-20"
EXTRA = ["n", "norm", "eps", "gpu", "s_epoch", "s_aa", "torch", "commit", "attacks"]  # each row's provenance
SOUND = ["sweep", "checks"]  # whether best.pt's --sweep held; what AutoAttack's own checks said in its evaluations


def result(done: str) -> dict | None:
    """A finished link's JSON (None while it has not finished)."""
    found = sorted(glob.glob(done))
    return json.loads(Path(found[0]).read_text()) if found else None


def smallest(margins: list[float]) -> list[bool]:
    """The IMPORTANT share of points with the smallest margins, at least one as attack.py counts them (ties: lower
    index first): the important points of compare.py, late.py and study.py's "margin, 30% smallest"."""
    k = max(1, round(IMPORTANT * len(margins)))
    chosen = set(sorted(range(len(margins)), key=lambda i: margins[i])[:k])
    return [i in chosen for i in range(len(margins))]


def metrics(r: dict, ce: dict | None) -> dict:
    """A run's figures from its finished links only (None where a link has not finished); ce: the same seed's ce
    run's margins, which fix the important points."""
    final = runlog.final(str(r["run"]))
    aa, last, mg, sweep = ([result(done) if final else None for done, _ in r["links"][1:]] + [None])[:4]
    recs = [x for x in runlog.records(str(r["run"])) if "epoch" in x]
    res = dict.fromkeys([*COLS, *EXTRA]) | dict(s_epoch=statistics.mean(x["time"] for x in recs) if recs else None)
    res["norm"] = r["norm"]  # train.py's, which attack.py takes from the checkpoint
    res["sweep"] = sweep["sweep_holds"] if sweep else None
    res["checks"] = list(dict.fromkeys(m for x in (aa, last, sweep) if x for m in x.get("checks", [])))
    if aa:
        s = aa["settings"]
        res |= dict(clean=aa["clean_acc"], aa=aa["robust_acc"], n=s["n"], eps=s["eps"], s_aa=aa["time_s"])
        res |= dict(attacks=aa_run.attack_label(s), settings=s)
        res["torch"] = aa["versions"]["torch"]
    if aa and last:  # the same attacks on both: last.pt's list, which best.pt's run also went through
        res["last_minus_best"] = last["robust_acc"] - aa["robust_after"].get(list(last["robust_after"])[-1], math.nan)
    if aa and mg:  # PGD-20 on the attacked points; a point counts if it is classified right, clean and attacked
        res["pgd20"] = statistics.mean(bool(c) and m > 0 for c, m in zip(aa["clean"], mg["test"]))
        res["gap"] = res["pgd20"] - res["aa"]
    if mg:
        res["gpu"] = mg.get("device")
        for part in ("train", "test") if ce else ():
            imp = smallest(ce[part])
            res[f"{part}_imp"] = statistics.mean(v for v, i in zip(mg[part], imp) if i)
            res[f"{part}_rest"] = statistics.mean(v for v, i in zip(mg[part], imp) if not i)
    with contextlib.suppress(OSError, IndexError):
        res["commit"] = json.loads((r["run"] / "links.jsonl").read_text().splitlines()[0])["commit"]
    return res


def fmt(vals: list, col: str) -> str:
    """mean ± std of the values there are: accuracies in percent, margins with two decimals, seconds with one."""
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    scale, digits = (1, 2) if "_imp" in col or "_rest" in col else (1, 1) if col.startswith("s_") else (100, 1)
    sd = f" ± {statistics.stdev(vals) * scale:.{digits}f}" if len(vals) > 1 else ""
    return f"{statistics.mean(vals) * scale:.{digits}f}{sd}"


HEAD = [
    "clean %",
    "PGD-20 %",
    "{robust}",  # attacked(): AutoAttack only when the version's full attack set ran
    "PGD-20 - {name}",
    "last - best, same attacks",
    "train margin, important",
    "train margin, other",
    "test margin, important",
    "test margin, other",
    "sweep holds",  # held(), after COLS' cells
]


def table(grid: dict, out: Path, found: list[dict]) -> str:
    """table.md and table.csv (one row per run), aa.png and margins.png, from the finished links."""
    ce = {(r["dataset"], r["arch"], r["seed"]): result(r["links"][3][0]) for r in found if r["loss"] == "ce"}
    for r in found:
        r["m"] = metrics(r, ce.get((r["dataset"], r["arch"], r["seed"])))
    complete = [r for r in found if all(runner.finished(d) for d, _ in r["links"])]
    runlog.write(str(out / "table.csv"), csv_rows(found))
    lines = header(grid, found, len(complete))
    groups: dict = {}
    for r in found:
        groups.setdefault((r["dataset"], r["arch"], r["loss"]), []).append(r)
    for (d, arch, loss), rs in groups.items():
        have = [r for r in rs if r["m"]["aa"] is not None or r["m"]["clean"] is not None]
        pre = f"{loss}" + (f" ({d}, {arch})" if len(groups) > len(grid["losses"]) else "")
        lines.append(row(f"**{pre}**", f"{len(have)} of {len(rs)}", have))
        lines += [row(f"{pre}, seed {r['seed']}", "1", [r]) for r in have]
        if loss != "ce":
            base = {r["seed"]: r for r in found if (r["dataset"], r["arch"], r["loss"]) == (d, arch, "ce")}
            pairs = [(r["m"], base[r["seed"]]["m"]) for r in rs if r["seed"] in base]
            cells = [fmt([a[k] - b[k] for a, b in pairs if None not in (a[k], b[k])], k) for k in COLS]
            n = sum(a["aa"] is not None and b["aa"] is not None for a, b in pairs)
            lines.append(f"| {pre} - ce, paired | {n} | " + " | ".join(cells) + " |" + " |" * 8)
    lines += warned(found)
    runlog.write(str(out / "table.md"), "\n".join(lines) + "\n")
    figures(out, groups, aa_run.attack_label(attacked(grid, found), " accuracy %", threat=True))
    return "\n".join(lines)


def csv_rows(found: list[dict]) -> str:
    """table.csv's text: one row per run, its figures and their provenance."""
    csv_text = io.StringIO(newline="")
    w = csv.writer(csv_text)
    w.writerow(["dataset", "arch", "loss", "seed", "run", *COLS, *EXTRA, *SOUND])
    for r in found:
        m = {**r["m"], "checks": " | ".join(r["m"]["checks"])}
        w.writerow(
            [r["dataset"], r["arch"], r["loss"], r["seed"], r["run"].name, *(m[k] for k in COLS + EXTRA + SOUND)]
        )
    return csv_text.getvalue()


def row(name: str, seeds: str, sel: list[dict]) -> str:
    """table.md's row of the runs `sel` (a loss's seeds, or one seed): their figures, then where and how they were
    measured; " !" after the name where AutoAttack's own checks warned."""
    cells = [fmt([r["m"][k] for r in sel], k) for k in COLS] + [held(sel)]
    name += " !" * any(r["m"]["checks"] for r in sel)
    first = sel[0]["m"] if sel else {}
    env = [first.get(k) for k in ("n", "eps", "gpu")] + [fmt([r["m"][k] for r in sel], k) for k in TIMES]
    env += [first.get("torch"), ",".join(sorted({str(r["m"].get("commit")) for r in sel}))]
    return f"| {name} | {seeds} | " + " | ".join(cells + [str(v if v is not None else "-") for v in env]) + " |"


def header(grid: dict, found: list[dict], complete: int) -> list[str]:
    """table.md's lines above its rows: what the grid is, how much of it finished, and what each column measured;
    a robust accuracy is called AutoAttack only when the version's full attack set ran (aa_run.attack_name)."""
    lines = [f"# {', '.join(grid['losses'])} on {', '.join(grid['datasets'])}, {', '.join(grid['archs'])}", ""]
    lines[0] += threat(found)
    if complete < len(found):
        lines += [
            f"**Partial grid: {complete} of {len(found)} runs have finished every link**; a cell counts "
            "only the finished links of its runs (seeds: runs with a figure of their own, of those in the grid).",
            "",
        ]
    lines += [
        "Per loss, mean ± std over seeds, then each seed; important points: the 30% smallest margins under the "
        "same seed's ce run (best.pt). Paired: minus ce, same seed.",
        "",
    ]
    s = attacked(grid, found)
    robust, name = aa_run.attack_label(s, " %"), aa_run.attack_name(s)
    if name != "AutoAttack":
        full = ", ".join(aa_run.NAMES.get(a, a.capitalize()) for a in aa_run.VERSION_ATTACKS["standard"])
        lines += [f"{robust}: {name} alone, not AutoAttack (standard AutoAttack runs {full}).", ""]
    head = [h.format(robust=robust, name=name) for h in HEAD]
    return lines + [
        "| loss | seeds | " + " | ".join(head) + f" | n | eps | GPU | s/epoch | s per {name} | torch | commit |",
        "|---" * (len(HEAD) + 9) + "|",
    ]


def threat(found: list[dict]) -> str:
    """table.md's title's end: what the runs trained against, "; trained under Linf, eps 8/255" (train.py's --norm
    and --eps; the eps column is the attack's)."""
    said = "; ".join(dict.fromkeys(f"{r['norm']}, eps {r['eps']}/255" for r in found))
    return f"; trained under {said}" if said else ""


def attacked(grid: dict, found: list[dict]) -> dict:
    """The settings of the table's robust column: the first finished evaluation's, else the grid's own (its
    --attacks or standard AutoAttack, with standard's settings, on --points test points)."""
    s = next((r["m"]["settings"] for r in found if r["m"].get("settings")), None)
    mode = (grid["attacks"] or "standard").replace(",", "+")
    norm = next((r["norm"] for r in found), "Linf")  # the runs' own: attack.py takes the checkpoint's
    return s or dict(mode=mode, version="standard", n=grid["points"] or "all", norm=norm, eps="?")


def held(sel: list[dict]) -> str:
    """The sweep column: of the runs with a finished attack.py --sweep, how many held (falls to 0, PGD-100 <=
    PGD-20); its verdict line, in the run's JSON, says what failed."""
    vals = [r["m"]["sweep"] for r in sel if r["m"]["sweep"] is not None]
    return f"{sum(vals)} of {len(vals)}" if vals else "-"


def warned(found: list[dict]) -> list[str]:
    """The footnote of the rows marked !: each run whose evaluations raised one of AutoAttack's own checks, and what
    it said (attack.py's `checks`)."""
    said = [f"- {r['run'].name}: {m}" for r in found for m in r["m"]["checks"]]
    head = "! AutoAttack's own checks warned in an evaluation of these runs (`checks` in their attack.py JSON files):"
    return ["", head, *said] if said else []


def figures(out: Path, groups: dict, robust: str) -> None:
    """aa.png: the robust accuracy (`robust`: aa_run.attack_label's, AutoAttack only when the full set ran) per loss,
    each seed a point; margins.png: the important points' margins per loss (the first seed), training and test
    points."""
    plt = cli.pyplot()
    if plt is None:
        return print("matplotlib is not installed: no figures (pip install matplotlib)")
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(max(4, 1 + 0.9 * len(groups)), 3.5))
    for k, rs in enumerate(groups.values()):
        v = [100 * r["m"]["aa"] for r in rs if r["m"]["aa"] is not None]
        ax.scatter([k] * len(v), v, color="C0", s=18)
        if v:
            ax.hlines(statistics.mean(v), k - 0.3, k + 0.3, color="C1")
    many = len({k[:2] for k in groups}) > 1
    ax.set_xticks(range(len(groups)), [f"{k[2]} ({k[0]}, {k[1]})" if many else k[2] for k in groups], rotation=30)
    ax.set(ylabel=robust, title="each seed a point, their mean a line")
    ax.title.set_fontsize(9)
    written(fig, out / "aa.png")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, part in zip(axes, ("train", "test")):
        drawn = {}
        for (d, arch, loss), rs in groups.items():
            r = next((r for r in rs if r["m"][f"{part}_imp"] is not None), None)
            if r:
                ce = next(c for c in groups[(d, arch, "ce")] if c["seed"] == r["seed"])
                imp, m = smallest(result(ce["links"][3][0])[part]), result(r["links"][3][0])[part]
                drawn[f"{loss} (seed {r['seed']})"] = [v for v, i in zip(m, imp) if i]
        span = (min(map(min, drawn.values())), max(map(max, drawn.values()))) if drawn else None
        for name, v in drawn.items():  # one range for every loss, so that their bins compare
            ax.hist(v, bins=40, range=span, histtype="step", label=name)
        ax.axvline(0, color="gray", linewidth=0.8)
        ax.set(ylabel="points", title=f"important {part} points (30% smallest under ce)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # points are counted whole
        ax.set_xlabel(MARGIN, fontsize=8)
        ax.title.set_fontsize(9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    written(fig, out / "margins.png")


def written(fig, path: Path) -> None:
    fig.tight_layout()
    runlog.png(fig, str(path), dpi=120)  # whole or not at all, and closed


if __name__ == "__main__":  # compare.py's module, not a script: it says so, and which command writes the table
    cli.parser(__doc__ + "\n\n    python results/compare.py --table --out GRID   # writes them").parse_args()
    sys.exit("compare_table.py: error: compare.py writes the table: python results/compare.py --table --out GRID")
