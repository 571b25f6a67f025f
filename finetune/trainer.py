"""The one training loop, shared by every method (see `finetune.methods`).

Read `_train` top to bottom: the checks that need no model (the data, the base model, a resume: cheap, before anything
heavy), the data's layout and the run's length, `_set_up_model` (the frozen base, and what the method attaches to train),
the optimizer and accelerate's wrapping, a resume's state, then the loop: each micro-batch's loss from the method
(encode, noise, predict: `finetune.methods.base`), the optimizer step, logs, checkpoints and validation grids. A clean
stop on Ctrl-C leaves a checkpoint; the run's end (outputs, final samples) is `finetune.run_end`'s.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from finetune import checkpoint as ckpt
from finetune.accelerate_state import clears_accelerate_settings, trackers_finished
from finetune.buckets import too_few_to_batch
from finetune.config import Recipe
from finetune.console import say, warn
from finetune.counts import counted
from finetune.cpu_adam_steps import continue_step_powers
from finetune.data_loader import training_loader
from finetune.batches import item_layout
from finetune.diffusion import BatchRandomness
from finetune.draw_keys import DRAWN, key_offset
from finetune.device_copy import to_device
from finetune.distributed import accelerator_options, agree_on_start, autocast, checkpoint_options, configure_deepspeed, full_parameters, keep_autocast_outputs, launch_problem, ready_to_compile, release_gathered, several_processes, trained_parameters, uncompiled_forwards, unsharded_loading, unwrap, uses_deepspeed, zero_stage
from finetune.deepspeed_checks import check_deepspeed_launch
from finetune.earlier_run import clear_earlier_run, guard_earlier_run, put_back_interrupted_checkpoints
from finetune.ema import EMA_FILE, weight_average
from finetune.caption_tokens import caption_warnings
from finetune.errors import FinetuneError
from finetune.finite_weights import ensure_finite_weights
from finetune.library_noise import quiet_deepspeed_shm_build
from finetune.held_out import HELD_OUT_STATE, TrainingSubset, concept_held_out_whole, held_out_for_run, held_out_loss, held_out_sources
from finetune.model_source import BaseLocation
from finetune.models import load_base_model
from finetune.output_metadata import dataset_metadata, output_metadata
from finetune.optim import apply_recipe_settings, build_lr_scheduler, build_optimizer, check_optimizer_installed, clip_gradients, step_size
from finetune.run_length import STEPS_BY_SHAPE, check_epoch_run, due, epoch_count, epochs_text, planned_steps, resume_warnings, run_length_line, run_sampler
from finetune.run_files import checkpoint_step, resolve_resume
from finetune.run_end import LOGGED_AT_STEP, OUTPUTS_PENDING, VALIDATION_PENDING, final_samples_wanted, finish_cut_short, finish_training, left_to_finish, next_step_said, remove_killed_grids
from finetune.resume_checks import check_resumable
from finetune.run_recipe import write_run_recipe
from finetune.logged_settings import start_trackers
from finetune.loss_mask import preview as mask_preview
from finetune.sampling import save_image_atomic
from finetune.start_weights import resumed_method
from finetune.step_losses import StepLosses, backward, micro_batch_shares, train_logs, weighted
from finetune.train_inputs import check_base_and_data
from finetune.validation import run_validation
from finetune.stopping import StopRequest, batches_of

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    output_dir: Path
    final_step: int
    saved_files: list[Path] = field(default_factory=list)
    sample_grids: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # per optimizer step, this run only
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss on the held-out images)
    interrupted: bool = False
    stopped_by: int = 0  # the signal that stopped it (SIGINT, SIGTERM), where `interrupted` or where it skipped the final samples


@clears_accelerate_settings  # however it ends: a later train() in this process may choose another precision
def train(recipe: Recipe, resume: str | None = None, on_step: Callable[[int], None] | None = None, overwrite: bool = False, base_location: BaseLocation | None = None) -> TrainResult:
    """Train `recipe`; `on_step(step)` is called after each optimizer step (the benchmark times steps with it).
    `overwrite`: start over in an output_dir that holds an earlier run (its checkpoints, samples and logs go). `base_location`: the command's lookup of the base."""
    with contextlib.ExitStack() as closing:  # the run's TensorBoard writers and stop agreement, closed however it ends
        return _train(recipe, resume, on_step, overwrite, base_location, closing)


def _train(recipe: Recipe, resume: str | None, on_step: Callable[[int], None] | None, overwrite: bool, base_location: BaseLocation | None,
           closing: contextlib.ExitStack) -> TrainResult:  # fmt: skip
    output_dir = Path(recipe.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    train_cfg = recipe.train

    # Cheap checks first: a bad image or a missing model is reported before any weight is loaded.
    resume_from = resolve_resume(resume, checkpoints_dir)
    method = resumed_method(recipe, resume_from)  # a resume's starting weights (lora.init_from, ...) are its checkpoint's
    check_deepspeed_launch(recipe, method.trained_module_names(), resume_from)  # DeepSpeed's refusals; a checkpoint of another engine
    check_optimizer_installed(recipe.optimizer)
    base_location = check_base_and_data(recipe, method.check_data, base_location)
    # A run's last checkpoint whose end a kill cut short is resumed to finish it (finetune.run_end). A finished one's "nothing left
    # to train" waits, with several processes, until they have joined: its end's saves are finished there (check_resumable).
    resumed_to = None if resume_from is None or left_to_finish(resume_from, train_cfg.max_steps) else train_cfg.max_steps
    if resume_from is not None:
        check_resumable(resume_from, None if several_processes() else resumed_to, recipe.flat_settings())
    guard_earlier_run(output_dir, resume_from, overwrite)
    if problem := launch_problem(train_cfg.mixed_precision):
        raise FinetuneError(problem)

    with quiet_deepspeed_shm_build():
        accelerator = Accelerator(
            **accelerator_options(),  # how several processes join, also on machines without CUDA
            mixed_precision=train_cfg.mixed_precision,
            gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
            log_with="tensorboard" if recipe.logging.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        )
    closing.enter_context(trackers_finished(accelerator))  # a failed run's last logs are written too, its writers' threads end
    say(
        f"training on {counted(accelerator.num_processes, 'process', 'processes')} (distributed: {accelerator.distributed_type.value.lower()}), "
        f"device {accelerator.device}, mixed precision {train_cfg.mixed_precision}"
    )
    agree_on_start(accelerator, checkpoint_step(resume_from) if resume_from else 0, checkpoints_dir, resume == "latest")
    if resume_from is not None and several_processes():
        check_resumable(resume_from, resumed_to, recipe.flat_settings())
    items = method.training_items()
    sources = [item.source for item in items]
    held_out_split = held_out_for_run(items, recipe.validation.loss_images, recipe.seed, resume_from)  # a resume's: its checkpoint's
    # Indices into `items`: those that train, and one per held-out image that validation.loss_images scores.
    trained_indices, held_out = held_out_split.trained, held_out_split.scored
    for line in held_out_split.lines:
        say(line)
    held_out_images = held_out_sources(sources, trained_indices)
    # The data check's summary (counts, buckets, skipped images, warnings): nothing is left out unseen.
    for report in method.data_reports:
        for line in report.lines(limit=10, held_out=held_out_images):
            say(line)
    short = too_few_to_batch(len(trained_indices), recipe, accelerator.num_processes, len(sources)) or concept_held_out_whole(method.data_reports, held_out_images, recipe)
    if short:
        raise FinetuneError(short)
    # The run's length from the checked data, laid out as the sampler will batch it (train.max_epochs counts its batches).
    trained_examples = [items[i] for i in trained_indices]
    layout = item_layout(trained_examples, recipe.data)
    trained_data = {**dataset_metadata(trained_examples, recipe.checkpoint.record_caption_tags, recipe.data.keep_tokens_separator), **method.data_metadata()}  # folders, tags

    # Where the checkpoint's data order stood: continued at this run's global batch, whatever the checkpoint's was. Dealt once:
    # the run's epochs are counted from it; a resumed checkpoint's steps count at the global batch they had (other processes,
    # batch size, accumulation).
    sampler = run_sampler(layout, train_cfg, accelerator.num_processes, accelerator.process_index, recipe.seed, resume_from)
    epochs_by = epoch_count(layout, train_cfg, accelerator.num_processes, resume_from, sampler=sampler)
    max_steps = planned_steps(train_cfg, epochs_by)  # train.max_steps, or train.max_epochs counted in steps
    draws_from = key_offset(resume_from, train_cfg.gradient_accumulation_steps)  # the noise's keys go on from the checkpoint's draws
    pending_end = left_to_finish(resume_from, max_steps)  # the outputs or final samples of a finished run's end, cut short
    if train_cfg.max_epochs is not None:
        check_epoch_run(recipe, max_steps, epochs_by, None if pending_end else resume_from)
    method.held_out_items = frozenset(range(len(sources))) - frozenset(trained_indices)
    if held_out:
        say(f"validation loss: {counted(len(held_out), 'image')} held out of training, scored at each validation")
    _set_up_model(recipe, method, accelerator, base_location, fresh_run=resume_from is None)

    configure_deepspeed(accelerator, recipe)
    # Before `prepare`: DreamBooth may generate class images with the UNet, which ZeRO-3 then shards. Then the record a resume compares.
    (dataset, collate_fn), images_record = method.training_data(accelerator), ckpt.data_record(trained_examples, method.recorded_data())
    training_set = TrainingSubset(dataset, trained_indices) if held_out else dataset
    if (len(training_set), getattr(training_set, "bucket_of", None)) != (len(layout), layout.bucket_of):
        raise RuntimeError(f"method {recipe.method}: its dataset is not laid out as its training_items() said")  # a bug, not the data
    parameter_groups = method.parameter_groups()
    group_names = [group.pop("name") for group in parameter_groups]  # for the logs; optimizers need no names
    # The recipe's rates, read before the optimizer and the schedule's warm-up write into these groups.
    group_lrs = [group.get("lr", recipe.optimizer.lr) for group in parameter_groups]
    optimizer = build_optimizer(recipe.optimizer, parameter_groups, accelerator.device, sharded=zero_stage(accelerator) > 0)
    lr_scheduler = build_lr_scheduler(recipe.optimizer, optimizer, max_steps)
    # Only now, with the model set up, the data built and the optimizer made, has every check that could refuse the
    # run passed: an earlier run's files are not cleared for a run that is then refused.
    if overwrite and resume_from is None:
        clear_earlier_run(accelerator, output_dir)
    strip = mask_preview(dataset, sources, recipe.data.loss_mask.unmasked_weight) if (
        recipe.data.loss_mask.enabled and accelerator.is_main_process and resume_from is None) else None  # fmt: skip
    if strip is not None:
        path = save_image_atomic(strip, output_dir / "samples" / "loss-masks.png")
        say(f"loss masks: what trains in the first images (the rest dimmed): {path}")
    names = list(method.trained_modules())
    batch_shapes = 2 * len(set(layout.bucket_of)) if layout.bucket_of else 2  # a bucket's (or the square's) full and last batch
    ready_to_compile(accelerator, list(method.trained_modules().values()), batch_shapes)  # --dynamo_backend: compiles once a shape
    *wrapped, optimizer = accelerator.prepare(*method.trained_modules().values(), optimizer)
    modules = dict(zip(names, wrapped))
    for name in method.feeding_another_model:
        keep_autocast_outputs(accelerator, modules[name])
    # Fixed for the run: gathered once, since walking every module of a UNet each step costs milliseconds
    # of the CPU time a GPU step waits on.
    clipped_parameters = method.trainable_parameters()
    accelerator.register_for_checkpointing(lr_scheduler)
    save_options, load_options = checkpoint_options(accelerator)
    if not uses_deepspeed(accelerator):  # DeepSpeed's engine writes its own, see finetune.distributed
        ckpt.register_trainable_only_hooks(accelerator)

    average = weight_average(trained_parameters(modules, accelerator), train_cfg.ema_decay) if train_cfg.ema_decay else None

    step, state = 0, None  # a resume's: its checkpoint's step and trainer state (trainer_state.json)
    if resume_from is not None:
        state = ckpt.load_checkpoint(accelerator, resume_from, recipe.flat_settings(), **load_options)
        step = state["step"]
        accelerator.step = 0  # its micro-batch count, restored: count % accumulation must say a step's last at another accumulation too
        method.load_checkpoint_state(state.get("method", {}))
        apply_recipe_settings(optimizer, lr_scheduler, group_lrs, recipe.optimizer)
        continue_step_powers(optimizer)  # DeepSpeed's CPU Adam keeps them outside its checkpoint
        say(f"resumed from {resume_from} at step {step}")
        for line in resume_warnings(resume_from, state, recipe, max_steps, accelerator.num_processes, layout.order_key(recipe.seed)):  # processes, length
            say(line)
        if average is not None and not average.load(resume_from / EMA_FILE):
            warn(f"{resume_from.name} has no weight average (train.ema_decay was off): it starts from the resumed weights")
        changed = ckpt.changed_settings(state.get("recipe"), recipe.flat_settings()) + ckpt.changed_data(state.get("data"), images_record)
        if changed:
            warn(f"settings changed since {resume_from.name}: {', '.join(changed)}")
        put_back_interrupted_checkpoints(accelerator, checkpoints_dir)  # the checkpoint read where a kill left it: in place before any save
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_killed_grids(output_dir)
        write_run_recipe(recipe, output_dir)  # never over a recipe.yaml of the user's there (finetune.run_recipe)
        start_trackers(accelerator, recipe.flat_settings(), output_dir, state, step)

    accumulation = train_cfg.gradient_accumulation_steps
    say(run_length_line(train_cfg, max_steps, sampler, len(training_set), accelerator.num_processes, epochs_by))
    loader = training_loader(training_set, sampler, collate_fn, recipe.data.num_workers, recipe.seed)
    result = TrainResult(output_dir=output_dir, final_step=step)

    @contextlib.contextmanager
    def averaged(saving: bool = False):
        """The weight average in place of the trained weights, with train.ema_decay. `saving`: only the process that
        writes needs it, unless the average is sharded (DeepSpeed's masters), which every process puts in together."""
        if average is None or (saving and not average.sharded and not accelerator.is_main_process):
            yield
            return
        with average.applied():
            method.hold_weight_limits(modules)
            yield

    def validate(at_step: int) -> Path | None:
        """The validation grid of this step (and the held-out loss); returns the grid's path, if one was drawn."""
        with averaged(), uncompiled_forwards(modules) as forwards:
            grid = run_validation(recipe, method, forwards, accelerator, at_step)
            if held_out:
                terms = held_out_loss(method, forwards, dataset, collate_fn, held_out, recipe.seed, accelerator.device, lambda: autocast(accelerator))
                result.validation_losses.append((at_step, terms["loss"]))
                say(f"validation loss at step {at_step}: {terms['loss']:.4f}")
                accelerator.log({f"validation/{name}": value for name, value in terms.items()}, step=at_step)
        release_gathered(accelerator, modules)
        if grid is not None:
            result.sample_grids.append(grid)
        return grid

    def save_outputs(folder: Path) -> list[Path]:
        """Collective: the method's outputs (from the weight average, if any) into `folder`, by the main process."""
        ensure_finite_weights(accelerator, trained_parameters(modules, accelerator).values(), step, checkpoints_dir)
        # Under DeepSpeed the average goes into the fp32 masters, which full_parameters then gathers.
        with averaged(saving=True), full_parameters(accelerator, modules):
            if not accelerator.is_main_process:
                return []
            unwrapped = {name: unwrap(accelerator, module) for name, module in modules.items()}
            progress = {"epoch": int(epochs_by.at(step)), "max_steps": max_steps, "dataset": trained_data, "started": method.start_metadata()}
            with unsharded_loading(accelerator):  # saving may load frozen parts again at the source's precision: whole, as at the start
                return method.save(folder, unwrapped, output_metadata(recipe, step, method.base.noise_scheduler.config.prediction_type, **progress))

    def save_checkpoint(validation_pending: bool = False, logged_at_step: dict | None = None, outputs_pending: bool = False) -> None:
        ensure_finite_weights(accelerator, trained_parameters(modules, accelerator).values(), step, checkpoints_dir)

        def extra(folder: Path) -> None:
            if average is not None:  # sharded (DeepSpeed), it is gathered by every process for the main one to write
                average.save(folder / EMA_FILE, writer=accelerator.is_main_process)
            if recipe.checkpoint.save_outputs:
                save_outputs(folder)

        ckpt.save_checkpoint(
            accelerator, checkpoints_dir, step,
            {"recipe_hash": recipe.fingerprint(), "recipe": recipe.flat_settings(), "processes": accelerator.num_processes, "max_steps": max_steps,
             "method": method.checkpoint_state(), "data": images_record, HELD_OUT_STATE: held_out_split.images, "data_order": sampler.position_after(step * accumulation),
             DRAWN: step * accumulation + draws_from, STEPS_BY_SHAPE: epochs_by.steps_by_shape(step),  # what its steps drew, and trained at which batch
             "losses_since_log": running.since_last_log_state(accelerator),  # the resumed run's first log covers the same steps
             VALIDATION_PENDING: validation_pending, LOGGED_AT_STEP: logged_at_step or {}, OUTPUTS_PENDING: outputs_pending},
            recipe.checkpoint.keep_last, extra=extra, **save_options
        )
        say(f"saved {checkpoints_dir / f'checkpoint-{step}'} (step {step}, {epochs_text(epochs_by.at(step))})")

    # Before the first step (validation.at_start), or due at the step its checkpoint was saved before it (by a stop, or
    # before a kill while it drew): the curve keeps that step.
    if (step == 0 and recipe.validation.at_start) or (resume_from is not None and state.get(VALIDATION_PENDING) and not pending_end):
        if (grid := validate(step)) is not None:  # named as the loop names its grids
            say(f"samples: {grid}")

    progress = tqdm(total=max_steps, initial=step, desc="training", disable=not accelerator.is_local_main_process)
    running = StepLosses()  # the loss and its terms over each step's micro-batches, and since the last log
    running.resume_since_last_log(state.get("losses_since_log") if resume_from is not None else None, accelerator.device)
    step_logs: dict[str, torch.Tensor | float] = {}  # what the method reports after each optimizer step (lora.max_norm)
    logged = {}  # the last step's train logs: its checkpoint keeps them (LOGGED_AT_STEP)
    stop = closing.enter_context(StopRequest(accelerator).closed_at_the_end())  # its gloo group too, after an error
    # A second stop mid-run is raised at once: its line names the command that continues (the checkpoints on disk), as at the end.
    with next_step_said(output_dir, checkpoints_dir, max_steps, resume_from), stop, batches_of(loader) as batches:
        while step < max_steps:
            step_batches = [sampler.rows_of(step * accumulation + micro) for micro in range(accumulation)]  # (global size, rows here)
            shares = micro_batch_shares(sampler, range(step * accumulation, (step + 1) * accumulation), accelerator.num_processes)  # each image counts alike
            for micro in range(accumulation):
                micro_batch = step * accumulation + micro
                batch = next(batches)
                if "pixel_values" in batch:  # absent when the batch names cached latents instead (finetune.views)
                    batch["pixel_values"] = to_device(batch["pixel_values"], accelerator.device)
                # Bucketed global batches vary in size (a bucket's last batch may be smaller).
                global_size, rows = step_batches[micro]
                randomness = BatchRandomness(recipe.seed, micro_batch + draws_from, global_size, rows)
                share = shares[micro]
                with accelerator.accumulate(*modules.values()):
                    with autocast(accelerator):
                        losses = method.loss(modules, batch, randomness)
                    backward(accelerator, weighted(losses["loss"], share))
                    if accelerator.sync_gradients and train_cfg.max_grad_norm:
                        clip_gradients(accelerator, clipped_parameters, train_cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if accelerator.sync_gradients:  # a real step, not one of accumulation's
                        step_logs = method.hold_weight_limits(modules)
                running.add(losses, share / accumulation)
            if not optimizer.step_was_skipped:  # fp16 loss scaling skips a step whose gradients overflowed
                lr_scheduler.step()
            if average is not None:
                average.update()
            step += 1

            running.end_step(accelerator)
            if on_step is not None:
                on_step(step)
            progress.update(1)
            lr = step_size(optimizer)
            ended, epochs = epochs_by.ended_by(step), epochs_by.at(step)
            logged = {}  # this step's train logs, kept by its checkpoint
            if step % recipe.logging.every_n_steps == 0 or step == max_steps:  # losses are read on the host here only (StepLosses)
                logged = train_logs(running.since_last_log(accelerator), step_logs, lr, optimizer, group_names, epochs)
                accelerator.log(logged, step=step)
            # Drawn by update() at most 10 times a second, not at every step's postfix.
            shown_epochs = {"epoch": f"{epochs:.2f}/{train_cfg.max_epochs}"} if train_cfg.max_epochs else {}
            progress.set_postfix(**running.shown(), lr=f"{lr:.2e}", **shown_epochs, refresh=False)

            validation_due = due(step, recipe.validation.every_n_steps, ended, recipe.validation.every_n_epochs)
            if step < max_steps and stop.agreed():  # at the last step: finished, the outputs are written below
                save_checkpoint(validation_pending=validation_due, logged_at_step=logged)  # a stop skips it; the resumed run draws it
                result.interrupted, result.stopped_by = True, stop.signal
                break
            if due(step, recipe.checkpoint.every_n_steps, ended, recipe.checkpoint.every_n_epochs) and step < max_steps:
                # Its validation is drawn after it is written: a kill while that draws (a grid takes minutes) left a checkpoint
                # whose resume never drew it. The resumed run draws it (again, the same, if the kill came later).
                save_checkpoint(validation_pending=validation_due, logged_at_step=logged)
            if validation_due and step < max_steps:
                grid = validate(step)
                if grid is not None:
                    say(f"samples: {grid}")
    progress.close()
    if result.interrupted:  # under the progress bar it ends: by the main process, whose checkpoint it names
        say(f"stopped at step {step}; checkpoint saved in {checkpoints_dir}; continue with --resume latest")
    result.final_step, result.losses = step, running.read_steps(accelerator)  # with a stop's steps since the last log step

    if pending_end and not result.interrupted:
        finish_cut_short(result, stop, output_dir, checkpoints_dir, save_outputs, validate, pending_end, resume_from)
    elif not result.interrupted:
        finish_training(result, stop, output_dir, checkpoints_dir, save_outputs, lambda **pending: save_checkpoint(logged_at_step=logged, **pending), validate,
                        final_samples_wanted(recipe, method, held_out))  # fmt: skip
    return result  # `closing` closes the stop agreement, then the trackers


def _set_up_model(recipe: Recipe, method, accelerator: Accelerator, base_location: BaseLocation | None, fresh_run: bool) -> None:
    """Load the base model (frozen, at the run's precision), let the method attach what trains (`method.setup`), and put
    them on the run's device and memory layout. A fresh run says what the method found (a resume said it at its start)."""
    train_cfg = recipe.train
    set_seed(recipe.seed)  # the same adapter initialisation on every process
    # TF32 (Ampere and newer GPUs) for cuBLAS matmuls and cuDNN convolutions alike: cuDNN's switch is on by
    # default, so `allow_tf32: false` left the convolutions in TF32.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = train_cfg.allow_tf32
    weight_dtype = WEIGHT_DTYPES[train_cfg.mixed_precision]

    with unsharded_loading(accelerator):
        base = load_base_model(recipe.model, weight_dtype, base_location)
    captions = {e.source: e.caption for report in method.data_reports for e in report.usable}
    for line in caption_warnings(base.tokenizer, captions, recipe.model.max_token_length, recipe.data.shuffle_tags):
        warn(line)
    base.vae.to(accelerator.device)
    base.text_encoder.to(accelerator.device)
    method.setup(base, weight_dtype)
    for line in method.start_lines if fresh_run else []:
        say(line)
    if train_cfg.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    if train_cfg.channels_last:
        for module in {base.unet, base.vae, *method.trained_modules().values()}:
            module.to(memory_format=torch.channels_last)
            for name, parameter in module.named_parameters():  # peft's DoRA flattens a conv LoRA's factors with .view, which an NHWC kernel refuses
                if "lora_" in name:
                    parameter.data = parameter.data.contiguous()
