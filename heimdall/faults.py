"""Deterministic fault injection: kill this process at a named point of an epoch, once.

    HEIMDALL_FAULT=checkpoint_upload@2,driver_final   points to kill at (epoch 0-based, default 1)
    HEIMDALL_FAULT=checkpoint_upload=enospc@2         a simulated full disk there instead of a kill
    HEIMDALL_FAULT_MARKER=/tmp/faults                 folder of markers: each point fires once

A point fires only if its marker file is absent; the marker is written before the fault, so the
restarted process (a Ray worker group restart, or the operator running the command again) goes
past it. The kill is SIGKILL: no handler, no flush, like a reclaimed node or an OOM kill. `enospc`
raises OSError(ENOSPC) as a full disk would.

Points:
  validation         a worker, after the first validation batch of the epoch
  before_report      a worker, the epoch's metrics computed, before its checkpoint is written
  checkpoint_upload  a worker, half of the epoch's checkpoint written to storage
  after_commit       the process that records committed epochs (Ray Train's controller; `fit`
                     itself), the checkpoint committed, its metrics not yet sent to MLflow / CSV
  driver_final       the driver, training done, before its outputs and MLflow run are finished
  dataset_write      `data synth` / `data import`, after N chunks / shards of the new dataset are
                     written (N is the "epoch" here), before its manifest
"""
from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

POINTS = ("validation", "before_report", "checkpoint_upload", "after_commit", "driver_final", "dataset_write")
ENV = ("HEIMDALL_FAULT", "HEIMDALL_FAULT_MARKER")


def settings() -> dict[str, str]:
    """The fault settings of this process, to hand to processes that do not inherit its environment."""
    return {k: os.environ[k] for k in ENV if k in os.environ}


def install(env: dict[str, str]) -> None:
    os.environ.update(env)


def planned() -> dict[str, tuple[int, str]]:
    """point -> (epoch, action) from HEIMDALL_FAULT."""
    spec = os.environ.get("HEIMDALL_FAULT", "")
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        what, _, epoch = item.partition("@")
        point, _, action = what.partition("=")
        if point not in POINTS or action not in ("", "kill", "enospc"):
            raise ValueError(f"HEIMDALL_FAULT: unknown fault {what!r} (points: {', '.join(POINTS)}; "
                             "actions: kill, enospc)")
        out[point] = (int(epoch) if epoch else 1, action or "kill")
    return out


def maybe_kill(point: str, epoch: int | None = None) -> None:
    """Fault here if HEIMDALL_FAULT names this point (and epoch) and it has not fired yet."""
    want, action = planned().get(point, (None, ""))
    if want is None or (epoch is not None and epoch != want):
        return
    folder = os.environ.get("HEIMDALL_FAULT_MARKER")
    if not folder:
        raise ValueError("HEIMDALL_FAULT needs HEIMDALL_FAULT_MARKER (a folder) so each point fires once")
    Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(Path(folder) / point, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    os.close(fd)
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (simulated by HEIMDALL_FAULT at {point})")
    os.kill(os.getpid(), signal.SIGKILL)


def write_halves(stream, data: bytes, point: str, epoch: int | None) -> None:
    """Write data to an open stream in two halves, with the fault point between them."""
    stream.write(data[: len(data) // 2])
    if point in planned():
        stream.flush()
        maybe_kill(point, epoch)
    stream.write(data[len(data) // 2:])
