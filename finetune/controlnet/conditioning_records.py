"""How a ControlNet's conditioning images were made, as recorded: the data folder's `conditioning.json` (written by
`finetune make-conditions`), and the trained ControlNet's metadata (`finetune.conditioning`, copied from it), which the
demo reads to make its conditions the same way. A record make-conditions could not have written (a canny sigma of 1e9,
another maker's option names) is one line, not a condition made as it says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.checkpoints.run_files import record_text
from finetune.controlnet.condition_kinds import KINDS, OPTION_NAMES
from finetune.controlnet.conditions import RECORD_FILE, check_options
from finetune.errors import FinetuneError


def conditioning_record(folder: Path) -> dict | None:
    """What make-conditions recorded of the folder's conditioning images ({"kind": ..., its options}), if it made them; one
    line for options it could not have written (a ControlNet trained on the folder records them, and the demo refuses it)."""
    try:
        record = json.loads(record_text(folder / RECORD_FILE))
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and record.get("kind") in KINDS):
        return None
    if problem := options_problem(record["kind"], {name: value for name, value in record.items() if name != "kind"}):
        raise FinetuneError(f"{folder / RECORD_FILE} records conditioning images made in a way make-conditions does not ({problem}): "
                            "make them again with finetune make-conditions, or delete that file (a ControlNet trained on the folder "
                            "then records no way they were made)")  # fmt: skip
    return record


def data_folder_record(data) -> dict | None:
    """`conditioning_record` of a ControlNet's data folder (data.image_dir, or a make-conditions folder given as data.dataset)."""
    folder = data.image_dir or data.dataset
    return conditioning_record(Path(folder)) if folder and Path(folder).is_dir() else None


def inherited_record(metadata: dict[str, str]) -> dict | None:
    """The record of how a ControlNet's conditioning images were made (its finetune.conditioning) that a run continuing it
    (controlnet.pretrained) on a data folder recording none keeps in its own outputs, so `finetune sample` and the demo
    make and check conditions for the continued ControlNet as for the one it began as; None where none is recorded, or
    one make-conditions could not have written (the demo refuses that of the pretrained one: it is not passed on)."""
    try:
        record = json.loads(metadata["finetune.conditioning"])
        kind, options = record["kind"], {name: value for name, value in record.items() if name != "kind"}
    except (KeyError, ValueError, TypeError, AttributeError):  # not recorded, or not by us
        return None
    return record if kind in KINDS and options_problem(kind, options) is None else None


def options_problem(kind: str, options: dict) -> str | None:
    """Why `options` are not thresholds make-conditions writes for `kind` (another maker's names, a sigma of 1e9), or None."""
    if unknown := sorted(set(options) - set(OPTION_NAMES.get(kind, ()))):
        return f"{kind} takes no {', '.join(unknown)}"
    try:
        check_options(kind, **options)
    except (FinetuneError, TypeError) as err:  # TypeError: a threshold of no number ("1", null)
        return str(err) if isinstance(err, FinetuneError) else f"{kind}'s thresholds are numbers"
    return None


def recorded_options(metadata: dict[str, str], kind: str, named: str = "the ControlNet") -> dict[str, float]:
    """The thresholds a ControlNet's `kind` conditioning images were made with (its finetune.conditioning), so
    that one made for it later (the demo's) is made the same way; {} where another kind or none is recorded. A
    record that make-conditions could not have written (a sigma of 1e9, another maker's names) is one line."""
    try:
        record = json.loads(metadata["finetune.conditioning"])
        options = {name: float(value) for name, value in record.items() if name != "kind"} if record["kind"] == kind else {}
    except (KeyError, ValueError, TypeError, AttributeError):  # not recorded, or not by us
        return {}
    if problem := options_problem(kind, options):
        raise FinetuneError(f"{named} records conditioning images made in a way make-conditions does not ({problem}): its metadata "
                            "(finetune.conditioning) is damaged or was edited; use another copy of it")  # fmt: skip
    return options


def recorded_conditioning(metadata: dict[str, str]) -> str | None:
    """'canny (low 20, high 40, sigma 1)': how a ControlNet's training images were made (its finetune.conditioning), if known."""
    try:
        return conditioning_named(json.loads(metadata["finetune.conditioning"]))
    except (KeyError, ValueError, TypeError, AttributeError):  # not recorded, or not by us
        return None


def conditioning_named(record: dict) -> str:
    """'canny (low 20, high 40, sigma 1)': how conditioning images were made, from their record ({"kind": ..., its options}).
    A record not by us (no kind, an option of no number) raises KeyError, ValueError or TypeError."""
    options = ", ".join(f"{name} {value:g}" for name, value in record.items() if name != "kind")
    return f"{record['kind']} ({options})" if options else str(record["kind"])


# What sample and the data check advise where a conditioning image is unlike its kind ("{kind}" filled in by kind_mismatch_line).
MAKE_ONE = "make its {kind} image with finetune make-conditions PHOTOS OUT --kind {kind} (it reads a folder)"


def unlike_its_kind(image: Image.Image, kind: str) -> str | None:
    """'has colours' (or 'has shades of grey') where `image` cannot be a `kind` conditioning image of make-conditions, which
    makes grey ones (luminance) and black and white ones (canny, mask): a photo given to an edge ControlNet, the usual
    mistake, steered as it never learned, said only as "give one of that kind" whatever the image. A few stray pixels (a
    JPEG's ringing round an edge) are let through; a black-and-white photo given for a canny ControlNet is not caught."""
    # Judged on at most 1024 px a side, picked (not averaged: no new greys): a 48-megapixel upload in int16 took 300 MB.
    if (scale := 1024 / max(image.size)) < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.NEAREST)
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    if (np.ptp(pixels, axis=2) > 32).mean() > 0.02:
        return "has colours"
    grey = pixels.mean(axis=2)
    if kind in ("canny", "mask") and ((grey > 64) & (grey < 192)).mean() > 0.05:
        return "has shades of grey"
    return None


def kind_mismatch_line(image: Image.Image, kind: str | None, named: str, advice: str) -> str | None:
    """'{named} is no canny image (...)': where the image steering a ControlNet is unlike the `kind` its training images were
    made as (`recorded_kind`), with `advice` on making one (its "{kind}" filled in); None where it may be one, or none is known."""
    if kind not in KINDS or (why := unlike_its_kind(image, kind)) is None:
        return None
    made = "grey" if kind == "luminance" else "black and white"
    return f"{named} is no {kind} image (make-conditions makes them {made}; it {why}): a photo steers as the ControlNet never learned; {advice.format(kind=kind)}"


def recorded_kind(metadata: dict[str, str]) -> str | None:
    """The kind a ControlNet's training images were made as (its finetune.conditioning), if recorded."""
    try:
        return json.loads(metadata["finetune.conditioning"])["kind"]
    except (KeyError, ValueError, TypeError):
        return None


def made_as_recorded(condition: str | Path, metadata: dict[str, str]) -> bool:
    """Whether `condition` is an image make-conditions wrote (OUT/conditioning/NAME.png) into a folder whose conditioning.json
    records the kind and thresholds a ControlNet's finetune.conditioning does: `sample` given the very images the ControlNet
    trained on told its user to "give one of that kind" all the same."""
    folder = Path(condition).parent
    if folder.name != "conditioning":
        return False
    try:
        made, recorded = conditioning_record(folder.parent), json.loads(metadata["finetune.conditioning"])
        return made is not None and conditioning_named(made) == conditioning_named(recorded)
    except (FinetuneError, KeyError, ValueError, TypeError, AttributeError):  # a damaged record here or there: the note stays
        return False
