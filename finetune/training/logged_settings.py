"""A run's TensorBoard writer started, so that a resumed or restarted run reads as one curve and one record.

accelerate writes each record of the settings (TensorBoard's HParams, listed as a run of its own beside the curves) with
a copy as `<logs>/finetune/<time>/hparams.yml`: a run started afresh after one killed before its first checkpoint, in the
same output_dir with the same recipe, recorded the same settings a second time, so those copies are read
(`settings_on_record`). A resume compares with its checkpoint's settings instead."""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.training.run_end import LOGGED_AT_STEP, VALIDATION_PENDING


def start_trackers(accelerator, settings: dict, output_dir: Path, resumed_state: dict | None, step: int) -> None:
    """The main process's trackers (`accelerator.init_trackers`) for a run at `step`, resumed from a checkpoint whose
    trainer state is `resumed_state` (None: a fresh run). `settings`: the recipe's `flat_settings()`."""
    # The writer hides the steps this run trains (again) that an earlier one logged: a kill's last steps after the resumed
    # checkpoint, the later steps of a resume from an older one, or a whole run killed before its first checkpoint (a fresh
    # run finds no other's logs: --overwrite clears them, and checkpoints refuse it). TensorBoard shows one curve. From the
    # resumed step itself where its grid is drawn again (a kill after the grid had left two): its train logs are written anew.
    redrawn = resumed_state is not None and resumed_state.get(VALIDATION_PENDING) and LOGGED_AT_STEP in resumed_state
    purged = {"tensorboard": {"purge_step": 0 if resumed_state is None else step if redrawn else step + 1}}
    # The settings (TensorBoard's HParams) once per run, again only where they differ from the checkpoint's a run resumes
    # (or, started afresh, from those its logs hold): each record is a run of its own in TensorBoard's list, and an
    # overnight run resumed ten times listed ten of the same.
    if resumed_state is not None:
        on_record = resumed_state.get("recipe") == settings
    else:
        on_record = settings_on_record(output_dir / "logs" / "finetune", settings)
    accelerator.init_trackers("finetune", config=None if on_record else settings, init_kwargs=purged)
    if redrawn:
        accelerator.log(resumed_state[LOGGED_AT_STEP], step=step)


def settings_on_record(logs: Path, settings: dict) -> bool:
    """Whether a record in `logs` (a run's logs/finetune folder) holds exactly `settings` (`Recipe.flat_settings`)."""
    for record in sorted(logs.glob("*/hparams.yml")):
        try:
            if yaml.safe_load(record.read_text(encoding="utf-8")) == settings:  # written as YAML's ASCII escapes
                return True
        except (OSError, UnicodeDecodeError, yaml.YAMLError):  # cut short by the kill, or not accelerate's: no record of these
            continue
    return False
