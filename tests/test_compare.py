"""results/compare.py and results/runner.py: a tiny grid (two losses, two seeds, synthetic data, 8 attacked points)
end to end through the local queue, killed and run again, its dry run against what ran, bad input, SLURM."""

import csv
import glob
import json
import os
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "results"))
import compare  # noqa: E402
import compare_table  # noqa: E402
import runner  # noqa: E402

import runlog  # noqa: E402

GRID = ["--losses", "ce,sovr", "--seeds", "0,1", "--datasets", "synthetic", "--points", "8", "--attacks", "apgd-ce"]
GRID += ["--train-points", "32", "--sweep-points", "0", "--jobs", "2", "--", "--smoke", "--train-limit", "128"]
GRID += ["--val", "32"]  # no sweep: test_the_sweep_column_and_the_checks_marker adds it to a copy
RUNS = [f"synthetic-resnet18-{loss}-s{s}" for loss in ("ce", "sovr") for s in (0, 1)]
TIMES = ("s_epoch", "s_aa", "commit")  # the only columns two identical grids may differ in (a tree edited meanwhile)


def start(*argv: str, cwd: Path) -> subprocess.Popen:
    """compare.py in a process group of its own, as a user's shell starts it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "results" / "compare.py"), *argv]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)


def links_of(line: str) -> list[str]:
    """The commands of a run's shell line (what follows each link's `--`)."""
    return [shlex.join(part[part.index("--") + 1 :]) for part in map(shlex.split, line.split(" && ")[1:])]


def table_rows(out: Path) -> list[dict]:
    with open(out / "table.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMES} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """The tiny grid, run once without interruption."""
    cwd = tmp_path_factory.mktemp("grid")
    p = start("--out", "a", *GRID, cwd=cwd)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return cwd


@pytest.fixture
def here(monkeypatch, capsys):
    """compare.py's main in this process (no interpreter to start), from `cwd`; what it printed."""

    def run(cwd: Path, *argv: str) -> str:
        monkeypatch.chdir(cwd)
        assert compare.main(list(argv)) == 0
        return capsys.readouterr().out

    return run


def test_grid_end_to_end_writes_table_and_figures(grid: Path, here, monkeypatch) -> None:
    out = grid / "a"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == RUNS
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == RUNS
    for r in rows:  # every link finished: every figure is there, nothing marked partial
        assert all(r[k] != "" for k in compare_table.COLS + ["n", "eps", "gpu", "torch", "commit"]), r
        assert r["n"] == "8" and r["eps"] == "8/255" and r["gpu"] == "cpu"
    md = (out / "table.md").read_text()
    assert "Partial" not in md and "| **sovr** | 2 of 2 |" in md and "| sovr - ce, paired | 2 |" in md
    assert (out / "aa.png").stat().st_size > 0 and (out / "margins.png").stat().st_size > 0
    ce = json.loads((out / RUNS[0] / "best.margins-train-test.json").read_text())
    assert len(ce["train"]) == 32 and len(ce["test"]) == 8
    assert here(grid, "--status", "--out", "a").splitlines() == [f"{r}: done" for r in RUNS]
    plt = pytest.importorskip("matplotlib.pyplot")
    drawn = []
    monkeypatch.setattr(plt, "close", drawn.append)
    here(grid, "--table", "--out", "a")  # the same table again, its figures kept to look at
    assert [f.axes[0].get_ylabel() for f in drawn] == [
        "APGD-CE accuracy % (Linf 8/255, n=8, standard's settings)",
        "points",
    ]
    assert all(float(t).is_integer() for ax in drawn[1].axes for t in ax.get_yticks())  # points counted whole


def test_dry_run_prints_exactly_what_ran(grid: Path) -> None:
    dry = subprocess.run(
        [sys.executable, str(REPO / "results" / "compare.py"), "--dry-run", "--out", "a", *GRID],
        cwd=grid,
        capture_output=True,
        text=True,
    )
    lines = dry.stdout.splitlines()
    assert lines == [(grid / "a" / r / "run.sh").read_text().strip() for r in RUNS]  # the files bash ran
    for r, line in zip(RUNS, lines):  # and each link's command is the one its log shows, once
        ran = [ln[2:] for ln in runner.log_lines(grid / "a" / r / "console.log") if ln.startswith("$ ")]
        assert ran == links_of(line)


def test_killed_grid_continues_without_repeating_a_finished_link(grid: Path, here) -> None:
    """The grid as a first command left it after seed 0 (a copy of the uninterrupted grid's seed-0 runs, to save
    the suite two runs' time), run again, killed while seed 1 is in flight, run again: it finishes with no link
    repeated and the uninterrupted grid's table."""
    (grid / "b").mkdir()
    shutil.copy(grid / "a" / "grid.json", grid / "b")
    for r in RUNS[::2]:  # seed 0's runs
        shutil.copytree(grid / "a" / r, grid / "b" / r)
    p = start("--out", "b", *GRID, cwd=grid)
    logs = [grid / "b" / r / "console.log" for r in RUNS[1::2]]

    def in_flight_after_a_finished_link(log: Path) -> bool:
        marks = [ln for ln in runner.log_lines(log) if ln.startswith(runner.MARKS)]
        return len(marks) > 2 and marks[-1].startswith("$ ") and marks[-2].startswith("done in ")

    while not any(in_flight_after_a_finished_link(log) for log in logs):  # kill a link, not the gap between two
        assert p.poll() is None, "the grid finished before it could be killed"
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)  # the command and every run it started
    p.wait()
    status = here(grid, "--status", "--out", "b").splitlines()
    assert status[::2] == [f"{r}: done" for r in RUNS[::2]] and all(": done" not in s for s in status[1::2]), status
    assert any("stopped" in s for s in status[1::2]), status
    here(grid, "--table", "--out", "b")
    assert "**Partial grid: 2 of 4 runs have finished every link**" in (grid / "b" / "table.md").read_text()
    found = compare.runs(json.loads((grid / "b" / "grid.json").read_text()), grid / "b", 1)
    finished = {r["run"].name: [shlex.join(c) for d, c in r["links"] if runner.finished(d)] for r in found}
    seen = {r["run"].name: len(runner.log_lines(r["run"] / "console.log")) for r in found}
    assert 8 < sum(map(len, finished.values())) < 16  # killed in the middle of seed 1
    p = start("--out", "b", *GRID, cwd=grid)
    assert p.wait(timeout=600) == 0
    for r in found:
        lines = runner.log_lines(r["run"] / "console.log")
        assert all(runner.finished(d) for d, _ in r["links"])
        for cmd in finished[r["run"].name]:  # a link finished before the kill never started again
            assert f"$ {cmd}" not in lines[seen[r["run"].name] :]
        for cmd in (shlex.join(c) for _, c in r["links"]):  # started at most twice (once killed), finished once
            assert (
                lines.count(f"$ {cmd}") <= 2
                and sum(ln.startswith("done in ") and ln.endswith(cmd) for ln in lines) <= 1
            )
        epochs = [x["epoch"] for x in runlog.records(str(r["run"])) if "epoch" in x]
        assert epochs == [1, 2]
    assert table_rows(grid / "b") == table_rows(grid / "a")


def test_the_sweep_column_and_the_checks_marker(grid: Path, here, monkeypatch) -> None:
    """The tiny grid with --sweep-points 8: each run's last link is attack.py --sweep on best.pt, whose result the
    link finds (one run for real, APGD-CE at two radii to keep it quick; the others' verdicts set); the table says
    per loss how many runs held, and marks with ! and a footnote the rows whose evaluations raised a check."""
    import attack
    import masking

    shutil.copytree(grid / "a", grid / "d")
    g = json.loads((grid / "d" / "grid.json").read_text())
    runner.write_json({**g, "sweep_points": 8}, grid / "d" / "grid.json")
    found = compare.runs({**g, "sweep_points": 8}, grid / "d", 1)
    monkeypatch.setattr(masking, "SWEEP_SCALES", (1, 8))
    monkeypatch.setattr(masking, "SWEEP_ATTACKS", "apgd-ce")
    done, cmd = found[0]["links"][4]
    attack.main(cmd[cmd.index(str(REPO / "attack.py")) + 1 :] + ["--device", "cpu"])
    assert cmd[-3:] == ["--sweep", "--points", "8"] and runner.finished(done)
    (made,) = map(Path, glob.glob(done))
    res, said = json.loads(made.read_text()), "it seems to be a randomized defense!"
    for r, holds, checks in zip(found, (True, True, False, True), ([], [], [], [said])):
        runner.write_json({**res, "sweep_holds": holds, "checks": checks}, r["run"] / made.name)
    md = here(grid, "--table", "--out", "d")
    assert "| sweep holds | n |" in md and "Partial" not in md
    rows = {ln.split(" | ")[0][2:]: ln.split(" | ") for ln in md.splitlines() if ln.startswith("| ")}
    col = rows["loss"].index("sweep holds")
    assert [rows[k][col] for k in ("**ce**", "ce, seed 0", "**sovr** !", "sovr, seed 0", "sovr, seed 1 !")] == [
        "2 of 2",
        "1 of 1",
        "1 of 2",
        "0 of 1",
        "1 of 1",
    ]
    assert md.splitlines()[-2:] == [
        "! AutoAttack's own checks warned in an evaluation of these runs (`checks` in their attack.py JSON files):",
        f"- synthetic-resnet18-sovr-s1: {said}",
    ]
    csv_rows = {r["run"]: r for r in table_rows(grid / "d")}
    assert [(csv_rows[n]["sweep"], csv_rows[n]["checks"]) for n in RUNS] == [
        ("True", ""),
        ("True", ""),
        ("False", ""),
        ("True", said),
    ]


def test_local_queue_runs_each_line_on_its_own_gpus_and_reports_failures(tmp_path: Path) -> None:
    lines = {}
    for name, rc in (("x", 3), ("y", 0), ("z", 0)):
        (tmp_path / name).mkdir()
        lines[str(tmp_path / name)] = (
            f'echo "gpus $CUDA_VISIBLE_DEVICES" >> {tmp_path / name / "console.log"}; exit {rc}'
        )
    seen = []
    where = runner.slots(["0", "1", "2", "3", "4"], 2, 1)
    assert [w["CUDA_VISIBLE_DEVICES"] for w in where] == ["0,1", "2,3"]  # two GPUs a run, not GPU 4
    rcs = runner.run_local(lines, where, lambda f, rc: seen.append((Path(f).name, rc)))
    assert rcs == {str(tmp_path / n): rc for n, rc in (("x", 3), ("y", 0), ("z", 0))}  # x failed, the rest ran
    assert sorted(seen) == [("x", 3), ("y", 0), ("z", 0)]
    assert {runner.last_line(tmp_path / n / "console.log") for n in "xyz"} <= {"gpus 0,1", "gpus 2,3"}
    assert (tmp_path / "x" / "run.sh").read_text() == lines[str(tmp_path / "x")] + "\n"  # what bash ran
    cpu = runner.slots([], 1, 2)
    assert cpu == [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(max(1, os.cpu_count() // 2))}] * 2


@pytest.mark.parametrize(
    "gpus, per_run, jobs, threads",
    [(8, 1, 1, ["2"] * 8), (8, 2, 1, ["2"] * 4), (3, 1, 1, ["5"] * 3), (0, 1, 4, ["4"] * 4), (32, 1, 1, ["1"] * 32)],
)
def test_every_slot_of_the_local_queue_gets_its_share_of_the_cores(monkeypatch, gpus, per_run, jobs, threads) -> None:
    """On 16 cores: each process that runs at once (per_run under torchrun) gets its share, at least one, on GPUs
    as on the CPU, where N concurrent GPU runs each started a thread per core."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    where = runner.slots([str(g) for g in range(gpus)], per_run, jobs)
    assert [w["OMP_NUM_THREADS"] for w in where] == threads
    assert runner.slots([], 1, 2, threads=1)[0]["OMP_NUM_THREADS"] == "1"  # a thread count given is kept


def test_default_grid_is_24_runs() -> None:
    grid = compare.grid_of(compare.get_args([])[0])
    found = compare.runs(grid, Path("runs/compare").resolve(), 1)
    assert len(found) == 24
    assert found[0]["run"].name == "cifar10-resnet18-ce-s0" and found[-1]["run"].name == "cifar10-resnet18-ovr-s2"
    assert "--attacks" not in found[0]["links"][1][1]  # standard AutoAttack on best.pt, every test point
    assert found[0]["links"][4][1][-4:] == [str(found[0]["run"] / "best.pt"), "--sweep", "--points", "1000"]


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--losses", "ce,nope"], "invalid choice: 'nope'"),
        (["--archs", "vgg"], "invalid choice: 'vgg'"),
        (["--datasets", "imagenet"], "unknown dataset 'imagenet'"),
        (["--", "--epochs", "0"], "--epochs must be >= 1"),
        (["--", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--attacks", "apgd-x"], "unknown attack(s) apgd-x"),
        (["--sweep-points", "-1"], "--sweep-points and --gpus-per-run must be >= 0"),
        (["--", "--out", "elsewhere"], "--out after -- is the grid's own"),
        (["--losses", "ce,mail", "--", "--ratio", "0.2"], "--ratio after -- is read by none of --losses"),
    ],
)
def test_bad_input_is_one_line_and_starts_nothing(argv, says, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        compare.main(["--out", str(tmp_path / "g"), *argv])
    code = e.value.code  # a message (sys.exit), or argparse's 2 after its usage and one error line
    msg = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert says in msg and "\n" not in msg and msg.startswith(("compare.py: error: ", "usage")), msg
    assert not (tmp_path / "g").exists()


def test_a_grid_fetches_each_cifar_dataset_once_before_any_run(tmp_path: Path, monkeypatch, capsys) -> None:
    """Into the folder the runs read (train.py's --data-dir, else ./data), not for --dry-run or synthetic data; a
    failed fetch is one line and starts nothing."""
    import data

    said = []
    monkeypatch.setattr(data, "load_data", lambda name, folder: said.append((name, folder)))
    monkeypatch.setattr(runner, "run_local", lambda lines, where, report: said.append(sorted(lines)) or {})
    monkeypatch.chdir(tmp_path)
    argv = ["--out", "g", "--losses", "ce,sovr", "--seeds", "0", "--gpus-per-run", "0"]
    argv += ["--datasets", "cifar10,synthetic,cifar100"]
    assert compare.main([*argv, "--dry-run", "--", "--data-dir", "d"]) == 0
    assert said == []
    capsys.readouterr()
    assert compare.main([*argv, "--", "--data-dir", "d"]) == 0
    runs = sorted(f"{d}-resnet18-{loss}-s0" for d in ("cifar10", "synthetic", "cifar100") for loss in ("ce", "sovr"))
    assert said == [("cifar10", "d"), ("cifar100", "d"), [str(tmp_path / "g" / r) for r in runs]]  # then the runs
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"fetching {d} into d once, before the runs" for d in ("cifar10", "cifar100")]

    def offline(name: str, folder: str) -> None:
        raise ValueError(f"could not download {name} into {folder} (no network)")

    monkeypatch.setattr(data, "load_data", offline)
    with pytest.raises(SystemExit) as e:
        compare.main(["--out", "h", "--losses", "ce", "--seeds", "0", "--gpus-per-run", "0"])
    assert e.value.code == "compare.py: error: could not download cifar10 into ./data (no network)"
    assert not (tmp_path / "h").exists() and len(said) == 3  # nothing ran


def test_grid_folder_of_another_grid_is_refused(tmp_path: Path) -> None:
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "grid.json").write_text(json.dumps(compare.grid_of(compare.get_args(["--seeds", "0"])[0])))
    with pytest.raises(SystemExit, match="holds another grid \\(seeds: \\['0'\\] there, \\['0', '1', '2'\\] here\\)"):
        compare.main(["--out", str(tmp_path / "g")])
    assert os.listdir(tmp_path / "g") == ["grid.json"]


def test_a_grid_from_before_the_sweep_has_none_and_resumes_with_sweep_points_0(tmp_path: Path, capsys) -> None:
    old = compare.grid_of(compare.get_args(["--losses", "ce", "--seeds", "0"])[0])
    del old["sweep_points"]
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "grid.json").write_text(json.dumps(old))
    assert compare.main(["--out", str(tmp_path / "g"), "--status"]) == 0
    assert capsys.readouterr().out == "cifar10-resnet18-ce-s0: waiting (0 of 4 links done)\n"  # no sweep link
    with pytest.raises(SystemExit, match="holds another grid \\(sweep_points: 0 there, 1000 here\\)"):
        compare.main(["--out", str(tmp_path / "g"), "--losses", "ce", "--seeds", "0"])


def test_slurm_without_sbatch_or_submitit_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit, match="sbatch is not on PATH"):
        compare.main(["--out", str(tmp_path / "g"), "--slurm"])
    (tmp_path / "sbatch").write_text("#!/bin/sh\n")
    (tmp_path / "sbatch").chmod(0o755)
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(SystemExit, match="--slurm needs submitit"):
        compare.main(["--out", str(tmp_path / "g"), "--slurm"])
    assert not (tmp_path / "g").exists()


def test_slurm_runs_the_grid_and_a_requeued_job_continues(grid: Path, slurm_cluster) -> None:
    """Seed 0 of the tiny grid as two SLURM array jobs on the real one-node cluster; the sovr job is requeued
    (scontrol requeue, as a preemption does) once its training has finished: it starts again, skips the finished
    link, and the table's rows equal the uninterrupted local grid's."""
    pytest.importorskip("submitit")
    slurm = ["--slurm", "--wait", "--partition", slurm_cluster.partition, "--gpus-per-run", "0", "--cpus-per-run", "1"]
    argv = [*GRID[: GRID.index("--seeds") + 1], "0", *GRID[GRID.index("--seeds") + 2 :]]
    p = start("--out", "c", *slurm, "--mem", "1G", *argv, cwd=grid)
    assert p.stdout.readline().startswith(f"2 of 2 runs to run in {grid / 'c'} (OMP_NUM_THREADS 1, as exported here)")
    submitted = p.stdout.readline()
    assert submitted.startswith("submitted 2 runs: SLURM jobs "), submitted
    job = submitted.split()[-1]  # sovr-s0's, the array's second task
    log = grid / "c" / "synthetic-resnet18-sovr-s0" / "console.log"
    deadline = time.monotonic() + 300
    started = done = 0
    while not started > done > 0:  # until training has finished and the next link is in flight
        assert time.monotonic() < deadline and p.poll() is None, runner.log_lines(log)
        time.sleep(0.1)
        marks = [ln[:2] for ln in runner.log_lines(log)]
        started, done = marks.count("$ "), marks.count("do")
    flight = [ln for ln in runner.log_lines(log) if ln.startswith("$ ")][-1]
    slurm_cluster.run("scontrol", "requeue", job)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    lines = runner.log_lines(log)
    done = [ln.split(": ", 1)[1] for ln in lines if ln.startswith("done in ")]
    assert len(done) == len(set(done)) == 4  # every link finished once: the requeued job repeated none
    train = next(ln for ln in lines if ln.startswith("$ ") and "train.py" in ln)
    assert lines.count(train) == 1 and flight.startswith("$ ") and lines.count(flight) == 2  # killed and run again
    seed0 = [r for r in table_rows(grid / "a") if r["seed"] == "0"]
    assert table_rows(grid / "c") == seed0


def test_study_chains_go_through_the_runner_and_skip_the_published_results() -> None:
    """results/study.py builds each run's chain for the runner: a rerun of the published study repeats no link."""
    import study

    args = study.get_args([])
    for r in study.runs(args):
        links = study.links(r, args, study.HERE / "e5")
        assert links[0][1][-2:] == ["--resume", "auto"] and all(runner.finished(d) for d, _ in links), r
        line = runner.chain_line(links, "console.log", study.REPO)
        assert links_of(line) == [shlex.join(c) for _, c in links]


def test_failed_runs_are_reported_with_their_last_line_and_the_exit_code(tmp_path: Path) -> None:
    argv = ["--losses", "ce,sovr", "--seeds", "0", "--datasets", "synthetic", "--jobs", "2", "--out", "f"]
    p = start(*argv, "--", "--smoke", "--batch", "4096", cwd=tmp_path)  # train.py accepts it, then has too few images
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 1
    said = "s: train.py: error: --batch 4096 is larger than the 256 training images (log: {})"
    failed = sorted(ln for ln in out.splitlines() if " train.py failed (1) in " in ln)  # a line per failed link
    for ln, loss in zip(failed, ("ce", "sovr"), strict=True):
        log = tmp_path / "f" / f"synthetic-resnet18-{loss}-s0" / "console.log"
        assert ln.startswith(f"synthetic-resnet18-{loss}-s0: train.py failed (1) in ") and ln.endswith(said.format(log))
    assert out.splitlines()[-1].endswith("2 runs failed: synthetic-resnet18-ce-s0, synthetic-resnet18-sovr-s0")
    assert "**Partial grid: 0 of 2 runs have finished every link**" in (tmp_path / "f" / "table.md").read_text()


def test_dataset_or_arch_after_the_dash_dash_is_the_grids_axis() -> None:
    args = compare.get_args(["--losses", "ce", "--", "--dataset", "synthetic", "--arch=wrn16", "--epochs", "2"])[0]
    assert (args.datasets, args.archs, args.flags) == ("synthetic", "wrn16", ["--epochs", "2"])
    found = compare.runs(compare.grid_of(args), Path("g").resolve(), 1)
    assert [r["run"].name for r in found] == ["synthetic-wrn16-ce-s0", "synthetic-wrn16-ce-s1", "synthetic-wrn16-ce-s2"]


@pytest.mark.parametrize(
    "t, m", [("90", 90), ("10:30", 11), ("12:00:00", 720), ("1-12", 2160), ("2-06:00", 3240), ("1-00:00:01", 1441)]
)
def test_slurm_time_limits_read_as_sbatch_reads_them(t: str, m: int) -> None:
    assert compare.minutes(t) == m


def test_flags_after_the_separator_reach_the_runs_that_read_them() -> None:
    argv = [
        "--losses",
        "ce,sovr",
        "--seeds",
        "0",
        "--",
        "--ratio",
        "0.2",
        "--smoke",
        "--dataset",
        "x",
        "--dataset=synthetic",
    ]
    args = compare.get_args(argv)[0]
    found = {r["loss"]: r for r in compare.runs(compare.grid_of(args), Path("g").resolve(), 1)}
    train = {loss: found[loss]["links"][0][1] for loss in found}
    assert "--ratio" not in train["ce"] and train["sovr"][train["sovr"].index("--ratio") + 1] == "0.2"
    assert found["ce"]["run"].name == "synthetic-resnet18-ce-s0" and found["sovr"]["run"].name.endswith("sovr-r0.2-s0")
    assert all(train[loss].count("--dataset") == 1 for loss in train)  # the last --dataset, as the grid's axis


def test_a_link_killed_by_a_signal_has_failed(tmp_path: Path) -> None:
    """An OOM-killed command: the link fails (exit 1), so a SLURM job does not take it for SLURM's own signal."""
    log = tmp_path / "console.log"
    assert runner.link(str(log), str(tmp_path / "never.json"), ["bash", "-c", "kill -9 $$"]) == 1
    assert runner.log_lines(log)[-1].startswith("failed (signal 9) in ")


def test_the_important_points_are_at_least_one_ties_lower_index_first() -> None:
    """compare_table.smallest, the one 30%-smallest count of results/: one point is its own 30% (as attack.py)."""
    assert compare_table.smallest([0.5]) == [True]
    assert (
        compare_table.smallest([1.0, 0.0, 0.0, 0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
        == [False, True, True, True] + [False] * 6
    )


@pytest.mark.parametrize(
    "mode, version, name",
    [
        ("standard", "standard", "AutoAttack"),
        ("apgd-ce+apgd-t+fab-t+square", "standard", "AutoAttack"),  # --attacks naming the full set
        ("apgd-ce", "standard", "APGD-CE"),
        ("apgd-ce+apgd-t", "standard", "APGD-CE+APGD-T"),
        ("apgd-ce+apgd-dlr", "rand", "AutoAttack"),  # rand's full set
        ("apgd-ce+apgd-dlr", "standard", "APGD-CE+APGD-DLR"),
        ("apgd-ce+apgd-t+fab-t+square", "plus", "APGD-CE+APGD-T+FAB-T+Square"),
    ],
)
def test_a_figure_is_called_autoattack_only_when_the_versions_full_attack_set_ran(mode, version, name) -> None:
    import aa_run

    s = dict(mode=mode, version=version, n=20, norm="Linf", eps="8/255")
    assert aa_run.attack_name(s) == name
    how = f"{version}, n=20" if name == "AutoAttack" else f"n=20, {version}'s settings"
    assert aa_run.attack_label(s, " %") == f"{name} % ({how})"
    assert aa_run.attack_label(s, threat=True) == f"{name} ({how.replace('n=20', 'Linf 8/255, n=20')})"


def finished_by_hand(r: dict, robust: float) -> None:
    """A run's files as its links leave them (train.py's log, attack.py's two results, the margins), written here:
    the table reads nothing else."""
    best = dict(epoch=2, test_clean=0.5, test_pgd=0.3)
    recs = [dict(epoch=1, time=1.0), dict(final=dict(best=best, last=best))]
    (r["run"] / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    s = dict(n=4, eps="8/255", norm="Linf", mode="apgd-ce", version="standard")
    res = dict(settings=s, clean_acc=0.5, robust_acc=robust, time_s=2.0, versions=dict(torch="2"), checks=[])
    res |= dict(clean=[1, 1, 0, 0], robust_after={"apgd-ce": robust})
    for ckpt in ("best", "last"):
        (r["run"] / f"{ckpt}.apgd-ce-Linf-eps8-n4-seed0.json").write_text(json.dumps(res))
    margins = dict(train=[0.5, -0.5, 1.0, 2.0], test=[0.4, -0.1, -1.0, 0.3], device="cpu")
    runner.margins_path(r["run"] / "best.pt").write_text(json.dumps(margins))


def test_a_table_of_apgd_ce_results_says_apgd_ce_not_autoattack(tmp_path: Path, monkeypatch) -> None:
    """table.md's column, its note, table.csv and aa.png's axis name the attack, the points and the version whose
    settings it ran with: APGD-CE alone is not AutoAttack."""
    argv = ["--losses", "ce,sovr", "--seeds", "0", "--datasets", "synthetic", "--points", "4", "--attacks", "apgd-ce"]
    grid = compare.grid_of(compare.get_args([*argv, "--sweep-points", "0"])[0])
    found = compare.runs(grid, tmp_path, 0)
    for r, robust in zip(found, (0.25, 0.0)):
        r["run"].mkdir()
        finished_by_hand(r, robust)
    plt = pytest.importorskip("matplotlib.pyplot")
    drawn = []
    monkeypatch.setattr(plt, "close", drawn.append)
    md = compare_table.table(grid, tmp_path, found)
    assert md == (tmp_path / "table.md").read_text().rstrip("\n") and "Partial" not in md
    label = "APGD-CE % (n=4, standard's settings)"
    assert f"| PGD-20 % | {label} | PGD-20 - APGD-CE |" in md and "s per APGD-CE" in md
    assert f"{label}: APGD-CE alone, not AutoAttack (standard AutoAttack runs APGD-CE, APGD-T, FAB-T, Square)." in md
    assert "AA" not in md and "| **sovr** | 1 of 1 | 50.0 | 25.0 | 0.0 |" in md
    assert [r["attacks"] for r in table_rows(tmp_path)] == ["APGD-CE (n=4, standard's settings)"] * 2
    assert drawn[0].axes[0].get_ylabel() == "APGD-CE accuracy % (Linf 8/255, n=4, standard's settings)"


FAKE_ATTACK = """import json, sys
s = dict(n=4, eps="8/255", norm="Linf", mode="apgd-ce", version="standard")
print("after apgd-ce: robust accuracy 25.00%")
json.dump(dict(settings=s, clean_acc=0.5, robust_acc=0.25), open(sys.argv[1] + ".apgd-ce-n4.json", "w"))
"""


def test_each_link_is_a_line_when_it_starts_and_when_it_ends(tmp_path: Path, monkeypatch, capsys) -> None:
    """Started (run, link, where: the slot's GPUs and threads), finished (its time and figure, named by what ran),
    failed (its log's last line and the log's path): read from the markers runner.link writes, as the grid runs."""
    run, scripts = tmp_path / "synthetic-resnet18-ce-s0", tmp_path / "bin"
    run.mkdir(), scripts.mkdir()
    (scripts / "attack.py").write_text(FAKE_ATTACK)
    (scripts / "train.py").write_text("import sys\nprint('epoch 1')\nsys.exit('train.py: error: out of memory')\n")
    best, log = str(run / "best.pt"), str(run / "console.log")
    attack_cmd = [sys.executable, str(scripts / "attack.py"), best, "--attacks", "apgd-ce"]
    train_cmd = [sys.executable, str(scripts / "train.py"), "--loss", "ce"]
    r = dict(run=run, links=[(str(run), train_cmd), (best + ".apgd-ce-n4.json", attack_cmd)], eval_steps=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    with compare.Watch([r]):
        assert runner.link(log, r["links"][1][0], attack_cmd) == 0
        assert runner.link(log, str(run), train_cmd) == 1
    out = [ln.split(" in ", 1)[0] if " in " in ln else ln for ln in capsys.readouterr().out.splitlines()]
    name = "synthetic-resnet18-ce-s0: "
    assert [ln.removeprefix(name) for ln in out] == [
        "attack.py best.pt --attacks apgd-ce started on GPU 3, 4 threads",
        "attack.py best.pt --attacks apgd-ce done",
        "train.py started on GPU 3, 4 threads",
        "train.py failed (1)",
    ]
    lines = runner.log_lines(log)
    event = compare.event(r, next(ln for ln in lines if ln.startswith("done in ")))
    assert event.endswith(": clean 50.00%, APGD-CE (n=4, standard's settings) 25.00%"), event
    event = compare.event(r, lines[-1])
    assert event.endswith(f"s: train.py: error: out of memory (log: {log})"), event


def test_status_names_the_link_a_running_run_is_on(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    links = [
        (str(run), ["python", "train.py", "--loss", "ce"]),
        (str(run / "x*.json"), ["python", "attack.py", "b.pt"]),
    ]
    (run / "console.log").write_text(f"$ {shlex.join(links[0][1])}\ndone in 3s: x\n$ {shlex.join(links[1][1])}\n")
    (run / "running").write_text(f"{os.uname().nodename} {os.getpid()} GPU 1, 2 threads\n")
    said = runner.state(links, run / "console.log")
    assert said == "running attack.py b.pt standard AutoAttack (link 2 of 2) on GPU 1, 2 threads"
    (run / "running").write_text(f"elsewhere {os.getpid()} SLURM job 7_1\n")
    said = runner.state(links, run / "console.log")
    assert said == "running attack.py b.pt standard AutoAttack (link 2 of 2) on SLURM job 7_1, host elsewhere"


def test_an_exported_omp_num_threads_is_kept_and_said_and_only_an_unset_one_filled(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A thread count changes results in their last digits: the user's is every run's, said once."""
    where = []
    monkeypatch.setattr(runner, "run_local", lambda lines, slots, report: where.append(slots) or {})
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.chdir(tmp_path)
    argv = ["--losses", "ce", "--seeds", "0", "--datasets", "synthetic", "--gpus-per-run", "0", "--jobs", "2"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert compare.main(["--out", "a", *argv]) == 0
    out = capsys.readouterr().out
    assert "(OMP_NUM_THREADS=1 from your environment, kept for every run)" in out.splitlines()[0]
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert compare.main(["--out", "b", *argv]) == 0
    assert "(OMP_NUM_THREADS unset: 8 per process, the cores shared out)" in capsys.readouterr().out.splitlines()[0]
    assert [[w["OMP_NUM_THREADS"] for w in slots] for slots in where] == [["1", "1"], ["8", "8"]]


SCRIPTS = sorted(
    p.relative_to(REPO)
    for p in [*REPO.glob("*.py"), *REPO.glob("results/*.py")]
    if "__main__" in p.read_text() and not p.name.startswith(("test_", "conftest"))
)


def tracked() -> tuple[str, list[int]]:
    """git status, and when each tracked file was last written: a script that rewrote one, even unchanged, shows."""
    git = ["git", "-C", str(REPO)]
    status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout
    files = subprocess.run([*git, "ls-files"], capture_output=True, text=True).stdout.split()
    return status, [os.stat(REPO / f).st_mtime_ns for f in files if (REPO / f).exists()]


@pytest.mark.parametrize("script", SCRIPTS, ids=str)
def test_every_script_answers_help_and_runs_nothing(script: Path, monkeypatch, capsys) -> None:
    """As `python SCRIPT --help` runs it (runpy, in this process: no interpreter to start): its usage, exit 0, and
    no file of the repository written or added."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    before = tracked()
    monkeypatch.setattr(sys, "argv", [str(REPO / script), "--help"])
    monkeypatch.setattr(sys, "path", [str((REPO / script).parent), *sys.path])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert e.value.code in (0, None) and capsys.readouterr().out.startswith("usage: ")
    assert tracked() == before


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_norm_and_dataset_after_the_separator_reach_every_run_and_the_table_says_them(tmp_path: Path, norm) -> None:
    """`-- --dataset svhn` is the grid's dataset and `-- --norm L2` every run's: train.py gets both, the run folders
    of the two norms differ, the attack links' results are those of the run's norm, and table.md's title and
    table.csv's norm column say them (a table of runs that have not finished: nothing trains here)."""
    import flags

    if norm != "Linf" and "norm" not in flags.DEFAULTS:
        pytest.skip("train.py has no --norm in this tree")
    argv = ["--losses", "ce,sovr", "--seeds", "0", "--points", "4", "--attacks", "apgd-ce", "--sweep-points", "0"]

    def grid(*extra: str) -> tuple[dict, list[dict]]:
        g = compare.grid_of(compare.get_args([*argv, "--", "--dataset", "svhn", *extra])[0])
        return g, compare.runs(g, tmp_path / norm, 0)

    g, found = grid(*["--norm", norm] * (norm != "Linf"))
    for r in found:
        train = r["links"][0][1]
        assert r["dataset"] == "svhn" and train[train.index("--dataset") + 1] == "svhn" and r["norm"] == norm
        assert norm == "Linf" or train[train.index("--norm") + 1] == norm
        assert all(f".apgd-ce-{norm}-eps*-n4-seed0*.json" in done for done, _ in r["links"][1:3])
        r["run"].mkdir(parents=True)
    linf = {r["run"] for r in grid()[1]}
    assert {r["run"] for r in found}.isdisjoint(linf) if norm != "Linf" else {r["run"] for r in found} == linf
    md, eps = compare_table.table(g, tmp_path / norm, found), 8 if norm == "Linf" else found[0]["eps"]
    assert md.splitlines()[0] == f"# ce, sovr on svhn, resnet18; trained under {norm}, eps {eps}/255"
    assert [(r["dataset"], r["norm"]) for r in table_rows(tmp_path / norm)] == [("svhn", norm)] * 2
