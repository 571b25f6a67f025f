"""The one training loop, shared by every method (see `finetune.methods`).

Read `_train` top to bottom: the checks that need no model (`_checked_start`: the data, the base model, a resume: cheap,
before anything heavy), the processes joined (`_accelerator`), the data's layout and the run's length (`_laid_out_data`),
`_set_up_model` (the frozen base, and what the method attaches to train), the optimizer and accelerate's wrapping
(`_prepared_run`), then the run itself (`finetune.training.training_run.TrainingRun`): a resume's state, the loop (each
micro-batch's loss from the method: encode, noise, predict, `finetune.methods.base`; the optimizer step, logs, checkpoints
and validation grids) and the end. A clean stop on Ctrl-C leaves a checkpoint; the run's end (outputs, final samples) is
`finetune.training.run_end`'s.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from finetune.captions.tokens import caption_warnings
from finetune.checkpoints import checkpoint as ckpt
from finetune.checkpoints.earlier_run import clear_earlier_run, guard_earlier_run
from finetune.checkpoints.resume_changes import data_record
from finetune.checkpoints.resume_checks import check_resumable
from finetune.checkpoints.resumed_alpha import keep_checkpoint_alpha
from finetune.checkpoints.run_files import checkpoint_step, resolve_resume
from finetune.config import Recipe
from finetune.console import say, warn
from finetune.counts import counted
from finetune.data.batches import item_layout
from finetune.data.buckets import too_few_to_batch
from finetune.data.loader import training_loader
from finetune.data.loss_mask import preview as mask_preview
from finetune.data_check.train_inputs import check_base_and_data
from finetune.distributed.deepspeed_checks import check_deepspeed_launch
from finetune.distributed.processes import accelerator_options, agree_on_start, checkpoint_options, configure_deepspeed, keep_autocast_outputs, launch_problem, ready_to_compile, several_processes, trained_parameters, unsharded_loading, uses_deepspeed, zero_stage
from finetune.errors import FinetuneError
from finetune.library_noise import quiet_deepspeed_shm_build
from finetune.methods.base import TrainingMethod
from finetune.models.loading import load_base_model
from finetune.models.model_source import BaseLocation
from finetune.models.single_file_configs import check_original_config
from finetune.models.start_weights import resumed_method
from finetune.optim.optimizers import build_lr_scheduler, build_optimizer, check_optimizer_installed
from finetune.outputs.metadata import dataset_metadata
from finetune.sampling.grids import save_image_atomic
from finetune.sampling.unset_prompts import fill_unset_prompts
from finetune.training.accelerate_state import clears_accelerate_settings, trackers_finished
from finetune.training.draw_keys import key_offset
from finetune.training.ema import weight_average
from finetune.training.held_out import TrainingSubset, concept_held_out_whole, held_out_for_run, held_out_sources
from finetune.training.logged_settings import resumed_wandb_run, run_trackers
from finetune.training.run_end import left_to_finish, resume_limit
from finetune.training.run_length import check_epoch_run, epoch_count, planned_steps, run_length_line, run_sampler
from finetune.training.training_run import RunData, TrainingRun, TrainResult  # the run from its prepared model to its end
from finetune.training.wandb_checks import check_wandb

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@clears_accelerate_settings  # however it ends: a later train() in this process may choose another precision
def train(recipe: Recipe, resume: str | None = None, on_step: Callable[[int], None] | None = None, overwrite: bool = False, base_location: BaseLocation | None = None) -> TrainResult:
    """Train `recipe`; `on_step(step)` is called after each optimizer step (the benchmark times steps with it).
    `overwrite`: start over in an output_dir that holds an earlier run (its checkpoints, samples, logs and outputs go). `base_location`: the command's lookup of the base."""
    with contextlib.ExitStack() as closing:  # the run's TensorBoard writers and stop agreement, closed however it ends
        return _train(recipe, resume, on_step, overwrite, base_location, closing)


def _train(recipe: Recipe, resume: str | None, on_step: Callable[[int], None] | None, overwrite: bool, base_location: BaseLocation | None,
           closing: contextlib.ExitStack) -> TrainResult:  # fmt: skip
    # Cheap checks first: a bad image or a missing model is reported before any weight is loaded.
    resume_from, method, base_location, resumed_to = _checked_start(recipe, resume, overwrite, base_location)
    accelerator = _accelerator(recipe, resume_from, closing)
    # Joined, the processes agree on the step they start at (each found its checkpoint on its own disk), and the resume
    # check that waited for them is theirs now.
    agree_on_start(accelerator, checkpoint_step(resume_from) if resume_from else 0, Path(recipe.output_dir) / "checkpoints", resume == "latest")
    if resume_from is not None and several_processes():
        check_resumable(resume_from, resumed_to, recipe.flat_settings())
    data = _laid_out_data(recipe, method, accelerator, resume_from)
    _set_up_model(recipe, method, accelerator, base_location, fresh_run=resume_from is None)
    run = _prepared_run(recipe, method, accelerator, data, resume_from, overwrite, on_step)
    if resume_from is not None:
        run.resume()
    run.start_outputs()
    say(run_length_line(recipe.train, data.max_steps, data.sampler, len(run.training_set), accelerator.num_processes, data.epochs_by))
    loader = training_loader(run.training_set, data.sampler, run.collate_fn, recipe.data.num_workers, recipe.seed)
    run.train(loader, closing)
    run.end()
    return run.result  # `closing` closes the stop agreement, then the trackers


def _checked_start(recipe: Recipe, resume: str | None, overwrite: bool, base_location: BaseLocation | None) -> tuple[Path | None, TrainingMethod, BaseLocation | None, int | None]:
    """The checks that load no model, in the order their refusals come: the checkpoint to resume (`resume_from`), the
    method (with a resume's starting weights), the launch, the optimizer's package, the base and the data (`base_location`),
    a single-file base's prediction type, the resume's state, an earlier run in output_dir. Returns (resume_from, the method,
    base_location, `resumed_to`: the train.max_steps `check_resumable` holds the resume to)."""
    output_dir, train_cfg = Path(recipe.output_dir), recipe.train
    resume_from = resolve_resume(resume, output_dir / "checkpoints")
    if resume_from is not None:
        keep_checkpoint_alpha(recipe, resume_from)  # an unset lora.alpha is the checkpoint's: its scale, where the default has changed since
    method = resumed_method(recipe, resume_from)  # a resume's starting weights (lora.init_from, ...) are its checkpoint's
    check_deepspeed_launch(recipe, method.trained_module_names(), resume_from)  # DeepSpeed's refusals; a checkpoint of another engine
    check_optimizer_installed(recipe.optimizer)
    check_wandb(recipe.logging.wandb.enabled)  # no package, or no API key: wandb would ask for one once the model had loaded
    base_location = check_base_and_data(recipe, method.check_data, base_location)
    if base_location.folder is None:  # a single file's .yaml against the hub configs it loads with (finetune train says it first)
        check_original_config(Path(recipe.model.pretrained).expanduser(), recipe.model)
    # A run's last checkpoint whose end a kill cut short is resumed to finish it (finetune.training.run_end). A finished one's "nothing left
    # to train" waits, with several processes, until they have joined: its end's saves are finished there (check_resumable).
    resumed_to = resume_limit(resume_from, train_cfg.max_steps)
    if resume_from is not None:
        check_resumable(resume_from, None if several_processes() else resumed_to, recipe.flat_settings())
    guard_earlier_run(output_dir, resume_from, overwrite)
    if problem := launch_problem(train_cfg.mixed_precision):
        raise FinetuneError(problem)
    return resume_from, method, base_location, resumed_to


def _accelerator(recipe: Recipe, resume_from: Path | None, closing: contextlib.ExitStack) -> Accelerator:
    """The processes joined (or the one alone), the run's precision and accumulation, its trackers (closed by `closing`; a
    resume's W&B run is its checkpoint's)."""
    output_dir, train_cfg = Path(recipe.output_dir), recipe.train
    wandb_run = resumed_wandb_run(resume_from)  # the W&B run a resume continues
    with quiet_deepspeed_shm_build():
        accelerator = Accelerator(
            **accelerator_options(),  # how several processes join, also on machines without CUDA
            mixed_precision=train_cfg.mixed_precision,
            gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
            log_with=run_trackers(recipe, wandb_run) or None,
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        )
    closing.enter_context(trackers_finished(accelerator))  # a failed run's last logs are written too, its writers' threads end
    say(
        f"training on {counted(accelerator.num_processes, 'process', 'processes')} (distributed: {accelerator.distributed_type.value.lower()}), "
        f"device {accelerator.device}, mixed precision {train_cfg.mixed_precision}"
    )
    return accelerator


def _laid_out_data(recipe: Recipe, method: TrainingMethod, accelerator: Accelerator, resume_from: Path | None) -> RunData:
    """The checked data split into trained and held-out images (said, with the data check's summary), laid out as the
    sampler will batch them, and the run's length from that; refused where too few train."""
    train_cfg = recipe.train
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
    if unset_prompts := fill_unset_prompts(recipe, items):  # validation.prompts: null samples prompts of this data
        say(unset_prompts)
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
    if held_out:
        say(f"validation loss: {counted(len(held_out), 'image')} held out of training, scored at each validation")
    return RunData(sources=sources, trained_indices=trained_indices, held_out=held_out, held_out_split=held_out_split,
                   trained_examples=trained_examples, layout=layout, trained_data=trained_data, sampler=sampler,
                   epochs_by=epochs_by, max_steps=max_steps, draws_from=draws_from, pending_end=pending_end)  # fmt: skip


def _prepared_run(recipe: Recipe, method: TrainingMethod, accelerator: Accelerator, data: RunData, resume_from: Path | None, overwrite: bool,
                  on_step: Callable[[int], None] | None) -> TrainingRun:  # fmt: skip
    """With the model set up: the dataset built, the optimizer and its schedule made, the trained modules prepared by
    accelerate (compiled, wrapped, sharded), the weight average; an earlier run's files cleared only now (`overwrite`)."""
    configure_deepspeed(accelerator, recipe)
    # The items validation.loss_images holds out of training: the datasets give them their captions as written, to score.
    method.held_out_items = frozenset(range(len(data.sources))) - frozenset(data.trained_indices)
    # Before `prepare`: DreamBooth may generate class images with the UNet, which ZeRO-3 then shards. Then the record a resume compares.
    (dataset, collate_fn), images_record = method.training_data(accelerator), data_record(data.trained_examples, method.recorded_data())
    training_set = TrainingSubset(dataset, data.trained_indices) if data.held_out else dataset
    if (len(training_set), getattr(training_set, "bucket_of", None)) != (len(data.layout), data.layout.bucket_of):
        raise RuntimeError(f"method {recipe.method}: its dataset is not laid out as its training_items() said")  # a bug, not the data
    parameter_groups = method.parameter_groups()
    group_names = [group.pop("name") for group in parameter_groups]  # for the logs; optimizers need no names
    # The recipe's rates, read before the optimizer and the schedule's warm-up write into these groups.
    group_lrs = [group.get("lr", recipe.optimizer.lr) for group in parameter_groups]
    optimizer = build_optimizer(recipe.optimizer, parameter_groups, accelerator.device, sharded=zero_stage(accelerator) > 0)
    lr_scheduler = build_lr_scheduler(recipe.optimizer, optimizer, data.max_steps)
    # Only now, with the model set up, the data built and the optimizer made, has every check that could refuse the
    # run passed: an earlier run's files are not cleared for a run that is then refused.
    if overwrite and resume_from is None:
        clear_earlier_run(accelerator, Path(recipe.output_dir), (recipe.model.pretrained, recipe.lora.init_from, recipe.controlnet.pretrained))
    if recipe.data.loss_mask.enabled and accelerator.is_main_process and resume_from is None:
        _save_loss_mask_preview(recipe, dataset, data.sources)
    trained = method.trained_modules()
    batch_shapes = 2 * len(set(data.layout.bucket_of)) if data.layout.bucket_of else 2  # a bucket's (or the square's) full and last batch
    ready_to_compile(accelerator, list(trained.values()), batch_shapes)  # --dynamo_backend: compiles once a shape
    *wrapped, optimizer = accelerator.prepare(*trained.values(), optimizer)
    modules = dict(zip(trained, wrapped))  # by the same names, as accelerate wrapped them
    for name in method.feeding_another_model:
        keep_autocast_outputs(accelerator, modules[name])
    # Fixed for the run: gathered once, since walking every module of a UNet each step costs milliseconds
    # of the CPU time a GPU step waits on.
    clipped_parameters = method.trainable_parameters()
    accelerator.register_for_checkpointing(lr_scheduler)
    save_options, load_options = checkpoint_options(accelerator)
    if not uses_deepspeed(accelerator):  # DeepSpeed's engine writes its own, see finetune.distributed.processes
        ckpt.register_trainable_only_hooks(accelerator)

    average = weight_average(trained_parameters(modules, accelerator), recipe.train.ema_decay) if recipe.train.ema_decay else None
    return TrainingRun(recipe, method, accelerator, data, resume_from, dataset, training_set, collate_fn, images_record, modules, optimizer,
                       lr_scheduler, group_names, group_lrs, clipped_parameters, average, save_options, load_options, on_step)  # fmt: skip


def _save_loss_mask_preview(recipe: Recipe, dataset, sources: list) -> None:
    """By the main process of a fresh run: the first images as the loss masks weigh them, to check before it trains."""
    strip = mask_preview(dataset, sources, recipe.data.loss_mask.unmasked_weight)
    if strip is not None:
        path = save_image_atomic(strip, Path(recipe.output_dir) / "samples" / "loss-masks.png")
        say(f"loss masks: what trains in the first images (the rest dimmed): {path}")


def _set_up_model(recipe: Recipe, method: TrainingMethod, accelerator: Accelerator, base_location: BaseLocation | None, fresh_run: bool) -> None:
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
