"""Bad input is said before the training and sampling stack loads: a missing LoRA, base, ControlNet or conditioning
image, export-checkpoint's or export-base's input, the demo's adapters folder; an empty data folder, an output_dir
under a file or holding an earlier run, a --resume that is not there. Each was said only after torch, diffusers,
transformers, peft and accelerate had imported (about 10 s of CPU, 20 to 40 s on a busy 2-core host); the check is
which modules the command imported, not a time, so a module-level import of torch that comes back into one of these
paths fails here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from finetune.checkpoints.run_files import MAX_RECORD_BYTES

ROOT = Path(__file__).resolve().parents[1]
BASE = "finetune/assets/toyworld-base"  # a real local base: its weights' headers are read as it is located
CONTROLNET = "finetune/assets/toyworld-controlnet-mask"

# What these errors must be said without (numpy, PIL, pydantic and yaml load with the recipe and the data folder's reader).
TRAINING_STACK = ("torch", "diffusers", "transformers", "peft", "accelerate", "deepspeed", "gradio")


def said_without_the_training_stack(calls: list[list[str]]) -> list[str]:
    """Run `finetune` with each argument list in one fresh interpreter in the repository, as a user would; each call's
    stderr, after asserting that it exited 2 (an error said) and that none of TRAINING_STACK was imported."""
    script = f"""
import contextlib, io, json, sys
from finetune.cli.main import main
said = []
for argv in {calls!r}:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        status = main(argv)
    said.append([status, err.getvalue(), [name for name in {TRAINING_STACK!r} if name in sys.modules]])
print(json.dumps(said))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = []
    for argv, (status, err, imported) in zip(calls, json.loads(result.stdout)):
        assert (status, imported) == (2, []), (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)  # one line
        lines.append(err.removeprefix("error: ").rstrip("\n"))
    return lines


def test_train_says_its_output_dir_data_and_resume_before_torch(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    earlier = tmp_path / "earlier"
    (earlier / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (earlier / "checkpoints" / "checkpoint-5" / "trainer_state.json").write_text('{"step": 5}')
    quickstart = ["train", "recipes/quickstart.yaml"]
    said = said_without_the_training_stack([
        [*quickstart, f"output_dir={tmp_path / 'run'}", f"data.image_dir={tmp_path / 'empty'}"],
        [*quickstart, f"output_dir={tmp_path / 'file' / 'run'}"],
        [*quickstart, f"output_dir={earlier}"],
        [*quickstart, f"output_dir={tmp_path / 'new'}", "--resume", str(tmp_path / "nope")],
    ])  # fmt: skip
    assert said[0].startswith(f"data folder {tmp_path / 'empty'} has no images (") and said[0].endswith("add some or fix data.image_dir")
    assert said[1] == f"output_dir {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, not a folder: give a folder for the run's checkpoints and outputs"
    assert said[2].startswith(f"output_dir {earlier} holds an earlier run (checkpoint-5): continue it with --resume latest")
    assert said[3].startswith(f"--resume {tmp_path / 'nope'}: no such folder")


def test_sample_merge_exports_eval_and_demo_say_missing_inputs_before_torch(tmp_path):
    lora, base, out = str(tmp_path / "lora.safetensors"), str(tmp_path / "base"), str(tmp_path / "out")
    (tmp_path / "kept.safetensors").write_bytes(b"")  # a file of the user's, which export-checkpoint would replace
    sample = ["sample", "--prompt", "a star", "--out", out]
    said = said_without_the_training_stack([
        [*sample, "--base", BASE, "--lora", lora],
        [*sample, "--lora", lora],  # no --base: the LoRA's record of its base would be read
        [*sample, "--base", base],
        [*sample, "--base", BASE, "--controlnet", str(tmp_path / "controlnet"), "--condition", "mask.png"],
        [*sample, "--base", BASE, "--controlnet", CONTROLNET, "--condition", str(tmp_path / "mask.png")],
        ["merge", "--base", BASE, "--lora", lora, out],
        ["merge", "--base", base, "--lora", str(ROOT / "finetune" / "assets" / "toyworld_classifier.safetensors"), out],
        ["export", lora, out, "--to", "kohya"],
        ["eval", "--base", base],
        ["eval", "--base", BASE, "--lora", lora],
        ["export-checkpoint", base, str(tmp_path / "model.safetensors")],
        ["export-base", base, out],
        ["demo", "--adapters", str(tmp_path / "runs")],
        ["export-checkpoint", BASE, str(tmp_path / "model.ckpt")],
        ["export-checkpoint", BASE, str(tmp_path / "kept.safetensors")],
    ])  # fmt: skip
    missing_lora = f"LoRA {lora} not found: pass a .safetensors file"
    assert [line.startswith(missing_lora) for line in said] == [True, True, False, False, False, True, False, True, False, True, False, False, False, False, False]
    assert said[2] == said[6] == said[8] == f"base model {base} not found: no such folder or file (check --base)"
    assert said[3].startswith(f"ControlNet {tmp_path / 'controlnet'} not found")
    assert said[4] == f"conditioning image {tmp_path / 'mask.png'} not found: check --condition"
    assert said[10].startswith(f"export-checkpoint input {base} not found")
    assert said[11] == f"{base} is not a diffusers pipeline folder (no model_index.json)"
    assert said[12].startswith(f"adapters folder {tmp_path / 'runs'} not found")
    assert said[13].startswith(f"export-checkpoint output {tmp_path / 'model.ckpt'} is not a .safetensors file name")
    assert said[14] == f"export-checkpoint would replace {tmp_path / 'kept.safetensors'}: give another output, or pass --overwrite"


def test_check_data_checks_controlnet_pairs_without_torch(tmp_path):
    """A ControlNet recipe's pairs were checked by finetune.controlnet.data, which holds the training dataset and
    imported torch with it: `finetune check-data`, which reads images only, must not (1.4 s more of its 2.9 s of CPU)."""
    from PIL import Image, ImageDraw

    (tmp_path / "conditioning").mkdir()
    rows = []
    for index, colour in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{index}.png")
        mask = Image.new("RGB", (64, 64), "black")
        ImageDraw.Draw(mask).rectangle((8, 8, 40, 40), fill="white")
        mask.save(tmp_path / "conditioning" / f"{index}.png")
        rows.append(json.dumps({"file_name": f"{index}.png", "conditioning_file_name": f"conditioning/{index}.png", "text": f"a {colour} square"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    script = f"""
import sys
from finetune.cli.main import main
status = main(["check-data", "recipes/controlnet.yaml", "data.image_dir={tmp_path}", "data.resolution=64", "train.batch_size=2", "model.pretrained={BASE}"])
print([status, [name for name in {TRAINING_STACK!r} if name in sys.modules]])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"data folder {tmp_path}: 2 images, 2 used, 0 skipped" in result.stdout, result.stdout
    assert result.stdout.splitlines()[-1] in ("[0, []]", "[0, ['transformers']]"), result.stdout  # the base's tokenizer counts caption tokens


def test_sample_eval_and_merge_without_base_say_the_adapters_record_before_torch(tmp_path):
    """Without --base the base an adapter's run recorded was read by loading the LoRA (torch) or through finetune.sampling.inference
    (torch and diffusers): a LoRA recording none, a recorded base not there, a LyCORIS or SDXL file were said after them. A
    checkpoint-N that is not there names the newest checkpoint there is (sample and export alike)."""
    import numpy as np
    from safetensors.numpy import save_file

    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora"
    weights = {f"{layer}.down.weight": np.zeros((4, 32), np.float32), f"{layer}.up.weight": np.zeros((32, 4), np.float32)}
    save_file(weights, tmp_path / "gone.safetensors", {"finetune.base_model": str(tmp_path / "gone")})
    save_file(weights, tmp_path / "none.safetensors", {})
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros((4, 32), np.float32)},
              tmp_path / "sdxl.safetensors", {"ss_sd_model_name": "sd_xl_base_1.0.safetensors"})  # fmt: skip
    controlnet = tmp_path / "controlnet"  # the shipped one, recording a base moved away
    controlnet.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (controlnet / name).symlink_to(ROOT / CONTROLNET / name)
    (controlnet / "finetune_metadata.json").write_text(json.dumps({"finetune.base_model": str(tmp_path / "gone")}))
    huge = tmp_path / "huge"  # its record replaced by a file of 100 MB and a byte (sparse: no disk taken), not read
    huge.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (huge / name).symlink_to(ROOT / CONTROLNET / name)
    with open(huge / "finetune_metadata.json", "wb") as file:
        file.truncate(MAX_RECORD_BYTES + 1)
    checkpoints = tmp_path / "run" / "checkpoints"  # a step mistyped, or rotated out: the newest there is is named, as --resume names it
    (checkpoints / "checkpoint-8").mkdir(parents=True)
    (checkpoints / "checkpoint-8" / "trainer_state.json").write_text('{"step": 8}')
    sample = ["sample", "--prompt", "a star", "--out", str(tmp_path / "out")]
    said = said_without_the_training_stack([
        [*sample, "--lora", str(tmp_path / "gone.safetensors")],
        ["eval", "--lora", str(tmp_path / "none.safetensors")],
        ["merge", "--lora", str(tmp_path / "sdxl.safetensors"), str(tmp_path / "merged")],
        [*sample, "--controlnet", str(controlnet), "--condition", str(ROOT / "docs" / "images" / "quickstart_before.png")],
        [*sample, "--controlnet", str(huge), "--condition", str(ROOT / "docs" / "images" / "quickstart_before.png")],
        [*sample, "--lora", str(checkpoints / "checkpoint-9")],
        ["export", str(checkpoints / "checkpoint-9"), str(tmp_path / "exported"), "--to", "kohya"],
    ])  # fmt: skip
    assert said[0] == f"pass --base MODEL: {tmp_path / 'gone.safetensors'} records the base {tmp_path / 'gone'}, which is not there from here"
    assert said[1] == f"pass --base MODEL: the base model to use ({tmp_path / 'none.safetensors'} records none)"
    assert said[2].startswith(f"LoRA {tmp_path / 'sdxl.safetensors'} is an SDXL LoRA")
    assert said[3] == f"pass --base MODEL: {controlnet} records the base {tmp_path / 'gone'}, which is not there from here"
    assert said[4].startswith(f"{huge / 'finetune_metadata.json'} holds 100,000,001 bytes, more than finetune records there")
    assert said[5] == said[6] == (f"LoRA {checkpoints / 'checkpoint-9'} not found: no such folder (the newest in {checkpoints} is checkpoint-8); "
                                  "pass a checkpoint-N folder that is there, or the run's output_dir for its last LoRA")  # fmt: skip


def test_check_data_says_a_lora_init_from_that_is_no_lora_without_torch(tmp_path):
    """check-data read lora.init_from with finetune.methods.lora_init (torch, diffusers, peft), whatever it was: one not
    there, or a file of another kind, is said from its path and header now (check-data prints it as its result line:
    tests/test_other_tools_files). A LoRA that passes them is still loaded with torch: its tensors' values are checked
    (NaN or infinite ones, in bf16 too, which numpy cannot read)."""
    import numpy as np
    from safetensors.numpy import save_file

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros((4, 32), np.float32)}, sdxl)
    script = f"""
import json, sys
from finetune.config import LoRAConfig
from finetune.data_check.command import init_from_problem
said = [init_from_problem(LoRAConfig(init_from=source)) for source in {[str(tmp_path / "gone.safetensors"), str(sdxl)]!r}]
print(json.dumps([said, [name for name in {TRAINING_STACK!r} if name in sys.modules]]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    said, imported = json.loads(result.stdout)
    assert imported == [], said
    assert said[0] == (f"lora.init_from {tmp_path / 'gone.safetensors'} not found: give a LoRA .safetensors file "
                       "or a training folder holding pytorch_lora_weights.safetensors")  # fmt: skip
    assert said[1].startswith(f"LoRA {sdxl} is an SDXL LoRA") and "\n" not in said[1], said
