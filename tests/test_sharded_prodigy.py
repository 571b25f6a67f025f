"""Prodigy's step size over DeepSpeed ZeRO's shards (finetune.optim.sharded_prodigy): in one process it steps exactly as
prodigyopt's Prodigy does; over processes that each hold a shard of the weights, as ZeRO hands them out, every process
finds the step size of one process holding them all, where each shard's own estimate differs. The launched run under
ZeRO-2: tests/test_deepspeed_prodigy.py."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ports import free_port
from prodigy_shards import STEPS, descend, join_group, shard_of, step_a_shard, whole_start
from prodigyopt import Prodigy

from finetune.config import OptimizerConfig
from finetune.errors import FinetuneError
from finetune.optim.optimizers import build_optimizer
from finetune.optim.sharded_prodigy import ShardedProdigy


@pytest.fixture
def one_process_group():
    join_group(0, 1, free_port())
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("safeguard_warmup", [False, True])
@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_in_one_process_it_steps_exactly_as_prodigy_does(one_process_group, safeguard_warmup, beta1):
    """Two groups, weight decay, a weight of zeros (Prodigy's scalar start), no moment of the gradient (beta1 0)."""
    torch.manual_seed(0)
    start = [torch.randn(8, 4), torch.zeros(16), torch.randn(5)]
    runs = {}
    for name, optimizer_class in (("prodigy", Prodigy), ("sharded", ShardedProdigy)):
        weights = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = optimizer_class([{"params": weights[:2]}, {"params": weights[2:]}], lr=1.0, betas=(beta1, 0.999), weight_decay=0.01,
                                    use_bias_correction=True, safeguard_warmup=safeguard_warmup)  # fmt: skip
        runs[name] = weights, optimizer, descend(optimizer, [0.0] + [1.0] * STEPS)
    (prodigy_weights, prodigy, prodigy_groups), (weights, sharded, groups) = runs["prodigy"], runs["sharded"]
    assert groups == prodigy_groups and groups[-1][0]["d_hat"] > 0  # d, d_hat, d_max, d_numerator, k, ... after every step
    assert groups[-1][0]["d"] > 1e-6 or safeguard_warmup  # grown from d0 (the safeguard holds it there for these steps)
    assert all(torch.equal(a, b) for a, b in zip(weights, prodigy_weights))
    for a, b in zip(weights, prodigy_weights):
        mine, theirs = sharded.state[a], prodigy.state[b]
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[key], theirs[key]) if torch.is_tensor(mine[key]) else mine[key] == theirs[key] for key in mine)


def test_over_two_processes_each_shard_steps_at_the_step_size_of_one_process_holding_all(tmp_path):
    whole = torch.nn.Parameter(whole_start().clone())
    whole_d = [g[0]["d"] for g in descend(Prodigy([whole], lr=1.0, weight_decay=0.01, use_bias_correction=True), [1.0] * STEPS)]
    # Forked, not spawned: each spawned process imported torch afresh (about 5 CPU s) for a few small steps; the sums
    # over the processes are what this checks, not how the processes started.
    mp.start_processes(step_a_shard, args=(2, free_port(), ShardedProdigy, str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for rank in ranks:
        assert rank["d"] == pytest.approx(whole_d, rel=1e-6, abs=0)  # measured 6e-8 apart: float32 dot products of halves
    assert torch.allclose(torch.cat([rank["shard"] for rank in ranks]), whole.detach(), rtol=1e-6, atol=1e-7)
    # Each shard on its own finds another step size (what Prodigy did under ZeRO): the comparison above can tell.
    for rank in (0, 1):
        alone = torch.nn.Parameter(shard_of(rank, 2, whole_start()).clone())
        alone_d = descend(Prodigy([alone], lr=1.0, weight_decay=0.01, use_bias_correction=True), [1.0] * STEPS)[-1][0]["d"]
        assert alone_d != pytest.approx(whole_d[-1], rel=1e-2)


def test_only_a_sharded_optimizer_sums_over_the_processes():
    """DDP (or one process) keeps prodigyopt's own Prodigy: each process holds every weight, gradients already averaged."""
    weight = torch.nn.Parameter(torch.zeros(4))
    config = OptimizerConfig(name="prodigy", lr=1.0)
    assert type(build_optimizer(config, [weight])) is Prodigy
    assert type(build_optimizer(config, [weight], sharded=True)) is ShardedProdigy


def test_weights_stepped_in_parts_are_one_line(one_process_group):
    """As ZeRO-3 steps each sub-group of a process's shard in turn (a model over sub_group_size weights per process)."""
    first, second = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    first.grad, second.grad = torch.ones(4), torch.ones(4)
    optimizer = ShardedProdigy([first], lr=1.0)
    optimizer.step()  # the first part
    optimizer.param_groups[0]["params"] = [second]  # the next one
    with pytest.raises(FinetuneError, match=r"^optimizer.name prodigy: DeepSpeed steps this model's weights in parts .*set sub_group_size in the DeepSpeed config"):
        optimizer.step()
