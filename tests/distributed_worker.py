"""Run by `accelerate launch` in tests/test_distributed.py: train each recipe in turn (one launch,
several runs: the process group stays), each optionally resumed from a checkpoint (also one that an
earlier run of the same launch wrote):

    distributed_worker.py [--resume CHECKPOINT] [--interrupt RANK:STEP] [--weights] [--forwards] RECIPE [[--resume CHECKPOINT] RECIPE ...]

--interrupt: process RANK sends itself SIGINT (a Ctrl-C that reached it alone) after STEP's optimizer step.
--weights (DeepSpeed): after each optimizer step N the trained weights' fp32 masters go to <output_dir>/masters-N.safetensors,
and at each validation of step N the engine's copies of them that it samples with to sampled-N.safetensors (names as below).
--forwards: after the run, how many times each of the UNet's blocks that gradient checkpointing wraps (its ResnetBlock2D
and BasicTransformerBlock modules) and its conv_in (which it never wraps) were called, in <output_dir>/forwards-rank<N>.json.

After each run this rank's trained weights go to <output_dir>/rank<N>.safetensors so the test can
compare ranks, and the weights they started from to <output_dir>/initial.safetensors (names: the
trained module's, a dot, the parameter's)."""

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from safetensors.torch import save_file

from finetune.config.recipe_loading import load_recipe
from finetune.distributed.processes import leave_process_group
from finetune.methods import METHODS
import finetune.training.trainer as trainer
import finetune.training.training_run as training_run

methods = []  # each run's method: it knows which modules trained (the UNet's LoRA, the ControlNet, ...)


def trained_parameters(method) -> dict:
    return {f"{name}.{key}": p for name, module in method.trained_modules().items() for key, p in module.named_parameters() if p.requires_grad}


def trained_weights(method) -> dict:
    return {name: p.detach().cpu().contiguous() for name, p in trained_parameters(method).items()}


COUNTED_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock")  # what diffusers' UNet checkpoints, block by block


def count_calls(unet) -> dict[str, int]:
    """Calls of the UNet's checkpointed blocks and of its conv_in, by module name, counted as they happen. Pre-hooks:
    torch's checkpoint stops a recomputation once it has the tensors backward needs, before a block's forward returns."""
    counts = {}
    for name, module in unet.named_modules():
        if type(module).__name__ in COUNTED_BLOCKS or name == "conv_in":
            counts[name] = 0
            module.register_forward_pre_hook(lambda module, args, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


def remembered(method_class):
    class Remembered(method_class):
        def setup(self, *args, **kwargs):
            super().setup(*args, **kwargs)
            methods.append(self)
            self.initial_weights = {key: value.clone() for key, value in trained_weights(self).items()}  # before training or sharding
            self.calls = count_calls(self.base.unet)

    return Remembered


def interrupt(at: str | None = None):
    """train's on_step for --interrupt RANK:STEP (None: no interruption)."""
    rank, step = map(int, at.split(":")) if at else (None, None)
    if rank != int(os.environ.get("RANK", "0")):
        return None
    return lambda done: os.kill(os.getpid(), signal.SIGINT) if done == step else None


def save_by_rank_0(tensors: dict, path: Path) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        save_file(tensors, str(path))


def record_masters(out: Path):
    """train's on_step for --weights. safe_get_full_fp32_param gathers: every rank calls it, in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param

    return lambda done: save_by_rank_0({name: safe_get_full_fp32_param(p).cpu() for name, p in trained_parameters(methods[-1]).items()},
                                       out / f"masters-{done}.safetensors")  # fmt: skip


@contextlib.contextmanager
def sampled_weights_recorded(out: Path):
    """For --weights: training_run.run_validation (called by every rank) first records the engine's copies, gathered whole."""
    import deepspeed

    run_validation = training_run.run_validation

    def recording(recipe, method, modules, accelerator, step):
        sharded = [p for p in trained_parameters(method).values() if hasattr(p, "ds_id")]  # ZeRO-3
        with deepspeed.zero.GatheredParameters(sharded) if sharded else contextlib.nullcontext():
            save_by_rank_0(trained_weights(method), out / f"sampled-{step}.safetensors")
        return run_validation(recipe, method, modules, accelerator, step)

    training_run.run_validation = recording
    try:
        yield
    finally:
        training_run.run_validation = run_validation


def train_and_record(runs: list[tuple]) -> None:
    """Train each (recipe path, checkpoint to resume from or None[, --interrupt's RANK:STEP or None[, --weights[, --forwards]]]) and write
    the rank's weights beside its outputs. Also called in the test's own process, for the single-process runs compared with a launch."""
    real_methods = dict(METHODS)
    METHODS.update({name: remembered(method_class) for name, method_class in real_methods.items()})  # in place: every importer sees them
    try:
        for path, resume, *options in runs:
            recipe = load_recipe(path)
            out, rank = Path(recipe.output_dir), int(os.environ.get("RANK", "0"))
            interrupted, weights, forwards = (*options, *(None, False, False)[len(options) :])
            calls = [call for call in (record_masters(out) if weights else None, interrupt(interrupted)) if call is not None]

            def on_step(done: int) -> None:
                for call in calls:
                    call(done)

            with sampled_weights_recorded(out) if weights else contextlib.nullcontext():
                trainer.train(recipe, resume=resume, on_step=on_step)
            save_file(trained_weights(methods[-1]), str(out / f"rank{rank}.safetensors"))
            if forwards:
                (out / f"forwards-rank{rank}.json").write_text(json.dumps(methods[-1].calls))
            if rank == 0:
                save_file(methods[-1].initial_weights, str(out / "initial.safetensors"))
    finally:
        METHODS.update(real_methods)


if __name__ == "__main__":
    runs, options = [], {}
    arguments = iter(sys.argv[1:])
    for argument in arguments:
        if argument in ("--resume", "--interrupt"):
            options[argument] = next(arguments)
        elif argument in ("--weights", "--forwards"):
            options[argument] = True
        else:
            runs.append((argument, options.pop("--resume", None), options.pop("--interrupt", None), options.pop("--weights", False),
                         options.pop("--forwards", False)))  # fmt: skip
    try:
        train_and_record(runs)
    finally:  # a failed run's process leaves the group too, as a finished one does
        leave_process_group()
