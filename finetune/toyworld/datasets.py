"""Toy-world dataset folders: ``generate`` samples ``(image, caption, scene, mask)`` and
``write_folder`` writes them as a training folder (images, ``.txt`` captions, optional
conditioning masks and ``metadata.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .world import Scene, caption, draw, mask_image, partial_caption, sample_scenes


def generate(
    n: int, seed: int, include_held_out: str = "no", size: int = 64
) -> list[tuple[Image.Image, str, Scene, np.ndarray]]:
    """``n`` samples ``(image, caption, scene, mask)``; image ``i`` is jittered with the
    seed ``(seed, i)``, so any sample can be re-rendered on its own."""
    out = []
    for i, scene in enumerate(sample_scenes(n, seed, include_held_out)):
        image, mask = draw(scene, size, np.random.default_rng([seed, i]))
        out.append((image, caption(scene), scene, mask))
    return out


def write_folder(
    directory: str | Path,
    n: int,
    seed: int,
    include_held_out: str = "no",
    size: int = 64,
    conditioning: bool = False,
    metadata: bool = True,
    partial_captions: float = 0.0,
    masks: bool = False,
) -> Path:
    """Write a dataset folder: ``0000.png`` + ``0000.txt`` (caption) per sample.

    With ``conditioning=True`` also writes ``conditioning/0000.png`` (the shape mask,
    white on black, RGB) for ControlNet. With ``metadata=True`` writes a
    ``metadata.jsonl`` (``file_name``, ``text`` and, with conditioning,
    ``conditioning_file_name``) in the Hugging Face ``imagefolder`` layout. A share
    ``partial_captions`` of the images get a :func:`partial_caption` (drawn with the seed
    ``(seed, i, 1)``) instead of the full one; the images themselves do not change.
    With ``masks=True`` also writes ``masks/0000.png``, the shape mask in greyscale: the
    loss mask (``data.loss_mask.source: files``) of a subject without its background.
    Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if conditioning:
        (directory / "conditioning").mkdir(exist_ok=True)
    if masks:
        (directory / "masks").mkdir(exist_ok=True)
    digits = max(4, len(str(max(n - 1, 0))))
    rows = []
    for i, (image, text, scene, mask) in enumerate(generate(n, seed, include_held_out, size)):
        name = f"{i:0{digits}d}.png"
        if partial_captions:
            caption_rng = np.random.default_rng([seed, i, 1])
            if caption_rng.random() < partial_captions:
                text = partial_caption(scene, caption_rng)
        image.save(directory / name)
        (directory / name).with_suffix(".txt").write_text(text + "\n")
        row = {"file_name": name, "text": text}
        if conditioning:
            cond = mask_image(mask)
            cond.save(directory / "conditioning" / name)
            row["conditioning_file_name"] = f"conditioning/{name}"
        if masks:
            mask_image(mask).convert("L").save(directory / "masks" / name)
        rows.append(row)
    if metadata:
        with open(directory / "metadata.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return directory
