"""What the `accelerate launch` command line that started this process asked for, read from the process's parent: the
options accelerate does not hand on to the processes, checked before anything loads.

A launch asking for several processes that started one: `accelerate launch --num_processes 2` on a machine without
GPUs (or with fewer than asked) runs its one-process launcher unless given `--multi_gpu`, and the run trained on one
process, half the global batch asked, said only as "training on 1 process" (measured, accelerate 1.15)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from finetune.errors import FinetuneError


def launcher_command_line() -> list[str]:
    """The command line of this process's parent, which under `accelerate launch` (its standard launcher) is the launcher
    itself; empty where it cannot be read. psutil's, on every platform (/proc on Linux): read from /proc alone, it was []
    on macOS and Windows, so a launch there that asked for several processes and started one trained on, unsaid."""
    import psutil

    try:
        return psutil.Process(os.getppid()).cmdline()
    except psutil.Error:  # gone, or not this user's to read
        return []


def launch_options(command_line: list[str]) -> argparse.Namespace | None:
    """`accelerate launch`'s options as its own parser reads `command_line`; None where it is no such command line."""
    words = command_line
    start = next((i + 1 for i, word in enumerate(words) if word == "accelerate.commands.launch" or Path(word).name == "accelerate-launch" or (
        word == "launch" and i > 0 and Path(words[i - 1]).name == "accelerate")), None)  # fmt: skip
    if start is None:
        return None
    from accelerate.commands.launch import launch_command_parser

    try:
        options, _ = launch_command_parser().parse_known_args(words[start:])
    except SystemExit:  # not a command line the launcher took: it would have refused it itself
        return None
    return options


def launch_config(options: argparse.Namespace) -> tuple[dict, str]:
    """(the config file's settings, its path) the launcher read where an option is not given: --config_file, else
    accelerate's default one, which a --cpu launch does not read (accelerate 1.16's _validate_launch_command); ({}, path)
    where it is missing, unreadable or not read."""
    import yaml
    from accelerate.commands.config import default_config_file

    config_file = options.config_file or default_config_file
    if options.config_file is None and options.cpu:
        return {}, config_file
    try:
        config = yaml.safe_load(Path(config_file).read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}, config_file
    return (config if isinstance(config, dict) else {}), config_file


def processes_asked(command_line: list[str]) -> tuple[int, str] | None:
    """(the processes an `accelerate launch` command line asks for, where: --num_processes or its config file) where it
    asks for more than one; None otherwise, or where it is no such command line."""
    options = launch_options(command_line)
    if options is None:
        return None
    if options.num_processes is not None:
        asked, source = options.num_processes, f"--num_processes {options.num_processes}"
    else:
        config, config_file = launch_config(options)
        asked, source = config.get("num_processes"), f"{config_file}'s num_processes: {config.get('num_processes')}"
    return (asked, source) if isinstance(asked, int) and asked > 1 else None


def check_processes_started(processes: int) -> None:
    """Refuse a run of `processes` (1) that its `accelerate launch` asked to start on several."""
    command_line = launcher_command_line()
    if processes != 1 or (asked := processes_asked(command_line)) is None:
        return
    count, source = asked
    if launch_options(command_line).cpu:  # accelerate refuses --cpu with --multi_gpu: "only one of ... at a time"
        raise FinetuneError(
            f"accelerate launch --cpu starts one process, whatever {source} asks: to train on several, launch with --multi_gpu "
            f"--num_processes {count} in place of --cpu (on a machine without GPUs they train on its CPUs, over gloo), or with "
            f"--num_processes 1 for one"
        )
    raise FinetuneError(
        f"accelerate launch {source} started this run as 1 process: without that many GPUs accelerate starts several only with "
        f"--multi_gpu (on CPUs too, over gloo): launch with --multi_gpu --num_processes {count}, or --num_processes 1 for one"
    )


def check_launch_first() -> None:
    """`finetune train`'s refusals of how it was launched, made before its data check decodes every image (seconds to
    minutes): a launch that asked for several processes and started one, and a DeepSpeed config file that is not there.
    train() makes them again (finetune.distributed.deepspeed_checks), for callers that do not come through the command."""
    check_processes_started(int(os.environ.get("WORLD_SIZE", "1")))  # finetune.distributed.process_env.launched_processes, without torch
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":  # finetune.distributed.process_env.deepspeed_requested
        from finetune.distributed.deepspeed_checks import require_config_file

        require_config_file(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none"))
