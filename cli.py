"""What train.py, attack.py and bench.py share as command-line programs: their argument parser (and which flags a
command line gives), the device and torchrun setup and gathering, one clear line for an error a user can cause, a
live progress line, and matplotlib."""

import argparse
import copy
import os
import signal
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

import runlog


def parser(doc: str, **kw) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


def given(p: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the flags that argv sets itself: a second parse in which no flag has a default (set_defaults
    included), so that a default, however it was set, never counts as given."""
    p.parse_args(argv)  # --help (its %(default)s needs the defaults) and errors, from the parser itself
    q = copy.deepcopy(p)
    q._defaults = {}
    for action in q._actions:
        action.default = argparse.SUPPRESS
    return set(vars(q.parse_args(argv)))


def refuse(p: argparse.ArgumentParser, message: str) -> NoReturn:
    """A command line refused after parsing (a value, a combination, a flag that would do nothing, a resume that
    does not match): one line and exit 2, as argparse's own errors, without the usage: the syntax was right."""
    p.exit(2, f"{p.prog}: error: {message}\n")


def as_flags(values: dict, keys: list[str]) -> str:
    """values[k] for k in keys as a command line gives them: --milestones 100,105 --sync-bn on --width (default)."""
    out = []
    for k in keys:
        v = values.get(k)
        v = ",".join(map(str, v)) if isinstance(v, list) else ("off", "on")[v] if isinstance(v, bool) else v
        out.append(f"--{k.replace('_', '-')} {'(default)' if v is None else v}")
    return " ".join(out)


def pick_device(name: str | None) -> torch.device:
    """--device, defaulting to CUDA when present; ValueError for a name torch or this machine lacks."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"--device {name}: no such CUDA device on this machine")
    return device


def rank_device(name: str | None) -> torch.device:
    """Under torchrun, a process's device: the GPU of its LOCAL_RANK (NCCL), or the CPU (gloo) with --device cpu or
    without CUDA. ValueError for a --device that names one GPU (every process takes its own) and for a LOCAL_RANK
    that no visible GPU has (torch.cuda.set_device would raise a CUDA error at it)."""
    device = pick_device(name)  # the name's own errors: not a device, no CUDA on this machine
    if device.type == "cpu":
        return device
    if device.type != "cuda" or device.index is not None:
        raise ValueError(
            f"--device {name} under torchrun: each process takes the GPU of its LOCAL_RANK; give --device cuda, "
            "cpu (gloo) or none, and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    local, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise ValueError(
            f"LOCAL_RANK {local}, but this process sees {count} GPUs (CUDA_VISIBLE_DEVICES {visible}): start at "
            f"most {count} processes a node (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local)


def bf16_default(device: torch.device) -> bool:
    """Whether training runs under bf16 autocast when --amp is not given: on a GPU with bf16 tensor cores, one
    that torch says supports bf16 and of compute capability 8.0 (Ampere) or later. Elsewhere fp32: the CPU, and
    GPUs before Ampere (V100, T4), where torch.cuda.is_bf16_supported() is true by emulation, without the cores."""
    return (
        device.type == "cuda" and torch.cuda.is_bf16_supported() and torch.cuda.get_device_capability(device) >= (8, 0)
    )


# How long a torchrun process may wait in a collective for the others: SOVR_DIST_TIMEOUT seconds, a day by default.
# attack.py's ranks attack their shards with no collective and meet only in the final gathers, hours apart where the
# shards take different times (a resumed evaluation whose shards stopped at different attacks): torch's default (10
# minutes for NCCL, 30 for gloo) aborted the ranks that finished first. One timeout for the process group is the
# simplest mechanism that holds for every such wait, and needs no shared folder across nodes; its cost is that a
# collective that truly hangs is given up as late. A rank that dies does not wait for it: torchrun stops the others,
# and NCCL and gloo see its connections close.
DIST_TIMEOUT_S = 24 * 3600


def dist_timeout() -> timedelta:
    """The process group's timeout (SOVR_DIST_TIMEOUT); ValueError for a value that is not a number of seconds."""
    value = os.environ.get("SOVR_DIST_TIMEOUT", str(DIST_TIMEOUT_S))
    try:
        timeout = timedelta(seconds=float(value))
    except (ValueError, OverflowError):  # not a number, nan, or more days than timedelta holds
        timeout = timedelta(0)
    if timeout <= timedelta(0):
        raise ValueError(f"SOVR_DIST_TIMEOUT={value}: give a number of seconds > 0 (default {DIST_TIMEOUT_S})")
    return timeout


def setup(name: str | None, benchmark: bool = True, deterministic: bool = False) -> tuple[torch.device, int, int]:
    """Device, rank and process count: one process, or under torchrun one per GPU (rank_device; gloo processes on
    the CPU). With `benchmark`, cuDNN times its kernels once for the fixed shapes of training; `deterministic` instead
    allows only kernels that give the same bits every time (an op without one raises)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when CUDA starts cuBLAS: not yet here
        torch.use_deterministic_algorithms(True)
    if "RANK" in os.environ:
        device = rank_device(name)  # before the process group, whose start waits for every process
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=dist_timeout())
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        device = pick_device(name)
    torch.backends.cudnn.benchmark = benchmark and not deterministic and device.type == "cuda"
    return (
        device,
        dist.get_rank() if dist.is_initialized() else 0,
        dist.get_world_size() if dist.is_initialized() else 1,
    )


def gather(values: list) -> list:
    """Every torchrun process's list, concatenated in rank order (the order of the shards)."""
    if not dist.is_initialized():
        return values
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def agreed(value):
    """Rank 0's `value` on every torchrun process. What decides whether or how often a process enters a collective
    (a file it reads, its clock) is taken from rank 0 alone: a process whose own read differed (a stale copy on a
    network filesystem) would otherwise skip a collective the others wait in, for the process group's timeout."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


Message = str | Callable[[], str]

# The exit codes of every script (train.py, attack.py, bench.py, results/*.py), as a shell or a requeue script reads
# them: argparse's 2 for a bad command line; 1 for a failure at run time; after an interruption, what a shell
# reports for a death by that signal (128 + its number), so that a script can tell an interruption from a failure:
# 130 after Ctrl-C (SIGINT), 143 after SIGTERM (SLURM's preemption, scancel and time limit; SLURM's requeue scripts
# treat 143 as an interruption).
USAGE, FAILED, INTERRUPTED, TERMINATED = 2, 1, 128 + signal.SIGINT, 128 + signal.SIGTERM


def _terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM (torchrun's, a link's) cuts no cleanup
    raise runlog.Terminated()


def run(prog: str, job: Callable[[], object], out_of_memory: Message, interrupted: Message):
    """Runs job() and returns what it returns; an error a user can cause ends in one line and a non-zero exit
    (FAILED), never a traceback; Ctrl-C and SIGTERM in one line saying what was kept (`interrupted`) and exit
    INTERRUPTED or TERMINATED. A file that could not be written (a full disk: runlog.WriteError) is named, with what
    was kept. A message given as a function is asked for when it is said (what has been saved by then). What every
    torchrun process meets together (Ctrl-C and SIGTERM reach them all; a non-finite loss is agreed among them) is said
    once, by rank 0."""
    rank = int(os.environ.get("RANK", 0))
    before = signal.getsignal(signal.SIGINT), signal.signal(signal.SIGTERM, _terminated)
    try:
        out = job()
        if dist.is_initialized():
            # every process past its last collective before any tears the group down: a gloo rank that destroyed it
            # right after receiving a broadcast aborted now and then ("terminate called without an active exception")
            dist.barrier()
        return out
    except runlog.WriteError as e:
        sys.exit(f"{prog}: error: {e}; {_say(interrupted)}")
    except (ValueError, OSError) as e:
        sys.exit(f"{prog}: error: {e}")
    except FloatingPointError as e:
        sys.exit(f"{prog}: error: {e}" if rank == 0 else FAILED)
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"{prog}: error: CUDA out of memory {_say(out_of_memory)}")
    except KeyboardInterrupt as e:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # torchrun passes the terminal's Ctrl-C on: a second one
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        how = ("terminated (SIGTERM)", TERMINATED) if isinstance(e, runlog.Terminated) else ("interrupted", INTERRUPTED)
        if rank == 0:
            print(f"{prog}: {how[0]}; {_say(interrupted)}", file=sys.stderr, flush=True)
        sys.exit(how[1])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for sig, handler in zip((signal.SIGINT, signal.SIGTERM), before):  # a caller's (a test's), as they were
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _say(message: Message) -> str:
    return message() if callable(message) else message


def progress(total: int, desc: str, unit: str, rank: int = 0):
    """A live tqdm line on a terminal, on rank 0; elsewhere (logs, CI, other ranks, no tqdm) a silent one."""
    quiet = rank > 0 or not sys.stderr.isatty() or total == 0
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in requirements.txt; without it there is just no live line
        tqdm, quiet = _Silent, True
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=quiet)


class _Silent:
    """tqdm's part that train.py and attack.py use, doing nothing."""

    disable = True

    def __init__(self, **kw):
        self.update = self.set_postfix_str = self.close = lambda *a: None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def figure(flag: str, what: str):
    """A new figure and axes for `flag`'s picture; ValueError without matplotlib (`what` is in the JSON files)."""
    plt = pyplot()
    if plt is None:
        raise ValueError(f"{flag} draws with matplotlib: pip install matplotlib (the {what} are in the JSON files)")
    return plt.subplots(figsize=(6, 3.5))


def save_figure(fig, ax, path: str):
    """`fig`, with its legend, written to `path` (runlog.png: whole or not at all, then closed) and said."""
    ax.legend(fontsize=8)
    fig.tight_layout()
    runlog.png(fig, path, dpi=120)
    print(f"wrote {path}")
    return fig
