"""finetune.bench.report's machine is written without importing torch or diffusers: the report is rewritten after every
variant and at a stop, where those imports took seconds on a busy host that a deadline's SIGKILL did not give."""

import json
import subprocess
import sys

import diffusers
import torch


def test_the_reports_machine_imports_neither_torch_nor_diffusers_and_names_their_versions():
    child = ("import json, sys\nfrom finetune.bench.report import machine_info\nmachine = machine_info([])\n"
             "print(json.dumps([machine['torch'], machine['diffusers'], machine['device'], 'torch' in sys.modules, 'diffusers' in sys.modules]))")  # fmt: skip
    said = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
    assert json.loads(said) == [torch.__version__, diffusers.__version__, None, False, False]  # no variant measured: no device to name


def test_the_reports_machine_names_the_measured_device_and_torchs_cuda_where_torch_is_imported():
    from finetune.bench.report import machine_info

    machine = machine_info([{"variant": "lora", "error": "failed"}, {"variant": "lora_gc", "device": "NVIDIA H200"}])
    assert machine["device"] == "NVIDIA H200" and machine["cuda"] == torch.version.cuda
    assert machine_info([])["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
