"""Compiled training under DDP (`accelerate launch --multi_gpu --num_processes 2 --dynamo_backend ...`, CPU: gloo). With
aspect-ratio buckets a bucket's last global batch is split unevenly over the processes, so each process has shapes of its own
(still at most two a bucket, as `finetune.distributed.processes.ready_to_compile` counts them): each compiles each of its shapes once,
none past torch's recompile limit, and the processes end identical, with the weights of one uncompiled process of the same
global batch. dynamo's `eager` backend: its guards decide the compiles whichever backend compiles (aot_eager, measured, trains
the same weights as uncompiled DDP bit for bit; inductor takes minutes a graph here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ports import free_port
from safetensors.torch import load_file
from test_distributed import assert_same_update, assert_same_weights, write

from compiled_worker import train_and_record

WORKER = Path(__file__).parent / "compiled_worker.py"
REPO = Path(__file__).resolve().parent.parent
WIDE, TALL, SQUARE = (96, 48), (48, 96), (64, 64)


def bucketed_folder(root: Path) -> Path:
    """At batch 2 on 2 processes (a global batch of 4): 7 wide images, 4 + 3 (process 0 trains 2 and 2, process 1 2 and 1);
    5 tall, 4 + 1 (each process 2, then 1: process 1 borrows one); 2 square, 1 each. Process 0's shapes: 4, process 1's: 5."""
    root.mkdir()
    for i, (width, height) in enumerate([WIDE] * 7 + [TALL] * 5 + [SQUARE] * 2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text("a red striped circle")
    return root


@pytest.mark.slow  # ~5 minutes on 2 cores: dynamo traces the tiny UNet's forward and backward once a shape, on each process
def test_two_processes_compile_each_of_their_shapes_once_and_train_what_one_uncompiled_process_does(make_recipe, pairs_folder, tmp_path):
    bucketed = dict(data={"image_dir": str(bucketed_folder(tmp_path / "mixed")), "resolution": 64, "bucketing": {"enabled": True, "step": 16}},
                    train__max_steps=8, train__gradient_accumulation_steps=2)  # 16 micro-batches: 3.2 epochs of 5, every shape  # fmt: skip
    controlnet = dict(method="controlnet", data__image_dir=str(pairs_folder), train__max_steps=3, train__gradient_accumulation_steps=2)
    runs = {"lora": (bucketed, 2), "controlnet": (controlnet, 1)}
    paths = [write(make_recipe(output_dir=str(tmp_path / name), train__batch_size=batch, **extra), tmp_path / f"{name}.yaml")
             for name, (extra, batch) in runs.items()]  # fmt: skip
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "eager", "--main_process_port", str(free_port()), str(WORKER), *map(str, paths)]  # fmt: skip
    launched = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert launched.returncode == 0, launched.stderr[-3000:]

    singles = [write(make_recipe(output_dir=str(tmp_path / f"{name}-single"), train__batch_size=2 * batch, **extra), tmp_path / f"{name}-single.yaml")
               for name, (extra, batch) in runs.items()]  # fmt: skip
    train_and_record(list(map(str, singles)))  # uncompiled, in this process: the same global batches
    shapes = {"lora": [4, 5], "controlnet": [1, 1]}
    for name in runs:
        counted = [json.loads((tmp_path / name / f"compiles-rank{rank}.json").read_text()) for rank in (0, 1)]
        assert [c["stats"]["unique_graphs"] for c in counted] == shapes[name], counted
        # A frame past the recompile limit runs uncompiled (one more each): the lora runs' one is DDP's own generator (its
        # bookkeeping, never compiled; measured).
        assert [c["frames"]["total"] - c["frames"]["ok"] for c in counted] == [1 if name == "lora" else 0] * 2, counted
        rank0 = load_file(tmp_path / name / "rank0.safetensors")
        assert_same_weights(rank0, load_file(tmp_path / name / "rank1.safetensors"), exact=True)  # DDP keeps them in lockstep
        # As test_distributed compares them: ControlNet's near-zero gradients move some weights either way by Adam's step.
        assert_same_update(rank0, load_file(tmp_path / f"{name}-single" / "rank0.safetensors"), load_file(tmp_path / name / "initial.safetensors"))
