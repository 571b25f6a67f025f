"""finetune.master_weights.local_slice: the part of a whole parameter value that each process's fp32 master holds,
as DeepSpeed lays them out (what a resumed weight average takes back from ema.safetensors). The launched runs of
test_deepspeed_ema.py resume through it, but none of the tiny models' parameters has an odd size, so ZeRO-3's padded
last partition is checked here."""

from types import SimpleNamespace

import torch

from finetune.master_weights import local_slice


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
