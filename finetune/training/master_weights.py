"""DeepSpeed's fp32 master weights as each process holds them, for the weight average (`finetune.training.ema`).

Under DeepSpeed the optimizer steps fp32 master weights that the processes split between them: under ZeRO-1/2 each
holds a slice of the flat fp32 group (a parameter may lie in one process's slice, or across two), under ZeRO-3 a
partition of each parameter (padded at the end of the last one). The module's parameters are the engine's copies the
forward pass computes with: bf16/fp16 with mixed precision, and under ZeRO-3 partitioned too (empty outside a gather).

DeepSpeed's safe_get_local_fp32_param and safe_set_local_fp32_param read and write a process's slice under ZeRO-3
only, and the reading one moves it to this process's device: under an offloaded optimizer a copy (on a GPU, the slice
over PCIe at every update, and the average made of it in GPU memory, which offload was to spare). So the slice is read
where the optimizer keeps it, through the helper that function calls (`_get_fp32_opt_state_partition`): a view, in CPU
memory under offload. Under ZeRO-1/2 no public API gives a slice (DeepSpeed 0.19.8): the safe_*_local_* functions assert
a ZeRO-3 parameter (`ds_id`), safe_get_full_fp32_param all-reduces a buffer of the whole parameter (at every update, the
whole model sent between the processes and held whole on each), and safe_set_full_fp32_param takes the whole value. So
the slice is the fragment that the parameter's `_hp_mapping` (what those two read and write there) points at. Both are
DeepSpeed's internals, so `check_layout` compares them with its public API at the start: a version that lays the
masters out otherwise stops the run in one line, where it would otherwise average something else.
"""

from __future__ import annotations

from typing import Iterable

import torch

from finetune.errors import FinetuneError

TESTED_DEEPSPEED = "0.19.8"  # the version whose internals local_master reads (tests/test_deepspeed_ema.py)


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


def local_span(parameter: torch.nn.Parameter) -> tuple[int, int, int]:
    """Where this process's slice lies in the flattened parameter: (start, values held, the slice's size), the size
    larger than what it holds in ZeRO-3's last partition, padded past the parameter's end."""
    if hasattr(parameter, "ds_id"):  # ZeRO-3: partition r of the parameter
        size = parameter.ds_tensor.ds_numel
        start = size * torch.distributed.get_rank(group=parameter.ds_process_group)  # DeepSpeed's groups are torch's
        return start, max(0, min(size, parameter.ds_numel - start)), size
    fragment = parameter._hp_mapping
    if fragment is None:
        return 0, 0, 0
    return fragment.lp_fragment_address.start, fragment.lp_fragment_address.numel, fragment.lp_fragment_address.numel


def local_slice(parameter: torch.nn.Parameter, whole: torch.Tensor) -> torch.Tensor:
    """The slice of `whole` (a value of the whole parameter) that this process's master holds, shaped as local_master's."""
    flat = whole.detach().float().flatten()
    start, held, size = local_span(parameter)
    piece = flat.new_zeros(size)
    piece[:held] = flat[start : start + held]
    return piece


def whole_master(parameter: torch.nn.Parameter) -> torch.Tensor:
    """Collective (every process, parameters in the same order): the parameter's fp32 master, gathered whole."""
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(parameter)


def check_layout(parameters: dict[str, torch.nn.Parameter]) -> None:
    """Collective (every process, the same parameters in the same order): refuse, in one line on every process, a
    DeepSpeed whose fp32 masters are not where local_master and local_slice find them. Each process's slice must hold
    what DeepSpeed's public gather of the whole master gives there (one gather per parameter, as a save does), and be
    the same memory at each read: the masters the optimizer steps, not a copy of them."""
    # Gathered first, by every process alike, so that no process leaves a collective the others wait in.
    wholes = {name: whole_master(p) if has_master(p) else None for name, p in parameters.items()}
    problem = None
    for name, parameter in parameters.items():
        try:
            problem = slice_problem(parameter, wholes[name])
        except (AttributeError, TypeError, KeyError, IndexError, ValueError, RuntimeError, AssertionError) as err:
            problem = f"reading its slice raised {type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}"
        if problem:
            problem = f"{name}: {problem}"
            break
    problems = [problem]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:  # every process says the same line
        problems = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first:
        raise FinetuneError(layout_refusal(first))


def slice_problem(parameter: torch.nn.Parameter, whole: torch.Tensor | None) -> str | None:
    """What is wrong with this process's slice of the parameter's master as local_master reads it (None: nothing),
    `whole` being DeepSpeed's gather of it."""
    if not has_master(parameter):
        return "no fp32 master where finetune looks for one (ds_id, _hp_mapping)"
    if whole is None:
        return "DeepSpeed's safe_get_full_fp32_param gives no master for it"
    held, read_again = local_master(parameter), local_master(parameter)
    start, count, size = local_span(parameter)
    if held.dtype != torch.float32 or held.dim() != 1 or held.numel() != size:
        return f"its slice is {held.dtype} of shape {tuple(held.shape)}, where {size} fp32 values were expected"
    if not torch.equal(held[:count], whole.detach().flatten()[start : start + count].to(held.device, torch.float32)):
        return "its slice holds other values than that part of DeepSpeed's safe_get_full_fp32_param"
    copied = hasattr(parameter, "ds_id") and parameter._z3_optimizer.swap_optimizer  # NVMe: a copy, by design
    if held.numel() and not copied and held.data_ptr() != read_again.data_ptr():
        return "each read of its slice is a new copy, not the masters the optimizer steps"
    return None


def layout_refusal(problem: str) -> str:
    import deepspeed

    return (f"train.ema_decay: DeepSpeed {deepspeed.__version__} keeps the fp32 master weights otherwise than finetune reads "
            f"each process's slice of them ({problem}); finetune reads DeepSpeed {TESTED_DEEPSPEED}'s under ZeRO-1, 2 and 3: "
            f"install it (pip install deepspeed=={TESTED_DEEPSPEED}), or set train.ema_decay: null")


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
