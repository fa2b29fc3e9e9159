"""Stream a split into torch batches without Ray (the single-device `heimdall fit` path)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from heimdall.training.batch import INPUT_COLUMNS, rebatch, to_inputs
from heimdall.data.dataset import Dataset


class SplitStream(IterableDataset):
    """Batches of one split. Train: shard order and rows shuffled per (seed, epoch), last partial
    batch dropped. Eval: file order, every row once. Loader workers take disjoint shards."""

    def __init__(self, dataset: Dataset, split: str, batch_size: int, ref_lat: float, ref_lon: float,
                 shuffle_seed: int | None = None):
        self.dataset, self.split, self.batch_size = dataset, split, batch_size
        self.ref_lat, self.ref_lon, self.shuffle_seed = ref_lat, ref_lon, shuffle_seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        info = get_worker_info()
        rank, world = (info.id, info.num_workers) if info else (0, 1)
        shards = self.dataset.iter_shards(self.split, self.shuffle_seed, self.epoch, rank, world, INPUT_COLUMNS)
        for cols in rebatch(shards, self.batch_size, drop_last=self.shuffle_seed is not None):
            yield to_inputs(cols, self.ref_lat, self.ref_lon)


def make_loader(stream: SplitStream, workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available())
