"""DeepSpeed's CPU Adam (what an offloaded optimizer steps with) brought to the step its loaded checkpoint is at.

DeepSpeedCPUAdam keeps Adam's bias-correction powers beta1^t and beta2^t in its compiled optimizer, outside the state
a checkpoint holds: `Adam_Optimizer::IncrementStep` (deepspeed/ops/csrc/includes/cpu_adam.h, DeepSpeed 0.19.8, lines
71-93) multiplies them by beta at each step (float32), and recomputes them with std::pow when the step it is handed is
not the next one, as at the first step after a resume (a fresh optimizer at step 0 handed step t + 1). The two round
apart (0.999^3: 0.9970031 by products, 0.997003 by pow), so a resumed run steps with other bias corrections than the
uninterrupted one: its fp32 masters differ by an ulp after the first step, and the difference grows from there.

`continue_step_powers` hands the compiled optimizer steps 1 .. t on a one-value scratch tensor after a checkpoint is
loaded, as the uninterrupted run did with its weights: its powers are then the products that run had, bit for bit. It
writes nothing of DeepSpeed's but the scratch tensor; a DeepSpeed that computes the powers from the step alone ignores
the replay.
"""

from __future__ import annotations

import torch


def cpu_adam_of(optimizer) -> torch.optim.Optimizer | None:
    """The DeepSpeedCPUAdam inside accelerate's and DeepSpeed's wrappers of `optimizer` (None: another optimizer)."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError:
        return None
    for _ in range(4):  # accelerate's wrapper, DeepSpeed's ZeRO optimizer, the base optimizer
        if isinstance(optimizer, DeepSpeedCPUAdam):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


@torch.no_grad()
def continue_step_powers(optimizer) -> None:
    """After a checkpoint is loaded (and the recipe's betas set): replay the loaded steps' bias-correction powers into
    DeepSpeed's CPU Adam, as the run that saved the checkpoint had them. A no-op for any other optimizer."""
    adam = cpu_adam_of(optimizer)
    steps = [int(state["step"]) for state in adam.state.values() if "step" in state] if adam is not None else []
    if not steps:
        return
    scratch = [torch.zeros(1) for _ in range(4)]  # weight, gradient, exp_avg, exp_avg_sq: the update lands here alone
    # ZeRO hands the optimizer one flat group after another, all at the same step; the first of a step multiplies the
    # powers (the others find them done), so one replay per step whatever the groups. Finetune's groups share their betas.
    group = adam.param_groups[0]
    update = getattr(getattr(adam, "ds_opt_adam", None), "adam_update", None)
    for step in range(1, max(steps) + 1):
        try:
            update(adam.opt_id, step, group["lr"], *group["betas"], group["eps"], group["weight_decay"], group["bias_correction"], *scratch)
        except (TypeError, AttributeError):  # a DeepSpeed whose compiled optimizer is called otherwise: the resume goes on,
            return  # its first steps rounded apart by an ulp, as before this replay (tests pin DeepSpeed 0.19.8's call)
