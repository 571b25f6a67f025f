"""What a training run imports on its way to the first step: nothing it does not use."""

from __future__ import annotations

import subprocess
import sys


def test_unwrapping_a_plain_runs_module_does_not_import_deepspeed():
    """accelerate's unwrap_model imports DeepSpeed wherever it is installed; a run without it (one process,
    the trainer unwraps at the first validation and each save) has nothing of DeepSpeed's to unwrap."""
    script = """
import sys, torch
from accelerate import Accelerator
from finetune.distributed import unwrap
accelerator = Accelerator(cpu=True)
linear = torch.nn.Linear(2, 2)
assert unwrap(accelerator, accelerator.prepare(linear)) is linear
assert "deepspeed" not in sys.modules
assert unwrap(accelerator, torch.compile(linear)) is linear  # compiled (not run): accelerate's unwrap_model, as before
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
