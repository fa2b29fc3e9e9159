"""Where a training step's time goes: milliseconds per step of `heimdall fit`, by Lightning's own
action names (Lightning's profiler) and, on a GPU, the kernel time per step (PyTorch profiler), for
the old data path (data.prefetch_batches=0) and the new one, in one command:

    python bench/profile_step.py --data URI [--steps 60] [key=value ...]

Columns (mean per step, past the first 5): the whole step (between batch starts), waiting for data
(`train_dataloader_next`), copy to the device (`batch_to_device`), forward + backward + optimizer
step (`run_training_batch`), per-step framework hooks (callbacks' and the module's batch hooks, the
LR scheduler), and what is left (the loop itself). On a GPU the host columns show where the host
waits; `GPU busy` is the summed kernel time of a step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.profilers import SimpleProfiler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heimdall.config import FitConfig, load_config  # noqa: E402
from heimdall.data.dataset import Dataset  # noqa: E402
from heimdall.training.fit import build_module, local_loaders, make_trainer, run, seed_everything  # noqa: E402

HOOKS = ("on_train_batch_start", "on_train_batch_end", "lr_scheduler_step")


class StepClock(L.Callback):
    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.starts.append(time.perf_counter())


WARM_UP = 5  # steps left out: first batches, allocator, kernel selection


def per_step(durations: dict[str, list[float]], match, steps: int) -> float:
    """Mean milliseconds per step past warm-up of the matching per-step actions (training batches only)."""
    return 1000 * sum(statistics.mean(v[WARM_UP:steps]) for k, v in durations.items() if match(k))


def profile(config: FitConfig, steps: int) -> dict[str, float]:
    """One epoch of `steps` training steps (one validation batch): milliseconds per step by category."""
    clock, lightning_profiler = StepClock(), SimpleProfiler()
    config = config.model_copy(deep=True)
    config.trainer.progress = False
    with tempfile.TemporaryDirectory() as tmp:
        config.trainer.out_dir = tmp
        cuda = torch.cuda.is_available() and config.trainer.accelerator != "cpu"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as torch_profiler:
            seed_everything(config)
            dataset = Dataset.open(config.data.uri)
            module = build_module(config, dataset)
            trainer = make_trainer(config, [clock], lambda *_: None, profiler=lightning_profiler,
                                   limit_train_batches=steps, limit_val_batches=1, max_epochs=1)
            run(trainer, module, local_loaders(config, dataset, module), config, None, lambda *_: None)
    d = lightning_profiler.recorded_durations
    n = len(clock.starts)
    row = {"step": 1000 * (clock.starts[-1] - clock.starts[WARM_UP]) / (n - 1 - WARM_UP),
           "data": per_step(d, lambda k: k.endswith("train_dataloader_next"), n),
           "copy": per_step(d, lambda k: k.endswith("batch_to_device"), n),
           "fwd_bwd_step": per_step(d, lambda k: k == "run_training_batch", n),
           "hooks": per_step(d, lambda k: k.startswith(("[Callback]", "[LightningModule]")) and k.endswith(HOOKS), n)}
    row["other"] = row["step"] - row["data"] - row["copy"] - row["fwd_bwd_step"] - row["hooks"]
    if cuda:
        kernels = sum(e.self_device_time_total for e in torch_profiler.key_averages())
        row["gpu_busy"] = kernels / 1000 / n  # all steps, warm-up included: kernel time is not split by step
    row["samples_per_s"] = config.data.batch_size * 1000 / row["step"]
    return row


def table(rows: dict[str, dict[str, float]]) -> str:
    cols = ["step", "data", "copy", "fwd_bwd_step", "hooks", "other"] + (["gpu_busy"] if any(
        "gpu_busy" in r for r in rows.values()) else [])
    head = f"{'path':34s}" + "".join(f"{c:>13s}" for c in cols) + f"{'samples/s':>11s}"
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:34s}" + "".join(f"{r[c]:13.2f}" for c in cols) + f"{r['samples_per_s']:11,.0f}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--json", help="write the table as JSON here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args()
    config = load_config(None, [f"data.uri={args.data}", *args.overrides])
    rows = {}
    for name, depth in (("old: prefetch_batches=0", 0), (f"new: prefetch_batches={config.data.prefetch_batches}",
                                                          config.data.prefetch_batches)):
        c = config.model_copy(deep=True)
        c.data.prefetch_batches = depth
        rows[name] = profile(c, args.steps)
    print(f"milliseconds per training step, {config.model.size}, batch {config.data.batch_size}, "
          f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU'}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
