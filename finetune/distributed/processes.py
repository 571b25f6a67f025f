"""What the training loop needs to know about running in several processes: DDP and DeepSpeed ZeRO.

accelerate does most of it. What is left here:

- Several processes on a machine without CUDA join over gloo. accelerate does this for DDP when told
  to use the CPU; under DeepSpeed it must be handed the gloo backend, or it counts one process.
- DeepSpeed's batch size, gradient accumulation and clipping are taken from the recipe, so its JSON
  ("auto") and the recipe never disagree (a file that sets them, or the precision, otherwise is refused first).
- DeepSpeed wraps exactly one trained module in its engine (the frozen VAE and text encoder stay out
  of it); a recipe that trains two (the UNet and the text encoder) is stopped with a clear error before
  anything loads, as is an optimizer that needs each weight whole (Adafactor: ZeRO hands the optimizer one
  flat shard per process): see `finetune.distributed.deepspeed_checks`.
- Under ZeRO-3 the base model is loaded whole (not sharded as it loads), so the frozen parts work.
- Under DeepSpeed the forward pass runs in torch's autocast (accelerate's is off there).
- Checkpoints under DeepSpeed are its own (each process writes its optimizer shard) without the
  frozen weights. Before the main process saves the ordinary diffusers/peft output, the parameters
  are gathered on every process (ZeRO-3) and the trained ones take their fp32 master values (bf16/fp16).
  Under ZeRO-3 every process samples the validation images (each forward gathers the shards from all
  of them; see `finetune.training.validation`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, DynamoBackend, InitProcessGroupKwargs, is_compiled_module, str_to_bool

from finetune.config import Recipe
from finetune.console import say, warn
from finetune.checkpoints.run_files import say_fresh_start
from finetune.distributed.process_env import deepspeed_requested, several_processes
from finetune.errors import FinetuneError
from finetune.sampling.placement import bf16_emulated, mps_without_bf16


def unwrap(accelerator: Accelerator, module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under accelerate's wrappers (DDP, DeepSpeed, and torch.compile's, which
    accelerate keeps by default): parameter names without `_orig_mod.`, as diffusers and peft files
    and our checkpoints name them, and a module that samples without recompiling for each shape."""
    if accelerator.distributed_type == DistributedType.NO and not is_compiled_module(module):
        # `prepare` left it as it was. accelerate's unwrap_model would import DeepSpeed (~440 modules), wherever it
        # is installed, only to see the module is not its engine: on a plain run, before the first validation.
        return module
    return accelerator.unwrap_model(module, keep_torch_compile=False)


def keep_autocast_outputs(accelerator: Accelerator, module: torch.nn.Module) -> None:
    """Let the prepared `module` return its outputs in the dtype autocast made them, not cast to fp32.

    Under its own mixed precision (not DeepSpeed's, nor fp32) accelerate's `prepare` wraps the model's forward (the model
    that DDP or torch.compile then wraps) in autocast and casts its half-precision outputs to fp32, for a loss computed
    outside autocast. Ours runs inside it (`autocast`; so do the held-out loss and validation's pipeline), and a model
    whose outputs another model reads (the ControlNet's residuals, the UNet's inputs) had them cast to fp32 and back,
    forward and backward, each activation-sized. Its forward of before `prepare` is put back: accelerate keeps it as
    `_original_forward`, which its unwrap with `keep_fp32_wrapper=False` restores too, but that walks past it and strips
    diffusers' decorators of the forward as well. The wrappers stay what is called: DDP still reduces the gradients. An
    accelerate that kept no `_original_forward` would leave the fp32 outputs (`predict` casts them back), and
    tests/test_controlnet_step_casts.py would fail."""
    if not accelerator.native_amp:
        return
    inner = unwrap(accelerator, module)
    original = vars(inner).pop("_original_forward", None)
    if original is not None:
        inner.forward = original


def ready_to_compile(accelerator: Accelerator, trained: list[torch.nn.Module], batch_shapes: int) -> None:
    """Before `prepare` compiles the trained modules (`accelerate launch --dynamo_backend ...`): what made them compile again,
    or run uncompiled. `batch_shapes`: how many shapes of batch the run can train (two a bucket: its last batch may be smaller;
    on several processes each process's share of that last batch, one size a process: tests/test_compiled_processes.py).

    - Each shape of batch compiles a static graph of its own (`accelerate launch`'s dynamic=False, as the trainer takes
      it). Past torch's recompile limit (8) the module ran uncompiled for the rest of the run, with one warning in the log:
      7 buckets did. The limit is raised to the run's shapes. Dynamic sizes are not the way: inductor (torch 2.13, on a
      CPU) fails on the UNet compiled with a dynamic batch or sides, in the first step of a new shape.
    - diffusers' first `save_pretrained` writes `_class_name` and `_diffusers_version` into the model's own config, which a
      model made here (a ControlNet copied from the UNet) lacks; its forward reads the config, guarded by its length, so
      the first checkpoint compiled it again. They are written before it compiles."""
    plugin = accelerator.state.dynamo_plugin
    if plugin.backend == DynamoBackend.NO:
        return
    if plugin.dynamic is not True:  # --dynamo_use_dynamic, on a GPU: as asked (refused on a CPU: launch_problem)
        plugin.dynamic = False  # None (torch's default, where accelerate launch did not set it) turns a changed size dynamic
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, batch_shapes + 2)  # 2: a margin
    if accelerator.device.type == "cpu" and plugin.backend == DynamoBackend.INDUCTOR:
        warn("compiling on a CPU: torch's inductor computed wrong gradients for diffusers' UNet on a CPU (torch 2.13: the tiny "
             "test UNet's loss right, most of its weight gradients off; docs/compiled-training.md), so this run may not learn what "
             "it should: train uncompiled on a CPU (leave out --dynamo_backend)")  # fmt: skip
    if batch_shapes > 2:
        say(f"compiling: up to {batch_shapes} shapes of batch (buckets, and each bucket's smaller last batch), each compiled on its first batch")
    for module in trained:
        config = getattr(module, "_internal_dict", None)
        if config is not None and "_diffusers_version" not in config:
            import diffusers

            module.register_to_config(_class_name=type(module).__name__, _diffusers_version=diffusers.__version__)


@contextlib.contextmanager
def uncompiled_forwards(modules: dict[str, torch.nn.Module]):
    """Inside, every compiled module runs uncompiled: for validation's grid and the held-out loss, which would each compile
    a graph of their own (the pipeline calls the model with other arguments and shapes; the held-out loss runs without
    gradients, and graphs are guarded on grad mode), a minute or more of a GPU's time for SD1.5 each, for no gain. Yields
    the modules to call. torch's stance (2.6 on) rather than the module under torch.compile's wrapper: under DeepSpeed
    (ACCELERATE_DYNAMO_BACKEND exported by hand) accelerate has the engine compile the model in place (`engine.compile`), so
    there is no wrapper to step around. torch 2.4 and 2.5 have no stance: there a module under accelerate's wrapper (outside
    DDP's) is called as the module it wraps, and one the engine compiled compiles its extra graphs (same results)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield {name: module._orig_mod if is_compiled_module(module) else module for name, module in modules.items()}
        return
    with set_stance("force_eager"):
        yield modules


def trained_parameters(modules: dict[str, torch.nn.Module], accelerator: Accelerator) -> dict[str, torch.nn.Parameter]:
    """Every parameter that trains, by a stable name (module name, then its own): for the weight average and the
    check of the weights before each save."""
    return {
        f"{name}.{parameter_name}": parameter
        for name, module in modules.items()
        for parameter_name, parameter in unwrap(accelerator, module).named_parameters()
        if parameter.requires_grad
    }


def leave_process_group() -> None:
    """At the end of a program that trained: close the process group that `train` leaves open."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def gpu_available() -> bool:
    """A device accelerate runs fp16 autocast on (CUDA, Apple's MPS, Intel's XPU)."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())


def launch_problem(mixed_precision: str) -> str | None:
    """Why train.mixed_precision or accelerate's launch options cannot (or should not) run on this machine,
    in one line; None when they can."""
    if regional_compilation_requested():
        # accelerate wraps each leaf layer outside the repeated blocks, and the UNet's forward tests its
        # conv_norm_out for truth, which a compiled wrapper answers with a TypeError (torch 2.13, accelerate 1.15).
        return ("accelerate's regional compilation (--dynamo_use_regional_compilation) cannot run diffusers' UNet: "
                "compile the whole UNet with --dynamo_backend inductor alone")  # fmt: skip
    on_the_cpu = launched_on_the_cpu()  # there fp16 cannot run, and bf16 can
    if dynamic_shapes_requested() and (on_the_cpu or not gpu_available()):
        # torch 2.13's inductor fails on the UNet compiled dynamic, in its first step (an InductorError comparing symbolic sizes).
        return ("accelerate's --dynamo_use_dynamic: inductor cannot compile diffusers' UNet with dynamic sizes on a CPU; "
                "leave it out: each shape of batch then compiles once")  # fmt: skip
    if mixed_precision == "fp16" and (on_the_cpu or not gpu_available()):
        # accelerate turns fp16 autocast off on a CPU, and the fp16 frozen weights would then meet fp32 inputs.
        launched = " (this launch runs it on the CPU)" if on_the_cpu and gpu_available() else ""
        return f"train.mixed_precision fp16 needs a GPU{launched}; on a CPU use bf16 or no"
    if mixed_precision == "bf16" and not on_the_cpu and (emulated := bf16_emulated()):
        return f"train.mixed_precision bf16: {emulated}: set train.mixed_precision: fp16"
    if mixed_precision == "bf16" and not on_the_cpu and (missing := mps_without_bf16()):
        return f"train.mixed_precision bf16: {missing}: set train.mixed_precision: fp16 (or no), or update macOS"
    return None


def launched_on_the_cpu() -> bool:
    """Whether the run's device is the CPU, whatever GPU the machine has: `accelerate launch --cpu`, or several processes
    without CUDA (a Mac's: joined over gloo on the CPU)."""
    return bool(str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "false"))) or accelerator_options().get("cpu", False)


def trains_on_mps() -> bool:
    """Whether accelerate will train on Apple's MPS: a Mac's GPU, in a launch not on the CPU."""
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and bool(mps and mps.is_available()) and not launched_on_the_cpu()


def regional_compilation_requested() -> bool:
    compiling = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower() != "no"
    return compiling and str_to_bool(os.environ.get("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "false")) == 1


def dynamic_shapes_requested() -> bool:
    compiling = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower() not in ("no", "eager", "aot_eager")
    return compiling and str_to_bool(os.environ.get("ACCELERATE_DYNAMO_USE_DYNAMIC", "false")) == 1


def accelerator_options() -> dict:
    """The Accelerator arguments that choose how processes join."""
    if torch.cuda.is_available() or not several_processes():
        return {}
    if deepspeed_requested():
        # DeepSpeed's CPU accelerator talks gloo; accelerate must be told, or it sees no backend.
        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}  # accelerate joins CPU processes over gloo only when told to use the CPU


def agree_on_start(accelerator: Accelerator, step: int, checkpoints_dir: Path, latest: bool) -> None:
    """Collective: every process starts at the same step (0, or that of the checkpoint it resumes), and where
    `--resume latest` found no checkpoint, that is said. Each process looks for checkpoints on its own machine's
    disk: where output_dir is not one folder shared by every machine, one would start over while the others
    resume, and their collectives would never match (a hang, not an error)."""
    if latest and step == 0:
        say_fresh_start(checkpoints_dir)  # unless `finetune train` said it before its data check
    if accelerator.num_processes == 1:
        return
    steps = accelerator.gather(torch.tensor([step], device=accelerator.device)).tolist()
    if len(set(steps)) > 1:
        raise FinetuneError(
            f"the processes would start at different steps ({', '.join(map(str, steps))}, by rank): they do not see the same "
            f"checkpoints in {checkpoints_dir}; on several machines output_dir must be a folder every machine shares (a network disk)"
        )


def release_gathered(accelerator: Accelerator, modules: dict[str, torch.nn.Module]) -> None:
    """Under ZeRO-3, shard again the weights that forwards outside training (validation's sampling and loss)
    gathered: DeepSpeed keeps them whole for reuse until the next training step, the whole model on every
    process meanwhile."""
    if zero_stage(accelerator) == 3:
        for module in modules.values():
            module.empty_partition_cache()


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    if not uses_deepspeed(accelerator):
        return 0
    return config_stage(accelerator.state.deepspeed_plugin.deepspeed_config)


def config_stage(config: dict) -> int:
    """The ZeRO stage of a DeepSpeed config."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def configure_deepspeed(accelerator: Accelerator, recipe: Recipe) -> None:
    """Take batch size, accumulation and clipping from the recipe (what DeepSpeed cannot do was refused before
    anything loaded: `finetune.distributed.deepspeed_checks`)."""
    if not uses_deepspeed(accelerator):
        return
    train_cfg = recipe.train
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = train_cfg.batch_size
    config["gradient_accumulation_steps"] = train_cfg.gradient_accumulation_steps
    config["train_batch_size"] = train_cfg.batch_size * train_cfg.gradient_accumulation_steps * accelerator.num_processes
    config["gradient_clipping"] = train_cfg.max_grad_norm or 0.0


def autocast(accelerator: Accelerator):
    """Mixed precision for the forward pass. accelerate's own autocast does nothing under DeepSpeed,
    whose engine holds the trained model in bf16/fp16 (fp32 master weights in the optimizer): fp32
    inputs (latents, timestep embeddings) would meet half-precision weights. So torch's autocast."""
    precision = accelerator.state.mixed_precision
    if uses_deepspeed(accelerator) and precision in ("bf16", "fp16"):
        return torch.autocast(device_type=accelerator.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return accelerator.autocast()


@contextlib.contextmanager
def unsharded_loading(accelerator: Accelerator):
    """Load the base model whole on every process. Under DeepSpeed accelerate registers its config with
    transformers, which then shards every model it loads as for ZeRO-3 (zero.Init), the frozen text
    encoder included, and a frozen model outside the engine never gathers its weights back. The UNet
    is sharded by the engine in `prepare` instead."""
    if not uses_deepspeed(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def checkpoint_options(accelerator: Accelerator) -> tuple[dict, dict]:
    """(save_state, load_state) keyword arguments: DeepSpeed checkpoints leave the frozen weights out."""
    if not uses_deepspeed(accelerator):
        return {}, {}
    return {"exclude_frozen_parameters": True}, {"load_module_strict": False}


@contextlib.contextmanager
def full_parameters(accelerator: Accelerator, modules: dict[str, torch.nn.Module]):
    """Collective: inside, every parameter of `modules` is whole on every process (ZeRO-3 shards them),
    and under DeepSpeed's bf16/fp16 each trained one holds its fp32 master value (the engine computes
    with a half-precision copy; saving that copy would round away what the optimizer accumulated)."""
    if not uses_deepspeed(accelerator):
        yield
        return
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = [p for module in modules.values() for p in unwrap(accelerator, module).parameters()]
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage(accelerator) == 3 else contextlib.nullcontext()
    with gather:
        swapped = []
        for p in params:
            if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
                master = safe_get_full_fp32_param(p)  # a collective: every process, the same order
                if master is not None:
                    swapped.append((p, p.data))
                    p.data = master.to(p.device).view(p.shape)
        try:
            yield
        finally:
            for p, data in swapped:
                p.data = data  # the engine's own tensors again, before ZeRO-3 partitions them
