"""Optimizers and learning-rate schedules named in the recipe."""

from __future__ import annotations

import contextlib
import io

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers.optimization import get_scheduler

from finetune.config import OptimizerConfig
from finetune.config.training import ADAMW_BETAS
from finetune.console import warn
from finetune.library_noise import quiet_paged_optimizer_on_cpu
from finetune.optim.packages import BITSANDBYTES_OPTIMIZERS, check_optimizer_installed, eight_bit_step_missing, native_library_missing, say_bitsandbytes_fallback


def build_optimizer(config: OptimizerConfig, parameters: list, device: torch.device | None = None, sharded: bool = False) -> torch.optim.Optimizer:
    """`parameters`: a list of tensors, or of parameter groups (dicts) with their own settings; `device`: where they
    train (default: where they are now; training builds the optimizer before accelerate moves them); `sharded`: each
    process's optimizer will hold its shard of them alone (DeepSpeed ZeRO), not all of them (one process, DDP)."""
    kwargs = dict(lr=config.lr, betas=config.betas_in_use, weight_decay=config.weight_decay)
    if config.name == "prodigy":
        return _prodigy(config, parameters, kwargs, sharded)
    if config.name == "adafactor":
        from transformers.optimization import Adafactor

        # At the recipe's learning rate and schedule, not Adafactor's own relative step; no first moment:
        # its factored second moments (a row and a column per matrix) are what make it small.
        return Adafactor(parameters, lr=config.lr, weight_decay=config.weight_decay, scale_parameter=False, relative_step=False)
    if config.name in BITSANDBYTES_OPTIMIZERS:
        if missing := eight_bit_step_missing((device or first_device(parameters)).type) or native_library_missing():  # Apple's MPS; no .so
            say_bitsandbytes_fallback(config.name, missing)  # unless `finetune train` said it before its data check
        else:
            try:
                import bitsandbytes as bnb

                optimizer_class = getattr(bnb.optim, BITSANDBYTES_OPTIMIZERS[config.name])
                extra = {} if config.name == "lion8bit" else {"eps": config.eps}  # Lion has no epsilon
                optimizer = optimizer_class(parameters, **kwargs, **extra)
                if config.name == "paged_adamw8bit" and (device or first_device(parameters)).type == "cpu":
                    warn("optimizer.name=paged_adamw8bit: paging needs a CUDA GPU, so on CPU the 8-bit states are kept unpaged, "
                         "as adamw8bit keeps them: name adamw8bit for the same training without this warning")
                    quiet_paged_optimizer_on_cpu()  # the library's own copy, from every process
                return optimizer
            except Exception as err:  # no CUDA/CPU backend, or bitsandbytes missing
                say_bitsandbytes_fallback(config.name, f"cannot run here ({err})")  # as above
        kwargs["betas"] = tuple(config.betas) if config.betas is not None else ADAMW_BETAS  # not Lion's own, for AdamW
    # One fused kernel for all tensors instead of a loop over them (CPU's default): LoRA has hundreds of
    # small tensors; the loop took ~5% of a cached LoRA step of the medium benchmark model.
    return torch.optim.AdamW(parameters, eps=config.eps, fused=fused_supported(parameters), **kwargs)


def _prodigy(config: OptimizerConfig, parameters: list, kwargs: dict, sharded: bool) -> torch.optim.Optimizer:
    """Prodigy estimates the step size itself; optimizer.lr multiplies it (1.0 as its authors use it).
    Bias correction and, with warm-up steps, the safeguard: the settings its authors give for diffusion.
    Sharded, its estimate is summed over the processes (finetune.optim.sharded_prodigy)."""
    check_optimizer_installed(config)
    from prodigyopt import Prodigy

    optimizer_class = Prodigy
    if sharded:
        from finetune.optim.sharded_prodigy import ShardedProdigy as optimizer_class
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay" on every process
        return optimizer_class(parameters, eps=config.eps, use_bias_correction=True, safeguard_warmup=config.warmup_steps > 0, **kwargs)


def first_device(parameters: list) -> torch.device:
    first = parameters[0]["params"][0] if isinstance(parameters[0], dict) else parameters[0]
    return first.device


def fused_supported(parameters: list) -> bool:
    tensors = [p for group in parameters for p in group["params"]] if parameters and isinstance(parameters[0], dict) else list(parameters)
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)


def build_lr_scheduler(config: OptimizerConfig, optimizer: torch.optim.Optimizer, max_steps: int):
    return get_scheduler(
        config.scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=max_steps,
        num_cycles=config.num_cycles,  # read by cosine_with_restarts alone
    )


def schedule_factor(config: OptimizerConfig, max_steps: int, step: int) -> float:
    """The factor on optimizer.lr that the recipe's schedule, laid out over `max_steps`, gives at `step`."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return build_lr_scheduler(config, probe, max_steps).lr_lambdas[0](step)


# The settings that shape a schedule besides its length; a checkpoint keeps them among its recipe's (flat settings).
SCHEDULE_KEYS = ("scheduler", "warmup_steps", "num_cycles")


def schedule_as_recorded(config: OptimizerConfig, settings: dict) -> OptimizerConfig:
    """The schedule a checkpoint trained on: `config` with the checkpoint's recorded optimizer.scheduler, warmup_steps and
    num_cycles (`settings`, flat); a key it lacks is a setting added since it was made, so this run's (as changed_settings reads it)."""
    return config.model_copy(update={key: settings[f"optimizer.{key}"] for key in SCHEDULE_KEYS if f"optimizer.{key}" in settings})


def schedule_change_line(then: OptimizerConfig, now: OptimizerConfig, checkpoint_name: str, step: int, old_steps: int | None,
                         new_steps: int) -> str | None:  # fmt: skip
    """A warning where a resume changes the run's length under a schedule that follows it (linear, cosine, cosine_with_restarts).
    The schedule is built again for the new length and continues at the checkpoint's step, as diffusers' and
    sd-scripts' trainers do on a resume; they say nothing of the jump in the learning rate, we say it. `then`: the
    checkpoint's schedule (`schedule_as_recorded`), `now`: this run's; each side is laid out with its own settings."""
    if old_steps is None or old_steps == new_steps:
        return None
    shorter = min(old_steps, new_steps)  # where one schedule has decayed to 0 and the other has not

    def shaped_by_length(config: OptimizerConfig) -> bool:  # not a constant schedule (past any warm-up)
        return schedule_factor(config, old_steps, shorter) != schedule_factor(config, new_steps, shorter)

    if not (shaped_by_length(then) or shaped_by_length(now)):
        return None
    before, after = schedule_factor(then, old_steps, step), schedule_factor(now, new_steps, step)
    this_run = str(new_steps) if schedule_named(then) == schedule_named(now) else f"a {schedule_named(now)} schedule of {new_steps} steps"
    said = (f"warning: {checkpoint_name} was trained on a {schedule_named(then)} schedule of {old_steps} steps, this run has {this_run}: "
            f"the schedule is laid out again over {new_steps} steps, so ")
    if abs(before - after) < 1e-6:  # in the warm-up: the same rate now, another decay later
        return said + f"the learning rate decays to 0 at step {new_steps}, not {old_steps}"
    return said + f"at step {step} the learning rate goes from {before:.0%} to {after:.0%} of optimizer.lr ({now.lr:g}) and decays to 0 at step {new_steps}"


def schedule_named(config: OptimizerConfig) -> str:
    """"cosine", or "cosine_with_restarts (3 cycles)": how the line above names a schedule."""
    return config.scheduler + (f" ({config.num_cycles} cycles)" if config.scheduler == "cosine_with_restarts" and config.num_cycles > 1 else "")


def apply_recipe_settings(optimizer: torch.optim.Optimizer, lr_scheduler, group_lrs: list[float], config: OptimizerConfig) -> None:
    """After a resume: the recipe's learning rates (`group_lrs`, one per parameter group), weight decay,
    betas and epsilon, where the loaded checkpoint restored the ones it was saved with. A changed value is
    reported as changed at the resume; it must then also be the one used. The schedule continues at its step."""
    for index, (group, base_lr) in enumerate(zip(optimizer.param_groups, group_lrs)):
        lr_scheduler.base_lrs[index] = group["initial_lr"] = base_lr
        group["lr"] = base_lr * lr_scheduler.lr_lambdas[index](lr_scheduler.last_epoch)
        group["weight_decay"] = config.weight_decay
        if "betas" in group:
            group["betas"] = config.betas_in_use
        # Adafactor's own pair of epsilons was not the recipe's; Lion has none (bitsandbytes keeps a 0 it never reads).
        if "eps" in group and config.name not in ("adafactor", "lion8bit"):
            group["eps"] = config.eps
        if config.name == "prodigy":  # as _prodigy sets it: its safeguard follows the warm-up
            group["safeguard_warmup"] = config.warmup_steps > 0
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def clip_gradients(accelerator: Accelerator, parameters: list[torch.Tensor], max_norm: float) -> None:
    """train.max_grad_norm: `accelerator.clip_grad_norm_`, which on one process and under DDP unscales fp16's gradients and
    calls torch's `clip_grad_norm_` itself, here without its wrapper for sharded tensors (DTensor), which took the norm of
    torch's total norm again (a stack and a norm of one value: two kernel launches on a GPU, the same bits) after a walk
    over every parameter. Elsewhere (FSDP, DeepSpeed, XLA), accelerate's own."""
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        accelerator.clip_grad_norm_(parameters, max_norm)
        return
    accelerator.unscale_gradients()
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def step_size(optimizer: torch.optim.Optimizer, group_index: int = 0) -> float:
    """A parameter group's learning rate as it is applied: Prodigy's `lr` only multiplies the step size
    `d` it finds, so it shows d x lr (a number comparable with AdamW's learning rates)."""
    group = optimizer.param_groups[group_index]
    return group["lr"] * group.get("d", 1.0)
