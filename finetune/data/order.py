"""Where a run's data order stands, and how a resumed run continues it, also with another global batch.

The batch samplers (`finetune.data.batches`, `finetune.data.buckets`) deal each epoch's items into global batches from a
seeded shuffle (`deal`). The global batch here is a micro-step's: train.batch_size x processes. An epoch is dealt
once, at the run's global batch.

A checkpoint records where that order stands (`position_after`): the epoch, and the deals it went through in that
epoch, as [global batch, processes, batches trained] each. A resumed run takes it up (`DealtOrder.start_at`):
- At the same global batch, gradient_accumulation_steps changed or not (it groups micro-steps into a step; it deals
  nothing), the same deal goes on where it stopped: the batches a run never stopped trains. Also where the processes
  changed (2 processes of batch 2 resumed by 1 of batch 4): a deal differs by its processes only in a bucket's last
  batch, padded to them.
- At another global batch (other processes or train.batch_size) the epoch's items not trained yet are dealt again at
  the new one, so every image of the epoch trains once before the next epoch's shuffle starts.
- A checkpoint from before the position was recorded, or of another order (`order_key`: another seed, number of
  items or, with bucketing, buckets; not the images themselves, whose change a resume warns of), starts at
  micro-batch `start` of this run's order.
A position of this order that the data could not have dealt (an epoch past any run's, more batches or processes than
images) is a damaged checkpoint's one line, before any deal (`OutsideTheData`, `unusable_position`).
"""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction
from pathlib import Path
from typing import Iterator

from finetune.checkpoints.run_files import STATE_FILE
from finetune.config.training import MAX_ACCUMULATION, MAX_TRAIN_STEPS
from finetune.counts import counted
from finetune.errors import FinetuneError

Deal = list[list[int]]  # an epoch's global batches, in training order (items by index)
# The furthest epoch a checkpoint can be in: an epoch is a micro-batch or more, and a run at most train.max_steps' bound of steps
# of gradient_accumulation_steps' bound. Past it a recorded position is damaged (epoch 10**30 was a traceback from torch's seeding).
MAX_EPOCH = MAX_TRAIN_STEPS * MAX_ACCUMULATION
# Epoch deals a sampler keeps: the stream's first epoch (every look-up reads it), the current one, and the next (a data
# loader's workers read ahead into it).
KEPT_DEALS = 3


class PaddedBatch(list):
    """A global batch with images borrowed to give every process a row (`BucketBatchSampler.deal`): its first `own` items
    are its own, the rest weigh nothing in the step (`finetune.training.step_losses.micro_batch_shares`), so N processes train what one does."""

    def __init__(self, items: list[int], own: int):
        super().__init__(items)
        self.own = own


class OutsideTheData(ValueError):
    """A recorded position of this run's order whose deals this data cannot have dealt (a damaged checkpoint): the
    caller, which knows the checkpoint, says so in one line (`unusable_position`)."""


class DealtOrder:
    """The stream of micro-batches a batch sampler yields, from micro-batch `start` (this run's numbering,
    as the trainer counts them: step x accumulation) and, resumed, from `resumed_at` (a `position_after`).

    A sampler sets the four attributes below, gives `deal`, `rows_of` and `order_key`, and calls `start_at` last.
    """

    global_batch: int
    num_processes: int
    batches_per_epoch: int
    num_items: int
    # Set by `start_at`: `_epoch`, the epoch micro-batch `start` is in; `_earlier`, that epoch's deals before the current
    # one ([global batch, processes, batches trained] each, as recorded); `_current`, the current deal (None: the epoch's
    # whole deal at this run's global batch, `epoch_batches`); `_done`, how many of its batches trained before `start`.

    def deal(self, epoch: int, trained: frozenset[int], global_batch: int, processes: int) -> Deal:
        """Epoch `epoch`'s items but `trained`, dealt into global batches of `global_batch` for `processes`."""
        raise NotImplementedError

    def rows_of(self, micro_batch: int) -> tuple[int, slice]:
        """(size of global batch `micro_batch`, this process's rows of it)."""
        raise NotImplementedError

    def own_images(self, micro_batch: int) -> int:
        """How many images of global batch `micro_batch` are its own: its first ones; the rest, if any, borrowed (`PaddedBatch`)."""
        batch = self.global_batch_indices(micro_batch)
        return batch.own if isinstance(batch, PaddedBatch) else len(batch)

    def order_key(self) -> str:
        """What the order is of (the seed, the items, their buckets): a position of another order does not apply."""
        raise NotImplementedError

    def epoch_batches(self, epoch: int) -> Deal:
        """The global batches of `epoch` dealt whole at this run's global batch. The last few epochs' deals are kept:
        each look-up past the stream's first epoch reads that one's too (`_locate`), and one kept deal was dealt again,
        each time, for every step after the first epoch (a shuffle and a pass over every image, a few a step)."""
        if epoch in self._cached:
            self._cached[epoch] = self._cached.pop(epoch)  # the most recently used last
        else:
            self._cached[epoch] = self.deal(epoch, frozenset(), self.global_batch, self.num_processes)
            if len(self._cached) > KEPT_DEALS:
                del self._cached[next(iter(self._cached))]
        return self._cached[epoch]

    def start_at(self, start: int, resumed_at: dict | None) -> None:
        """Where the stream starts: the epoch it is in, that epoch's deals before the one trained now, the one
        trained now, and how many of its batches trained before `start`."""
        self.start, self._cached = start, {}  # epoch -> its deal, least recently used first
        self.continued = continues(resumed_at, self.order_key())  # a recorded position taken up
        if not self.continued:  # the epoch's deal whole, dealt where first used (a sampler made for its batches_per_epoch deals nothing)
            self._epoch, self._done = divmod(start, self.batches_per_epoch)
            self._earlier, self._current = [], None
            return
        self._epoch, trained = resumed_at["epoch"], frozenset()
        *earlier, (global_batch, processes, done) = resumed_at["dealt"]
        # Each batch of an epoch's deals has an image not trained before it, and each process a row of it: a damaged record of
        # more is refused before any deal (a deal pads a bucket's last batch to its processes: 10**12 of them ran out of memory).
        batches, most_processes = sum(count for *_, count in resumed_at["dealt"]), max(p for _, p, _ in resumed_at["dealt"])
        if max(batches, most_processes) > self.num_items:
            raise OutsideTheData(f"{counted(batches, 'batch', 'batches')} on up to {counted(most_processes, 'process', 'processes')}, "
                                 f"of {counted(self.num_items, 'image')}")
        for then_batch, then_processes, count in earlier:
            trained |= items_of(self._dealt_part(trained, then_batch, then_processes, count))
        # The same global batch is the same deal, where it stopped, also on another number of processes: the processes
        # only pad a bucket's last batch smaller than them (`BucketBatchSampler.deal`), which this run's deal does its way.
        if global_batch == self.global_batch:
            self._earlier, self._done = earlier, done
        else:
            trained |= items_of(self._dealt_part(trained, global_batch, processes, done))
            self._earlier, self._done = earlier + ([[global_batch, processes, done]] if done else []), 0
        self._current = self.deal(self._epoch, trained, self.global_batch, self.num_processes)
        if self._done > len(self._current):
            raise OutsideTheData(f"{counted(done, 'batch', 'batches')} trained of a deal of {counted(len(self._current), 'batch', 'batches')}")

    def _dealt_part(self, trained: frozenset[int], global_batch: int, processes: int, count: int) -> Deal:
        """The first `count` batches of this epoch's deal of the items but `trained` (a recorded deal's)."""
        deal = self.deal(self._epoch, trained, global_batch, processes)
        if count > len(deal):
            raise OutsideTheData(f"{counted(count, 'batch', 'batches')} trained of a deal of {counted(len(deal), 'batch', 'batches')}")
        return deal[:count]

    def epochs_before_start(self) -> Fraction:
        """Epochs trained before micro-batch `start` as this stream counts them: the epoch under way ends with its
        deal's last batch, at this run's batches per epoch (what `finetune.training.run_length` counts a resumed run's epochs from)."""
        return self._epoch + 1 - Fraction(len(self._current_deal()) - self._done, self.batches_per_epoch)

    def _current_deal(self) -> Deal:
        """The deal of the epoch the stream starts in (the recorded position's, or this run's whole)."""
        return self._current if self._current is not None else self.epoch_batches(self._epoch)

    def _locate(self, micro_batch: int) -> tuple[int, int, Deal]:
        """(epoch, batch of its deal, the deal) of micro-batch `micro_batch`."""
        into = micro_batch - self.start + self._done
        if into < 0:
            raise IndexError(f"micro-batch {micro_batch} is before this stream's epoch {self._epoch}")
        current = self._current_deal()
        if into < len(current):
            return self._epoch, into, current
        later, batch = divmod(into - len(current), self.batches_per_epoch)
        return self._epoch + 1 + later, batch, self.epoch_batches(self._epoch + 1 + later)

    def global_batch_indices(self, micro_batch: int) -> list[int]:
        epoch, batch, deal = self._locate(micro_batch)
        return deal[batch]

    def position_after(self, micro_batches: int) -> dict:
        """Where the order stands once micro-batches up to `micro_batches` (this run's numbering) have trained:
        what a checkpoint keeps, for `resumed_at`."""
        epoch, batch, deal = self._locate(micro_batches)
        earlier = self._earlier if epoch == self._epoch else []  # a later epoch is dealt whole
        return {"order": self.order_key(), "epoch": epoch, "dealt": [*earlier, [self.global_batch, self.num_processes, batch]]}

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro_batch = self.start
        while True:
            epoch, batch, deal = self._locate(micro_batch)
            yield [(index, epoch) for index in deal[batch][self.rows_of(micro_batch)[1]]]
            micro_batch += 1


def recorded_position(checkpoint: Path, state: dict) -> dict | None:
    """`checkpoint`'s record of where its data stood (None: from before checkpoints kept one), read from its `state`; one
    the samplers cannot take up (hand-edited: not an epoch and a list of [global batch, processes, batches] deals) is one line."""
    position = state.get("data_order")
    if position is None or _well_formed(position):
        return position
    raise unusable_position(checkpoint, position)


def unusable_position(checkpoint: Path, position, why: str = "") -> FinetuneError:
    """The one line for `checkpoint`'s data_order the samplers cannot take up (`why`: what of it this data could not have dealt)."""
    return FinetuneError(
        f"checkpoint {checkpoint}: its data_order ({json.dumps(position)[:80]}) is not a position in the data order ({why + '; ' if why else ''}"
        f"edited by hand?): resume from another checkpoint, or delete data_order from its {STATE_FILE} (its data then go on by its step, as an "
        "older checkpoint's do)"
    )


def _well_formed(position) -> bool:
    """Whether `position` has the form `position_after` writes: its order key, an epoch up to MAX_EPOCH, and one deal or
    more as [global batch, processes (at most one a row), batches trained (one at least, but in the last deal)]."""

    def count(value, least: int = 0, most: int | None = None) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least and (most is None or value <= most)

    if not isinstance(position, dict) or not isinstance(position.get("order"), str) or not count(position.get("epoch"), most=MAX_EPOCH):
        return False
    # A global batch is train.batch_size x processes: a row each at least. A deal before the last trained a batch or more (a
    # resume that trained none of it records none): so a damaged list has no more deals than batches, which are bounded by the images.
    dealt = position.get("dealt")
    return isinstance(dealt, list) and len(dealt) > 0 and all(
        isinstance(deal, list) and len(deal) == 3 and count(deal[0], 1) and count(deal[1], 1, deal[0]) and count(deal[2], int(i < len(dealt) - 1))
        for i, deal in enumerate(dealt)
    )


def continues(position: dict | None, order_key: str) -> bool:
    """Whether `position` (a checkpoint's record, None before it kept one) is of the order `order_key`: taken up, not
    restarted at micro-batch `start`."""
    return position is not None and position.get("order") == order_key


def items_of(batches: Deal) -> frozenset[int]:
    """The items `batches` trained: each batch's own, not those a padded one borrowed (`PaddedBatch`), whose own batch may
    not have come yet: counted, a resume at another global batch skipped them for the rest of the epoch."""
    return frozenset(index for batch in batches for index in (batch[: batch.own] if isinstance(batch, PaddedBatch) else batch))


def epoch_generator(seed: int, epoch: int):
    """The torch generator an epoch's deal is shuffled by: the same on every process and in a resumed run."""
    import torch  # here: finetune.data.buckets builds on this module and is read without torch (check-data)

    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def order_fingerprint(seed: int, num_items: int, bucket_of: list | None) -> str:
    return hashlib.sha256(json.dumps([seed, num_items, bucket_of]).encode()).hexdigest()[:16]
