"""Images that decode to NaN or inf: a guidance or an adapter's scale far too high, or a training run that diverged.
Made into 8-bit pixels they are black, with no word but numpy's "invalid value encountered in cast". Checked once per
decoded batch (`torch.isfinite(...).all()`), before the pixels are made."""

from __future__ import annotations

import sys

from finetune.console import warn
from finetune.counts import counted

# The likely causes of images that decode to NaN or inf: where they are sampled, and in a training run's validation grid.
SAMPLING_OVERFLOW = "the guidance or an adapter's scale (--lora-scale, a LoRA's strength) is likely too high: lower it"
VALIDATION_OVERFLOW = ("the run may have diverged (a learning rate too high?), or validation's guidance is too high; "
                       "training goes on: look at its loss, and at the next grids")  # fmt: skip


def not_finite_rows(decoded) -> list[int]:
    """The images (rows) of a pipeline's decoded batch (a tensor, `output_type="pt"`) with a value that is NaN or inf."""
    if bool(decoded.isfinite().all()):  # one sync a batch; the rows are looked at only when some are not finite
        return []
    return [row for row, finite in enumerate(decoded.isfinite().flatten(1).all(1).tolist()) if not finite]


def decoded_pixels(pipeline, decoded) -> list:
    """A decoded batch as the pipeline's own "pil" output makes it (pt_to_numpy, then numpy_to_pil): the same pixels;
    NaN (the pipeline's clamp keeps it) as black."""
    return pipeline.image_processor.numpy_to_pil(pipeline.image_processor.pt_to_numpy(decoded.nan_to_num(nan=0.0)))


def say_warning(line: str) -> None:
    """By the process that drew the images (a validation grid's share is each process's), and over any progress bar
    (`finetune sample`'s denoising bar): printed, it went on after the bar's text on the bar's line."""
    warn(line, by="this process")
    sys.stdout.flush()  # now, into a log file too (a demo's or a job's), as print(..., flush=True) said it


def not_finite_line(made: list[tuple[str, int]], cause: str) -> str:
    """One line for the images (prompt, seed) of one pipeline call that decoded to NaN or inf."""
    by_prompt: dict[str, list[int]] = {}
    for prompt, seed in made:
        by_prompt.setdefault(prompt, []).append(seed)
    named = ", ".join(f"prompt {prompt!r} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})" for prompt, seeds in by_prompt.items())
    return f"{counted(len(made), 'image')} of {named} decoded to NaN or inf, saved black where not finite: {cause}"
