"""The training DataLoader: the batch sampler's micro-batches, collated by `data.num_workers` worker processes,
at most one per CPU this process may run on."""

from __future__ import annotations

import os

import torch

from finetune.console import warn
from finetune.distributed.stopping import leave_stop_signals_to_the_trainer


def usable_cpus() -> int:
    """The CPUs this process may run on (taskset, a container's cpuset), as torch's DataLoader counts them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def data_workers(asked: int) -> int:
    """`data.num_workers`, capped at the CPUs this process may use, with a warning. Capped rather than refused:
    a recipe (and the recipe_as_run.yaml a run saves, which a resume reads) moves between machines, and a count right
    on a 32-core server would otherwise stop the same run on a laptop; workers past the CPUs only take turns on
    them, so the cap loses nothing. 1000000 set a million worker processes starting, without a word."""
    cpus = usable_cpus()
    if asked <= cpus:
        return asked
    warn(f"data.num_workers ({asked}) is more than the {cpus} CPUs this process may use: starting {cpus} data workers "
         f"(more would only take turns on them); set data.num_workers to at most {cpus} to silence this")  # fmt: skip
    return cpus


def training_loader(dataset, sampler, collate_fn, num_workers: int, seed: int) -> torch.utils.data.DataLoader:
    workers = data_workers(num_workers)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=workers,
        # Its own generator: creating the iterator must not draw from the (restored) global RNG.
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=leave_stop_signals_to_the_trainer if workers else None,
    )
