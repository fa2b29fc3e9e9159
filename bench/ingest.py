"""Does ingest keep ahead of training? The data path alone (Ray Data read of the shards -> decoded
model-input batches on the device) beside the model's training step rate on the same batches.

Both in one command, same device, the training side on the torch threads a Ray worker gets.
Target (issue 3): ingest >= 3x training samples/s.
Usage: python bench/ingest.py [--data URI] [--epochs E] [--threads T] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import ray
import torch

from launch.cli import WORLD_PRESETS
from heimdall.data.dataset import Dataset
from heimdall.model.loss import gaussian_nll
from heimdall.config import ModelConfig
from heimdall.model.net import build_model
from heimdall.data.synth import SynthSpec, synthesize
from launch.cluster import connect
from launch.ingest import ShardBatches, train_val_datasets


def ingest_rates(dataset: Dataset, epochs: int, batch_size: int, device: str) -> list[float]:
    shard = train_val_datasets(dataset, seed=0, read_cpus=1)["train"].streaming_split(1, equal=True)[0]
    rates = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for batch in ShardBatches(shard, dataset, "train", batch_size, 45.0, 7.5, drop_last=True):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            n += len(batch["rx_state"])
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - start))
    return rates


def train_rate(dataset: Dataset, steps: int, batch_size: int, device: str, size: str) -> float:
    shard = train_val_datasets(dataset, seed=0, read_cpus=1)["train"].streaming_split(1, equal=True)[0]
    batches = []
    for b in ShardBatches(shard, dataset, "train", batch_size, 45.0, 7.5, drop_last=True):
        batches.append({k: v.to(device) for k, v in b.items()})
        if len(batches) == 8:
            break
    model = build_model(ModelConfig(size=size)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = None
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            start = time.perf_counter()
        b = batches[i % len(batches)]
        mean, tril = model(b["iq"], b["rx_pos"], b["rx_state"])
        loss = gaussian_nll(b["target"], mean, tril).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="runs/bench-throughput/data")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if not (Path(args.data) / "manifest.json").exists():
        synthesize(SynthSpec(out=args.data, samples=12000, seed=11, iq_length=512, world=WORLD_PRESETS["low-noise"]),
                   workers=2)
    torch.set_num_threads(args.threads)
    connect()
    dataset = Dataset.open(args.data)
    rates = ingest_rates(dataset, args.epochs, args.batch_size, args.device)
    ingest = statistics.median(rates[1:])
    train = train_rate(dataset, args.steps, args.batch_size, args.device, args.size)
    print(f"\ndataset {args.data}: {dataset.count('train')} train samples, IQ {dataset.num_receivers}x2x"
          f"{dataset.iq_length} int16, device {args.device}")
    print(f"  ingest (Ray Data read -> batches on {args.device}): {ingest:,.0f} samples/s "
          f"(median of epochs 2..{args.epochs}; per epoch {[round(r) for r in rates]})")
    print(f"  training steps, {args.size}, {args.threads} thread(s):  {train:,.0f} samples/s")
    print(f"  ingest / training = {ingest / train:.1f}x (target >= 3x)")
    ray.shutdown()


if __name__ == "__main__":
    main()
