"""The validation loss: images held out of training (`validation.loss_images`), scored at each validation.

The training loss is a different batch at a different noise level every step, so it is too noisy to
show overfitting. Held-out images scored with the same noise and timesteps every time give a curve
that compares across steps: it falls while the model learns what carries over to images it never
trains on, and turns up once it memorises its own. Every method's loss is used as it is (DreamBooth's
with its class image, ControlNet's with its conditioning), one image at a time (any bucket).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.checkpoints.resume_changes import data_record
from finetune.checkpoints.run_files import read_state, resolve_resume
from finetune.counts import counted

if TYPE_CHECKING:  # for annotations only: the data check and the recipe schema load pydantic and PIL
    from finetune.config import Recipe
    from finetune.data_check.check import DataReport

# Micro-batch numbers no training run reaches: the validation draws are never a training step's.
FIRST_DRAW = 2**40
# Noise and timestep draws per image: four times the forwards for a steadier number.
DRAWS_PER_IMAGE = 4
# Where a checkpoint's trainer state keeps the images it held out (their pixel digests).
HELD_OUT_STATE = "held_out_images"


def split_held_out(images: list[str], count: int, seed: int) -> tuple[list[int], list[int]]:
    """(items to train on, items to score): `count` distinct images, chosen by `seed`, leave training with every
    copy of them (data.folders repeats, a folder under two templates, the same pixels in another file); one copy of
    each is scored. `images` names the image of each dataset item by its content (`image_identities`): the choice is
    the same wherever the data live (a folder moved, another mount point, another machine), on every process, in a
    resume and in check-data; an image added, removed or edited changes at most one of those held out."""
    if count == 0:
        return list(range(len(images))), []
    rank = {image: hashlib.sha256(f"{seed}:{image}".encode()).hexdigest() for image in set(images)}
    return _split(images, set(sorted(rank, key=rank.get)[:count]))


def image_identities(items: list) -> list[str]:
    """Each item's image by its pixels (the data check's digest), or by its source where it has none."""
    return [item.digest or item.source for item in items]


def split_by_full_paths(sources: list[str], count: int, seed: int) -> tuple[list[int], list[int]]:
    """The choice before `split_held_out`: by `seed` among the sorted real paths of the images, so moving a data folder
    could change it. Kept for the checkpoints made with it (`held_out_for_run`)."""
    if count == 0:
        return list(range(len(sources))), []
    files = [os.path.realpath(source) if os.path.isfile(source) else source for source in sources]  # one file, however written
    images = sorted(set(files))
    import torch  # here: check-data reports the split without loading torch

    generator = torch.Generator().manual_seed(seed)
    return _split(files, {images[i] for i in torch.randperm(len(images), generator=generator)[:count].tolist()})


def _split(images: list[str], held: set[str]) -> tuple[list[int], list[int]]:
    first_copy: dict[str, int] = {}
    for index, image in enumerate(images):
        if image in held:
            first_copy.setdefault(image, index)
    return [index for index, image in enumerate(images) if image not in held], sorted(first_copy.values())


@dataclass(frozen=True)
class HeldOutSplit:
    trained: list[int]  # the items that train
    scored: list[int]  # one item of each held-out image
    images: list[str]  # the held-out images by content (sorted): what a checkpoint keeps, for a resume to hold out the same
    lines: list[str]  # what the run says of a resume's choice


def held_out_for_run(items: list, count: int, seed: int, checkpoint: Path | None = None) -> HeldOutSplit:
    """The run's split (`items`: the method's training items, checked). A resume holds out the images its checkpoint
    held out, wherever the data are now. One from before checkpoints kept them keeps the ones it chose by full paths
    where its record of the trained images shows them (or it has none); otherwise the run says they changed."""
    images = image_identities(items)
    split, lines = split_held_out(images, count, seed), []
    if checkpoint is None or count == 0:
        return _run_split(images, split, lines)
    state = read_state(checkpoint)
    if (kept := state.get(HELD_OUT_STATE)) is not None:
        missing = set(kept) - set(images)
        if len(kept) == count and not missing:  # (another validation.loss_images: the settings warning says so)
            split = _split(images, set(kept))
        elif len(kept) == count:
            lines.append(f"warning: {counted(len(missing), 'image')} of the {count} {checkpoint.name} held out (by their pixels) "
                         f"{'is' if len(missing) == 1 else 'are'} no longer in the data (removed or edited): this run holds out the seed's "
                         "choice among the images now, so its validation losses do not continue the checkpoint's")
    elif (state.get("recipe") or {}).get("validation.loss_images") == count:
        by_paths = split_by_full_paths([item.source for item in items], count, seed)

        def recorded(trained: list[int]) -> bool:
            return data_record([items[i] for i in trained])["hash"] == state["data"]["hash"]

        if (recorded(split[0]) if state.get("data") else by_paths[0] == split[0]):
            pass
        elif not state.get("data") or recorded(by_paths[0]):  # (with no record: what that version chose, where the data are now)
            split = by_paths
            lines.append(f"{checkpoint.name} held out the images finetune then chose by their full paths: this run holds out those")
        else:
            lines.append(
                f"warning: {checkpoint.name} held out images chosen by their full paths (as finetune did then), and the data moved or "
                "changed since: which ones cannot be told, so this run holds out its own choice (images it held out may train now, "
                "images it trained on are scored): for a validation loss of unseen images, start a new run")
    return _run_split(images, split, lines)


def held_out_for_check(items: list, count: int, seed: int, output_dir: Path) -> tuple[HeldOutSplit, str]:
    """check-data's split: a new run's, or where `output_dir` holds checkpoints (its next run either resumes, or starts
    over with --overwrite) and `--resume latest` would hold out other images or say something of them, the resume's,
    its lines saying so; and what the held-out line adds ("" for a new run's)."""
    new = held_out_for_run(items, count, seed)
    checkpoints = output_dir / "checkpoints"
    if count == 0 or not checkpoints.is_dir() or not any("checkpoint-" in path.name for path in checkpoints.iterdir()):
        return new, ""
    from finetune.errors import FinetuneError

    if (latest := resolve_resume("latest", checkpoints)) is None:  # (with one a kill left unrenamed: run_files.interrupted_checkpoints)
        return new, ""
    try:
        resumed = held_out_for_run(items, count, seed, latest)
    except FinetuneError as err:  # a damaged trainer state: the resume stops on it, a new run does not read it
        return HeldOutSplit(new.trained, new.scored, new.images, [f"warning: with --resume latest: {err}"]), ""
    if resumed.images == new.images and not resumed.lines:
        return new, ""
    lines = [line.replace("warning: ", "warning: with --resume latest, ", 1) if line.startswith("warning: ") else f"with --resume latest, {line}"
             for line in resumed.lines]  # fmt: skip
    other = "the same images" if resumed.images == new.images else "other images"
    return HeldOutSplit(resumed.trained, resumed.scored, resumed.images, lines), f" as --resume latest holds them out ({latest.name}; a new run, with --overwrite, holds out {other})"


def _run_split(images: list[str], split: tuple[list[int], list[int]], lines: list[str]) -> HeldOutSplit:
    return HeldOutSplit(split[0], split[1], sorted({images[i] for i in split[1]}), lines)


def held_out_sources(sources: list[str], trained: list[int]) -> frozenset[str]:
    """The image names (as items give them) that `split_held_out` keeps out of training: `trained` is its first list."""
    return frozenset(sources) - {sources[i] for i in trained}


class TrainingSubset:
    """A method's training dataset without the held-out items; items keep their own index (their
    augmentation and caption draws are those of the whole dataset)."""

    def __init__(self, dataset, kept: list[int]):
        self.dataset = dataset
        self.kept = kept
        buckets = getattr(dataset, "bucket_of", None)
        self.bucket_of = None if buckets is None else [buckets[i] for i in self.kept]

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        return self.dataset[(self.kept[index], epoch)]


def held_out_loss(method, modules: dict, dataset, collate_fn, held_out: list[int], seed: int, device, autocast) -> dict[str, float]:
    """The mean of each loss term over the held-out items, each scored with DRAWS_PER_IMAGE fixed draws.

    Every process computes it whole (under ZeRO-3 each forward needs all of them) and gets the same
    numbers. Trained modules are in eval mode meanwhile (no LoRA dropout)."""
    import torch

    from finetune.training.diffusion import BatchRandomness  # diffusers: loaded to score, not for check-data

    modes = {name: module.training for name, module in modules.items()}
    for module in modules.values():
        module.eval()
    totals: dict[str, float] = {}
    # Scoring must not disturb the training RNG: a resumed run then follows the same curve.
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        try:
            for n, index in enumerate(held_out):
                batch = collate_fn([dataset[(index, 0)]])
                if "pixel_values" in batch:
                    batch["pixel_values"] = batch["pixel_values"].to(device)
                for draw in range(DRAWS_PER_IMAGE):
                    randomness = BatchRandomness(seed, FIRST_DRAW + n * DRAWS_PER_IMAGE + draw, 1, slice(0, 1))
                    with autocast():
                        terms = method.loss(modules, batch, randomness)
                    for name, value in terms.items():
                        totals[name] = totals.get(name, 0.0) + value.detach().float().item()
        finally:
            for name, module in modules.items():
                module.train(modes[name])
    return {name: total / (len(held_out) * DRAWS_PER_IMAGE) for name, total in totals.items()}


def concept_held_out_whole(reports: list[DataReport], held_out: frozenset[str], recipe: Recipe) -> str | None:
    """Why validation.loss_images (`held_out`: the images it keeps out) leaves a DreamBooth concept none of its
    images to train on (they are chosen among all concepts' images together), or None: that subject would be
    scored, never learned."""
    for report in reports:
        if (concept := report.config.dreambooth_concept) and report.usable and {e.source for e in report.usable} <= held_out:
            return (f"validation.loss_images ({recipe.validation.loss_images}) holds out every image of {concept} ({report.config.image_dir}), "
                    "which would never train: lower it")  # fmt: skip
    return None
