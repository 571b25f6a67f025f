"""Library lines the user can do nothing about: bitsandbytes' on import (from Python too), and those a DeepSpeed launch
on CPUs printed from every process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

# bitsandbytes' line as `import bitsandbytes` logs it on a CPU with AVX512-BF16 (diffusers imports it when installed),
# then, after the command line's filters, another bitsandbytes warning that a run must still show (a CUDA build it
# does not ship). No bitsandbytes import: the line is logged as it logs it, on any CPU, in a blink.
BITSANDBYTES_LINES = """
import logging
import finetune
logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install kernels`",
    "No module named 'kernels'",
)
from finetune.library_noise import quiet_third_party_warnings
quiet_third_party_warnings()
logging.getLogger("bitsandbytes.cextension").warning("No prebuilt binary for CUDA 12.9, loading CUDA 12.8 instead.")
"""


def test_bitsandbytes_cpu_kernel_line_is_quiet_from_python_and_its_other_warnings_are_not():
    result = subprocess.run([sys.executable, "-c", BITSANDBYTES_LINES], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "gemm_4bit_forward" not in result.stderr
    assert result.stderr == "No prebuilt binary for CUDA 12.9, loading CUDA 12.8 instead.\n"


def test_a_hub_warning_is_said_once_on_the_command_line():
    """huggingface_hub's own handler and the root one the command line sets up (cli.main's basicConfig) both printed it."""
    script = ("import logging\nfrom finetune.library_noise import quiet_third_party_warnings\n"
              "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')\nquiet_third_party_warnings()\n"
              "from huggingface_hub.utils import logging as hub_logging\nhub_logging.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s')")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == "Retrying in 1s\n"


@pytest.mark.slow  # seconds of imports (diffusers, transformers, bitsandbytes)
def test_importing_the_demo_engine_prints_nothing_of_bitsandbytes_or_torchvision():
    """transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..." (and Siglip's), said
    as diffusers' pipeline module imports them, was printed from Python; a user's own image processor still says it."""
    script = ("from finetune.demo.engine import DemoEngine\nimport transformers\ntransformers.ViTImageProcessor\n"
              "from bitsandbytes.functional import has_avx512bf16\nprint(bool(has_avx512bf16()))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    if importlib.util.find_spec("torchvision") is None:  # with it, transformers has nothing to say
        assert "`CLIPImageProcessor` requires torchvision" not in result.stderr and "`SiglipImageProcessor`" not in result.stderr, result.stderr
        assert "`ViTImageProcessor` requires torchvision (not installed)" in result.stderr, result.stderr
    if result.stdout.strip() != "True":
        pytest.skip("bitsandbytes says its CPU kernel line only on a CPU with AVX512-BF16")
    assert "gemm_4bit_forward" not in result.stderr, result.stderr


def test_transformers_torchvision_line_of_a_user_s_own_import_is_said():
    """Only finetune's own imports are quiet (a finetune module on the stack), not the line from the user's code."""
    script = ("import logging\nimport finetune\nlogging.getLogger('transformers.utils.import_utils').warning("
              "'`ViTImageProcessor` requires torchvision (not installed); falling back to `ViTImageProcessorPil`')")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == "`ViTImageProcessor` requires torchvision (not installed); falling back to `ViTImageProcessorPil`\n"


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


# A bench worker (`python -m finetune.bench --worker`) whose measurement logs bitsandbytes' two kinds of line.
BENCH_WORKER = """
import logging, sys
from finetune.bench import measure

def measured(spec):
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward from kernels-community: x")
    logging.getLogger("bitsandbytes.cextension").warning("No prebuilt binary for CUDA 12.9, loading CUDA 12.8 instead.")
    return {}

measure.measure = measured
sys.exit(measure._worker(sys.argv[1:]))
"""


def test_a_bench_worker_quiets_bitsandbytes_cpu_kernel_line_only(tmp_path):
    """It raised the whole bitsandbytes logger to errors: a variant's warning of a CUDA build bitsandbytes cannot find was hidden."""
    (tmp_path / "spec.json").write_text("{}")
    result = subprocess.run([sys.executable, "-c", BENCH_WORKER, str(tmp_path / "spec.json"), str(tmp_path / "row.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == "WARNING:bitsandbytes.cextension:No prebuilt binary for CUDA 12.9, loading CUDA 12.8 instead.\n"


# torch's DDP reducer's warning as a launched ControlNet's processes each said it at the first backward (2 CPU processes,
# recipes/controlnet.yaml on the toy-world base), then the same for a 3x3 kernel, whose strides do move its elements.
DDP_STRIDES = """
import warnings
from finetune.library_noise import quiet_third_party_warnings
quiet_third_party_warnings()
said = ("Grad strides do not match bucket view strides. This may indicate grad was not created according to the gradient layout "
        "contract, or that the param's strides changed since DDP was constructed.  This is not an error, but may impair performance.\\n"
        "grad.sizes() = [{0}, {0}, {1}, {1}], strides() = [{2}, 1, {3}, {0}]\\n"
        "bucket_view.sizes() = [{0}, {0}, {1}, {1}], strides() = [{2}, {4}, {1}, 1] "
        "(Triggered internally at /__w/pytorch/pytorch/torch/csrc/distributed/c10d/reducer.cpp:335.)")
warnings.warn(said.format(32, 1, 32, 32, 1), UserWarning)
warnings.warn(said.format(32, 3, 288, 96, 9), UserWarning)
"""


def test_ddp_strides_warning_of_a_one_by_one_kernel_is_quiet_and_of_another_kernel_is_said():
    result = subprocess.run([sys.executable, "-c", DDP_STRIDES], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("Grad strides do not match bucket view strides") == 1, result.stderr
    assert "grad.sizes() = [32, 32, 3, 3]" in result.stderr and "[32, 32, 1, 1]" not in result.stderr, result.stderr
