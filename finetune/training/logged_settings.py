"""A run's trackers started (TensorBoard's writer, W&B's run), so that a resumed or restarted run reads as one curve and
one record.

accelerate writes each record of the settings (TensorBoard's HParams, listed as a run of its own beside the curves) with
a copy as `<logs>/finetune/<time>/hparams.yml`: a run started afresh after one killed before its first checkpoint, in the
same output_dir with the same recipe, recorded the same settings a second time, so those copies are read
(`settings_on_record`). A resume compares with its checkpoint's settings instead.

W&B (`logging.wandb`) gets the same scalars and grids through accelerate's tracker API, and the settings as its run's config."""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.training.run_end import LOGGED_AT_STEP, VALIDATION_PENDING

def run_trackers(recipe) -> list:
    """accelerate's `log_with` for `recipe`'s logging section: "tensorboard", and W&B's tracker. Its project, which
    accelerate would take from the name that also names TensorBoard's folder (logs/finetune), is the recipe's."""
    trackers: list = ["tensorboard"] if recipe.logging.tensorboard else []
    wandb = recipe.logging.wandb
    if wandb.enabled:
        from accelerate.tracking import WandBTracker

        name = wandb.run_name or Path(recipe.output_dir).resolve().name
        trackers.append(WandBTracker(wandb.project, entity=wandb.entity, name=name))  # started with the others by init_trackers
    return trackers


def start_trackers(accelerator, settings: dict, output_dir: Path, resumed_state: dict | None, step: int) -> None:
    """The main process's trackers (`accelerator.init_trackers`) for a run at `step`, resumed from a checkpoint whose
    trainer state is `resumed_state` (None: a fresh run). `settings`: the recipe's `flat_settings()`."""
    # The writer hides the steps this run trains (again) that an earlier one logged: a kill's last steps after the resumed
    # checkpoint, the later steps of a resume from an older one, or a whole run killed before its first checkpoint (a fresh
    # run finds no other's logs: --overwrite clears them, and checkpoints refuse it). TensorBoard shows one curve. From the
    # resumed step itself where its grid is drawn again (a kill after the grid had left two): its train logs are written anew.
    redrawn = resumed_state is not None and resumed_state.get(VALIDATION_PENDING) and LOGGED_AT_STEP in resumed_state
    purged = {"tensorboard": {"purge_step": 0 if resumed_state is None else step if redrawn else step + 1}}
    accelerator.init_trackers("finetune", init_kwargs=purged)
    # The settings (TensorBoard's HParams) once per run, again only where they differ from the checkpoint's a run resumes
    # (or, started afresh, from those its logs hold): each record is a run of its own in TensorBoard's list, and an
    # overnight run resumed ten times listed ten of the same. W&B's run holds them as its config (each run is a new one).
    if resumed_state is not None:
        on_record = resumed_state.get("recipe") == settings
    else:
        on_record = settings_on_record(output_dir / "logs" / "finetune", settings)
    for tracker in accelerator.trackers:
        if not (on_record and tracker.name != "wandb"):
            tracker.store_init_configuration(settings)
        # Only TensorBoard's purged logs of the step are written again: W&B's run has no logs before it.
        if redrawn and tracker.name == "tensorboard":
            tracker.log(resumed_state[LOGGED_AT_STEP], step=step)


def settings_on_record(logs: Path, settings: dict) -> bool:
    """Whether a record in `logs` (a run's logs/finetune folder) holds exactly `settings` (`Recipe.flat_settings`)."""
    for record in sorted(logs.glob("*/hparams.yml")):
        try:
            if yaml.safe_load(record.read_text(encoding="utf-8")) == settings:  # written as YAML's ASCII escapes
                return True
        except (OSError, UnicodeDecodeError, yaml.YAMLError):  # cut short by the kill, or not accelerate's: no record of these
            continue
    return False
