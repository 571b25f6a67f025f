"""The validation grid: the recipe's prompts drawn at fixed seeds into samples/step-N.png, TensorBoard and W&B.

Under several processes that each hold the whole model (DDP; DeepSpeed ZeRO-0/1/2, which partition the optimizer's state
and gradients, not the weights that sample) the grid's batches are dealt out between them (`finetune.sampling.pipelines.shared_between`):
each draws its share, and the main process gathers the images and saves the grid, the one a single process draws. A
process waits in the gather only for the slowest share, not for the whole grid (a long grid drawn by the main process
alone had outlasted the process group's timeout), and N processes draw a grid of N batches or more about N times faster;
a grid of one batch (at 512 px, two images) is still one process's. Under ZeRO-3 each forward gathers the sharded weights from every process:
all of them draw every image, in lockstep (`finetune.sampling.pipelines.in_lockstep`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from finetune.data.image_bounds import GRID_LABEL_WIDTH
from finetune.distributed.processes import unwrap, zero_stage
from finetune.errors import FinetuneError
from finetune.models.start_weights import starting_weights
from finetune.outputs.atomic_files import failed_write
from finetune.outputs.full_disk import disk_full, room_text
from finetune.sampling.grids import make_grid, save_image_atomic
from finetune.sampling.pipelines import grid_progress, in_lockstep, shared_between


def run_validation(recipe, method, modules, accelerator: Accelerator, step: int) -> Path | None:
    """Collective: render the recipe's prompts with fixed seeds into samples/step-N.png (the main process saves)."""
    path, rows, labels = None, [], []
    lockstep = zero_stage(accelerator) == 3
    shared = accelerator.num_processes > 1 and not lockstep
    unwrapped = {name: unwrap(accelerator, module) for name, module in modules.items()}
    for module in unwrapped.values():
        module.eval()
    # Before the first step the model is the base (plus no-op adapters), unless it starts from trained weights (a LoRA, a
    # ControlNet): those sample as this run trains, unless taken to be trained as the base was (`started_as_pretrained`).
    as_pretrained = step == 0 and (not starting_weights(recipe) or method.started_as_pretrained())
    # Sampling must not disturb the training RNG: a resumed run then follows the same curve.
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []), contextlib.ExitStack() as sampling:
        if as_pretrained:
            sampling.enter_context(method.base.predicting_as_pretrained())
        if lockstep:
            sampling.enter_context(in_lockstep())
        share = sampling.enter_context(shared_between(accelerator.process_index, accelerator.num_processes)) if shared else None
        sampling.enter_context(grid_progress(f"validation grid (step {step})", accelerator.is_main_process))  # a bar, as `finetune sample` draws
        rows, labels = method.validation_images(unwrapped)
    for module in unwrapped.values():
        module.train()
    if share is not None:
        rows = gathered_rows(rows, share.drawn, accelerator.is_main_process)
    failure = None
    if rows and accelerator.is_main_process:
        grid = make_grid(rows, row_labels=labels, label_width=GRID_LABEL_WIDTH)
        try:
            path = save_image_atomic(grid, Path(recipe.output_dir) / "samples" / f"step-{step:06d}.png")
        except Exception as err:
            if not failed_write(err):
                raise
            failure = GridNotWritten(Path(recipe.output_dir) / "samples" / f"step-{step:06d}.png", err)
        log_grid(accelerator, grid, step)
    accelerator.wait_for_everyone()  # (raised after it: the other processes are not left waiting here)
    if failure is not None:
        raise failure
    return path


class GridNotWritten(FinetuneError):
    """A validation grid drawn that could not be written (a full disk, samples/ read-only): mid-run the run goes on without it
    (`TrainingRun.validate`), at the run's end it is the run's error (`run_end.finish_training`)."""

    def __init__(self, path: Path, err: Exception):
        self.path = path
        self.what = f"could not write the sample grid {path} ({_write_problem(err, path.parent)})"
        super().__init__(self.what)


def _write_problem(err: Exception, folder: Path) -> str:
    if disk_full(err, folder):
        return f"no space left on the disk{room_text(folder)}"
    return f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"


def gathered_rows(rows: list[list[Image.Image | None]], drawn: set[int], main: bool) -> list[list[Image.Image]]:
    """Collective: on the main process, `rows` with each image another process drew (None here) in its place; elsewhere [].
    Each process sends the images it drew (`drawn`: their id()), as uint8 pixels; the rest of a row (a ControlNet's
    conditioning image) every process has."""
    cells = {(r, c): np.asarray(image) for r, row in enumerate(rows) for c, image in enumerate(row) if image is not None and id(image) in drawn}
    everyone: list[dict | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, cells)
    if not main:
        return []
    return merged_rows(rows, everyone)


def merged_rows(rows: list[list[Image.Image | None]], cells_by_process: list[dict]) -> list[list[Image.Image]]:
    """`rows` with each None filled from the process that drew it ({(row, column): pixels} by process)."""
    merged = [list(row) for row in rows]
    for cells in cells_by_process:
        for (r, c), pixels in cells.items():
            if merged[r][c] is None:
                merged[r][c] = Image.fromarray(pixels)
    missing = [(r, c) for r, row in enumerate(merged) for c, image in enumerate(row) if image is None]
    if missing:
        raise RuntimeError(f"validation grid: no process drew the images at (row, column) {missing}")  # a bug in dealing the batches
    return merged


# What each tracker's log_images needs to read a batch of one image, as its pixels (height, width, channels).
IMAGE_OPTIONS = {"tensorboard": {"dataformats": "NHWC"}}


def log_grid(accelerator: Accelerator, grid: Image.Image, step: int) -> None:
    """The grid as the image "validation" of `step`, to each of the main process's trackers (TensorBoard, W&B)."""
    for tracker in accelerator.trackers:
        tracker.log_images({"validation": np.asarray(grid)[None]}, step, **IMAGE_OPTIONS.get(tracker.name, {}))
