"""What a resumed run changed since its checkpoint: its settings (the flat recipe the checkpoint keeps, compared key by
key) and its data (the count and a hash of its training images, and of the method's other data, kept by the checkpoint).
The resume warns with these lines (`finetune.training.training_run`), and a checkpoint that cannot load names them
(`finetune.checkpoints.checkpoint.load_checkpoint`); a resume's held-out split reads the data's record
(`finetune.training.held_out`). Plain Python: no torch to import for them."""

from __future__ import annotations

import hashlib
import json
import re

# Settings a resumed run may change without a word: how long it runs, where and how often it reports.
RESUMABLE_CHANGES = ("train.max_steps", "train.max_epochs", "output_dir", "checkpoint.", "validation.", "logging.")
TRAINING_DATA_CHANGES = ("validation.loss_images",)  # among those: it changes which images train


LIST_ITEM = re.compile(r"(?P<item>(?P<list>.+?)\.\d+)\.")  # a setting of an item of a list of sections: dreambooth.concepts.1.instance_dir


def changed_settings(saved: dict | None, current: dict) -> list[str]:
    """'key old -> new' for each setting (flattened recipe) that differs from the checkpoint's recipe."""
    if saved is None:  # a checkpoint from before the recipe was stored
        return []

    def kept_whole(key: str) -> bool:  # a list of sections kept as one value, by a checkpoint made before they were kept item by item
        return isinstance(saved.get(key), str) and saved[key].startswith("[{")

    def differs(key: str) -> bool:
        if key not in current and any(name.startswith(f"{key}.") for name in current):
            return False  # a list kept whole (or empty) then, item by item now: its items are compared below
        return saved[key] != current.get(key) and (not key.startswith(RESUMABLE_CHANGES) or key in TRAINING_DATA_CHANGES)

    changes = {key: f"{key} {saved[key]} -> {current.get(key)}" for key in saved if differs(key)}
    # A key the checkpoint lacks is a setting added since it was made, not a change (this run has its default or a
    # choice); but in a list of sections it is an item added, or an item's setting given where it had none.
    for key in current.keys() - saved.keys():
        item = LIST_ITEM.match(key)
        if item is None or kept_whole(item["list"]) or item["list"].startswith(RESUMABLE_CHANGES):
            continue
        if any(name.startswith(f"{item['item']}.") for name in saved):
            changes[key] = f"{key} None -> {current[key]}"
        else:
            changes[item["item"]] = f"{item['item']} added"
    return [changes[key] for key in sorted(changes)]


def data_record(items: list, more: dict[str, list] | None = None) -> dict:
    """What a checkpoint keeps of the images it trains on (the check's examples, in training order): their count, and a
    hash of their pixels and captions. Not settings, so changed_settings cannot see them: a folder's files changed.
    `more`: the method's other data by kind ("conditioning images", "class images"), kept as a count and a hash each."""
    seen = [[item.digest or item.source, item.caption] for item in items]
    return {"images": len(items), "hash": _short_hash(seen), **{kind: [len(entries), _short_hash(entries)] for kind, entries in (more or {}).items()}}


def _short_hash(entries: list) -> str:
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def changed_data(saved: dict | None, now: dict) -> list[str]:
    """'training images old -> new' (and so for each other kind of data) where a resumed run's data differ from its
    checkpoint's (None, or a kind missing: kept none then)."""
    if saved is None:
        return []
    kinds = {"training images": ([saved["images"], saved["hash"]], [now["images"], now["hash"]])}
    kinds.update({kind: (saved[kind], now[kind]) for kind in now if kind not in ("images", "hash") and kind in saved})
    return [f"{kind} {old[0]} -> {new[0]}" + (f" ({SAME_COUNT_CHANGES.get(kind, 'other images')})" if old[0] == new[0] else "")
            for kind, (old, new) in kinds.items() if old != new]  # fmt: skip


SAME_COUNT_CHANGES = {"training images": "other images or captions", "class images": "other images or prompts", "loss masks": "other masks"}
