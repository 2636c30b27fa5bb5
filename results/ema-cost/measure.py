"""The cost of train.py --ema on this machine: the average's update against one training step.

    python results/ema-cost/measure.py          # writes results/ema-cost/cpu.json

bench.py's project step (train.py's own batches and train_step, PreAct ResNet-18 at width 16, batch 32, sovr, one
thread: bench.py's CPU defaults), with and without --ema, alternated so that a change of load hits both; and the
update alone (models.EMA.update), timed over many calls.
"""

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
import bench  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
targs = train.get_args(["--arch", "preact18", "--batch", "32"])
model = models.build("preact18", 10, width=16).to(memory_format=torch.channels_last).train()
pool = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (128,))
ema = models.EMA(model, 0.995, 1000)
plain = bench.project_step(model, bench.sgd(model, targs), targs, *pool, False)
averaged = bench.project_step(model, bench.sgd(model, targs), targs, *pool, False, ema)


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


plain(), averaged()  # warm-up
steps = [(seconds(plain), seconds(averaged)) for _ in range(8)]
update = [seconds(lambda: ema.update(500)) for _ in range(200)]
step_s, step_ema_s, update_s = (statistics.median(v) for v in ([a for a, _ in steps], [b for _, b in steps], update))
out = dict(
    command="python results/ema-cost/measure.py",
    cpu=bench.device_name(torch.device("cpu")),
    torch=torch.__version__,
    python=platform.python_version(),
    params=sum(p.numel() for p in model.parameters()),
    step_s=step_s,
    step_with_ema_s=step_ema_s,
    update_s=update_s,
    update_share_of_step=update_s / step_s,
    steps=steps,
)
(HERE / "cpu.json").write_text(json.dumps(out, indent=2))
print(
    f"step {step_s * 1e3:.1f} ms, with --ema {step_ema_s * 1e3:.1f} ms; the update alone {update_s * 1e3:.3f} ms = "
    f"{100 * update_s / step_s:.2f}% of a step ({out['params'] / 1e6:.2f}M parameters, {out['cpu']})"
)
