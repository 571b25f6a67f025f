"""DeepSpeed's fp32 master weights as each process holds them, for the weight average (`finetune.ema`).

Under DeepSpeed the optimizer steps fp32 master weights that the processes split between them: under ZeRO-1/2 each
holds a slice of the flat fp32 group (a parameter may lie in one process's slice, or across two), under ZeRO-3 a
partition of each parameter (padded at the end of the last one). The module's parameters are the engine's copies the
forward pass computes with: bf16/fp16 with mixed precision, and under ZeRO-3 partitioned too (empty outside a gather).

DeepSpeed's safe_get_local_fp32_param and safe_set_local_fp32_param read and write a process's slice under ZeRO-3
only, and the reading one moves it to this process's device: under an offloaded optimizer a copy (on a GPU, the slice
over PCIe at every update, and the average made of it in GPU memory, which offload was to spare). So the slice is read
where the optimizer keeps it, through the helper that function calls (`_get_fp32_opt_state_partition`): a view, in CPU
memory under offload. Under ZeRO-1/2 the slice is the fragment that the parameter's `_hp_mapping` (what
safe_get_full_fp32_param reads there) points at.
"""

from __future__ import annotations

from typing import Iterable

import torch


def has_master(parameter: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed's optimizer keeps an fp32 master of `parameter` (as safe_get_full_fp32_param decides): under
    ZeRO-1/2/3, not under ZeRO-0 without mixed precision, whose parameters are what the optimizer steps."""
    return hasattr(parameter, "ds_id") or hasattr(parameter, "_hp_mapping")


def local_master(parameter: torch.nn.Parameter) -> torch.Tensor:
    """This process's slice of the parameter's fp32 master, flat (empty where it holds none): a view the optimizer
    steps in place, where it keeps it (in CPU memory under an offloaded optimizer). Under ZeRO-3 with NVMe offload, a
    copy: the partition lives in a swap buffer only while DeepSpeed reads it."""
    from deepspeed.utils import safe_get_local_fp32_param

    if hasattr(parameter, "ds_id"):
        optimizer = parameter._z3_optimizer
        if optimizer.swap_optimizer:
            return safe_get_local_fp32_param(parameter)
        return optimizer._get_fp32_opt_state_partition(parameter, release_swap_buffers=True)[0]
    fragment = parameter._hp_mapping
    return fragment.get_hp_fragment() if fragment is not None else torch.empty(0, device=parameter.device)


def set_local_master(parameter: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write this process's slice of the parameter's fp32 master (a no-op where it holds none)."""
    from deepspeed.utils import safe_set_local_fp32_param

    if hasattr(parameter, "ds_id"):
        safe_set_local_fp32_param(parameter, value)
    elif parameter._hp_mapping is not None:
        parameter._hp_mapping.get_hp_fragment().copy_(value)


def local_slice(parameter: torch.nn.Parameter, whole: torch.Tensor) -> torch.Tensor:
    """The slice of `whole` (a value of the whole parameter) that this process's master holds, shaped as local_master's."""
    flat = whole.detach().float().flatten()
    if hasattr(parameter, "ds_id"):  # ZeRO-3: partition r of the parameter, the last one padded
        size = parameter.ds_tensor.ds_numel
        start = size * torch.distributed.get_rank(group=parameter.ds_process_group)  # DeepSpeed's groups are torch's
        piece = flat.new_zeros(size)
        held = max(0, min(size, parameter.ds_numel - start))
        piece[:held] = flat[start : start + held]
        return piece
    fragment = parameter._hp_mapping
    if fragment is None:
        return flat[:0]
    return flat.narrow(0, fragment.lp_fragment_address.start, fragment.lp_fragment_address.numel)


def whole_master(parameter: torch.nn.Parameter) -> torch.Tensor:
    """Collective (every process, parameters in the same order): the parameter's fp32 master, gathered whole."""
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(parameter)


@torch.no_grad()
def copy_masters_to_engine(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Collective: the engine's copies (bf16/fp16, or fp32) take the masters' values, as after an optimizer step (the
    same rounding, so copying masters that step made gives back the copies it made, bit for bit). Under ZeRO-3 through
    a gather one parameter at a time: modified on one process, partitioned again from it (a persistent small
    parameter too, which a write to its partition alone would miss)."""
    import deepspeed

    for parameter in parameters:
        master = whole_master(parameter)
        if hasattr(parameter, "ds_id"):
            with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
                parameter.data.copy_(master.view(parameter.shape))
        else:
            parameter.data.copy_(master.view(parameter.shape))
