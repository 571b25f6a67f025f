"""Run by `accelerate launch` in tests/test_distributed.py: train each recipe in turn (one launch,
several runs: the process group stays), each optionally resumed from a checkpoint (also one that an
earlier run of the same launch wrote):

    distributed_worker.py [--resume CHECKPOINT] [--interrupt RANK:STEP] RECIPE [[--resume CHECKPOINT] RECIPE ...]

--interrupt: process RANK sends itself SIGINT (a Ctrl-C that reached it alone) after STEP's optimizer step.

After each run this rank's trained weights go to <output_dir>/rank<N>.safetensors so the test can
compare ranks, and the weights they started from to <output_dir>/initial.safetensors (names: the
trained module's, a dot, the parameter's)."""

import os
import signal
import sys
from pathlib import Path

from safetensors.torch import save_file

import finetune.trainer as trainer
from finetune.checkpoint import trainable_state_dict
from finetune.distributed import leave_process_group
from finetune.methods import METHODS
from finetune.recipe_loading import load_recipe

methods = []  # each run's method: it knows which modules trained (the UNet's LoRA, the ControlNet, ...)


def trained_weights(method) -> dict:
    return {f"{name}.{key}": value for name, module in method.trained_modules().items() for key, value in trainable_state_dict(module).items()}


def remembered(method_class):
    class Remembered(method_class):
        def setup(self, *args, **kwargs):
            super().setup(*args, **kwargs)
            methods.append(self)
            self.initial_weights = {key: value.clone() for key, value in trained_weights(self).items()}  # before training or sharding

    return Remembered


def interrupt(at: str | None = None):
    """train's on_step for --interrupt RANK:STEP (None: no interruption)."""
    rank, step = map(int, at.split(":")) if at else (None, None)
    if rank != int(os.environ.get("RANK", "0")):
        return None
    return lambda done: os.kill(os.getpid(), signal.SIGINT) if done == step else None


def train_and_record(runs: list[tuple]) -> None:
    """Train each (recipe path, checkpoint to resume from or None[, --interrupt's RANK:STEP]) and write the rank's
    weights beside its outputs. Also called in the test's own process, for the single-process runs compared with a launch."""
    real_methods = dict(METHODS)
    METHODS.update({name: remembered(method_class) for name, method_class in real_methods.items()})  # in place: every importer sees them
    try:
        for path, resume, *interrupted in runs:
            recipe = load_recipe(path)
            trainer.train(recipe, resume=resume, on_step=interrupt(*interrupted))
            out, rank = Path(recipe.output_dir), int(os.environ.get("RANK", "0"))
            save_file(trained_weights(methods[-1]), str(out / f"rank{rank}.safetensors"))
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
        else:
            runs.append((argument, options.pop("--resume", None), options.pop("--interrupt", None)))
    train_and_record(runs)
    leave_process_group()
