"""finetune.trainer and finetune.training_run import each other (the loop looks up on trainer the calls that tests stand
in for there): each imports the other as a module, not its names, so a process may import either first."""

import subprocess
import sys


def test_training_run_imports_before_trainer():
    # A fresh interpreter: in this one the trainer is imported already (by other tests' modules).
    code = "import finetune.training_run as run, finetune.trainer as trainer; assert run.trainer is trainer and trainer.training_run is run"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
