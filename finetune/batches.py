"""Which items each process trains on, micro-batch by micro-batch: deterministic, resumable at any
micro-batch, and the same images whether one process or many share a global batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from finetune.buckets import BucketBatchSampler, Size, assign_buckets
from finetune.config import DataConfig
from finetune.counts import counted
from finetune.images import upright_size
from finetune.errors import FinetuneError
from finetune.sources import Example


class EpochBatchSampler:
    """An endless, deterministic stream of this process's micro-batches, starting at any micro-batch.

    Micro-batch m covers the global batch m of a seeded permutation of the dataset (a new permutation
    each epoch); process r takes its slice [r*B, (r+1)*B). One process with batch N*B therefore sees
    exactly what N processes with batch B see together, and a resumed run starts where it stopped
    without replaying anything.
    """

    def __init__(self, num_items: int, batch_size: int, num_processes: int, process_index: int, seed: int, start: int = 0):
        self.global_batch = batch_size * num_processes
        if num_items < self.global_batch:
            raise FinetuneError(
                f"the dataset has {counted(num_items, 'image')}, fewer than one global batch ({batch_size} x {counted(num_processes, 'process', 'processes')}): "
                "lower train.batch_size or add images"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.process_index = process_index
        self.seed = seed
        self.start = start
        self.batches_per_epoch = num_items // self.global_batch
        self.images_per_epoch = self.batches_per_epoch * self.global_batch  # the rest wait for the next epoch's shuffle
        self._cached: tuple[int, list[int]] = (-1, [])

    def permutation(self, epoch: int) -> list[int]:
        if self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._cached = (epoch, torch.randperm(self.num_items, generator=generator).tolist())
        return self._cached[1]

    def global_batch_indices(self, micro_batch: int) -> list[int]:
        epoch, position = divmod(micro_batch, self.batches_per_epoch)
        first = position * self.global_batch
        return self.permutation(epoch)[first : first + self.global_batch]

    def rows_of(self, micro_batch: int) -> tuple[int, slice]:
        """(size of global batch `micro_batch`, this process's rows of it): always full here."""
        return self.global_batch, slice(self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro_batch = self.start
        while True:
            epoch = micro_batch // self.batches_per_epoch
            indices = self.global_batch_indices(micro_batch)
            mine = indices[self.process_index * self.batch_size : (self.process_index + 1) * self.batch_size]
            yield [(index, epoch) for index in mine]
            micro_batch += 1


@dataclass(frozen=True)
class ItemLayout:
    """What a batch sampler reads of a dataset: its length and, with bucketing, each item's bucket. Known
    from the checked data, before any model loads (so the run's length in epochs is known then too)."""

    bucket_of: list[Size] | None
    num_items: int

    def __len__(self) -> int:
        return self.num_items


def item_layout(items: list[Example], config: DataConfig) -> ItemLayout:
    """The layout a dataset of these items (each item's image) will have: buckets as the datasets assign them."""
    return ItemLayout(assign_buckets([upright_size(item) for item in items], config), len(items))


def make_batch_sampler(dataset, batch_size: int, num_processes: int, process_index: int, seed: int, start: int = 0):
    """Batches of one bucket each for a dataset (or ItemLayout) with `bucket_of` (bucketing on), else square batches."""
    bucket_of = getattr(dataset, "bucket_of", None)
    if bucket_of is None:
        return EpochBatchSampler(len(dataset), batch_size, num_processes, process_index, seed, start=start)
    return BucketBatchSampler(bucket_of, batch_size, num_processes, process_index, seed, start=start)
