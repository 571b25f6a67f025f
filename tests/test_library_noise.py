"""Library lines a DeepSpeed launch on CPUs printed from every process, which the user can do nothing about."""

from __future__ import annotations

import os
import subprocess
import sys

# One interpreter, as a launched process is: torch's deprecated collectives as DeepSpeed's ZeRO calls them, and the
# shared-memory op DeepSpeed builds (and announces with a print) as the processes join in `Accelerator()`.
SCRIPT = """
import importlib, os
import torch, torch.distributed as dist
from finetune.library_noise import quiet_deepspeed_shm_build, quiet_third_party_warnings

quiet_third_party_warnings()
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
dist.all_gather_into_tensor(torch.zeros(1), torch.zeros(1))
dist.reduce_scatter_tensor(torch.zeros(1), torch.zeros(1))
dist.destroy_process_group()
os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
comm_torch = importlib.import_module("deepspeed.comm.torch")
build = comm_torch.build_shm_op
with quiet_deepspeed_shm_build():
    built = comm_torch.build_shm_op()
assert comm_torch.build_shm_op is build
print("op built:", built is not None)
"""


def test_deepspeed_launch_lines_no_user_can_act_on_are_quiet():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)  # a hang only: it may build the op
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "op built: True"  # the op was built here: its line had the chance to print
    for noise in ("is deprecated", "built successfully", "Setting accelerator to CPU"):
        assert noise not in result.stdout + result.stderr, noise


def test_outside_a_deepspeed_launch_deepspeed_is_not_imported():
    script = "import sys\nfrom finetune.library_noise import quiet_deepspeed_shm_build\nwith quiet_deepspeed_shm_build(): pass\nassert 'deepspeed' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_DEEPSPEED"})
    assert result.returncode == 0, result.stderr[-2000:]
