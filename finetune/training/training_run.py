"""One run from its prepared model to its end: `TrainingRun` holds what the loop, the checkpoints and the validation share
(the accelerator, the method and its wrapped modules, the optimizer and its schedule, the data and their order, the weight
average, the step, the result), and `finetune.training.trainer` builds it, then calls `resume`, `start_outputs`, `train` and `end`.

`train` reads as the loop: each optimizer step (`optimizer_step`: its micro-batches' losses from the method, the gradients,
the step), what follows it (`after_step`: the losses and logs, the progress bar), then `between_steps`: a stop's
checkpoint, a checkpoint due, a validation due. Every process runs the same calls in the same order: the collective ones
(a save, a validation, a stop's agreement, a log step's reductions) are reached by all of them at the same step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from finetune.checkpoints import checkpoint as ckpt
from finetune.checkpoints.cpu_adam_steps import continue_step_powers
from finetune.checkpoints.earlier_run import put_back_interrupted_checkpoints
from finetune.checkpoints.resume_changes import changed_data, changed_settings
from finetune.config import Recipe
from finetune.config.run_recipe import write_run_recipe
from finetune.console import say, warn
from finetune.data.batches import ItemLayout
from finetune.data.order import DealtOrder
from finetune.data.sources import Example
from finetune.distributed.processes import autocast, full_parameters, release_gathered, trained_parameters, uncompiled_forwards, unsharded_loading, unwrap
from finetune.distributed.stopping import StopRequest, batches_of
from finetune.methods.base import TrainingMethod
from finetune.optim.optimizers import apply_recipe_settings, clip_gradients, step_size
from finetune.outputs.metadata import output_metadata
from finetune.training.device_copy import to_device
from finetune.training.diffusion import BatchRandomness
from finetune.training.draw_keys import DRAWN
from finetune.training.ema import EMA_FILE, WeightAverage
from finetune.training.finite_weights import ensure_finite_weights
from finetune.training.held_out import HELD_OUT_STATE, HeldOutSplit, held_out_loss
from finetune.training.logged_settings import WANDB_RUN, start_trackers, wandb_run_id
from finetune.training.run_end import LOGGED_AT_STEP, OUTPUTS_PENDING, VALIDATION_PENDING, final_samples_wanted, finish_cut_short, finish_training, next_step_said, remove_killed_grids, resume_command
from finetune.training.run_length import STEPS_BY_SHAPE, EpochCount, due, epochs_text, resume_warnings
from finetune.training.step_losses import StepLosses, backward, micro_batch_shares, train_logs, weighted
from finetune.training.validation import GridNotWritten, run_validation


@dataclass
class TrainResult:
    """What `finetune.training.trainer.train` returns: the run's outputs, its losses, and whether a stop ended it."""

    output_dir: Path
    final_step: int
    saved_files: list[Path] = field(default_factory=list)
    sample_grids: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # per optimizer step, this run only
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss on the held-out images)
    interrupted: bool = False
    stopped_by: int = 0  # the signal that stopped it (SIGINT, SIGTERM), where `interrupted` or where it skipped the final samples


@dataclass
class RunData:
    """The checked data as the run trains them, and the run's length (`finetune.training.trainer._laid_out_data`)."""

    sources: list  # each training item's image (the method's `training_items()`), held out or not
    trained_indices: list[int]  # into `sources`: the items that train
    held_out: list[int]  # one item per held-out image that validation.loss_images scores
    held_out_split: HeldOutSplit  # its images go into each checkpoint: a resume holds out the same
    trained_examples: list[Example]  # the items that train
    layout: ItemLayout  # `finetune.data.batches.item_layout` of them: the sizes the sampler batches by
    trained_data: dict  # what the outputs' metadata say of them (folders, tags)
    sampler: DealtOrder  # each micro-batch's rows, continued from a resume's position
    epochs_by: EpochCount  # the epochs at each step
    max_steps: int  # train.max_steps, or train.max_epochs counted in steps
    draws_from: int  # the noise's keys go on from a resumed checkpoint's draws
    pending_end: list[str]  # what a finished run's end, cut short by a kill, has still to write (`finetune.training.run_end`)


@dataclass
class TrainingRun:
    """What the run's phases share once its model is prepared (`finetune.training.trainer._prepared_run`), with the work they
    share it for: a validation, the outputs, a checkpoint, an optimizer step."""

    recipe: Recipe
    method: TrainingMethod  # set up (`finetune.training.trainer._set_up_model`)
    accelerator: Accelerator
    data: RunData
    resume_from: Path | None  # the checkpoint the run continues
    dataset: object  # the method's whole dataset: the held-out loss reads its held-out items
    training_set: object  # the items of it that train
    collate_fn: Callable
    images_record: dict  # the trained images, as each checkpoint records them for a resume to compare
    modules: dict[str, torch.nn.Module]  # the trained modules by name, as accelerate prepared them
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    group_names: list[str]  # the parameter groups', for the logs
    group_lrs: list[float]  # the recipe's rates for them, read before the optimizer's warm-up wrote into them: a resume's to apply
    clipped_parameters: list  # fixed for the run: gathered once, since walking a UNet's modules each step costs milliseconds
    average: WeightAverage | None  # train.ema_decay's weight average
    save_options: dict  # how the accelerator saves and loads checkpoints (`finetune.distributed.processes.checkpoint_options`)
    load_options: dict
    on_step: Callable[[int], None] | None
    step: int = 0
    state: dict | None = None  # a resume's trainer state (trainer_state.json)
    running: StepLosses = field(default_factory=StepLosses)  # the loss and its terms over each step's micro-batches, and since the last log
    step_logs: dict = field(default_factory=dict)  # what the method reports after each optimizer step (lora.max_norm)
    logged: dict = field(default_factory=dict)  # the last step's train logs: its checkpoint keeps them (LOGGED_AT_STEP)
    progress: tqdm | None = field(default=None, init=False)  # the loop's progress bar
    stop: StopRequest | None = field(default=None, init=False)  # whether the processes agree to stop (Ctrl-C, SIGTERM): the loop's and the end's
    output_dir: Path = field(init=False)
    checkpoints_dir: Path = field(init=False)
    result: TrainResult = field(init=False)

    def __post_init__(self):
        self.output_dir = Path(self.recipe.output_dir)
        self.checkpoints_dir = self.output_dir / "checkpoints"
        self.result = TrainResult(output_dir=self.output_dir, final_step=self.step)  # its final step is set as the loop ends

    @contextlib.contextmanager
    def averaged(self, saving: bool = False):
        """The weight average in place of the trained weights, with train.ema_decay. `saving`: only the process that
        writes needs it, unless the average is sharded (DeepSpeed's masters), which every process puts in together."""
        if self.average is None or (saving and not self.average.sharded and not self.accelerator.is_main_process):
            yield
            return
        with self.average.applied():
            self.method.hold_weight_limits(self.modules)
            yield

    def validate(self, at_step: int, going_on: bool = False) -> Path | None:
        """The validation grid of this step (and the held-out loss); returns the grid's path, if one was drawn. A grid that
        cannot be written (`GridNotWritten`) is raised once the rest is done; mid-run (`going_on`) it is a warning and the run
        goes on: a grid is a view of the run, not its state, and a full disk that stays full stops the run at the next
        checkpoint with that one's line, the last good checkpoint kept; where room is made meanwhile, nothing is lost."""
        unwritten = None
        with self.averaged(), uncompiled_forwards(self.modules) as forwards:
            try:
                grid = run_validation(self.recipe, self.method, forwards, self.accelerator, at_step)
            except GridNotWritten as failure:
                grid, unwritten = None, failure
            if self.data.held_out:
                terms = held_out_loss(self.method, forwards, self.dataset, self.collate_fn, self.data.held_out, self.recipe.seed,
                                              self.accelerator.device, lambda: autocast(self.accelerator))  # fmt: skip
                self.result.validation_losses.append((at_step, terms["loss"]))
                say(f"validation loss at step {at_step}: {terms['loss']:.4f}")
                self.accelerator.log({f"validation/{name}": value for name, value in terms.items()}, step=at_step)
        release_gathered(self.accelerator, self.modules)
        if unwritten is not None and not going_on:
            raise unwritten
        if unwritten is not None:
            warn(f"{unwritten.what}: training goes on without it (the checkpoints hold what a resume needs)")
        if grid is not None:
            self.result.sample_grids.append(grid)
        return grid

    def save_outputs(self, folder: Path) -> list[Path]:
        """Collective: the method's outputs (from the weight average, if any) into `folder`, by the main process."""
        ensure_finite_weights(self.accelerator, trained_parameters(self.modules, self.accelerator).values(), self.step, self.checkpoints_dir)
        # Under DeepSpeed the average goes into the fp32 masters, which full_parameters then gathers.
        with self.averaged(saving=True), full_parameters(self.accelerator, self.modules):
            if not self.accelerator.is_main_process:
                return []
            unwrapped = {name: unwrap(self.accelerator, module) for name, module in self.modules.items()}
            progress = {"epoch": int(self.data.epochs_by.at(self.step)), "max_steps": self.data.max_steps, "dataset": self.data.trained_data,
                        "started": self.method.start_metadata()}  # fmt: skip
            with unsharded_loading(self.accelerator):  # saving may load frozen parts again at the source's precision: whole, as at the start
                metadata = output_metadata(self.recipe, self.step, self.method.base.noise_scheduler.config.prediction_type, **progress)
                return self.method.save(folder, unwrapped, metadata)

    def save_checkpoint(self, validation_pending: bool = False, logged_at_step: dict | None = None, outputs_pending: bool = False) -> None:
        """Collective: the step's checkpoint, with what its resume needs to go on as if never stopped."""
        accelerator, recipe, data, step = self.accelerator, self.recipe, self.data, self.step
        ensure_finite_weights(accelerator, trained_parameters(self.modules, accelerator).values(), step, self.checkpoints_dir)

        def extra(folder: Path) -> None:
            if self.average is not None:  # sharded (DeepSpeed), it is gathered by every process for the main one to write
                self.average.save(folder / EMA_FILE, writer=accelerator.is_main_process)
            if recipe.checkpoint.save_outputs:
                self.save_outputs(folder)

        micro_batches = step * recipe.train.gradient_accumulation_steps
        folder = ckpt.save_checkpoint(
            accelerator, self.checkpoints_dir, step,
            {"recipe_hash": recipe.fingerprint(), "recipe": recipe.flat_settings(), "processes": accelerator.num_processes, "max_steps": data.max_steps,
             "method": self.method.checkpoint_state(), "data": self.images_record, HELD_OUT_STATE: data.held_out_split.images,
             "data_order": data.sampler.position_after(micro_batches),
             DRAWN: micro_batches + data.draws_from, STEPS_BY_SHAPE: data.epochs_by.steps_by_shape(step),  # what its steps drew, and trained at which batch
             "losses_since_log": self.running.since_last_log_state(accelerator),  # the resumed run's first log covers the same steps
             VALIDATION_PENDING: validation_pending, LOGGED_AT_STEP: logged_at_step or {}, OUTPUTS_PENDING: outputs_pending,
             WANDB_RUN: wandb_run_id(accelerator) or (self.state or {}).get(WANDB_RUN)},  # (a resume with W&B off keeps its run for one with it on)
            recipe.checkpoint.keep_last, extra=extra, **self.save_options
        )  # fmt: skip
        say(f"saved {folder} (step {step}, {epochs_text(data.epochs_by.at(step))})")

    def resume(self) -> None:
        """Collective: the trained state, the data order's and the schedule's, from `resume_from`; then what changed since."""
        recipe, accelerator, resume_from = self.recipe, self.accelerator, self.resume_from
        self.state = ckpt.load_checkpoint(accelerator, resume_from, recipe.flat_settings(), **self.load_options)
        self.step = self.state["step"]
        accelerator.step = 0  # its micro-batch count, restored: count % accumulation must say a step's last at another accumulation too
        self.method.load_checkpoint_state(self.state.get("method", {}))
        apply_recipe_settings(self.optimizer, self.lr_scheduler, self.group_lrs, recipe.optimizer)
        continue_step_powers(self.optimizer)  # DeepSpeed's CPU Adam keeps them outside its checkpoint
        say(f"resumed from {resume_from} at step {self.step}")
        for line in resume_warnings(resume_from, self.state, recipe, self.data.max_steps, accelerator.num_processes, self.data.layout.order_key(recipe.seed)):  # processes, length
            say(line)
        if self.average is not None and not self.average.load(resume_from / EMA_FILE):
            warn(f"{resume_from.name} has no weight average (train.ema_decay was off): it starts from the resumed weights")
        changed = changed_settings(self.state.get("recipe"), recipe.flat_settings()) + changed_data(self.state.get("data"), self.images_record)
        if changed:
            warn(f"settings changed since {resume_from.name}: {', '.join(changed)}")
        put_back_interrupted_checkpoints(accelerator, self.checkpoints_dir)  # the checkpoint read where a kill left it: in place before any save

    def start_outputs(self) -> None:
        """By the main process: the output folder, the run's recipe in it, the trackers (continued at a resume's step)."""
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_killed_grids(self.output_dir)
            write_run_recipe(self.recipe, self.output_dir)  # never over a recipe.yaml of the user's there (finetune.config.run_recipe)
            start_trackers(self.accelerator, self.recipe.flat_settings(), self.output_dir, self.state, self.step)

    def train(self, loader, closing: contextlib.ExitStack) -> None:
        """Collective: the steps from `step` to the run's last, or to a stop all processes agree on (its checkpoint saved)."""
        recipe, data = self.recipe, self.data
        # Before the first step (validation.at_start), or due at the step its checkpoint was saved before it (by a stop, or
        # before a kill while it drew): the curve keeps that step.
        if (self.step == 0 and recipe.validation.at_start) or (self.resume_from is not None and self.state.get(VALIDATION_PENDING) and not data.pending_end):
            if (grid := self.validate(self.step, going_on=True)) is not None:  # named as the loop names its grids
                say(f"samples: {grid}")

        self.progress = tqdm(total=data.max_steps, initial=self.step, desc="training", disable=not self.accelerator.is_local_main_process)
        self.running.resume_since_last_log(self.state.get("losses_since_log") if self.resume_from is not None else None, self.accelerator.device)
        self.stop = closing.enter_context(StopRequest(self.accelerator).closed_at_the_end())  # its gloo group too, after an error
        # A second stop mid-run is raised at once: its line names the command that continues (the checkpoints on disk), as at the end.
        with next_step_said(self.output_dir, self.checkpoints_dir, data.max_steps, self.resume_from), self.stop, batches_of(loader) as batches:
            while self.step < data.max_steps and not self.result.interrupted:
                self.optimizer_step(batches)
                self.after_step()
                self.between_steps()
        self.progress.close()
        if self.result.interrupted:  # under the progress bar it ends: by the main process, whose checkpoint it names
            # With the command, as a second stop and one at the end say it: the run may have been launched with overrides.
            say(f"stopped at step {self.step}; checkpoint saved in {self.checkpoints_dir}; continue with --resume latest ({resume_command(self.output_dir)})")
        self.result.final_step, self.result.losses = self.step, self.running.read_steps(self.accelerator)  # with a stop's steps since the last log step

    def optimizer_step(self, batches) -> None:
        """One optimizer step: its micro-batches' losses and gradients (train.gradient_accumulation_steps), the step, the
        schedule's and the weight average's."""
        accelerator, sampler, accumulation = self.accelerator, self.data.sampler, self.recipe.train.gradient_accumulation_steps
        first = self.step * accumulation  # the run's count of micro-batches before this step
        step_batches = [sampler.rows_of(first + micro) for micro in range(accumulation)]  # (global size, rows here)
        shares = micro_batch_shares(sampler, range(first, first + accumulation), accelerator.num_processes)  # each image counts alike
        for micro in range(accumulation):
            batch = next(batches)
            if "pixel_values" in batch:  # absent when the batch names cached latents instead (finetune.data.views)
                batch["pixel_values"] = to_device(batch["pixel_values"], accelerator.device)
            # Bucketed global batches vary in size (a bucket's last batch may be smaller).
            global_size, rows = step_batches[micro]
            randomness = BatchRandomness(self.recipe.seed, first + micro + self.data.draws_from, global_size, rows)
            with accelerator.accumulate(*self.modules.values()):
                with autocast(accelerator):
                    losses = self.method.loss(self.modules, batch, randomness)
                backward(accelerator, weighted(losses["loss"], shares[micro]))
                if accelerator.sync_gradients and self.recipe.train.max_grad_norm:
                    clip_gradients(accelerator, self.clipped_parameters, self.recipe.train.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:  # a real step, not one of accumulation's
                    self.step_logs = self.method.hold_weight_limits(self.modules)
            self.running.add(losses, shares[micro] / accumulation)
        if not self.optimizer.step_was_skipped:  # fp16 loss scaling skips a step whose gradients overflowed
            self.lr_scheduler.step()
        if self.average is not None:
            self.average.update()
        self.step += 1

    def after_step(self) -> None:
        """Collective at a log step: the step's loss, `on_step`, the progress bar, and the train logs when due."""
        step, train_cfg = self.step, self.recipe.train
        self.running.end_step(self.accelerator)
        if self.on_step is not None:
            self.on_step(step)
        self.progress.update(1)
        lr = step_size(self.optimizer)
        epochs = self.data.epochs_by.at(step)
        self.logged = {}  # this step's train logs, kept by its checkpoint
        if step % self.recipe.logging.every_n_steps == 0 or step == self.data.max_steps:  # losses are read on the host here only (StepLosses)
            self.logged = train_logs(self.running.since_last_log(self.accelerator), self.step_logs, lr, self.optimizer, self.group_names, epochs)
            self.accelerator.log(self.logged, step=step)
        # Drawn by update() at most 10 times a second, not at every step's postfix.
        shown_epochs = {"epoch": f"{epochs:.2f}/{train_cfg.max_epochs}"} if train_cfg.max_epochs else {}
        self.progress.set_postfix(**self.running.shown(), lr=f"{lr:.2e}", **shown_epochs, refresh=False)

    def between_steps(self) -> None:
        """Collective, unless the step was the run's last (its outputs and final samples are `end`'s): a stop all processes
        agree on, with its checkpoint (the loop ends), else the checkpoint and the validation due at this step."""
        recipe, step = self.recipe, self.step
        if step >= self.data.max_steps:
            return
        ended = self.data.epochs_by.ended_by(step)
        validation_due = due(step, recipe.validation.every_n_steps, ended, recipe.validation.every_n_epochs)
        if self.stop.agreed():
            self.save_checkpoint(validation_pending=validation_due, logged_at_step=self.logged)  # a stop skips it; the resumed run draws it
            self.result.interrupted, self.result.stopped_by = True, self.stop.signal
            return
        if due(step, recipe.checkpoint.every_n_steps, ended, recipe.checkpoint.every_n_epochs):
            # Its validation is drawn after it is written: a kill while that draws (a grid takes minutes) left a checkpoint
            # whose resume never drew it. The resumed run draws it (again, the same, if the kill came later).
            self.save_checkpoint(validation_pending=validation_due, logged_at_step=self.logged)
        if validation_due and (grid := self.validate(step, going_on=True)) is not None:
            say(f"samples: {grid}")

    def end(self) -> None:
        """Collective, unless stopped: the outputs and the final samples, or what a resumed finished run's end had left."""
        if self.result.interrupted:
            return
        if self.data.pending_end:
            finish_cut_short(self.result, self.stop, self.output_dir, self.checkpoints_dir, self.save_outputs, self.validate, self.data.pending_end, self.resume_from)
        else:
            finish_training(self.result, self.stop, self.output_dir, self.checkpoints_dir, self.save_outputs,
                            lambda **pending: self.save_checkpoint(logged_at_step=self.logged, **pending), self.validate,
                            final_samples_wanted(self.recipe, self.method, self.data.held_out))  # fmt: skip
