"""heimdall.training.prefetch.DevicePrefetch on the CPU (its CUDA stream path runs in bench/gpu_check.sh)."""
import threading

import pytest
import torch

from heimdall.training.prefetch import DevicePrefetch


def batches(n):
    for i in range(n):
        yield {"x": torch.full((2,), float(i))}


class Stream:
    def __init__(self, n):
        self.n, self.epoch = n, None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return batches(self.n)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_every_batch_in_order_every_epoch(depth):
    stream = Stream(7)
    loader = DevicePrefetch(stream, "cpu", depth)
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert [int(b["x"][0]) for b in loader] == list(range(7))
        assert stream.epoch == epoch


def test_a_reader_error_reaches_the_training_loop():
    def broken():
        yield {"x": torch.zeros(1)}
        raise ValueError("shard 3 is corrupt")

    it = iter(DevicePrefetch(broken(), "cpu", 2))
    next(it)
    with pytest.raises(ValueError, match="shard 3 is corrupt"):
        next(it)


def test_stopping_early_leaves_no_thread_behind():
    before = threading.active_count()
    it = iter(DevicePrefetch(Stream(1000), "cpu", 2))
    next(it)
    it.close()  # what Lightning does when an epoch ends early (limit_train_batches, should_stop)
    assert threading.active_count() == before
