"""A bitsandbytes that is installed and fails to import (a build for another CUDA raised "CUDA Setup failed" as it was
imported): diffusers and transformers import it wherever it is installed, so every command that loads a model ended in
their two tracebacks ("Failed to import diffusers.models..."; `finetune train` after its data check). One line now.
A stand-in package on PYTHONPATH raises as the broken one did."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, SHIPPED_BASE

from finetune.errors import FinetuneError


def test_a_command_that_loads_a_model_says_a_broken_bitsandbytes_in_one_line(tmp_path):
    stand_in = tmp_path / "site" / "bitsandbytes"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text('raise RuntimeError("CUDA Setup failed despite GPU being available.")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "finetune", "sample", "--base", str(SHIPPED_BASE), "--prompt", "x", "--out", str(tmp_path / "out")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: bitsandbytes is installed but cannot be imported (RuntimeError: CUDA Setup failed despite GPU being available.), and diffusers "
        "imports it wherever it is installed: reinstall it for this machine (pip install --force-reinstall bitsandbytes), or uninstall it "
        "(pip uninstall bitsandbytes; 8-bit optimizers then fall back to torch AdamW)"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_other_errors_go_on_as_they_were():
    from finetune.optim.packages import broken_bitsandbytes_as_one_line

    with pytest.raises(ValueError, match="^not bitsandbytes'$"), broken_bitsandbytes_as_one_line():
        raise ValueError("not bitsandbytes'")
    with pytest.raises(FinetuneError, match="^one line already$"), broken_bitsandbytes_as_one_line():
        raise FinetuneError("one line already")
