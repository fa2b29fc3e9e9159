"""Batches made ready ahead of the training step, for `fit` and the Ray Train worker alike.

A background thread builds the next batches (read, decode, coordinates) and, on a GPU, pins them and
copies them to the device on a side CUDA stream. Without it a GPU step waits twice per batch: the
batch is built while the GPU idles, and its copy from pageable memory on the default stream blocks
the host until the previous step's kernels are done, so reading and computing never overlap
(docs/gpu-speed.md has the profile). `depth=0` is that old path: batches built on demand in the
training loop and moved to the device by Lightning.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

import torch

_END = object()


class DevicePrefetch:
    """Iterate `batches` (dicts of CPU tensors) with `depth` batches built ahead, on `device`."""

    def __init__(self, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | str, depth: int):
        self.batches, self.device, self.depth = batches, torch.device(device), depth
        self._side: torch.cuda.Stream | None = None  # one per loader: the allocator caches memory per stream

    def set_epoch(self, epoch: int) -> None:
        for target in (self.batches, getattr(self.batches, "dataset", None)):  # the batches, or a DataLoader's
            if hasattr(target, "set_epoch"):
                target.set_epoch(epoch)
                return

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.depth == 0:
            yield from self.batches
            return
        cuda = self.device.type == "cuda"
        if cuda and self._side is None:
            self._side = torch.cuda.Stream(self.device)
        side = self._side
        ready: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce() -> None:
            if cuda:  # a new thread starts on device 0: another rank's GPU would get a context too
                torch.cuda.set_device(self.device)
            try:
                for batch in self.batches:
                    event = None
                    if cuda:
                        with torch.cuda.stream(side):
                            batch = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
                            event = torch.cuda.Event()
                            event.record(side)
                    if not put((batch, event)):
                        return
                put(_END)
            except BaseException as e:  # noqa: BLE001 - re-raised in the training loop
                put(e)

        worker = threading.Thread(target=produce, name="heimdall-prefetch", daemon=True)
        worker.start()
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for v in batch.values():
                        v.record_stream(current)  # the allocator must not reuse it before the step is done
                yield batch
        finally:
            stop.set()
            worker.join(timeout=30)
