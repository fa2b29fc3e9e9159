"""The limit a training loop is measured against: forward + Gaussian NLL + backward + clip + AdamW
step of the model on 8 batches kept on the device, with the same model, normalisation, optimiser,
precision and threads as a training worker (no data path, no framework)."""
from __future__ import annotations

import platform
import time

import torch

from heimdall.config import TrainConfig
from heimdall.data.dataset import Dataset


def bare_loop(config: dict, seconds: float) -> dict:
    """Samples/s of forward + Gaussian NLL + backward + clip + AdamW step on 8 batches kept on the device,
    with the same model, normalisation, optimiser, precision and threads as the training worker."""
    from heimdall.training.batch import INPUT_COLUMNS, rebatch, to_inputs
    from heimdall.training.fit import build_module, precision_for
    from heimdall.model.loss import gaussian_nll

    c = TrainConfig.model_validate(config)
    torch.set_num_threads(c.trainer.threads)
    device = "cuda" if c.trainer.accelerator == "gpu" else "cpu"
    dataset = Dataset.open(c.data.uri)
    module = build_module(c, dataset)
    model = module.model.to(device).train()
    optim = module.configure_optimizers()
    opt, schedule = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    ref = float(model.ref_lat), float(model.ref_lon)
    chunks = rebatch(dataset.iter_shards("train", columns=INPUT_COLUMNS), c.data.batch_size, drop_last=True)
    batches = [{k: v.to(device) for k, v in to_inputs(cols, *ref).items()} for cols, _ in zip(chunks, range(8))]
    bf16 = precision_for(c) == "bf16-mixed"

    def timed(steps: int) -> float:
        sync = torch.cuda.synchronize if device == "cuda" else lambda: None
        sync()
        start = time.perf_counter()
        for i in range(steps):
            b = batches[i % len(batches)]
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):  # what Lightning's bf16-mixed does
                mean, tril = model(b["iq"], b["rx_pos"], b["rx_state"])
                loss = gaussian_nll(b["target"], mean.float(), tril.float()).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.optim.grad_clip)
            opt.step()
            schedule.step()
        sync()
        return time.perf_counter() - start

    timed(3)  # warm-up: kernels, allocator
    steps = max(5, int(seconds / (timed(5) / 5)))
    rate = steps * c.data.batch_size / timed(steps)
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {"samples_per_s": rate, "steps": steps, "device": name}
