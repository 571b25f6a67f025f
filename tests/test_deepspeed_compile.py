"""`accelerate launch --dynamo_backend X` under DeepSpeed: accelerate's DeepSpeed launcher (1.15) does not hand the backend to
the processes (its DDP launcher does), so such a run trained uncompiled without a word (measured: 2 CPU processes under
ZeRO-2, --dynamo_backend eager: no "compiling" line, dynamo's counters empty). It is refused before anything loads.
A backend exported by hand (ACCELERATE_DYNAMO_BACKEND) does reach them, and accelerate has DeepSpeed's engine compile the model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_port
from test_distributed import write

from finetune.distributed.deepspeed_checks import launcher_compile_backend
import finetune.distributed.deepspeed_checks as deepspeed_checks
from finetune.errors import FinetuneError
from finetune.training.trainer import train

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "deepspeed"
LAUNCH = ["/venv/bin/python", "-m", "accelerate.commands.launch"]


def test_the_backend_an_accelerate_launch_command_line_asks_for(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("distributed_type: DEEPSPEED\ndynamo_config:\n  dynamo_backend: INDUCTOR\n")
    script = ["-m", "finetune", "train", "recipe.yaml"]
    assert launcher_compile_backend([*LAUNCH, "--dynamo_backend", "inductor", *script]) == ("inductor", "--dynamo_backend inductor")
    assert launcher_compile_backend(["/venv/bin/python", "/venv/bin/accelerate", "launch", "--dynamo_backend=aot_eager", *script])[0] == "aot_eager"
    assert launcher_compile_backend(["/venv/bin/python", "/venv/bin/accelerate-launch", "--dynamo_backend", "eager", *script])[0] == "eager"
    assert launcher_compile_backend([*LAUNCH, "--config_file", str(config), *script]) == ("INDUCTOR", f"{config}'s dynamo_config (dynamo_backend: INDUCTOR)")
    assert launcher_compile_backend([*LAUNCH, "--config_file", str(config), "--dynamo_backend", "no", *script]) is None  # the option wins
    assert launcher_compile_backend([*LAUNCH, "--config_file", str(tmp_path / "none.yaml"), "train.py", "--dynamo_backend", "eager"]) is None  # the script's
    assert launcher_compile_backend(["/bin/bash", "-c", "pytest"]) is None and launcher_compile_backend([]) is None


def test_a_compile_asked_of_accelerate_launch_under_deepspeed_is_refused_before_anything_loads(make_recipe, monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(CONFIGS / "zero2.json"))
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)  # as the DeepSpeed launcher leaves it
    monkeypatch.setattr(deepspeed_checks, "launcher_command_line", lambda: [*LAUNCH, "--dynamo_backend", "inductor", "-m", "finetune", "train", "r.yaml"])
    recipe = make_recipe(model__pretrained=str(tmp_path / "no-such-model"))  # a later refusal would say "not found"
    with pytest.raises(FinetuneError, match=r"^--dynamo_backend inductor: accelerate launch does not pass torch.compile's backend \(inductor\) on "
                                            r"to the processes under DeepSpeed .* or launch without DeepSpeed \(--multi_gpu\) to compile$"):  # fmt: skip
        train(recipe)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")  # set by hand: accelerate compiles DeepSpeed's model itself
    with pytest.raises(FinetuneError, match="no-such-model"):
        train(recipe)


@pytest.mark.slow  # ~2 minutes: DeepSpeed's start, and dynamo traces the tiny UNet's forward and backward
def test_a_compile_exported_by_hand_under_deepspeed_compiles_training_alone(make_recipe, tmp_path):
    """DeepSpeed's engine compiles the model in place (the module validation is handed is itself compiled): validation's
    grid and the held-out loss each compiled a graph of their own (3 in all, measured), where the run compiles 1."""
    recipe = make_recipe(train__max_steps=2, validation__every_n_steps=1, validation__loss_images=1, validation__prompts=["a shape"],
                         validation__num_inference_steps=2)  # fmt: skip
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file", str(CONFIGS / "zero2.json"),
               "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(free_port()),
               str(REPO / "tests" / "compiled_worker.py"), str(write(recipe, tmp_path / "recipe.yaml"))]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_DYNAMO_BACKEND": "EAGER"}
    launched = subprocess.run(command, env=environment, capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert launched.returncode == 0, launched.stderr[-3000:]
    counted = json.loads((Path(recipe.output_dir) / "compiles-rank0.json").read_text())
    assert "validation loss at step 2" in launched.stdout and (Path(recipe.output_dir) / "samples" / "step-000002.png").is_file()
    assert (counted["stats"]["unique_graphs"], counted["frames"]["total"] - counted["frames"]["ok"]) == (1, 0), counted
