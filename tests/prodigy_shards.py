"""What each process of tests/test_sharded_prodigy.py runs (forked from the test's): a shard of the weights stepped as
ZeRO steps it. Its own module, importing no more than the optimizer needs."""

import torch
import torch.distributed as dist

STEPS = 6


def join_group(rank: int, world_size: int, port: int) -> None:
    """A gloo group over loopback (by its address, not the environment, which the tests after these read)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)


def loss_gradient(weights: torch.Tensor, step: int) -> torch.Tensor:
    """A gradient that changes with the step, element by element (a shard computes its own part of the whole's)."""
    return weights.detach() * (1 + 0.1 * step) - 0.5


def descend(optimizer: torch.optim.Optimizer, learning_rates: list[float]) -> list[dict]:
    """`optimizer` stepped once per learning rate (0 first: a warm-up's start); each step's group settings after it."""
    after = []
    for step, lr in enumerate(learning_rates):
        for group in optimizer.param_groups:
            group["lr"] = lr
            for p in group["params"]:
                p.grad = loss_gradient(p, step)
        optimizer.step()
        after.append([{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups])
    return after


def shard_of(rank: int, world_size: int, full: torch.Tensor) -> torch.Tensor:
    return full.flatten().chunk(world_size)[rank]


def step_a_shard(rank: int, world_size: int, port: int, optimizer_class: type, out: str) -> None:
    """One process of `world_size`: steps its shard of the whole weights as ZeRO does, and saves it with its d."""
    join_group(rank, world_size, port)
    try:
        shard = torch.nn.Parameter(shard_of(rank, world_size, whole_start()).clone())
        optimizer = optimizer_class([shard], lr=1.0, weight_decay=0.01, use_bias_correction=True)
        groups = descend(optimizer, [1.0] * STEPS)
        torch.save({"shard": shard.detach(), "d": [g[0]["d"] for g in groups]}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def whole_start() -> torch.Tensor:
    """Shards as unlike as a model's parts: one half small weights, the other large ones."""
    generator = torch.Generator().manual_seed(1)
    return torch.cat([0.01 * torch.randn(96, generator=generator), torch.randn(32, generator=generator)])
