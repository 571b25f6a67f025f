"""A DreamBooth run's class images, planned before the model loads: which to train on (a user's own first, then generated
ones), which are still to generate, and what check-data says of them. Apart from `finetune.methods.dreambooth` and
`finetune.dreambooth.class_images` (torch) so that `finetune check-data` reads a DreamBooth recipe's class images without torch."""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from finetune.data_check.check import DataReport, check_examples, inspect_examples
from finetune.data_check.check_record import CheckRecord
from finetune.data_check.checked_once import kept_check
from finetune.dreambooth.class_image_names import (
    class_image_caption, generation_record, is_generated_name, read_generation_records, record_key, unused_class_prompts_warning,
    unused_own_class_images_warning,
)
from finetune.config import Concept, DataConfig, LossMaskConfig, Recipe
from finetune.console import warn
from finetune.counts import counted
from finetune.data.sources import SAID_SUBFOLDER_DEPTH, Example, convert_unread, folder_images, image_subfolders, subfolder_names, unread_image_files
from finetune.errors import FinetuneError


def plan_class_images(folder: Path, key: str, wanted: int) -> tuple[list[Path], list[int]]:
    """(the class images to train on, indices k still to generate) for `wanted` images in `folder`.

    Images a user put in the folder count first (sorted by name); generated images of this key fill
    the rest. Generated images of another key (another prompt or settings) are never used.
    """
    user_images = own_class_images(folder, wanted)
    needed = wanted - len(user_images)
    generated = [folder / f"{key}-{k:05d}.png" for k in range(needed)]
    missing = [k for k, path in enumerate(generated) if not path.is_file()]
    return user_images + generated, missing


def own_class_images(folder: Path, wanted: int) -> list[Path]:
    """The images a user put in class folder `folder` that train (sorted by name, at most `wanted`): none it generated."""
    files = folder_images(folder) if folder.is_dir() else []
    return [p for p in files if not is_generated_name(p)][:wanted]


def class_folder(recipe: Recipe, index: int) -> Path:
    """Concept `index`'s class folder: its class_dir, else <output_dir>/class_images/concept-<index>, where its class images are generated."""
    concept = recipe.dreambooth.concepts[index]
    return Path(concept.class_dir) if concept.class_dir else Path(recipe.output_dir) / "class_images" / f"concept-{index}"


def check_class_images(recipe: Recipe, concept: Concept, folder: Path, paths: list[Path], record: CheckRecord | None = None) -> DataReport | None:
    """Class images `paths` (in `folder`) checked as training checks them: they may have any size (resized and cropped like
    instance images); only unreadable or too small ones stop the run in one line (or are skipped with data.skip_bad_images).
    None without any. `record`: the check's record, whose facts of unchanged files are taken instead of decoding them
    (finetune/data_check/check_record.py); the report is the same with or without it."""
    if not paths:
        return None
    return check_examples(class_examples(paths, concept), class_data_config(recipe), f"class images {folder}", record)


def checked_own_class_images(recipe: Recipe, index: int, folder: Path, paths: list[Path], record: CheckRecord | None = None) -> DataReport | None:
    """`check_class_images` of the images a user brought for concept `index`, once per `finetune train`
    (finetune/data_check/checked_once.py): its command checks them before torch loads (a corrupt one said in seconds), and the
    DreamBooth method takes that report."""
    concept = recipe.dreambooth.concepts[index]
    key = f"class images {folder} {class_data_config(recipe).model_dump_json()} {json.dumps([str(p) for p in paths])} {json.dumps(concept.class_prompts)}"
    return kept_check(key, lambda: check_class_images(recipe, concept, folder, paths, record))


def changed_settings(made: dict, now: dict) -> str:
    """'guidance_scale 7.5 (now 5.0), ...': what images made as `made` describes were made with otherwise; a setting
    `made` lacks (an earlier version's record) as unknown, not as None."""
    changed = [f"{name} {made[name]!r} (now {now.get(name)!r})" for name in sorted(made) if made[name] != now.get(name)]
    unrecorded = sorted(now.keys() - made.keys())
    if unrecorded:
        changed.append(f"{' and '.join(unrecorded)} unknown (an earlier version of finetune, which did not record {'them' if len(unrecorded) > 1 else 'it'})")
    return ", ".join(changed)


def warn_of_unused_generated_images(folder: Path, records: dict[str, dict]) -> None:
    """A warning for the generated images in `folder` that no key of this run uses (`records`: how every
    concept whose class folder it is makes its images; they share it without making each other's unused),
    saying what they were made with where the folder's record knows."""
    named_generated = [p for p in (folder_images(folder) if folder.is_dir() else []) if is_generated_name(p)]
    # Generation writes and reuses `<key>-<k>.png` alone: one converted to JPEG (or renamed .PNG) was left out unsaid, even of this run's key.
    not_png = [p.name for p in named_generated if p.suffix != ".png" and not _same_file(p.with_suffix(".png"), p)]  # .PNG is .png on macOS
    if not_png:
        warn(f"{folder}: ignoring {counted(len(not_png), 'file')} named as generated class images are but not .png (e.g. {not_png[0]}): "
             "generation reuses only the .png it writes; give your own class images another name to train them")  # fmt: skip
    unused = Counter(p.stem[:10] for p in named_generated if p.name not in not_png and p.stem[:10] not in records)
    made = read_generation_records(folder)
    for key, count in sorted(unused.items()):
        if key in made:  # told against the closest setup of this run (one per concept sharing the folder)
            why = min((changed_settings(made[key], now) for now in records.values()), key=lambda line: line.count(" (now "))
            warn(f"{folder}: ignoring {counted(count, 'generated image')} made with {why}")
    unrecorded = sum(count for key, count in unused.items() if key not in made)
    if unrecorded:
        warn(f"{folder}: ignoring {counted(unrecorded, 'generated image')} of another class prompt, generation settings, resolution or base model, "
             "or of an earlier version of finetune")


def unread_class_images_lines(folders: list[Path], recipe: Recipe) -> list[str]:
    """A warning for each class folder holding images training does not read: of a kind it does not (a .gif, an iPhone's
    .HEIC), or in a subfolder (only the folder's own images are class images); worded as the data check words a data
    folder's: they were left out without a word, unlike an instance folder's. A subfolder that is another concept's class
    folder, or a concept's instance_dir (or in one), is read: moving its images into the class folder would train the
    subject's photos as its class."""
    lines, class_folders = [], {folder.resolve(): folder for folder in folders if folder.is_dir()}
    instance_folders = {Path(concept.instance_dir).resolve() for concept in recipe.dreambooth.concepts}
    config = class_data_config(recipe)  # how class images are read
    for folder in class_folders.values():  # a shared folder: once
        if files := unread_image_files(folder):
            lines.append(f"warning: class folder {folder} has {counted(len(files), 'image')} training does not read {convert_unread(files)}")
        subfolders = [sub for sub in image_subfolders(folder, config, SAID_SUBFOLDER_DEPTH)
                      if sub.resolve() not in class_folders and not instance_folders & {sub.resolve(), *sub.resolve().parents}]  # fmt: skip
        if subfolders:
            lines.append(f"warning: class folder {folder} has subfolders with images ({subfolder_names(folder, subfolders)}), which are not read: "
                         "move their images into it to train them as class images")  # fmt: skip
    # Captions beside class images (an sd-scripts regularisation folder's .txt files, which it trains them with) are not
    # read: a user's class images train with the class prompt, and nothing said so. Per concept, for its prompt.
    said = set()
    for concept, folder in zip(recipe.dreambooth.concepts, folders):
        if folder.is_dir() and folder.resolve() not in said and concept.class_prompts and (captions := _caption_files_named(folder)):
            said.add(folder.resolve())
            lines.append(f"warning: class folder {folder} has captions ({captions}), which are not read: its images train with the class prompt "
                         f"'{concept.class_prompts[0]}' (sd-scripts trains a regularisation folder's images with their captions)")  # fmt: skip
    return lines


def _caption_files_named(folder: Path) -> str:
    """'2 caption files, e.g. a.txt' (and its metadata file) for the captions of `folder`'s images; "" where they have none.
    A .txt of no image there (a notes.txt) is nobody's caption: it was said as one, "its images train with the class prompt"."""
    from finetune.captions.captions import caption_file_names
    from finetune.captions.file_names import loose_name_key
    from finetune.captions.metadata_files import metadata_file

    images = {loose_name_key(image.stem) for image in folder_images(folder)}  # as sidecar_path finds an image's caption file
    files = sorted(name for name in caption_file_names(folder).values() if loose_name_key(Path(name).stem) in images)
    named = [f"{counted(len(files), 'caption file')}, e.g. {files[0]}"] if files else []
    named += [table.name] if (table := metadata_file(folder)) is not None else []
    return ", ".join(named)


def _same_file(path: Path, other: Path) -> bool:
    return path.is_file() and os.path.samefile(path, other)


@dataclass
class ClassImagePlan:
    """A concept's class images, planned before the model loads: which to train on, which to generate."""

    folder: Path
    key: str  # names generated images: prompts and generation settings
    paths: list[Path]  # the user's own images first, then generated ones (existing or to be made)
    missing: list[int]  # indices k of generated images still to make
    own: list[Example]  # the user's images that passed the data check


def class_image_plans(recipe: Recipe) -> list[tuple[Path, str, list[Path], list[int]]]:
    """Per concept with prior preservation: (class folder, generation key, images to train on, indices
    still to generate). Default folder: <output_dir>/class_images/concept-<n>."""
    settings, plans = recipe.dreambooth, []
    made_as: dict[str, dict] = {}  # key: how its images are made
    for i, concept in enumerate(settings.concepts if settings.prior_preservation else []):
        folder = class_folder(recipe, i)
        check_class_folder(recipe, i, folder)
        record = recipe_generation_record(recipe, concept.class_prompts)
        key = record_key(record)
        made_as[key] = record
        plans.append((folder, key, *plan_class_images(folder, key, settings.num_class_images)))
    for folder in {folder.resolve(): folder for folder, *_ in plans}.values():
        warn_of_unused_generated_images(folder, {key: made_as[key] for other, key, *_ in plans if other.resolve() == folder.resolve()})
    return plans


def check_class_folders(recipe: Recipe) -> None:
    """Each concept's class folder, where prior preservation reads one (`check_class_folder`): `finetune train` says one
    that cannot be before its data check decodes the images, which decoded an instance folder named as a class folder twice."""
    if recipe.method != "dreambooth" or not recipe.dreambooth.prior_preservation:
        return
    for index in range(len(recipe.dreambooth.concepts)):
        check_class_folder(recipe, index, class_folder(recipe, index))


def check_class_folder(recipe: Recipe, index: int, folder: Path) -> None:
    """Concept `index`'s class folder `folder` is no file and no concept's instance_dir, from their paths alone."""
    if folder.exists() and not folder.is_dir():  # else generation's mkdir raises once the model has loaded
        raise FinetuneError(f"dreambooth.concepts.{index}.class_dir {folder} is a file, not a folder: name a folder for the class images (missing ones are generated there)")
    subjects = [j for j, other in enumerate(recipe.dreambooth.concepts) if Path(other.instance_dir).resolve() == folder.resolve()]
    if subjects:  # the subject's photos would train as its class, and generated images would join a concept's photos
        raise FinetuneError(f"dreambooth.concepts.{index}.class_dir {folder} is dreambooth.concepts.{subjects[0]}.instance_dir: give class images a folder "
                            f"of their own (or class_dir: null for {Path(recipe.output_dir) / 'class_images' / f'concept-{index}'})")  # fmt: skip


def unused_class_images_lines(recipe: Recipe, plans: list[tuple[Path, str, list[Path], list[int]]]) -> list[str]:
    """Warnings of what a DreamBooth run leaves unused, said by training as it starts and by check-data: class prompts
    that make no class image, and a class folder's own images past num_class_images (once per folder: concepts may share one)."""
    lines, said = [], set()
    for i, (concept, (folder, _key, paths, _missing)) in enumerate(zip(recipe.dreambooth.concepts, plans)):
        if line := unused_class_prompts_warning(i, concept.class_prompts, recipe.dreambooth.num_class_images, folder, paths):
            lines.append(line)
        if folder.resolve() not in said and (line := unused_own_class_images_warning(recipe.dreambooth.num_class_images, folder)):
            lines.append(line)
        said.add(folder.resolve())
    return lines


def recipe_generation_record(recipe: Recipe, class_prompts: list[str]) -> dict:
    """How the recipe makes the class images of `class_prompts` (its key names them): one call for the plan and the record written."""
    return generation_record(class_prompts, recipe.dreambooth.class_generation, recipe.data.resolution, recipe.model, recipe.train.mixed_precision)


def class_examples(paths: list[Path], concept: Concept) -> list[Example]:
    return [Example(str(p), class_image_caption(p, concept.class_prompts), functools.partial(Image.open, p)) for p in paths]


def class_data_config(recipe: Recipe) -> DataConfig:
    """How class images are read: as instances are, but unmasked (data.loss_mask masks the subject)."""
    return recipe.data.model_copy(update={"loss_mask": LossMaskConfig()})


def inspect_class_images(recipe: Recipe, record: CheckRecord | None = None) -> tuple[list[DataReport], list[str]]:
    """`finetune check-data` of a DreamBooth recipe: the class images there now (a user's and those
    generated so far), checked as training checks them, with how many are still to generate; and a line
    for each class folder that holds none yet (without it, check-data said nothing of what training makes first),
    and training's warnings of class prompts that make no class image and of images of a kind it does not read.
    `record`: see `check_class_images`."""
    plans = class_image_plans(recipe)
    reports, lines = [], unread_class_images_lines([folder for folder, *_ in plans], recipe) + unused_class_images_lines(recipe, plans)
    for concept, (folder, _key, paths, missing) in zip(recipe.dreambooth.concepts, plans):
        present = [p for p in paths if p.is_file()]
        if present:
            report = inspect_examples(class_examples(present, concept), class_data_config(recipe), f"class images {folder}", record)
            report.label += f" ({len(missing)} more to generate)" if missing else ""
            reports.append(report)
        elif missing:
            lines.append(f"class images {folder}: none yet, {len(missing)} to generate (training makes them first, with the base model)")
    return reports, lines
