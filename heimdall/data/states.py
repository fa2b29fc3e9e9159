"""What each receiver says about a capture: three states, and the one detector that decides them.

    ABSENT (0)  no data from the receiver: offline, not recording, or not part of the capture
    SILENT (1)  online, delivered IQ, but does not hear the transmitter
    HEARD  (2)  online and hears the transmitter

A silent receiver is information: the transmitter is far from it, or shadowed from it.
Synthetic data and imported recordings alike decide SILENT or HEARD from the IQ alone, with
`detect`: the signal-to-noise ratio measured from the IQ (heimdall.data.levels.snr_db: total
power less the median-periodogram noise floor, over that floor) at or above DETECT_SNR_DB: the
signal brings at least as much power into the band as the noise. One threshold for every capture
length, so whether a receiver hears does not depend on how long the capture is; on pure noise the
estimate stays under it (its spread falls as 1/sqrt(L): no false alarm in about 25,000 noise
captures each of 128, 256 and 1024 samples). It assumes a narrowband signal (the 2 m / 70 cm FM
this project locates): a signal spread over most of the band raises the median bin, the noise
estimate, with it. Measured rates: bench/detector.py, docs/receiver-states.md.
"""
from __future__ import annotations

import numpy as np

from heimdall.data.levels import snr_db

ABSENT, SILENT, HEARD = 0, 1, 2
STATE_NAMES = {ABSENT: "absent", SILENT: "silent", HEARD: "heard"}
DETECT_SNR_DB = 0.0


def detect(iq: np.ndarray) -> np.ndarray:
    """(..., 2, L) int16 IQ -> (...) True where the receiver hears a transmitter."""
    return snr_db(iq) >= DETECT_SNR_DB


def receiver_states(iq: np.ndarray, online: np.ndarray) -> np.ndarray:
    """(N, R, 2, L) IQ and (N, R) online -> (N, R) int8 states."""
    heard = np.zeros(online.shape, bool)
    heard[online] = detect(iq[online])
    return np.where(heard, HEARD, np.where(online, SILENT, ABSENT)).astype(np.int8)


def check(rx_state) -> np.ndarray:
    """rx_state as a caller passed it -> int8, or a ValueError saying what is wrong with it."""
    a = np.asarray(rx_state)
    if a.dtype == np.bool_:
        raise ValueError("rx_state is a boolean mask: pass 0 (absent), 1 (online, silent) or 2 (heard) per receiver; "
                         "a two-state mask m is rx_state = 2 * m")
    if not np.isin(a, (ABSENT, SILENT, HEARD)).all():
        raise ValueError(f"rx_state holds {sorted(set(np.unique(a).tolist()) - {ABSENT, SILENT, HEARD})[:5]}: "
                         "only 0 (absent), 1 (online, silent) and 2 (heard) are receiver states")
    return a.astype(np.int8)


def describe() -> dict:
    """The detector as recorded in a dataset manifest."""
    return {"statistic": "heimdall.data.levels.snr_db", "threshold_db": DETECT_SNR_DB,
            "states": {str(k): v for k, v in STATE_NAMES.items()}}
