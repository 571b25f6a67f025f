"""The start-up check that DeepSpeed's fp32 masters are where the weight average reads each process's slice of them
(finetune.training.master_weights.check_layout): under ZeRO-1/2 through the parameter's `_hp_mapping`, which no public API
replaces. Here on one process holding part of a flat fp32 group, the fragments made by DeepSpeed's own
get_hp_fragment_mapping; the launched runs of tests/test_deepspeed_ema.py pass it under ZeRO-2, ZeRO-3 and ZeRO-3
with an offloaded optimizer. A DeepSpeed that lays the masters out otherwise is one line, not a silent wrong average."""

import pytest
import torch
from deepspeed.utils import fragment_address, get_hp_fragment_mapping

from finetune.errors import FinetuneError
from finetune.training import master_weights
from finetune.training.ema import MasterWeightAverage, WeightAverage, weight_average

REFUSAL = r"^train.ema_decay: DeepSpeed \S+ keeps the fp32 master weights otherwise than finetune reads each process's slice of them \(%s.*\); .*pip install deepspeed==0.19.8\), or set train.ema_decay: null$"


@pytest.fixture
def zero2(monkeypatch):
    """Two bf16 parameters, a (2, 3) and a (4,), flat one after the other; this process's partition holds values 3 to 8
    of that flat group (the second half of the first, most of the second), its masters 100 above the copies. The whole
    masters are what DeepSpeed's gather (safe_get_full_fp32_param, here without other processes) gives."""
    copies = {"unet.a": torch.arange(6.0).reshape(2, 3), "unet.b": torch.arange(6.0, 10.0)}
    whole = {name: value + 100 for name, value in copies.items()}
    partition = torch.cat([whole["unet.a"].flatten()[3:], whole["unet.b"][:3]])  # the optimizer's flat fp32 slice
    parameters, offset = {}, 0
    for name, value in copies.items():
        parameters[name] = torch.nn.Parameter(value.bfloat16())
        parameters[name]._hp_mapping = get_hp_fragment_mapping(parameters[name], offset, partition, {}, {}, False, 0, 3, 6)
        offset += value.numel()
    gathered = {id(p): whole[name] for name, p in parameters.items()}
    monkeypatch.setattr(master_weights, "whole_master", lambda p: gathered[id(p)])
    return parameters


def test_deepspeeds_layout_passes_and_the_average_is_of_the_masters(zero2):
    average = weight_average(zero2, decay=0.5)
    assert isinstance(average, MasterWeightAverage)
    assert average.averages["unet.a"].tolist() == [103, 104, 105] and average.averages["unet.b"].tolist() == [106, 107, 108]


def test_a_fragment_address_counted_otherwise_is_refused(zero2):
    """As if DeepSpeed counted lp_fragment_address from the partition's start: the slice is another part of the weight."""
    fragment = zero2["unet.a"]._hp_mapping
    fragment.lp_fragment_address = fragment_address(start=0, numel=3)
    with pytest.raises(FinetuneError, match=REFUSAL % r"unet.a: its slice holds other values than that part of DeepSpeed's safe_get_full_fp32_param"):
        weight_average(zero2, decay=0.5)


def test_a_fragment_that_is_a_copy_of_the_masters_is_refused(zero2):
    """The average writes its values into the masters to sample and save: into a copy, they would never arrive."""
    fragment = zero2["unet.b"]._hp_mapping
    fragment.get_hp_fragment = lambda optim_state_key=None: fragment.hp_fragment.clone()  # the same values, elsewhere
    with pytest.raises(FinetuneError, match=REFUSAL % r"unet.b: each read of its slice is a new copy, not the masters the optimizer steps"):
        weight_average(zero2, decay=0.5)


def test_a_mapping_of_another_kind_is_refused(zero2):
    zero2["unet.a"]._hp_mapping = object()  # no get_hp_fragment, no lp_fragment_address
    with pytest.raises(FinetuneError, match=REFUSAL % r"unet.a: reading its slice raised AttributeError"):
        weight_average(zero2, decay=0.5)


def test_half_precision_weights_whose_masters_are_not_found_are_refused(zero2):
    """As if DeepSpeed renamed `_hp_mapping`: the average would be of the engine's bf16 copies, which round updates away."""
    for parameter in zero2.values():
        del parameter._hp_mapping
    with pytest.raises(FinetuneError, match=REFUSAL % r"unet.a: a torch.bfloat16 copy, and no fp32 master where finetune looks for one"):
        weight_average(zero2, decay=0.5)
    # Weights that train in fp32 are what the optimizer steps (no DeepSpeed, or its ZeRO-0): their own average.
    assert type(weight_average({name: torch.nn.Parameter(p.float()) for name, p in zero2.items()}, decay=0.5)) is WeightAverage


def test_one_parameter_without_a_mapping_among_others_is_refused(zero2):
    del zero2["unet.b"]._hp_mapping
    with pytest.raises(FinetuneError, match=REFUSAL % r"unet.b: no fp32 master where finetune looks for one"):
        weight_average(zero2, decay=0.5)
