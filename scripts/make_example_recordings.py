"""Write the tiny example recordings in examples/recordings/ with the project's own synthetic world.

    .venv/bin/python scripts/make_example_recordings.py [OUT]

sigmf/: 40 captures, one folder each, one .sigmf-data/.sigmf-meta pair per receiver online (hearing or not).
legacy/: 8 sessions of the earlier service's layout ({session}_iq.npy, _label.npy, _metadata.json),
half as (R, L) complex64 (full scale 1.0), half as (R, 2, L) int16. Deterministic: same bytes every run.
"""
import json
import shutil
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from heimdall.data.recordings import write_sigmf
from heimdall.data.states import ABSENT
from heimdall.data.synth import SynthSpec, generate_chunk, make_world
from heimdall.data.world import WORLD_PRESETS

IQ_LENGTH, RATE = 256, 48_000.0


def main(out: Path) -> None:
    world = make_world(SynthSpec(out="", samples=48, seed=11, iq_length=IQ_LENGTH, sample_rate_hz=RATE,
                                 world=WORLD_PRESETS["low-noise"]))
    cols = generate_chunk(world, 11, 0, 0, 48)
    names, start = world.network.names, datetime(2026, 5, 1, 10, 0, tzinfo=timezone.utc)
    shutil.rmtree(out, ignore_errors=True)
    for k in range(48):
        stamp = (start + timedelta(minutes=k)).isoformat().replace("+00:00", "Z")
        tx = (float(cols["tx_lat"][k]), float(cols["tx_lon"][k]))
        if k < 40:
            for i, name in enumerate(names):
                if cols["rx_state"][k, i] != ABSENT:
                    write_sigmf(out / "sigmf" / f"capture-{k:03d}", name, cols["iq"][k, i], tuple(cols["rx_pos"][k, i]),
                                RATE, float(cols["freq_hz"][k]), stamp, tx)
            continue
        session, legacy = f"session-{k:03d}", out / "legacy"
        legacy.mkdir(parents=True, exist_ok=True)
        iq = np.where(cols["rx_state"][k][:, None, None] != ABSENT, cols["iq"][k], 0).astype(np.int16)  # absent: zeros
        if k % 2:
            iq = ((iq[:, 0] + 1j * iq[:, 1]) / 32767.0).astype(np.complex64)
        np.save(legacy / f"{session}_iq.npy", iq)
        np.save(legacy / f"{session}_label.npy", np.array(tx))
        (legacy / f"{session}_metadata.json").write_text(json.dumps(
            {"sample_rate_hz": RATE, "center_frequency_hz": float(cols["freq_hz"][k]), "receivers": list(names),
             "timestamp": stamp}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/recordings"))
