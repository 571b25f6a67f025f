"""An epoch's uses: each image listed its repeats times (data.folders, a DreamBooth concept's repeats), the
list the batch samplers shuffle whole each epoch, within the bound that keeps it countable."""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.config.base import MAX_USES_PER_EPOCH
from finetune.counts import counted
from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from finetune.data.sources import Example


def check_epoch_uses(repeats: list[int]) -> None:
    """Refuse an epoch of more than MAX_USES_PER_EPOCH uses (`repeats`: each image's), before it is listed: each
    folder's repeats are bounded by the recipe, but many images times large repeats would still be listed until memory ran out."""
    uses = sum(repeats)
    if uses > MAX_USES_PER_EPOCH:
        raise FinetuneError(f"an epoch would use {counted(len(repeats), 'image')} {uses:,} times in all (each its repeats times), more than the "
                            f"{MAX_USES_PER_EPOCH:,} an epoch may have (it is listed and shuffled in memory): lower the repeats")  # fmt: skip


def expand_repeats(examples: list[Example]) -> list[Example]:
    """Each example listed its repeats times: an epoch's uses, in order."""
    check_epoch_uses([example.repeats for example in examples])
    return [example for example in examples for _ in range(example.repeats)]


def expand_together(sources: list[list[Example]]) -> list[list[Example]]:
    """Each source's examples listed their repeats times, the epoch they make together checked first: DreamBooth's
    concepts are one epoch (their instances one list, shuffled whole), so each within the bound is not enough."""
    check_epoch_uses([example.repeats for examples in sources for example in examples])
    return [[example for example in examples for _ in range(example.repeats)] for examples in sources]
