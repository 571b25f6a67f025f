"""A run's trackers started (TensorBoard's writer, W&B's run), so that a resumed or restarted run reads as one curve and
one record.

accelerate writes each record of the settings (TensorBoard's HParams, listed as a run of its own beside the curves) with
a copy as `<logs>/finetune/<time>/hparams.yml`: a run started afresh after one killed before its first checkpoint, in the
same output_dir with the same recipe, recorded the same settings a second time, so those copies are read
(`settings_on_record`). A resume compares with its checkpoint's settings instead.

W&B (`logging.wandb`) gets the same scalars and grids through accelerate's tracker API, and the settings as its run's config.
Each checkpoint records its W&B run's id (`WANDB_RUN`): a resume continues that run, not a new one."""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.checkpoints.run_files import read_state
from finetune.errors import FinetuneError
from finetune.training.run_end import LOGGED_AT_STEP, VALIDATION_PENDING

WANDB_RUN = "wandb_run_id"  # the trainer state's key of the W&B run a checkpoint's run logged to


def run_trackers(recipe, resumed_run: str | None) -> list:
    """accelerate's `log_with` for `recipe`'s logging section: "tensorboard", and W&B's tracker, continuing the W&B run of
    id `resumed_run` (the resumed checkpoint's `WANDB_RUN`; None: a new W&B run). Its project, which accelerate would take
    from the name that also names TensorBoard's folder (logs/finetune), is the recipe's."""
    trackers: list = ["tensorboard"] if recipe.logging.tensorboard else []
    wandb = recipe.logging.wandb
    if wandb.enabled:
        from accelerate.tracking import WandBTracker

        continued = {"id": resumed_run, "resume": "allow"} if resumed_run else {}
        name = wandb.run_name or Path(recipe.output_dir).resolve().name
        trackers.append(WandBTracker(wandb.project, entity=wandb.entity, name=name, **continued))  # started with the others by init_trackers
    return trackers


def resumed_wandb_run(resume_from: Path | None) -> str | None:
    """The id of the W&B run a resume from checkpoint `resume_from` continues; None for a fresh run, a checkpoint of a run
    that logged to none, or one this process cannot read (where several processes start, before they agree on their
    checkpoints: only the main process's tracker reads it, and the others' missing or damaged one is said as they agree)."""
    if resume_from is None:
        return None
    try:
        return read_state(resume_from).get(WANDB_RUN)
    except FinetuneError:
        return None


def wandb_run_id(accelerator) -> str | None:
    """The id of the W&B run this process logs to (the main process's, with logging.wandb); None elsewhere."""
    return next((tracker.run.id for tracker in accelerator.trackers if tracker.name == "wandb"), None)


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
    # overnight run resumed ten times listed ten of the same. W&B's run holds them as its config: once, where it is new.
    if resumed_state is not None:
        on_record = resumed_state.get("recipe") == settings
    else:
        on_record = settings_on_record(output_dir / "logs" / "finetune", settings)
    continued_wandb = resumed_state is not None and bool(resumed_state.get(WANDB_RUN))
    for tracker in accelerator.trackers:
        if not (on_record and (tracker.name != "wandb" or continued_wandb)):
            tracker.store_init_configuration(settings)
        # W&B keeps what it was sent (its run is continued, nothing purged): only TensorBoard's purged logs of the step are written again.
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
