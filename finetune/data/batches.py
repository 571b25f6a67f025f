"""Which items each process trains on, micro-batch by micro-batch: deterministic, resumable at any
micro-batch, and the same images whether one process or many share a global batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.config import DataConfig
from finetune.counts import counted
from finetune.data.buckets import BucketBatchSampler, Size, assign_buckets, either, ways_to_fill_a_batch
from finetune.data.images import upright_size
from finetune.data.order import Deal, DealtOrder, epoch_generator, order_fingerprint
from finetune.data.sources import Example
from finetune.errors import FinetuneError


class EpochBatchSampler(DealtOrder):
    """An endless, deterministic stream of this process's micro-batches, starting at any micro-batch.

    Micro-batch m covers the global batch m of a seeded permutation of the dataset (a new permutation
    each epoch); process r takes its slice [r*B, (r+1)*B). One process with batch N*B therefore sees
    exactly what N processes with batch B see together, and a resumed run starts where it stopped
    without replaying anything, also at another global batch (`finetune.data.order`).
    """

    def __init__(self, num_items: int, batch_size: int, num_processes: int, process_index: int, seed: int, start: int = 0,
                 resumed_at: dict | None = None):  # fmt: skip
        self.global_batch = batch_size * num_processes
        if num_items < self.global_batch:
            raise FinetuneError(
                f"the dataset has {counted(num_items, 'image')}, fewer than one global batch ({batch_size} x {counted(num_processes, 'process', 'processes')}): "
                f"{either(ways_to_fill_a_batch(num_items, batch_size, num_processes))}"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.batches_per_epoch = num_items // self.global_batch
        self.images_per_epoch = self.batches_per_epoch * self.global_batch  # the rest wait for the next epoch's shuffle
        self._permuted: tuple[int, list[int]] = (-1, [])
        self.start_at(start, resumed_at)

    def permutation(self, epoch: int) -> list[int]:
        if self._permuted[0] != epoch:
            self._permuted = (epoch, torch.randperm(self.num_items, generator=epoch_generator(self.seed, epoch)).tolist())
        return self._permuted[1]

    def deal(self, epoch: int, trained: frozenset[int], global_batch: int, processes: int) -> Deal:
        """The epoch's permutation but `trained`, in whole global batches (the rest wait for the next epoch's shuffle)."""
        rest = [index for index in self.permutation(epoch) if index not in trained]
        return [rest[first : first + global_batch] for first in range(0, len(rest) - global_batch + 1, global_batch)]

    def rows_of(self, micro_batch: int) -> tuple[int, slice]:
        """(size of global batch `micro_batch`, this process's rows of it): always full here."""
        return self.global_batch, slice(self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size)

    def order_key(self) -> str:
        return order_fingerprint(self.seed, self.num_items, None)


@dataclass(frozen=True)
class ItemLayout:
    """What a batch sampler reads of a dataset: its length and, with bucketing, each item's bucket. Known
    from the checked data, before any model loads (so the run's length in epochs is known then too)."""

    bucket_of: list[Size] | None
    num_items: int

    def __len__(self) -> int:
        return self.num_items

    def order_key(self, seed: int) -> str:
        """The `order_key` of the batch sampler `make_batch_sampler` makes of this layout with `seed`."""
        return order_fingerprint(seed, self.num_items, self.bucket_of)


def item_layout(items: list[Example], config: DataConfig) -> ItemLayout:
    """The layout a dataset of these items (each item's image) will have: buckets as the datasets assign them."""
    return ItemLayout(assign_buckets([upright_size(item) for item in items], config), len(items))


def make_batch_sampler(dataset, batch_size: int, num_processes: int, process_index: int, seed: int, start: int = 0, resumed_at: dict | None = None):
    """Batches of one bucket each for a dataset (or ItemLayout) with `bucket_of` (bucketing on), else square batches;
    from micro-batch `start`, at the position a checkpoint recorded (`resumed_at`, see `finetune.data.order`)."""
    bucket_of = getattr(dataset, "bucket_of", None)
    if bucket_of is None:
        return EpochBatchSampler(len(dataset), batch_size, num_processes, process_index, seed, start=start, resumed_at=resumed_at)
    return BucketBatchSampler(bucket_of, batch_size, num_processes, process_index, seed, start=start, resumed_at=resumed_at)
