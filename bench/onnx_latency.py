"""ONNX Runtime (CPU) vs PyTorch eager on the same serving graph and the same inputs: latency at
batch 1 and throughput at batch 64, plus the export time, in one command.

Both run the whole serving graph (geodesy, features, network, ellipse), with the same number of
threads. Repeats alternate between the two engines and the figures are medians: this machine is
shared and noisy. Weights do not change the cost, so an untrained model of each size is used
(frame and normalisation fitted on the dataset, as in training).
Usage: python bench/onnx_latency.py [--data data/quick] [--sizes tiny base] [--threads 1] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from heimdall.config import FitConfig
from heimdall.data.dataset import Dataset
from heimdall.serving.export import OnnxPredictor, TorchPredictor, export_graph
from heimdall.training.fit import build_module


def timed(fn, args, n: int) -> float:
    """Median seconds per call over n calls (after one warm-up call)."""
    fn(*args)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_size(size: str, dataset: Dataset, threads: int, repeats: int) -> dict:
    config = FitConfig.model_validate({"data": {"uri": dataset.uri, "normalization_samples": 512}, "model": {"size": size}})
    module = build_module(config, dataset)
    start = time.perf_counter()
    proto = export_graph(module.model, dataset.num_receivers, dataset.iq_length)
    export_s = time.perf_counter() - start
    engines = {"pytorch": TorchPredictor(module.model), "onnxruntime": OnnxPredictor(proto.SerializeToString(), threads)}
    cols = next(dataset.iter_shards("test", columns=["iq", "rx_pos", "rx_state"]))
    one = tuple(np.array(cols[k][:1]) for k in ("iq", "rx_pos", "rx_state"))
    many = tuple(np.array(cols[k][:64]) for k in ("iq", "rx_pos", "rx_state"))
    latency = {e: [] for e in engines}
    throughput = {e: [] for e in engines}
    for r in range(repeats):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):  # alternate the order
            latency[name].append(timed(engines[name], one, 50) * 1000)
            throughput[name].append(64 / timed(engines[name], many, 5))
    row = {"size": size, "params": sum(p.numel() for p in module.model.parameters()), "export_s": export_s,
           "onnx_bytes": len(proto.SerializeToString())}
    for name in engines:
        row[f"{name}_b1_ms"] = statistics.median(latency[name])
        row[f"{name}_b64_per_s"] = statistics.median(throughput[name])
    row["latency_ratio_ort_over_torch"] = row["onnxruntime_b1_ms"] / row["pytorch_b1_ms"]
    row["throughput_ratio_ort_over_torch"] = row["onnxruntime_b64_per_s"] / row["pytorch_b64_per_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/quick")
    ap.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="runs/bench-onnx")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dataset = Dataset.open(args.data)
    rows = [bench_size(size, dataset, args.threads, args.repeats) for size in args.sizes]
    print(f"serving graph, {dataset.num_receivers} receivers x {dataset.iq_length} IQ, {args.threads} thread(s), "
          f"medians of {args.repeats} alternating repeats")
    print(f"{'size':<6}{'params':>9}{'export s':>10}{'torch b1 ms':>13}{'ORT b1 ms':>11}{'ratio':>7}"
          f"{'torch b64/s':>13}{'ORT b64/s':>11}{'ratio':>7}")
    for r in rows:
        print(f"{r['size']:<6}{r['params']:>9,}{r['export_s']:>10.1f}{r['pytorch_b1_ms']:>13.2f}{r['onnxruntime_b1_ms']:>11.2f}"
              f"{r['latency_ratio_ort_over_torch']:>7.2f}{r['pytorch_b64_per_s']:>13,.0f}{r['onnxruntime_b64_per_s']:>11,.0f}"
              f"{r['throughput_ratio_ort_over_torch']:>7.2f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "onnx_latency.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
