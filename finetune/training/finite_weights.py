"""A run whose trained weights turned to NaN or infinity stops before it saves them.

A learning rate too high for the data, or fp16 overflowing past what its loss scaler catches, can blow the
weights up mid-run. Saved, they would be a checkpoint and outputs that draw only noise or black, and with
`checkpoint.keep_last` the rotation would then delete the last good checkpoint. So every save first checks
the weights (one read, at saves only: the step loop itself never waits for it) and stops the run in one line
that names the step and the checkpoint that is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from accelerate import Accelerator

from finetune.checkpoints.run_files import list_checkpoints
from finetune.counts import counted
from finetune.errors import FinetuneError


def count_non_finite(parameters: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """How many of `parameters` hold a NaN or an infinity (on `device`, unread). Under ZeRO-3 a parameter is an
    empty placeholder and its process's slice lives in `ds_tensor`: that slice is checked."""
    bad = torch.zeros((), dtype=torch.int64, device=device)
    for parameter in parameters:
        values = getattr(parameter, "ds_tensor", parameter).detach()
        bad += (~torch.isfinite(values)).any().to(device)
    return bad


def ensure_finite_weights(accelerator: Accelerator, parameters: Iterable[torch.Tensor], step: int, checkpoints_dir: Path) -> None:
    """Collective: raise on every process if any process's trained weights hold NaN or infinity at `step`."""
    bad = int(accelerator.reduce(count_non_finite(parameters, accelerator.device), "sum").item())
    if bad == 0:
        return
    kept = list_checkpoints(checkpoints_dir)
    keeps = f"the last good checkpoint, {kept[-1]}, is kept (--resume it with the change)" if kept else "no checkpoint was saved before it"
    raise FinetuneError(
        f"the trained weights hold NaN or infinite values at step {step} ({counted(bad, 'tensor')}): training diverged, so nothing of "
        f"this step was saved; {keeps}; lower optimizer.lr, keep train.max_grad_norm on, or use bf16 rather than fp16"
    )
