"""A process of a run killed (SIGKILL, the out-of-memory killer): the others' next collective failed in gloo's traceback
("Connection closed by peer ... GLHF!"), which named neither the cause nor what to do. It is one line now."""

import os
import subprocess
import sys

from ports import free_port

# 2 processes of one machine run `finetune train`; process 0 is killed in its run, process 1's run meets it in a collective.
ONE_KILLED = r"""
import os, signal, sys, time
from types import SimpleNamespace
import torch, torch.distributed as dist
import finetune.cli as cli, finetune.native_resolution, finetune.recipe_loading, finetune.train_inputs
import finetune.distributed  # (accelerate: seconds) before the processes join, as the run's errors meet them after it

dist.init_process_group("gloo")
finetune.recipe_loading.load_recipe = lambda path, overrides: SimpleNamespace(output_dir=sys.argv[1], data=SimpleNamespace(resolution=512), model=SimpleNamespace(pretrained="", single_file_config=None))
finetune.train_inputs.check_inputs_exist = lambda recipe: None
finetune.native_resolution.far_from_native_line = lambda *a: None  # the fake recipe names no real base

def train(recipe, **options):
    if dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1)
    dist.all_reduce(torch.ones(4))  # a step's gradients

sys.modules["finetune.trainer"] = SimpleNamespace(train=train)  # (diffusers not imported: seconds)
sys.exit(cli.main(["train", "recipe.yaml"]))
"""


def test_the_process_left_when_another_is_killed_says_one_line(tmp_path):
    port = str(free_port())
    processes = [
        subprocess.Popen([sys.executable, "-c", ONE_KILLED, str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
            **os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0"})
        for rank in (0, 1)
    ]  # fmt: skip
    try:
        said = [process.communicate(timeout=600) for process in processes]  # a hang only
    finally:
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [-9, 2], said
    stderr = said[1][1]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert errors[0].startswith("error: another process of the run ended, or its machine went down (gloo: Connection closed by peer"), stderr
    assert errors[0].endswith(f"this one stops too: continue with --resume latest (the last checkpoint in {tmp_path / 'run' / 'checkpoints'} is kept)")
