"""The receiver-state detector (heimdall.data.states.detect) measured on synthetic data: its
false-alarm rate on noise alone, and its detection rate against the true SNR of the links of a
world (shadowing, fading, noise and int16 quantisation as `heimdall data synth` makes them).

Usage: python bench/detector.py [--captures 4000] [--world default]
"""
from __future__ import annotations

import argparse

import numpy as np

from heimdall.data.states import DETECT_SNR_DB, detect
from heimdall.data.synth import SynthSpec, make_world
from heimdall.data.world import WORLD_PRESETS

BINS = (-6, -4, -2, -1, 0, 1, 2, 4, 6)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--captures", type=int, default=4000)
    p.add_argument("--world", default="default", choices=sorted(WORLD_PRESETS))
    args = p.parse_args()
    print(f"detector: heard when the SNR measured from the IQ >= {DETECT_SNR_DB:g} dB; world {args.world}")
    print(f"{'IQ length':>10}{'false alarms':>16}  detection rate by true SNR (dB, bin start): "
          + " ".join(f"{b:>5}" for b in BINS))
    for length in (128, 256, 1024):
        world = make_world(SynthSpec(out="", samples=1, seed=5, iq_length=length, world=WORLD_PRESETS[args.world]))
        rng = np.random.default_rng(length)
        links = world.draw_links(rng, args.captures)
        quiet = {**links, "rx_power_dbm": np.full_like(links["rx_power_dbm"], -300.0)}
        noise_only = world.render_iq(rng, quiet)[links["present"]]
        false_alarms = detect(noise_only).mean()
        iq = world.render_iq(rng, links)
        present, snr = links["present"], links["snr_db"]
        heard = detect(iq)
        rates = []
        for lo, hi in zip(BINS, BINS[1:] + (99,)):
            sel = present & (snr >= lo) & (snr < hi)
            rates.append(f"{heard[sel].mean():5.3f}" if sel.any() else "    -")
        print(f"{length:>10}{false_alarms:>9.4f} of {len(noise_only):<6}  {'':>44}" + " ".join(rates))


if __name__ == "__main__":
    main()
