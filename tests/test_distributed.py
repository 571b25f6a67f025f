"""Several processes on CPU (gloo): DDP on one machine, and two "machines" on loopback."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.methods.lora import LORA_WEIGHTS_NAME
from finetune.trainer import train

WORKER = Path(__file__).parent / "distributed_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], recipe_path: Path, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    # --multi_gpu picks the torchrun launcher; with no GPU there, accelerate runs the processes on CPU with gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
               *args, str(WORKER), str(recipe_path)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def write(recipe, path: Path) -> Path:
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    return path


def assert_same_weights(a: dict, b: dict, exact: bool) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-4), (key, (a[key] - b[key]).abs().max())


def wait(process: subprocess.Popen) -> None:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]


@pytest.fixture
def distributed_recipes(make_recipe, tmp_path):
    common = dict(train__max_steps=3, train__gradient_accumulation_steps=2, data__random_flip=True)
    two_processes = make_recipe(output_dir=str(tmp_path / "ddp"), train__batch_size=1, **common)
    one_process = make_recipe(output_dir=str(tmp_path / "single"), train__batch_size=2, **common)
    return two_processes, one_process


def test_ddp_two_processes_match_each_other_and_one_process_with_the_same_global_batch(distributed_recipes, tmp_path):
    two_processes, one_process = distributed_recipes
    wait(launch(["--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port())], write(two_processes, tmp_path / "ddp.yaml")))
    out = Path(two_processes.output_dir)
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert_same_weights(rank0, rank1, exact=True)  # DDP keeps the ranks in lockstep

    train(one_process)
    ddp_file = load_file(out / LORA_WEIGHTS_NAME)
    single_file = load_file(Path(one_process.output_dir) / LORA_WEIGHTS_NAME)
    # Same global batch of the same images with the same noise: equal up to the order of float sums.
    assert_same_weights(ddp_file, single_file, exact=False)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in ddp_file.items() if "lora.up" in k)


def test_two_machines_of_one_process_each_on_loopback(distributed_recipes, tmp_path):
    two_processes, _ = distributed_recipes
    path = write(two_processes, tmp_path / "machines.yaml")
    port = str(free_port())
    common = ["--num_processes", "2", "--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port]
    machines = [launch([*common, "--machine_rank", str(rank)], path) for rank in (0, 1)]
    for machine in machines:
        wait(machine)
    out = Path(two_processes.output_dir)
    assert_same_weights(load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors"), exact=True)
    assert (out / LORA_WEIGHTS_NAME).is_file()
