"""What a run under DeepSpeed refuses, said before anything loads (the data check, the base model: seconds to minutes).

Everything these checks read is known at the start: the recipe, the models its method will train (by name, from the
recipe), accelerate's DeepSpeed settings (its plugin reads them from the launch's environment, as `Accelerator()` does
later) and a resumed checkpoint's files. `finetune.distributed.processes.configure_deepspeed` only fills in the config after them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

from finetune.checkpoints.resume_checks import check_same_engine
from finetune.checkpoints.run_files import read_state
from finetune.config import Recipe
from finetune.distributed.launch_options import check_processes_started, launch_config, launch_options, launcher_command_line
from finetune.distributed.process_env import launched_processes
from finetune.distributed.processes import config_stage, deepspeed_requested
from finetune.errors import FinetuneError


def launch_deepspeed_config() -> dict | None:
    """The DeepSpeed config this launch gives the run, as `Accelerator()` will read it; None when launched without DeepSpeed."""
    if not deepspeed_requested():
        return None
    require_deepspeed_installed()
    require_config_file(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none"))
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin().deepspeed_config


def require_deepspeed_installed() -> None:
    """A DeepSpeed launch where the deepspeed package is missing (pyproject.toml installs it on Linux alone): `Accelerator()`
    raised accelerate's ImportError with its traceback, once the data check had decoded every image."""
    if importlib.util.find_spec("deepspeed") is not None:
        return
    fix = ('pip install "deepspeed>=0.16"' if sys.platform.startswith("linux") else
           f"DeepSpeed is installed with finetune on Linux only, not on {PLATFORM_NAMES.get(sys.platform, sys.platform)}")
    raise FinetuneError(
        f"this launch runs under DeepSpeed (accelerate's distributed_type DEEPSPEED, as accelerate_config.yaml sets it), which is "
        f"not installed: {fix}; or launch without DeepSpeed (accelerate launch --multi_gpu --num_processes N, or finetune train alone)"
    )


PLATFORM_NAMES = {"darwin": "macOS", "win32": "Windows"}


def require_config_file(path: str) -> None:
    """The launch's deepspeed_config_file, there from the current folder: accelerate_config.yaml names
    configs/deepspeed/zero2.json relative to the repository's root, and launched from another folder accelerate's plugin
    failed on it in every process with three chained tracebacks ("Expected a string path to an existing deepspeed config")."""
    if path == "none" or path.lstrip().startswith("{") or Path(path).is_file():  # none: accelerate builds one; {: JSON itself
        return
    options = launch_options(launcher_command_line())
    if options is not None and options.deepspeed_config_file:  # the launcher's own option, over its config file's
        config_file, named = None, " (accelerate launch --deepspeed_config_file)"
    else:
        config_file = options.config_file if options is not None else None
        named = f" (deepspeed_config_file of {config_file})" if config_file else ""
    beside = Path(config_file).parent / path if config_file and not Path(path).is_absolute() else None
    fix = (f"launch from {Path(config_file).parent.resolve()}, where it is, or give deepspeed_config_file as {beside.resolve()}"
           if beside is not None and beside.is_file() else "give its path from the current folder, or launch from the folder it is relative to")
    raise FinetuneError(f"DeepSpeed config {path}{named} not found (relative paths are read from the current folder, {os.getcwd()}): {fix}")


def check_deepspeed_launch(recipe: Recipe, trained_models: list[str], resume_from: Path | None) -> None:
    """Refuse what this launch's DeepSpeed cannot do with `recipe` (whose method trains `trained_models`), and a resume
    from a checkpoint another engine, ZeRO stage or number of processes wrote (checked with or without DeepSpeed). Under
    DeepSpeed, its "untested optimizer" line is left out for the optimizers tested under ZeRO here. A launch that asked
    for several processes and started one is refused first (finetune.distributed.launch_options)."""
    check_processes_started(launched_processes())
    config = launch_deepspeed_config()
    if resume_from is not None:
        stage = config_stage(config) if config is not None else None
        check_same_engine(resume_from, read_state(resume_from).get("processes"), stage, launched_processes())
    if config is not None:
        check_no_compile_asked()
        check_deepspeed_recipe(recipe, trained_models, config)
        check_recipe_settings_agree(recipe, launched_processes())
        quiet_untested_optimizer_line(recipe.optimizer.name)


def check_no_compile_asked() -> None:
    """Under DeepSpeed: refuse `accelerate launch --dynamo_backend X` (or its config file's dynamo_config), which accelerate's
    DeepSpeed launcher (1.15) does not hand to the processes, unlike its DDP one: the run trained uncompiled without a word."""
    if os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower() != "no":
        return  # set in the environment itself: accelerate compiles DeepSpeed's model (its engine.compile)
    asked = launcher_compile_backend(launcher_command_line())
    if asked is not None:
        backend, source = asked
        raise FinetuneError(
            f"{source}: accelerate launch does not pass torch.compile's backend ({backend}) on to the processes under DeepSpeed "
            f"(only under DDP or in one process), so this run would train uncompiled: leave it out to train under DeepSpeed, or "
            f"launch without DeepSpeed (--multi_gpu) to compile"
        )


def launcher_compile_backend(command_line: list[str]) -> tuple[str, str] | None:
    """(the backend, where it was asked: --dynamo_backend, or the config file's dynamo_config) that an `accelerate launch`
    command line asks to compile with; None where it asks none, or is no such command line. Read as the launcher reads
    it: its own parser, then its config file (--config_file, else accelerate's default one) where the option is not given."""
    options = launch_options(command_line)
    if options is None:
        return None
    if options.dynamo_backend is not None:
        return (options.dynamo_backend, f"--dynamo_backend {options.dynamo_backend}") if options.dynamo_backend.lower() != "no" else None
    config, config_file = launch_config(options)
    dynamo = config.get("dynamo_config")
    backend = dynamo.get("dynamo_backend") if isinstance(dynamo, dict) else None
    return (str(backend), f"{config_file}'s dynamo_config (dynamo_backend: {backend})") if backend and str(backend).lower() != "no" else None


# DeepSpeed logs "You are using ZeRO with an untested optimizer, proceed with caution" for every optimizer outside its own
# list (torch's Adam and AdamW, its fused and CPU ones), whatever its config says: zero_allow_untested_optimizer, which
# accelerate sets for every optimizer it is handed, only lets the run start. The 8-bit optimizers are tested under ZeRO
# here (adamw8bit: its 8-bit states in the checkpoint and a resume, tests/test_recipes_in_processes.py; paged_adamw8bit
# and lion8bit are the same blockwise 8-bit code of bitsandbytes), and so is Prodigy: it finds its step size from sums
# over the weights it is given, which under ZeRO are summed over every process's shard (finetune.optim.sharded_prodigy), so
# each process finds the step size of one process with the same global batch, and a resume goes on with it
# (tests/test_deepspeed_prodigy.py).
ZERO_TESTED_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit", "lion8bit", "prodigy")
UNTESTED_OPTIMIZER_LINE = "You are using ZeRO with an untested optimizer"


def _not_the_untested_optimizer_line(record: logging.LogRecord) -> bool:
    return UNTESTED_OPTIMIZER_LINE not in record.getMessage()


def quiet_untested_optimizer_line(optimizer_name: str) -> None:
    """DeepSpeed's "untested optimizer" line left out for optimizer.name `optimizer_name` where it is one of
    ZERO_TESTED_OPTIMIZERS, said for any other (a process may run several trainings); its other lines are kept."""
    logger = logging.getLogger("DeepSpeed")  # the logger DeepSpeed creates on import (the same object before it)
    if optimizer_name in ZERO_TESTED_OPTIMIZERS:
        logger.addFilter(_not_the_untested_optimizer_line)  # once: a filter already there is not added again
    else:
        logger.removeFilter(_not_the_untested_optimizer_line)


def check_deepspeed_recipe(recipe: Recipe, trained_models: list[str], config: dict) -> None:
    """The recipe's settings DeepSpeed (its `config`) cannot train, each in one line."""
    if len(trained_models) != 1:
        # DeepSpeed wraps exactly one trained module in its engine. The switch of the second model: lora, full and
        # dreambooth each have their text encoder's; ControlNet trains the UNet's decoder beside it with unlock_unet_decoder.
        switch = "controlnet.unlock_unet_decoder" if recipe.method == "controlnet" else f"{recipe.method}.train_text_encoder"
        raise FinetuneError(
            f"DeepSpeed trains one model per run, this recipe trains {len(trained_models)} ({', '.join(trained_models)}): "
            f"set {switch} to false, or launch without DeepSpeed"
        )
    if recipe.lora.max_norm is not None:
        raise FinetuneError(
            "lora.max_norm with DeepSpeed: it rescales the LoRA weights after each step, and DeepSpeed's engine keeps its own "
            "copy of them (its fp32 master weights): launch without DeepSpeed, or set lora.max_norm: null"
        )
    if recipe.optimizer.name == "adafactor":
        # ZeRO hands the optimizer each process's shard of the weights as one flat tensor (measured: ZeRO-2 moved a LoRA
        # half of its update away from one process's).
        raise FinetuneError(
            "optimizer.name adafactor with DeepSpeed: ZeRO gives the optimizer its shard of the weights as one flat tensor, so "
            "Adafactor can neither factor its second moments by each weight's rows and columns nor clip each weight's update on "
            "its own, and trains another model than one process does: use adamw or an 8-bit optimizer, or launch without DeepSpeed"
        )
    offloaded = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if offloaded and recipe.optimizer.name != "adamw":
        raise FinetuneError(
            f"optimizer.name {recipe.optimizer.name} with DeepSpeed optimizer offload: offload runs DeepSpeed's own CPU Adam; "
            "set optimizer.name: adamw or use a config without offload_optimizer"
        )


def recipe_settings(recipe: Recipe, processes: int) -> dict[str, tuple[object, str]]:
    """What the recipe makes each DeepSpeed setting it decides (`finetune.distributed.processes.configure_deepspeed` fills them in, accelerate the
    precision), with the recipe keys that decide it."""
    train = recipe.train
    return {
        "train_micro_batch_size_per_gpu": (train.batch_size, "train.batch_size"),
        "gradient_accumulation_steps": (train.gradient_accumulation_steps, "train.gradient_accumulation_steps"),
        "train_batch_size": (train.batch_size * train.gradient_accumulation_steps * processes,
                             f"train.batch_size x train.gradient_accumulation_steps x {processes} processes"),
        "gradient_clipping": (train.max_grad_norm or 0.0, "train.max_grad_norm"),
        "bf16.enabled": (train.mixed_precision == "bf16", "train.mixed_precision"),
        "fp16.enabled": (train.mixed_precision == "fp16", "train.mixed_precision"),
    }


def check_recipe_settings_agree(recipe: Recipe, processes: int) -> None:
    """Refuse a DeepSpeed config file that sets what the recipe decides (batch size, accumulation, clipping, precision)
    otherwise than the recipe: its batch, accumulation and clipping were replaced by the recipe's without a word, and its
    precision kept, so the engine held the model in bf16 (or fp32) while the recipe's frozen parts and autocast were in another."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path == "none":  # accelerate builds the config from its own settings: precision from the recipe, the rest filled in
        return
    try:
        written = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return  # accelerate's plugin read it already (launch_deepspeed_config), and says what is wrong with it
    for key, (value, decided_by) in recipe_settings(recipe, processes).items():
        *sections, name = key.split(".")
        node = written
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        given = node.get(name, "auto") if isinstance(node, dict) else "auto"
        if given == "auto" or _same(given, value):
            continue
        raise FinetuneError(
            f"DeepSpeed config {path}: {key} is {json.dumps(given)}, where {decided_by} makes it {json.dumps(value)}: the recipe decides it, "
            f'so set it to "auto" in that file (or change {decided_by.split(" ")[0]} to match)'
        )


def _same(given, value) -> bool:
    if isinstance(value, bool):
        return str(given).lower() == str(value).lower()  # DeepSpeed reads true, "true" and "True" alike
    return isinstance(given, (int, float)) and not isinstance(given, bool) and float(given) == float(value)
