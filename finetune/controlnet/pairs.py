"""ControlNet's (image, conditioning image, caption) triples, read and checked without torch, so that `finetune check-data`
checks a ControlNet recipe's pairs as it checks any data (finetune/controlnet/data.py serves them to training).

Pairs come from a data folder's metadata.jsonl (`conditioning_file_name`) or a dataset's conditioning
column (`controlnet.conditioning_column`, read by finetune/controlnet/dataset_pairs.py); every pair is checked before
training (`checked_pairs`).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from finetune.captions.captions import split_at_line_ends, template_needs_caption
from finetune.captions.file_names import file_names_by_loose_key, loosely_named_file, name_key, row_image_key
from finetune.captions.metadata_files import RowCaptions, metadata_file, metadata_rows, read_csv_captions
from finetune.captions.metadata_lines import csv_rows, metadata_lines, metadata_text
from finetune.config import DataConfig, FolderConfig, Recipe
from finetune.controlnet.dataset_pairs import dataset_pairs
from finetune.data.epoch_uses import check_epoch_uses
from finetune.data.image_warnings import pillow_warning_line, pillow_warnings, pillow_warnings_named
from finetune.data.images import decode, file_stamp, float_levels_problem, has_alpha, pixel_digest, turned_on_its_side, upright_rgb
from finetune.data.sources import IMAGE_SUFFIXES, Example, read_examples
from finetune.data.views import plan_view, render
from finetune.data_check.check import FATAL, WARNING, DataReport, Finding, data_label, inspect_examples, skip_fatal, stop_unless_trainable, too_small_problem
from finetune.data_check.check_record import CheckRecord, ConditioningFacts
from finetune.data_check.checked_once import kept_check
from finetune.data_check.threads import each_on_threads
from finetune.errors import FinetuneError


@dataclass(frozen=True)
class Pair:
    """A training image and its conditioning image (the caption is the image example's)."""

    image: Example
    conditioning: Example


def checked_pairs(recipe: Recipe, record: CheckRecord | None = None) -> tuple[list[Pair], DataReport]:
    """The (image, conditioning, caption) triples that train, and the report training prints.

    A bad pair stops the run with a one-line error naming it, or with data.skip_bad_images is left out
    and listed. `record`: see `inspect_pairs`.
    """
    # Once in a `finetune train` (finetune/data_check/checked_once.py); by what it reads, not controlnet.pretrained, which a
    # resume's method has not.
    key = f"pairs {recipe.data.model_dump_json()} {recipe.controlnet.model_dump_json(exclude={'pretrained'})}"
    return kept_check(key, lambda: _checked_pairs(recipe, record))


def _checked_pairs(recipe: Recipe, record: CheckRecord | None) -> tuple[list[Pair], DataReport]:
    pairs, report = inspect_pairs(recipe, record)
    stop_unless_trainable(report)
    check_epoch_uses([pair.image.repeats for pair in pairs])
    return [pair for pair in pairs for _ in range(pair.image.repeats)], report  # data.folders repeats


def inspect_pairs(recipe: Recipe, record: CheckRecord | None = None) -> tuple[list[Pair], DataReport]:
    """Check every pair without stopping (what `finetune check-data` prints for a ControlNet recipe).

    Images get the standard check (`finetune.data_check.check`: readable, large enough, captioned,
    duplicates, conversions); each pair also needs a readable conditioning image of its image's size.
    `record`: what an earlier check read from the files, taken for those unchanged since instead of decoding them
    (finetune/data_check/check_record.py); the report and pairs are the same with or without it.
    """
    config = recipe.data
    pairs, unpaired = read_pairs(recipe)
    report = inspect_examples([pair.image for pair in pairs], config.model_copy(update={"skip_bad_images": False}), data_label(config), record)
    report.config, report.found = config, report.found + len(unpaired)
    report.findings = unpaired + report.findings
    # The checked images, in the pairs' order (a bad one left out): matched by position, not by file, as
    # one folder under two templates lists each file twice with two captions.
    checked, next_checked = list(report.usable), 0
    matched = []
    for pair in pairs:
        if next_checked == len(checked) or checked[next_checked].source != pair.image.source:
            continue
        matched.append(Pair(checked[next_checked], pair.conditioning))
        next_checked += 1
    usable, taken_before = [], record.taken[ConditioningFacts] if record is not None else 0
    for pair, problems in each_on_threads(functools.partial(check_conditioning, config=config, record=record), matched, "checking conditioning images"):
        report.findings += problems
        if any(problem.level == FATAL for problem in problems):  # a Pillow warning is said, and the pair trains
            report.usable.remove(pair.image)
        else:
            usable.append(pair)
    report.unchanged_conditioning = record.taken[ConditioningFacts] - taken_before if record is not None else 0
    if config.skip_bad_images:
        skip_fatal(report)
    return usable, report


def validation_conditions_problem(recipe: Recipe) -> str | None:
    """Why controlnet.validation_conditions would stop the run (an image missing or unreadable), or None;
    `finetune check-data` says it too."""
    for path in recipe.controlnet.validation_conditions:
        if not Path(path).is_file():
            return f"validation conditioning image {path} not found: check controlnet.validation_conditions"
        try:
            image = read_conditioning(Example(path, "", lambda p=path: Image.open(p)))
        except FinetuneError as err:
            return str(err)
        # Validation samples at data.resolution: refused as `finetune sample --condition` refuses it at that size.
        if (problem := small_conditioning_problem(image, path, recipe.data.resolution)) is not None:
            return f"controlnet.validation_conditions: {problem}"
    return None


def validation_conditions_warnings(recipe: Recipe) -> list[str]:
    """A warning for each controlnet.validation_conditions image unlike the kind make-conditions made the data folder's
    conditioning images as (its conditioning.json): a photo there steered every validation grid as the ControlNet never
    learns to be steered, without a word. One that cannot be read is `validation_conditions_problem`'s to say."""
    from finetune.controlnet.conditioning_records import MAKE_ONE, data_folder_record, kind_mismatch_line  # it reads make-conditions' record

    kind = (data_folder_record(recipe.data) or {}).get("kind")
    lines = []
    for path in recipe.controlnet.validation_conditions if kind else []:
        try:
            image = read_conditioning(Example(path, "", lambda p=path: Image.open(p)))
        except (FinetuneError, OSError):
            continue
        if line := kind_mismatch_line(image, kind, f"controlnet.validation_conditions image {path}", MAKE_ONE):
            lines.append(f"warning: {line}")
    return lines


def read_pairs(recipe: Recipe) -> tuple[list[Pair], list[Finding]]:
    """Every image with the conditioning image the data names for it, and fatal findings for images without one."""
    config, settings = recipe.data, recipe.controlnet
    if config.dataset is not None:
        return [Pair(image, conditioning) for image, conditioning in dataset_pairs(config, settings.conditioning_column)], []
    require_pair_columns(config, settings.conditioning_column)
    files_in: dict[Path, RowCaptions] = {}  # each folder's metadata.jsonl (data.folders: one per subfolder)
    partners_in: dict[Path, set[Path]] = {}  # the conditioning images each names
    missing_in: dict[Path, set[str]] = {}  # the stems of those not found beside the images, where a renamed one is read as an image
    pairs, unpaired = [], []
    for example in read_examples(config):
        folder, name = Path(example.source).parent, name_key(Path(example.source).name)
        if folder not in files_in:
            files_in[folder] = _conditioning_files(folder, recipe.controlnet.conditioning_column)
            partners_in[folder] = {loosely_named_file(folder / named) for named in files_in[folder].values()}
            missing_in[folder] = {partner.stem.casefold() for partner in partners_in[folder] if partner.parent == folder and not partner.is_file()}
        files = files_in[folder]
        if name not in files and Path(example.source) in partners_in[folder]:
            continue  # a conditioning image kept beside the images (0001.png, 0001_canny.png): a partner, not an image to train
        if name not in files and any(_named_like(Path(example.source), stem) for stem in missing_in[folder]):
            continue  # one renamed (0001_canny.png to 0001_canny_v2.png): said as the missing partner's likely file, not as an image without one
        path = loosely_named_file(folder / files[name]) if name in files else None
        metadata = metadata_file(folder) or folder / "metadata.jsonl"  # the one it names them in: a metadata.csv too
        if path is None:
            message = (
                f"image {example.source} has no conditioning image: give it a conditioning_file_name in "
                f"{metadata} (finetune make-conditions writes one)"
            )
        elif not path.is_file():
            message = missing_conditioning_message(path, example.source, files.places.get(name, str(metadata)))
        else:
            pairs.append(Pair(example, Example(str(path), "", functools.partial(Image.open, path))))
            continue
        unpaired.append(Finding(FATAL, example.source, message))
    return pairs, unpaired


def missing_conditioning_message(path: Path, image: str, place: str) -> str:
    """Why conditioning image `path` of `image`, which `place` ("FILE line N") names, is not found, with what to write
    there: a folder that is not there said as such, and files beside it named like it (`0001_canny.png` for `0001.png`,
    `0001.jpg`): where conditioning images were renamed after the metadata was written."""
    said = f"conditioning image {path} of image {image} not found ({place} names it)"
    if not path.parent.is_dir():
        return f"{said}, nor is its folder {path.parent}: put the conditioning images there, or write the folder they are in into conditioning_file_name"
    alike = sorted(name for name in file_names_by_loose_key(str(path.parent)).values() if _named_like(Path(name), path.stem.casefold()))
    if not alike:
        return f"{said}: fix its conditioning_file_name there, or put the conditioning image at that path"
    relative = PurePosixPath(Path(os.path.relpath(path.parent / alike[0], Path(image).parent))).as_posix()
    others = f" (or {', '.join(alike[1:3])}{' ...' if len(alike) > 3 else ''})" if alike[1:] else ""
    return f"{said}; {path.parent} has {alike[0]}{others}: if that is this image's, write conditioning_file_name {relative!r} there"


def _named_like(file: Path, stem: str) -> bool:
    """Whether `file` is an image named as one of `stem` (casefolded) is: that stem in another format, or with a word
    before or after it (`0001_canny`, `canny-0001`)."""
    own = file.stem.casefold()
    return file.suffix.lower() in IMAGE_SUFFIXES and (own == stem or any(own.startswith(stem + mark) or own.endswith(mark + stem) for mark in "_-. "))


# ControlNet's own fill50k example names its columns so (its prompt.json): each said with the column it is here.
FILL50K_NAMES = {"target": "file_name", "source": "conditioning_file_name", "prompt": "text"}


def require_pair_columns(config: DataConfig, conditioning_column: str) -> None:
    """One line naming every column a data folder's metadata file lacks, of those its pairs are read from (the image, its
    conditioning image, its caption where the caption is read from the file), with the columns it has: each reader says
    the one it reads, so a file lacking two was fixed one rerun at a time (a lone missing one is said by its reader)."""
    for settings in config.folders or [FolderConfig(path=".")]:
        path = metadata_file(Path(config.image_dir) / settings.path)
        if path is None:
            continue  # said by _conditioning_files, with what to write
        if path.suffix == ".csv":
            has = csv_rows(metadata_lines(path, lenient=True), path).fieldnames or []
        else:
            has = list(dict.fromkeys(key for row in metadata_rows(path.parent) for key in row))
        if not has:  # no row read (a JSON array over several lines, rows in single quotes): its reader names the line and the fix
            continue
        roles = {"file_name": "the image", "conditioning_file_name": "its conditioning image, or the column controlnet.conditioning_column names"}
        if config.caption is None and template_needs_caption(settings.template):
            roles[config.caption_column] = "its caption, or the column data.caption_column names"
        missing = [name for name in roles if name not in has and not (name == "conditioning_file_name" and conditioning_column in has)]
        if len(missing) < 2:
            continue
        renames = [f"{old!r} to {new!r}" for old, new in FILL50K_NAMES.items() if old in has and new in missing]
        advice = "rename its columns to those, or name the ones that hold them in controlnet.conditioning_column and data.caption_column"
        if renames:
            advice = f"rename {', '.join(renames)} (ControlNet's fill50k names)" + ("" if len(renames) == len(missing) else f"; for the others, {advice}")
        listed = ", ".join(f"{name!r} ({roles[name]})" for name in missing)
        raise FinetuneError(f"{path} lacks the columns {listed}: its columns are {', '.join(repr(name) for name in has) or 'none'}; {advice}")


def _conditioning_files(folder: Path, column: str = "conditioning_file_name") -> RowCaptions:
    """{image file name: conditioning file name relative to the folder}, with the row naming each (`places`), from metadata.jsonl: its
    conditioning_file_name, or the recipe's controlnet.conditioning_column (diffusers' examples call it
    conditioning_image), or from metadata.csv's columns of those names, as Hugging Face's imagefolder reads either."""
    path, table = folder / "metadata.jsonl", folder / "metadata.csv"
    if not path.is_file() and table.is_file():
        text = metadata_text(table)
        header = csv_rows(text, table).fieldnames or []  # its errors name the folder's file, not a bare metadata.csv
        key = "conditioning_file_name" if "conditioning_file_name" in header else column
        if key not in header:
            raise FinetuneError(f"{table} names no conditioning images: its columns are {', '.join(repr(k) for k in header)}; "
                                f"add conditioning_file_name (or set controlnet.conditioning_column to the column that holds them)")  # fmt: skip
        rows, files = read_csv_captions(table, key), RowCaptions()
        for name, named in rows.items():
            if named:
                files[name], files.places[name] = named.replace("\\", "/"), rows.places[name]
        return files
    if not path.is_file():
        raise FinetuneError(
            f"data folder {folder} has no metadata.jsonl naming conditioning images (file_name, conditioning_file_name, text; "
            "or a metadata.csv of those columns): write one, or make one with finetune make-conditions"
        )
    files, keys = RowCaptions(), set()
    for line_number, line in enumerate(split_at_line_ends(metadata_text(path)), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            keys.update(row)
            named = row.get("conditioning_file_name") or row.get(column)
            if named:
                key = row_image_key(row["file_name"], folder, f"{path} line {line_number}")
                files[key], files.places[key] = str(named).replace("\\", "/"), f"{path} line {line_number}"  # written on Windows: conditioning\0001.png
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise FinetuneError(f"{path} line {line_number}: expected a JSON object with 'file_name', 'conditioning_file_name' and 'text'") from None
    if not {"conditioning_file_name", column} & keys:
        raise FinetuneError(f"{path} names no conditioning images: its rows have {', '.join(repr(k) for k in sorted(keys))}; "
                            f"add conditioning_file_name (or set controlnet.conditioning_column to the key that holds them)")  # fmt: skip
    return files


def check_conditioning(pair: Pair, config: DataConfig, record: CheckRecord | None = None) -> tuple[Pair, list[Finding]]:
    """The pair with its conditioning image's pixel digest (what a checkpoint records of it), and a fatal finding if
    that image cannot be read, would train blank (drawn only in its alpha channel, or float values of 0-1) or is not
    its image's size (or its shape at another scale, large enough). `record`: its facts, kept from an earlier check while
    the file is unchanged (one refused is not kept: it is read again)."""
    source = pair.conditioning.source
    stamp = file_stamp(source)  # before reading: an edit while it is read shows as a changed file
    if (facts := record.facts(source, stamp, ConditioningFacts) if record is not None else None) is None:
        try:
            with pillow_warnings() as heard:
                conditioning = read_conditioning(pair.conditioning)
        except FinetuneError as err:
            return pair, [Finding(FATAL, pair.image.source, str(err))]
        facts = ConditioningFacts(size=conditioning.size, digest=pixel_digest(conditioning), heard=tuple(heard))
        if record is not None:
            record.keep(source, stamp, facts)
    # Its size and stamp: training stops where it changes size mid-run (files_as_checked.require_checked_size), as for images.
    checked = replace(pair, conditioning=replace(pair.conditioning, digest=facts.digest, size=facts.size, file_stamp=stamp))
    said = [Finding(WARNING, pair.image.source, "conditioning " + pillow_warning_line(source, list(facts.heard)))] if facts.heard else []
    return checked, said + conditioning_size_problems(pair, facts.size, config)


def conditioning_size_problems(pair: Pair, size: tuple[int, int], config: DataConfig) -> list[Finding]:
    """A fatal finding if the conditioning image (upright `size`) is not its image's size, nor its shape at another
    scale (a dataset's 512 px depth maps for 1024 px photos: the view is cut at any scale, as diffusers' script resizes
    each) whose short side is as large as a training image's must be (too_small_problem)."""
    image_size = pair.image.size
    (width, height), (image_width, image_height) = size, image_size
    same_shape = abs(height * image_width / width - image_height) <= max(1.0, image_width / width)  # within a pixel's rounding at either scale
    if size != image_size and same_shape and (small := too_small_problem(pair.conditioning.source, width, height, config)):
        return [Finding(FATAL, pair.image.source, f"conditioning {small}")]  # "conditioning image X is WxH, smaller than ..."
    if size != image_size and not same_shape:
        # Made from the image's stored pixels (both files lie the same way on disk), it would be cut across the upright image.
        rotated = size == image_size[::-1] and turned_on_its_side(pair.image.load())
        hint = ("save the conditioning image upright: the image is turned by its EXIF orientation (finetune make-conditions writes them so)"
                if rotated else "they must be the same size, or of one shape at another scale (one crop is cut from both): resize one to the other")  # fmt: skip
        message = (
            f"conditioning image {pair.conditioning.source} is {size[0]}x{size[1]} but image "
            f"{pair.image.source} is {image_size[0]}x{image_size[1]}{' upright' if rotated else ''}: {hint}"
        )
        return [Finding(FATAL, pair.image.source, message)]
    return []


def conditioning_content_problem(decoded: Image.Image, source: str) -> str | None:
    """Why a decoded conditioning image would steer as a blank one, or None. Training's pairs and validation
    images, `finetune sample --condition` and the demo's uploads are read alike (`open_rgb`), so they are checked alike."""
    if message := float_levels_problem(decoded, f"conditioning image {source}"):
        return message
    if has_alpha(decoded) and one_colour(upright_rgb(decoded, colour_managed=False)) and not one_colour(decoded.convert("RGBA")):
        # A white shape on a transparent background: flattened onto white, as every image is, nothing is left to read
        # (whether the hidden pixels hold the shape too, or are white everywhere, as many editors save them).
        return (f"conditioning image {source} is one colour once its transparency is flattened onto white "
                "(as it trains): its content is in the alpha channel; save it without transparency (e.g. white on black)")  # fmt: skip
    return None


def read_conditioning(example: Example) -> Image.Image:
    """A conditioning image to steer with, read as training reads its pairs' (`open_rgb`: EXIF rotation, 16-bit
    scaled, transparency flattened onto white; no colour profile converted), after the same check (`conditioning_content_problem`)."""
    with pillow_warnings_named(example.source, checked=example.digest is not None):
        decoded = decode(example)
        if (problem := conditioning_content_problem(decoded, example.source)) is not None:
            raise FinetuneError(problem)
        return upright_rgb(decoded, colour_managed=False)  # its values are data (depth, edges, labels), not a photo's colours


def small_conditioning_problem(image: Image.Image, source: str, size: int) -> str | None:
    """Why a conditioning image is too small to sample `size` px images with, or None: under half of it on its
    short side, the limit training puts on its images (data.min_image_size), it is enlarged too far to steer by."""
    if min(image.size) >= size // 2:
        return None
    return f"conditioning image {source} is {image.width}x{image.height}, smaller than {size // 2} px on its short side (half of the {size} px sampled): give a larger one"


def one_colour(image: Image.Image) -> bool:
    return image.getcolors(1) is not None  # None: more colours than one


def paired_views(image: Image.Image, conditioning: Image.Image, config: DataConfig, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Resize both to cover the resolution square, then cut ONE crop and apply ONE flip to both.

    The draws are those of `views.plan_view` (crop offsets, then the flip), as for any training image;
    the conditioning view is the same geometry.
    """
    plan = plan_view(image.size, (config.resolution, config.resolution), config.crop, config.random_flip, rng)
    return render(image, plan), render(conditioning, plan)
