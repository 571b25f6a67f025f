"""Run by `accelerate launch` in tests/test_distributed.py: train each recipe in turn (one launch,
several runs: the process group stays), optionally resuming the first: `distributed_worker.py
RECIPE [RECIPE ...] [--resume PATH]`. After each run this rank's trained weights go to
<output_dir>/rank<N>.safetensors so the test can compare ranks, and the weights they started from
to <output_dir>/initial.safetensors (names: the trained module's, a dot, the parameter's)."""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

import finetune.trainer as trainer
from finetune.checkpoint import trainable_state_dict
from finetune.config import load_recipe
from finetune.distributed import leave_process_group

arguments = sys.argv[1:]
resume = None
if "--resume" in arguments:
    at = arguments.index("--resume")
    resume = arguments[at + 1]
    del arguments[at : at + 2]

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


trainer.METHODS = {name: remembered(method_class) for name, method_class in trainer.METHODS.items()}
for path in arguments:
    recipe = load_recipe(path)
    trainer.train(recipe, resume=resume)
    resume = None
    out, rank = Path(recipe.output_dir), int(os.environ.get("RANK", "0"))
    save_file(trained_weights(methods[-1]), str(out / f"rank{rank}.safetensors"))
    if rank == 0:
        save_file(methods[-1].initial_weights, str(out / "initial.safetensors"))
leave_process_group()
