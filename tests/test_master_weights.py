"""finetune.training.master_weights.local_slice: the part of a whole parameter value that each process's fp32 master holds,
as DeepSpeed lays them out (what a resumed weight average takes back from ema.safetensors). The launched runs of
test_deepspeed_ema.py resume through it, but none of the tiny models' parameters has an odd size, so ZeRO-3's padded
last partition is checked here."""

from types import MethodType, SimpleNamespace

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.training.ema import MasterWeightAverage
from finetune.training.master_weights import local_master, local_slice


def test_zero3_partitions_each_parameter_and_pads_the_last_one(monkeypatch):
    whole = torch.arange(10.0).reshape(2, 5) + 1  # 10 values over 3 processes: partitions of 4, the last holding 2
    parameter = SimpleNamespace(ds_id=7, ds_numel=10, ds_tensor=SimpleNamespace(ds_numel=4), ds_process_group="group")
    slices = []
    for rank in range(3):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group, rank=rank: rank if group == "group" else None)
        slices.append(local_slice(parameter, whole))
    assert [s.tolist() for s in slices] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]


def test_zero2_takes_the_fragment_of_the_flat_partition_that_holds_part_of_the_parameter():
    whole = torch.arange(6.0).reshape(3, 2).bfloat16()  # a half-precision value: the slice is fp32, as the masters
    fragment = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=2, numel=3))
    piece = local_slice(SimpleNamespace(_hp_mapping=fragment), whole)
    assert piece.dtype == torch.float32 and piece.tolist() == [2, 3, 4]
    assert local_slice(SimpleNamespace(_hp_mapping=None), whole).numel() == 0  # a process whose partition holds none of it


def offloaded_zero3_parameter(monkeypatch, masters: torch.Tensor, start: int, size: int) -> torch.nn.Parameter:
    """A ZeRO-3 parameter whose fp32 partition is `size` values of the flat group `masters` from `start`, with the
    optimizer offloaded: the group in CPU memory and the process's device another one ("meta" here, as "cuda:0" on a
    GPU). DeepSpeed's own stage-3 methods read it, on an optimizer that holds only what they use."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    monkeypatch.setattr(type(get_accelerator()), "current_device_name", lambda self: "meta")
    parameter = torch.nn.Parameter(torch.zeros(size, dtype=torch.bfloat16))  # the engine's copy
    optimizer = SimpleNamespace(fp32_partitioned_groups_flat=[masters], grad_position={0: (0, start, size)}, swap_optimizer=False,
                                get_param_id=lambda p: 0, _swappable_optimizer_subgroup=lambda group: False)  # fmt: skip
    for method in ("_get_fp32_opt_state_partition", "get_local_fp32_param", "set_local_hp_param"):
        setattr(optimizer, method, MethodType(getattr(Stage3, method), optimizer))
    optimizer.get_full_hp_param = lambda p, optim_state_key=None: masters[start : start + size].clone()  # one process: its partition
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group: 0)
    parameter.ds_id, parameter._z3_optimizer = 0, optimizer
    parameter.ds_numel, parameter.ds_tensor, parameter.ds_process_group = size, SimpleNamespace(ds_numel=size), None
    return parameter


def test_under_an_offloaded_zero3_optimizer_the_slice_is_read_in_cpu_memory_where_the_optimizer_steps_it(monkeypatch):
    """safe_get_local_fp32_param moves the partition to the process's device: on a GPU, a copy of every slice at each
    update, and the average made of them in GPU memory. The average reads the partition itself, and stays beside it."""
    masters = torch.arange(8.0)
    parameter = offloaded_zero3_parameter(monkeypatch, masters, start=2, size=4)
    held = local_master(parameter)
    assert held.device == masters.device and held.data_ptr() == masters[2:].data_ptr() and held.tolist() == [2, 3, 4, 5]
    average = MasterWeightAverage({"w": parameter}, decay=0.5)
    assert average.averages["w"].device.type == "cpu"
    masters[2:6] = 10.0  # an optimizer step, in place
    average.update()  # the warm-up's decay 1/10: 0.9 of the way
    assert torch.allclose(average.averages["w"], torch.tensor([2.0, 3, 4, 5]) + 0.9 * (10 - torch.tensor([2.0, 3, 4, 5])))


def test_a_zero3_partition_of_another_size_than_finetune_expects_is_refused_at_the_start(monkeypatch):
    """local_slice (a resumed average's part of ema.safetensors) takes partitions of ds_tensor's size: a DeepSpeed that
    partitions otherwise would resume each process's average from another part of the weight."""
    parameter = offloaded_zero3_parameter(monkeypatch, torch.arange(8.0), start=2, size=4)
    parameter.ds_tensor.ds_numel = 3
    with pytest.raises(FinetuneError, match=r"^train.ema_decay: DeepSpeed .*\(w: its slice is torch.float32 of shape \(4,\), where 3 fp32 values were expected\); .*deepspeed==0.19.8"):
        MasterWeightAverage({"w": parameter}, decay=0.5)
