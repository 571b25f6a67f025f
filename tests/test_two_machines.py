"""DreamBooth (a LoRA) and ControlNet on two "machines" of one process each, over loopback (DDP across machines,
as tests/test_distributed.py runs a LoRA): each trains 3 steps, and again from its checkpoint-2 to the uninterrupted
run's weights (bit for bit on the CPU), with the settings tests/test_recipes_in_processes.py gives them on one machine (cached encoders and
gradient checkpointing included). One launch per machine, all four runs in each."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import build_recipe
from ports import free_port
from test_distributed import RESUME_IS_EXACT, assert_same_weights, launch, wait, write
from test_recipes_in_processes import DDP, outputs, settings

from finetune.toyworld.datasets import write_folder

NAMES = ("dreambooth-lora", "controlnet")


@pytest.mark.slow  # two launches side by side, four short runs in each: 41 s on 2 cores as measured
def test_dreambooth_and_controlnet_on_two_machines_resume_to_the_uninterrupted_weights(tiny_model, image_folder, pairs_folder, tmp_path):
    folders = write_folder(tmp_path / "star", 2, seed=11), write_folder(tmp_path / "class", 2, seed=1, metadata=False)
    overrides = settings(pairs_folder, folders, DDP, tmp_path / "cache")
    arguments = []
    for name in NAMES:
        for run in (name, f"{name}-resumed"):
            if run.endswith("-resumed"):
                arguments += ["--resume", tmp_path / name / "checkpoints" / "checkpoint-2"]
            arguments.append(write(build_recipe(tiny_model, image_folder, tmp_path / run, train__batch_size=1, **overrides[name]), tmp_path / f"{run}.yaml"))
    common = ["--num_processes", "2", "--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    machines = [launch([*common, "--machine_rank", str(rank)], *arguments) for rank in (0, 1)]
    for machine in machines:
        wait(machine)
    for name in NAMES:
        out: Path = tmp_path / name
        # DDP keeps the two machines' processes in lockstep.
        assert_same_weights(load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors"), exact=True)
        uninterrupted = outputs(out)
        trained = [t for key, t in uninterrupted.items() if "lora.up" in key or key.startswith("controlnet_mid_block")]  # zero at the start
        assert trained and any(t.any() for t in trained), name
        assert_same_weights(outputs(tmp_path / f"{name}-resumed"), uninterrupted, exact=RESUME_IS_EXACT)  # bit for bit on the CPU, as on one machine
