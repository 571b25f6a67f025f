"""How long a run is: optimizer steps (`train.max_steps`), or the epochs sd-scripts users count
(`train.max_epochs`; an epoch uses each image its folder's repeats times), and which step ends an epoch
(`checkpoint.every_n_epochs`, `validation.every_n_epochs`).

An epoch is the sampler's `batches_per_epoch` micro-batches (see `finetune.data.batches`); an optimizer step
takes `gradient_accumulation_steps` of them, so with accumulation an epoch may end inside a step: the
step that completes it counts as its end, and a run of N epochs ends at the first step that completes N.

A run resumed from a checkpoint of another global batch (another number of processes, batch size or
accumulation) counts the checkpoint's steps at the batch they had (`EpochCount`): 2 processes' steps are
twice the images of 1 process's; and the epoch under way ends with its last images as the resumed sampler
deals them at the new batch (`finetune.data.order`). A checkpoint records its steps by the batch they had
(`STEPS_BY_SHAPE`): resumed again at another, each still counts at its own (its recipe and processes say only the last).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from finetune.checkpoints.earlier_run import finish_a_finished_runs_saves
from finetune.checkpoints.run_files import STATE_FILE, read_state
from finetune.config import Recipe, TrainConfig
from finetune.config.training import MAX_TRAIN_STEPS
from finetune.counts import counted
from finetune.data.batches import ItemLayout, make_batch_sampler
from finetune.data.order import OutsideTheData, continues, recorded_position, unusable_position
from finetune.errors import FinetuneError
from finetune.optim.optimizers import SCHEDULE_KEYS, schedule_as_recorded, schedule_change_line

STEPS_BY_SHAPE = "steps_by_batch"  # checkpoint state: [batch_size, processes, accumulation, steps] each, in order


@dataclass(frozen=True)
class StepShape:
    """The images of an optimizer step: a batch per process, on each process, for each accumulated micro-batch."""

    batch_size: int
    processes: int
    accumulation: int

    @property
    def images(self) -> int:
        return self.batch_size * self.processes * self.accumulation

    def batches_per_epoch(self, layout: ItemLayout) -> int:
        return make_batch_sampler(layout, self.batch_size, self.processes, 0, 0).batches_per_epoch


@dataclass(frozen=True)
class EpochCount:
    """Epochs trained by the end of each optimizer step of this run: `batches_per_epoch` micro-batches an epoch
    (at this run's global batch), from `epochs_then` at the resumed checkpoint's `step_then`. Exact fractions:
    an epoch ends at a step exactly when its last micro-batch is in it."""

    accumulation: int
    batches_per_epoch: int
    step_then: int = 0
    epochs_then: Fraction = Fraction(0)
    then: StepShape | None = None  # where the checkpoint's (last) steps had other images (processes, batch size, accumulation)
    before: tuple[tuple[StepShape, int], ...] = ()  # its steps before its last batch, by batch: it was resumed at another itself
    now: StepShape | None = field(default=None, compare=False)  # this run's batch: what its checkpoints record (`steps_by_shape`)

    def done_by_shape(self) -> list[tuple[StepShape, int]]:
        """The checkpoint's steps by the batch they had, in order (this run's `now`: those that had its batch)."""
        last = self.step_then - sum(steps for _, steps in self.before)
        return [*self.before, (self.then or self.now, last)] if last or not self.before else list(self.before)

    def steps_by_shape(self, step: int) -> list[list[int]]:
        """What a checkpoint at `step` records as STEPS_BY_SHAPE: the steps of each batch in turn, the checkpoint's then this run's."""
        record: list[list[int]] = []
        for shape, steps in [*self.done_by_shape(), (self.now, step - self.step_then)]:
            if record and record[-1][:3] == [shape.batch_size, shape.processes, shape.accumulation]:
                record[-1][3] += steps
            elif steps:
                record.append([shape.batch_size, shape.processes, shape.accumulation, steps])
        return record

    def exact(self, step: int) -> Fraction:
        return self.epochs_then + Fraction((step - self.step_then) * self.accumulation, self.batches_per_epoch)

    def at(self, step: int) -> float:
        """Epochs trained after `step` (fractional: TensorBoard's train/epoch)."""
        return float(self.exact(step))

    def ended_by(self, step: int) -> range:
        """The epochs (1, 2, ...) that step `step` (1-based) completes: none, one, or several (when an epoch has
        fewer micro-batches than a step accumulates)."""
        return range(math.floor(self.exact(step - 1)) + 1, math.floor(self.exact(step)) + 1)

    def steps_for(self, epochs: int) -> int:
        """The first step by which `epochs` epochs are trained (the checkpoint's step where it has them already)."""
        left = max(epochs - self.epochs_then, 0)
        return self.step_then + math.ceil(left * self.batches_per_epoch / self.accumulation)

    def to_continue(self, step: int) -> int:
        """The fewest epochs whose steps go past `step`: what a resume at `step` needs train.max_epochs to be."""
        return math.floor(self.exact(step)) + 1


def run_sampler(layout: ItemLayout, train: TrainConfig, processes: int, process_index: int, seed: int, resume_from: Path | None):
    """This process's batch sampler, resumed at the checkpoint's step where its data stood (`finetune.data.order`); a
    position the samplers cannot take up, or that this data could not have dealt (a damaged checkpoint), is one line."""
    state = read_state(resume_from) if resume_from is not None else {}
    position = recorded_position(resume_from, state) if resume_from is not None else None
    start = state.get("step", 0) * train.gradient_accumulation_steps
    try:
        return make_batch_sampler(layout, train.batch_size, processes, process_index, seed, start, position)
    except OutsideTheData as err:
        raise unusable_position(resume_from, position, str(err)) from None


def epoch_count(layout: ItemLayout, train: TrainConfig, processes: int, resume_from: Path | None, sampler=None) -> EpochCount:
    """This run's epochs; resumed from a checkpoint whose steps had other images (another number of processes,
    train.batch_size or gradient_accumulation_steps), its steps count at the global batch they had. With the run's
    `sampler` (`run_sampler`), from where the checkpoint's data stood (`finetune.data.order`): the epoch under way ends
    where its images do."""
    now = StepShape(train.batch_size, processes, train.gradient_accumulation_steps)
    batches_now = sampler.batches_per_epoch if sampler is not None else now.batches_per_epoch(layout)
    state = read_state(resume_from) if resume_from is not None else {}
    recorded = state.get("recipe") or {}  # (a checkpoint from before the recipe was kept: this run's settings)
    then = StepShape(recorded.get("train.batch_size", now.batch_size), state.get("processes", processes),
                     recorded.get("train.gradient_accumulation_steps", now.accumulation))  # fmt: skip
    step = state.get("step", 0)
    done, epochs_then = [], Fraction(0)  # the checkpoint's steps by the batch they had, and the epochs they trained
    for shape, steps in recorded_steps(resume_from, state, then) if resume_from is not None else []:
        batches = batches_of(shape, layout, now, batches_now)
        if batches is None:  # fewer images now than its global batch: counted at this run's (the change of data is said)
            shape, batches = now, batches_now
        done = done[:-1] + [(shape, done[-1][1] + steps)] if done and done[-1][0] == shape else [*done, (shape, steps)]
        epochs_then += Fraction(steps * shape.accumulation, batches)
    if sampler is not None and sampler.continued:  # (a hand-edited position: a line where the sampler was made, before the model loads)
        epochs_then = sampler.epochs_before_start()
    *before, (last, _) = done or [(now, 0)]
    return EpochCount(now.accumulation, batches_now, step, epochs_then, last if last != now else None, tuple(before), now)


def batches_of(shape: StepShape, layout: ItemLayout, now: StepShape, batches_now: int) -> int | None:
    """A batch's micro-batches per epoch of `layout` (None: the layout has fewer images than its global batch)."""
    if shape == now:
        return batches_now
    try:
        return shape.batches_per_epoch(layout)
    except FinetuneError:
        return None


def recorded_steps(checkpoint: Path, state: dict, last: StepShape) -> list[tuple[StepShape, int]]:
    """The checkpoint's steps by the batch they had: its record (STEPS_BY_SHAPE), or all at its `last` (its recipe's and
    processes'): from before it kept one, or where they disagree with it (its step, processes or recipe edited since)."""
    step, record = state.get("step", 0), state.get(STEPS_BY_SHAPE)
    if record is None:
        return [(last, step)]
    if not isinstance(record, list) or not record or not all(map(_four_counts, record)):
        raise FinetuneError(f"checkpoint {checkpoint}: its {STEPS_BY_SHAPE} ({json.dumps(record)[:80]}) is not a list of [batch_size, processes, "
                            f"accumulation, steps] (edited by hand?): resume from another checkpoint, or delete {STEPS_BY_SHAPE} from its "
                            f"{STATE_FILE} (its steps then count at its last batch)")  # fmt: skip
    done = [(StepShape(*entry[:3]), entry[3]) for entry in record]
    return done if sum(steps for _, steps in done) == step and done[-1][0] == last else [(last, step)]


def _four_counts(entry) -> bool:
    return isinstance(entry, list) and len(entry) == 4 and all(type(n) is int and n > 0 for n in entry)


def planned_steps(train: TrainConfig, count: EpochCount | int) -> int:
    """The run's optimizer steps: train.max_steps, or train.max_epochs in steps (`count`: an EpochCount, or this
    run's batches per epoch for a run of one global batch)."""
    if train.max_epochs is None:
        return train.max_steps
    count = count if isinstance(count, EpochCount) else EpochCount(train.gradient_accumulation_steps, count)
    return count.steps_for(train.max_epochs)


def check_epoch_run(recipe: Recipe, max_steps: int, count: EpochCount, resume_from: Path | None) -> None:
    """With train.max_epochs, once its steps are known: the checks made for train.max_steps when the recipe
    loads (a warm-up shorter than the run) and before a resume (something left to train)."""
    warmup, epochs = recipe.optimizer.warmup_steps, recipe.train.max_epochs
    if max_steps > MAX_TRAIN_STEPS:  # train.max_steps is bounded where the recipe loads; the steps of epochs only here
        raise FinetuneError(f"train.max_epochs ({epochs}) is {max_steps:,} steps of this data, more than the {MAX_TRAIN_STEPS:,} a run may have "
                            f"(train.max_steps' bound): lower it")  # fmt: skip
    if recipe.optimizer.scheduler != "constant" and warmup >= max_steps:
        raise FinetuneError(
            f"optimizer.warmup_steps ({warmup}) must be below the run's {counted(max_steps, 'step')} (train.max_epochs {epochs}): "
            "the learning rate would never reach optimizer.lr; lower warmup_steps or raise max_epochs"
        )
    step = count.step_then
    if resume_from is not None and step >= max_steps:
        # A finished run's, as for train.max_steps (`checkpoint.check_resumable`): what a kill cut short of its last save is done now.
        resume_from = finish_a_finished_runs_saves(resume_from, Path(recipe.output_dir))
        raise FinetuneError(
            f"{resume_from} is at step {step} and train.max_epochs {epochs} ends at step {max_steps}: nothing left to train; "
            f"raise train.max_epochs to continue (e.g. train.max_epochs={count.to_continue(step)})"
        )


def due(step: int, every_n_steps: int, epochs: range, every_n_epochs: int) -> bool:
    """Whether a periodic save or validation falls on this step: every N steps, or at the end of every Nth epoch."""
    return bool(every_n_steps and step % every_n_steps == 0) or any(every_n_epochs and epoch % every_n_epochs == 0 for epoch in epochs)


def run_length_line(train: TrainConfig, max_steps: int, sampler, items: int, processes: int, count: EpochCount | None = None) -> str:
    """The run's length in steps and in epochs (an epoch uses each image its repeats times)."""
    count = count or EpochCount(train.gradient_accumulation_steps, max(sampler.batches_per_epoch, 1))
    epochs, images = count.at(max_steps), train.batch_size * train.gradient_accumulation_steps
    steps = f"{counted(max_steps, 'step')} of {counted(images * processes, 'image')}"
    if count.then is not None or count.before:  # the checkpoint's steps had other images (some or all of them)
        done, to_go = count.done_by_shape(), f"{max_steps - count.step_then} to go of {images * processes}"
        of = [f"{counted(shape.images, 'image')}" + (f" by {processes_named(shape.processes)}" if shape.processes != processes else "") for shape, _ in done]
        if len(done) == 1:
            steps = f"{counted(max_steps, 'step')} ({count.step_then} done of {of[0]}, {to_go})"
        else:  # resumed with another batch before: each batch's steps
            steps = f"{counted(max_steps, 'step')} ({count.step_then} done: {', '.join(f'{n} of {o}' for (_, n), o in zip(done, of))}; {to_go})"
    line = f"length: {steps} = {epochs_text(epochs)} of "
    if sampler.images_per_epoch < items:
        left = items - sampler.images_per_epoch
        return line + f"{sampler.images_per_epoch} of the {items} images (each epoch leaves {left} out at random, to fill whole batches)"
    if sampler.batches_per_epoch * train.batch_size * processes > items:  # buckets: every image, in some smaller batches
        return line + f"{counted(items, 'image')} (in {counted(sampler.batches_per_epoch, 'batch', 'batches')} an epoch: a bucket's last batch may be smaller)"
    return line + counted(items, "image")


def processes_named(count: int) -> str:
    return counted(count, "process", "processes")


def epochs_text(epochs: float) -> str:
    """A number of epochs as the console says it: "2000 epochs" (not 2e+03), "1.5 epochs", "1 epoch"."""
    return counted(epochs, "epoch", spec=".0f" if epochs >= 100 else ".3g")


def resume_warnings(checkpoint: Path, state: dict, recipe: Recipe, max_steps: int, processes: int, order_key: str | None = None) -> list[str]:
    """What a resume changes around its checkpoint that the comparison of settings does not say: the number of
    processes (the global batch), and the run's length under a schedule laid out over it (the learning rate).
    `order_key`: this run's data order (`ItemLayout.order_key`); the checkpoint's position in it is taken up only if it
    is the checkpoint's (finetune.data.order)."""
    lines, batch = [], recipe.train.batch_size
    processes_then, batch_then = state.get("processes", processes), (state.get("recipe") or {}).get("train.batch_size", batch)
    if processes_then != processes:
        global_then, global_now = processes_then * batch_then, processes * batch
        continued = continues(state.get("data_order"), order_key)  # finetune.data.order
        if global_then == global_now:  # (train.batch_size changed with the processes): the same batches, where they stopped
            change = f"stays {global_now} images per micro-step" + (" (the data continue where they stopped)" if continued else "")
        else:
            change = f"changes from {global_then} to {global_now} images per micro-step " + (
                "(the data continue where they stopped)" if continued else "(and the data order with it)")
        lines.append(f"warning: {checkpoint.name} was trained by {processes_named(processes_then)}, this run has {processes}: the global batch {change}")
    # The planned steps (kept since they were: train.max_epochs counts them from the data), else the recipe's.
    steps_then = state.get("max_steps", (state.get("recipe") or {}).get("train.max_steps"))
    schedule_then = schedule_as_recorded(recipe.optimizer, state.get("recipe") or {})
    if line := schedule_change_line(schedule_then, recipe.optimizer, checkpoint.name, state["step"], steps_then, max_steps):
        keep = recipe.train.max_epochs is None and state["step"] < steps_then  # (a run of epochs changes length with the processes)
        # With the checkpoint's schedule settings too, where this recipe changed them (the length alone would not keep it).
        settings = [f"train.max_steps={steps_then}"] + [f"optimizer.{key}={getattr(schedule_then, key)}" for key in SCHEDULE_KEYS
                                                         if getattr(schedule_then, key) != getattr(recipe.optimizer, key)]  # fmt: skip
        lines.append(line + (f"; to keep the old schedule, resume with {', '.join(settings)}" if keep else ""))
    return lines
