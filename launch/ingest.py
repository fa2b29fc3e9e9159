"""Ray Data ingestion: a dataset's split shards -> Ray Datasets -> per-worker torch batches.

Shuffling is by file order, reseeded every epoch (FileShuffleConfig), never by a local shuffle
buffer (17x slower on an H200). Rows inside a shard keep their generation order, which is already
random: synthetic samples are i.i.d. Last-batch rule: `streaming_split(equal=True)` gives every
worker the same row count (dropping at most world_size - 1 rows) and each worker drops its final
partial training batch, so an epoch sees all train rows but fewer than world_size * batch_size.
Validation keeps every row a worker receives.

The V1 Parquet reader is used: in Ray 2.60 the default V2 reader lists files in one task (~2 s per
epoch here) and packs a whole small split into one block, so the first batch waits for the entire
read; V1 reads one task per shard and streams (measured: bench/ingest.py).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from typing import Callable

import ray
from ray.data import DataContext, DataIterator, FileShuffleConfig

from heimdall.training.batch import INPUT_COLUMNS, to_inputs
from heimdall.data.dataset import Dataset


def split_dataset(dataset: Dataset, split: str, shuffle_seed: int | None, read_cpus: float,
                  first_epoch: int = 0) -> ray.data.Dataset:
    """One split as a Ray Dataset whose executions are epochs first_epoch, first_epoch + 1, ...

    Ray Data seeds an execution's file shuffle with (seed, the dataset's count of executions), and
    every copy of a dataset counts from 0: a worker group that Ray Train restarts at epoch k would
    replay epoch 0's order unless the count starts at k. Epoch e's order is then the same in a run
    through any number of restarts as in the run without them."""
    paths = [dataset.shard_path(s) for s in dataset.split_shards(split)]
    shuffle = FileShuffleConfig(seed=shuffle_seed, reseed_after_execution=True) if shuffle_seed is not None else None
    DataContext.get_current().use_datasource_v2 = False
    ds = ray.data.read_parquet(paths, filesystem=dataset.fs, columns=INPUT_COLUMNS, shuffle=shuffle,
                               num_cpus=read_cpus, override_num_blocks=len(paths))
    ds.context._execution_idx = first_epoch  # no public setter in Ray 2.60 (tests/test_train.py holds it)
    return ds


class TrainSplit:
    """The train split as a dataset factory for Ray Train, which calls it at every worker-group
    start in its controller: the split reads from the epoch the group resumes at (`first_epoch()`),
    with the Ray Data settings (progress bars, reader) of the process that built the factory, not
    the controller's defaults."""

    def __init__(self, dataset: Dataset, seed: int, read_cpus: float, first_epoch: Callable[[], int]):
        self.dataset, self.seed, self.read_cpus, self.first_epoch = dataset, seed, read_cpus, first_epoch
        self.context = DataContext.get_current().copy()

    def __call__(self) -> ray.data.Dataset:
        DataContext._set_current(self.context.copy())  # as Ray Train's own DatasetManager does
        return split_dataset(self.dataset, "train", self.seed, self.read_cpus, self.first_epoch())


def train_val_datasets(dataset: Dataset, seed: int, read_cpus: float) -> dict[str, ray.data.Dataset]:
    return {"train": split_dataset(dataset, "train", seed, read_cpus),
            "val": split_dataset(dataset, "val", None, read_cpus)}


class ShardBatches:
    """One worker's share of a split as model-input batches; iterate once per epoch.

    With `prestart`, each epoch's Ray Data execution starts early: the first when the loader is
    built (overlapping model and trainer set-up), the next as soon as this one's batches run out
    (overlapping validation and checkpointing), so no epoch's first step waits for read start-up.
    """

    def __init__(self, shard: DataIterator, dataset: Dataset, split: str, batch_size: int,
                 ref_lat: float, ref_lon: float, drop_last: bool, prestart: bool = False):
        self.shard, self.dataset, self.split, self.batch_size = shard, dataset, split, batch_size
        self.ref, self.drop_last, self.prestart = (ref_lat, ref_lon), drop_last, prestart
        self._next: Future | None = _PRESTART.submit(self._open) if prestart else None

    def _open(self):
        tables = iter(self.shard.iter_batches(batch_size=self.batch_size, batch_format="pyarrow",
                                              drop_last=self.drop_last, prefetch_batches=2))
        return tables, next(tables, None)

    def __iter__(self):
        tables, first = self._next.result() if self._next else self._open()
        self._next = None
        where = f"{self.dataset.uri} ({self.split} split via Ray Data)"
        if first is not None:
            for table in chain([first], tables):
                yield to_inputs(self.dataset.decode(table, self.split, where), *self.ref)
        if self.prestart:
            self._next = _PRESTART.submit(self._open)


_PRESTART = ThreadPoolExecutor(max_workers=1, thread_name_prefix="heimdall-next-epoch")
