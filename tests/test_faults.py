"""A full disk, an exceeded quota and SIGTERM at every file the project writes: one line naming the file and what was
kept, no temporary file, every file written before intact; the exit codes every script shares."""

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import attack
import cli
import models
import runlog
import train

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "results"))
import compare_table  # noqa: E402
import runner  # noqa: E402

CODES = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
RECORD = dict(epoch=1, lr=0.1, time=1.0, train_loss=2.0, train_adv_acc=0.2, val_clean=0.3, val_pgd=0.1)


def last_pt(epoch: int) -> dict:
    """A small last.pt's contents, as train.save_epoch writes them."""
    model = models.build("wrn16", 10, width=1)
    return dict(model=model.state_dict(), arch="wrn16", width=1, num_classes=10, mean=[0.5] * 3, std=[0.25] * 3, eps=8,
                dataset="synthetic", epoch=epoch, improved=True, best=0.1, metrics={**RECORD, "epoch": epoch},
                optimizer={}, scheduler={})  # fmt: skip


def picture(path: Path) -> None:
    attack.plot([dict(margins=[0.1, -0.2, 0.3], settings=dict(objective="ce", checkpoint="/r/ce/best.pt"))], str(path))


GRID = dict(losses=[], datasets=[], archs=[], attacks=None, points=0)  # an empty grid: its table and figures
# Each write site, by the call that writes it: (the file it writes, the call on a run folder holding a finished epoch)
SITES = {
    "last.pt": ("last.pt", lambda out: runlog.save_last(str(out), last_pt(2), "t")),
    "best.pt": ("best.pt", lambda out: runlog.after_last(str(out), last_pt(2), "t")),
    "log append": ("log.jsonl", lambda out: runlog.append(str(out), {**RECORD, "epoch": 2})),
    "log trim": ("log.jsonl", lambda out: runlog.trim(str(out), 1)),
    "curves.png": ("curves.png", lambda out: runlog.curves(str(out), "t")),
    "attack state": ("x.json.state", lambda out: models.write_json(dict(after={}), str(out / "x.json.state"))),
    "attack result": ("x.json", lambda out: models.write_json(dict(robust_acc=0.5), str(out / "x.json"))),
    "margins.png": ("m.png", lambda out: picture(out / "m.png")),
    "grid.json": ("grid.json", lambda out: runner.write_json(dict(losses=["ce"]), out / "grid.json")),
    "table.csv": ("table.csv", lambda out: compare_table.table(GRID, out, [])),
    "table.md": ("table.md", lambda out: compare_table.table(GRID, out, [])),
    "aa.png": ("aa.png", lambda out: compare_table.table(GRID, out, [])),
}


REWRITES = {"table.md": {"table.csv"}, "aa.png": {"table.csv", "table.md"}}  # written whole before the file that fails


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A run folder as its first epoch leaves it (curves.png's bytes stand in for a drawing), and a file of every
    other site, each with its own bytes."""
    models.save(last_pt(1), str(tmp_path / "last.pt"))
    models.save(last_pt(1), str(tmp_path / "best.pt"))
    runlog.append(str(tmp_path), RECORD)
    for name in ("curves.png", "x.json.state", "x.json", "m.png", "grid.json", "table.csv", "table.md", "aa.png"):
        (tmp_path / name).write_text(f"before: {name}")
    return tmp_path


@pytest.mark.parametrize("code", CODES)
@pytest.mark.parametrize("site", SITES)
def test_a_full_disk_at_any_write_keeps_every_file_and_names_the_one(folder: Path, full_disk, site: str, code) -> None:
    """The one writer fails after half of the file (a full disk, an exceeded quota): the site ends in a
    WriteError naming the file and the error, the file and every other keep their bytes, and no .tmp is left."""
    name, write = SITES[site]
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    full_disk(code, name + ".tmp")
    with pytest.raises(runlog.WriteError) as e:
        write(folder)
    assert str(e.value) == f"cannot write {folder / name}: {CODES[code]}" and e.value.errno == code
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in REWRITES.get(site, ())}
    assert after == {k: v for k, v in before.items() if k not in REWRITES.get(site, ())} and name in after


def test_every_write_site_goes_through_the_one_writer(folder: Path, monkeypatch) -> None:
    """What the test above patches is what every site writes with: with it working, each site writes its file."""
    names = []
    real = runlog._write_all
    monkeypatch.setattr(
        runlog, "_write_all", lambda fd, data: names.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd, data)
    )
    for site, (name, write) in SITES.items():
        write(folder)
        assert any(n.endswith(f"/{name}.tmp") for n in names), site
    assert not list(folder.glob("*.tmp")) and models.read(str(folder / "last.pt"))["epoch"] == 2


def test_a_file_that_is_not_a_regular_file_is_written_to_never_replaced() -> None:
    """`--plot /dev/null`, a pipe: the writer writes into them; a rename over /dev/null (as root) would replace it."""
    runlog.write(os.devnull, b"x")
    assert not os.path.isfile(os.devnull) and not os.path.exists(os.devnull + ".tmp")


def test_torch_save_s_own_error_is_never_what_a_full_disk_says(tmp_path: Path, full_disk) -> None:
    """torch.save to a file turns a full disk into RuntimeError('basic_ios::clear: iostream error'); models.save
    serializes in memory, so the disk's error is an OSError with its errno, named as cli.run says it."""
    full_disk(errno.ENOSPC, "")
    with pytest.raises(SystemExit) as e:
        cli.run("train.py", lambda: models.save(last_pt(1), str(tmp_path / "last.pt")), "", "nothing was saved")
    assert (
        e.value.code
        == f"train.py: error: cannot write {tmp_path / 'last.pt'}: {CODES[errno.ENOSPC]}; nothing was saved"
    )
    assert list(tmp_path.iterdir()) == []


def test_exit_codes_are_defined_once_and_read_as_a_shell_does() -> None:
    assert (cli.USAGE, cli.FAILED, cli.INTERRUPTED, cli.TERMINATED) == (2, 1, 130, 143)
    assert set(runner.STOPPED) == {cli.INTERRUPTED, cli.TERMINATED} and runner.TERMINATED == cli.TERMINATED  # no torch


@pytest.mark.parametrize(
    "signum, code, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")]
)
def test_a_signal_during_a_save_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch, capsys, signum, code, said, sigterm_fails_the_test
) -> None:
    """Ctrl-C or SIGTERM halfway through a write: one line saying what was kept, its exit code, the file as it was,
    no .tmp; the handlers of the caller are back afterwards."""
    (tmp_path / "last.pt").write_bytes(b"epoch 1")
    real = runlog._write_all

    def signalled(fd: int, data) -> None:
        real(fd, bytes(data[:10]))
        os.kill(os.getpid(), signum)  # handled at the next line of Python, here
        real(fd, bytes(data[10:]))

    monkeypatch.setattr(runlog, "_write_all", signalled)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        cli.run("train.py", lambda: models.save(last_pt(2), str(tmp_path / "last.pt")), "", "last.pt keeps epoch 1")
    assert e.value.code == code and capsys.readouterr().err == f"train.py: {said}; last.pt keeps epoch 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"] and (tmp_path / "last.pt").read_bytes() == b"epoch 1"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize("exits", [143, 1])
def test_a_link_passes_sigterm_on_and_is_stopped_not_failed(tmp_path: Path, sigterm_fails_the_test, exits) -> None:
    """SIGTERM to a link (results/runner.py) reaches its command, which says what it kept and exits 143 (or 1, as
    torchrun does once its processes have stopped); the link waits for it, logs it as stopped, exits 143 (a requeue
    script's interruption) and the same line continues it."""
    cmd, before = [sys.executable, "-c", CHILD.replace("143", str(exits))], signal.getsignal(signal.SIGTERM)
    rc = runner.link(str(tmp_path / "console.log"), str(tmp_path / "result.json"), cmd)
    lines = runner.log_lines(tmp_path / "console.log")
    assert (
        rc == 143 and lines[-2] == "x.py: terminated (SIGTERM); kept" and lines[-1].startswith("stopped (SIGTERM) in")
    )
    assert runner.state([(str(tmp_path / "result.json"), cmd)], tmp_path / "console.log") == "stopped"
    assert runner.last_line(tmp_path / "console.log") == "x.py: terminated (SIGTERM); kept"
    assert signal.getsignal(signal.SIGTERM) == before


# a command as cli.run ends one (without torch's import: seconds), SIGTERMing the link that runs it
CHILD = (
    "import os, signal, sys, time; "
    "said = lambda *a: (print('x.py: terminated (SIGTERM); kept', file=sys.stderr), sys.exit(143)); "
    "signal.signal(signal.SIGTERM, said); os.kill(os.getppid(), signal.SIGTERM); time.sleep(30)"
)


def test_sigterm_to_a_local_grid_stops_its_runs_and_starts_no_other(tmp_path: Path, capsys, sigterm_fails_the_test):
    """compare.py's local queue (runner.run_local) gets SIGTERM, which reaches it alone: it passes it to the running
    line's link (which passes it to its command), starts neither that line's next link nor a queued line, waits for
    the command to say what it kept, and ends in one line with exit 143."""
    me, lines = str(os.getpid()), {}
    for run, cmd in (("a", [sys.executable, "-c", TERMINATING, me]), ("b", [sys.executable, "-c", "0"])):
        (tmp_path / run).mkdir()
        links = [(str(tmp_path / run / "one.json"), cmd), (str(tmp_path / run / "two.json"), cmd)]
        lines[str(tmp_path / run)] = runner.chain_line(links, str(tmp_path / run / "console.log"), tmp_path)
    job = lambda: runner.run_local(lines, runner.slots([], 1, 1), lambda *a: None)  # noqa: E731
    with pytest.raises(SystemExit) as e:
        cli.run("compare.py", job, "", "the same command continues the grid where it stopped")
    said = "compare.py: terminated (SIGTERM); the same command continues the grid where it stopped\n"
    assert e.value.code == 143 and capsys.readouterr().err == said
    marks = [ln for ln in runner.log_lines(tmp_path / "a" / "console.log") if ln.startswith(runner.MARKS)]
    assert len(marks) == 2 and marks[1].startswith("stopped (SIGTERM)")  # one link, stopped; not the next
    assert not (tmp_path / "b" / "console.log").exists()  # the queued line never started


# a command that SIGTERMs the process in argv[1] (the queue), then waits to be stopped, as cli.run stops a script
TERMINATING = (
    "import os, signal, sys, time; "
    "said = lambda *a: (print('x.py: terminated (SIGTERM); kept', file=sys.stderr), sys.exit(143)); "
    "signal.signal(signal.SIGTERM, said); os.kill(int(sys.argv[1]), signal.SIGTERM); time.sleep(30)"
)


def mount(where: Path, kib: int, remount: bool = False) -> None:
    size = f"{'remount,' * remount}size={kib}k"
    subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(where)], check=True, capture_output=True)


def can_mount(where: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    try:
        mount(where, 8192)
    except subprocess.CalledProcessError:
        return False
    return True


def test_train_on_a_real_full_disk_says_one_line_and_resumes(tmp_path: Path, capsys) -> None:
    """On a tmpfs with room for the first epoch's files but not for the second last.pt beside them: one line, exit
    1, no .tmp, the first epoch's files intact; with space freed, --resume continues the run."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not can_mount(disk):
        pytest.skip("needs root and tmpfs to make a small filesystem")
    try:
        out, flags = disk / "r", ["--smoke", "--device", "cpu", "--width", "4", "--epochs", "2"]
        train.main([*flags, "--out", str(out), "--stop-after", "1"])
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        used = sum(len(b) for b in before.values()) // 1024
        mount(disk, used + 64 + len(before["last.pt"]) // 2048, remount=True)  # the files, and half a last.pt more
        with pytest.raises(SystemExit) as e:
            train.main([*flags, "--out", str(out), "--resume"])
        assert e.value.code == (
            f"train.py: error: cannot write {out / 'last.pt'}: no space left on device; "
            f"{out / 'last.pt'} keeps the last finished epoch (continue with --resume)"
        )
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        mount(disk, 8192, remount=True)
        train.main([*flags, "--out", str(out), "--resume", "--stop-after", "1"])  # the epoch that did not fit
        assert models.read(str(out / "last.pt"))["epoch"] == 2 and not list(out.glob("*.tmp"))
        assert [r.get("epoch") for r in runlog.records(str(out))][:2] == [1, 2]
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], capture_output=True)  # also where a traceback holds a file
