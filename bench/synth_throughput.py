"""Synthetic generation throughput, including writing Parquet shards: samples/s per core.

Target (issue 2): >= 1,000 samples/s per CPU core at 7 receivers x 1024 IQ. The earlier Heimdall
generator did 25 samples/s on a GPU. Usage: python bench/synth_throughput.py [--samples N] [--repeats K]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from heimdall.data.synth import SynthSpec, synthesize


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=16384)
    p.add_argument("--iq-length", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    print(f"{args.samples} samples, 7 receivers x {args.iq_length} IQ, {cores} cores, median of {args.repeats}")
    for workers in sorted({1, cores}):
        rates = []
        for r in range(args.repeats):
            out = tempfile.mkdtemp(prefix="synth-bench-")
            try:
                start = time.perf_counter()
                synthesize(SynthSpec(out=out, samples=args.samples, seed=r, iq_length=args.iq_length),
                           workers=workers, overwrite=True, log=lambda *_: None)
                rates.append(args.samples / (time.perf_counter() - start))
            finally:
                shutil.rmtree(out)
        med = statistics.median(rates)
        print(f"workers={workers}: {med:,.0f} samples/s total, {med / workers:,.0f} samples/s per worker core "
              f"(runs: {', '.join(f'{x:,.0f}' for x in rates)})")


if __name__ == "__main__":
    main()
