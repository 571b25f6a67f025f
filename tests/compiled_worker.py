"""Run by `accelerate launch --dynamo_backend ...` in tests/test_compiled_processes.py: train each recipe, then write this rank's
dynamo counters (<output_dir>/compiles-rank<N>.json), trained weights (rank<N>.safetensors) and the weights they started from
(initial.safetensors). Not tests/distributed_worker.py:
its forward pre-hooks count calls in a closure that dynamo guards on, so each count compiled the UNet again."""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch._dynamo.utils import counters

from finetune.config.recipe_loading import load_recipe
from finetune.distributed.processes import leave_process_group
from finetune.methods import METHODS
import finetune.training.trainer as trainer

made = []


def trained_weights(method) -> dict:
    return {f"{name}.{key}": p.detach().cpu().clone().contiguous() for name, module in method.trained_modules().items()
            for key, p in module.named_parameters() if p.requires_grad}  # fmt: skip


def remembered(method_class):
    class Remembered(method_class):
        def setup(self, *args, **kwargs):
            super().setup(*args, **kwargs)
            made.append(self)
            self.initial_weights = trained_weights(self)  # before training

    return Remembered


def train_and_record(paths: list[str]) -> None:
    """Train each recipe and write what the module docstring says; also called in the test's own process (uncompiled)."""
    real_methods = dict(METHODS)
    METHODS.update({name: remembered(method_class) for name, method_class in real_methods.items()})
    rank = os.environ.get("RANK", "0")
    try:
        for path in paths:
            recipe = load_recipe(path)
            torch._dynamo.reset()
            counters.clear()
            trainer.train(recipe)
            out = Path(recipe.output_dir)
            (out / f"compiles-rank{rank}.json").write_text(json.dumps({key: dict(value) for key, value in counters.items()}, default=str))
            save_file(trained_weights(made[-1]), str(out / f"rank{rank}.safetensors"))
            if rank == "0":
                save_file(made[-1].initial_weights, str(out / "initial.safetensors"))
    finally:
        METHODS.update(real_methods)


if __name__ == "__main__":
    train_and_record(sys.argv[1:])
    leave_process_group()
