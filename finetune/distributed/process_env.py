"""What `accelerate launch` (torchrun) tells each process through its environment, read without importing
torch: the recipe's warnings and the command's errors are said before torch loads (see `finetune.cli.main`)."""

from __future__ import annotations

import os


def launched_processes() -> int:
    """The processes of this launch (torchrun's WORLD_SIZE; 1 without a launcher), as accelerate will count them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def several_processes() -> bool:
    return launched_processes() > 1


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def main_process() -> bool:
    """Whether this process says the run's lines, once for all its processes and machines: rank 0 under a
    launcher, or the only process (`accelerator.is_main_process`, known before accelerate starts)."""
    return os.environ.get("RANK", "0") == "0"


def first_on_its_machine() -> bool:
    """Whether this process says the lines said once per machine (errors, a machine's own state, progress of
    per-machine work): local rank 0 under a launcher, or the only process. Every process of a launch checks
    the same recipe and files, so the others would repeat it."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def machine_name() -> str | None:
    """'machine N' where the launch spans several machines, so a line about one machine's state says which; None on one
    machine."""
    return f"machine {machine_number()}" if machine_count() > 1 else None


def machine_number() -> str:
    """This machine's number in the launch: torchrun's GROUP_RANK (accelerate's --machine_rank), or CROSS_RANK where
    DeepSpeed's own launcher started the processes (accelerate launch --use_deepspeed on several machines: its default
    --deepspeed_multinode_launcher pdsh), which sets neither of torchrun's names; 0 without a launcher."""
    return os.environ.get("GROUP_RANK", os.environ.get("CROSS_RANK", "0"))


def machine_count() -> int:
    """The machines of the launch: its processes over each machine's (torchrun's LOCAL_WORLD_SIZE, DeepSpeed's launcher's
    LOCAL_SIZE; accelerate launch gives every machine as many)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")) // (processes_on_this_machine() or 1))


def processes_on_this_machine() -> int | None:
    """The launch's processes on this machine: torchrun's LOCAL_WORLD_SIZE, or LOCAL_SIZE where DeepSpeed's own launcher
    started them (see machine_number); None where the launcher says neither (1 without a launcher is the caller's to
    assume: MPI or Slurm may have started several)."""
    told = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE"))
    return int(told) if told is not None else None
