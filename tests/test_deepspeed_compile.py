"""`accelerate launch --dynamo_backend X` under DeepSpeed: accelerate's DeepSpeed launcher (1.15) does not hand the backend to
the processes (its DDP launcher does), so such a run trained uncompiled without a word (measured: 2 CPU processes under
ZeRO-2, --dynamo_backend eager: no "compiling" line, dynamo's counters empty). It is refused before anything loads."""

from pathlib import Path

import pytest

import finetune.deepspeed_checks as deepspeed_checks
from finetune.deepspeed_checks import launcher_compile_backend
from finetune.errors import FinetuneError
from finetune.trainer import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "deepspeed"
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
