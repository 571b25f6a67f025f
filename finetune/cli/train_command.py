"""The `finetune train` command: its checks before torch loads (the recipe, the data folders and base model, --resume,
output_dir and the earlier run there, the files the run starts from, then the data check of every image), the run under output_dir's lock, and what it prints."""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path

from finetune.checkpoints.run_files import resolve_resume, say_fresh_start
from finetune.errors import FinetuneError, one_line
from finetune.library_noise import quiet_weight_progress_bars
from finetune.stop_signals import exit_status


def run_train_command(args) -> int:
    from finetune.config.recipe_loading import load_recipe

    if args.overwrite and args.resume:
        raise FinetuneError("--overwrite starts over (deleting the earlier run's checkpoints) and --resume continues one: pass one of them")
    recipe = load_recipe(args.recipe, args.overrides)  # a bad recipe is said at once, before torch and diffusers load (~10 s)
    from finetune.data_check.train_inputs import check_inputs_exist  # PIL and numpy, with the data folder's reader

    base_location = check_inputs_exist(recipe)  # so is a missing data folder or base model (looked up once: train() loads it from there)
    from finetune.console import warn
    from finetune.models.native_resolution import far_from_native_line

    if line := far_from_native_line(recipe.data.resolution, recipe.model.pretrained, recipe.model.single_file_config):
        warn(line)
    from finetune.checkpoints.earlier_run import guard_earlier_run  # it imports no torch
    from finetune.checkpoints.run_lock import output_dir_lock
    from finetune.cli.run_refusals import check_run_first
    from finetune.data_check.checked_once import checks_kept
    from finetune.data_check.starting_files import check_starting_files
    from finetune.data_check.train_inputs import check_data_first
    from finetune.distributed.launch_options import check_launch_first

    # So are a --resume that is no checkpoint, and an output_dir that cannot be written or holds an earlier run unasked
    # (train() checks them again, for callers that do not come through here). The lock from the check of output_dir on: a run
    # still writing there is said as that, not as an earlier run, nor is its save, between two renames, taken for a killed one's.
    # A run that fails (these checks too) leaves no folder the lock made, where it is still empty (`run_lock.removed_if_left_empty`).
    check_launch_first()  # a launch of one process where several were asked: before the lock makes output_dir, and the data check
    output_dir, checkpoints_dir = Path(recipe.output_dir), Path(recipe.output_dir) / "checkpoints"
    if not output_dir.is_dir():  # a mistyped --resume is said before the lock makes the folder
        resolve_resume(args.resume, checkpoints_dir)
    with full_disk_said(recipe.output_dir), output_dir_lock(output_dir), checks_kept():
        resume_from = resolve_resume(args.resume, checkpoints_dir)
        guard_earlier_run(output_dir, resume_from, args.overwrite)
        check_starting_files(recipe, resuming=resume_from is not None)  # controlnet.pretrained, lora.init_from, the validation conditions
        check_run_first(recipe, resume_from, base_location)  # train()'s refusals of the run itself (finetune/cli/run_refusals.py)
        if args.resume == "latest" and resume_from is None:  # once nothing cheaper refuses the run: a mistyped output_dir, before minutes of decoding
            say_fresh_start(checkpoints_dir)
        check_data_first(recipe, resume_from)  # every image decoded, after the cheaper checks above (train() takes its result), then whether they fill a batch
        result = _run_training(recipe, args, base_location)
    if result.interrupted:
        return exit_status(result.stopped_by)
    for path in result.sample_grids[-1:]:
        print(f"samples: {path}")
    for path in result.saved_files:
        print(f"output: {path}")
    return exit_status(result.stopped_by) if result.stopped_by else 0  # a stop after the last step skipped the final samples


def _run_training(recipe, args, base_location):
    """train(), its error said by one process of the run (`says_its_error`), the process group left however it ends."""
    say_loading(recipe)
    from finetune.distributed.error_exchange import lost_process_said, says_its_error, wait_for_error_readers
    from finetune.distributed.processes import leave_process_group  # torch and the training stack: after the checks
    from finetune.training.trainer import train

    quiet_weight_progress_bars()
    try:
        with full_disk_said(recipe.output_dir), lost_process_said(recipe.output_dir):
            return train(recipe, resume=args.resume, overwrite=args.overwrite, base_location=base_location)
    except FinetuneError as err:
        if err.said_here is None:  # asked while the processes' rendezvous store is still there
            err.said_here, err.after_said = says_its_error(one_line(err)), wait_for_error_readers
        raise
    finally:
        leave_process_group()


def say_loading(recipe) -> None:
    """Said as the data check's bar ends, before torch and diffusers import and the base's weights load: 10-20 s on 2 CPU
    cores that said nothing. By the main process, as every line of the run."""
    from finetune.console import say

    say(f"loading torch, diffusers and the base model {recipe.model.pretrained} (UNet, VAE, text encoder)...")


@contextlib.contextmanager
def full_disk_said(output_dir: str):
    """A full disk under a sample grid, the logs or the run's lock file is one line too (checkpoints and outputs say their own)."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise FinetuneError(
            f"no space left on the disk of {output_dir}{f' (writing {err.filename})' if err.filename else ''}: make room, then "
            "--resume latest (the last complete checkpoint is kept)"
        ) from None
