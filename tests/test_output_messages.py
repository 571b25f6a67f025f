"""What export, export-checkpoint and merge say when handed the wrong thing from a run: one line that names
what it is and what to pass instead; and the name export gives a run's LoRA however the run is named."""

import shutil

import pytest

import torch
from safetensors.torch import save_file

from finetune.cli.main import main


def fake_checkpoints(run, steps):
    for step in steps:
        checkpoint = run / "checkpoints" / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "trainer_state.json").write_text("{}")
        save_file({"weight": torch.zeros(2)}, str(checkpoint / "pytorch_lora_weights.safetensors"))
    return run / "checkpoints"


def test_a_runs_checkpoints_folder_says_to_pick_a_checkpoint(tmp_path, capsys):
    checkpoints = fake_checkpoints(tmp_path / "run", [5, 10])
    assert main(["export", str(checkpoints), str(tmp_path / "out"), "--to", "kohya"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {checkpoints} holds a run's checkpoints: pick a checkpoint (checkpoint-N, of step N), e.g. {checkpoints / 'checkpoint-10'}, the latest"]


def test_export_checkpoint_of_a_controlnet_run_says_it_is_a_controlnet(tmp_path, capsys):
    controlnet = tmp_path / "run" / "controlnet"
    controlnet.mkdir(parents=True)
    (controlnet / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    for source in (tmp_path / "run", controlnet):
        assert main(["export-checkpoint", str(source), str(tmp_path / "out.safetensors")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {source} holds a ControlNet, not a whole model: use {controlnet} as it is (finetune sample --controlnet {controlnet}; "
                       f"in diffusers ControlNetModel.from_pretrained('{controlnet}'))"]  # fmt: skip


def test_merge_of_a_lora_from_another_base_names_the_lora_file(tmp_path, capsys):
    from finetune.formats.kohya import LoRA, LoRALayer, save_lora_file
    from conftest import SHIPPED_BASE

    layer = LoRALayer(down=torch.zeros(4, 7), up=torch.zeros(7, 4), alpha=4.0)  # 7 features: no layer of the shipped base
    lora = save_lora_file(LoRA({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": layer}), tmp_path / "other.safetensors", "diffusers")
    assert main(["merge", "--base", str(SHIPPED_BASE), "--lora", str(lora), str(tmp_path / "merged")]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading")]  # progress bars
    assert len(err) == 1 and err[0].startswith(f"error: LoRA {lora} does not fit this base model: LoRA layer unet.down_blocks.0."), err


def test_a_lora_naming_a_block_not_a_layer_is_one_line_in_merge_sample_and_the_demo(tmp_path, capsys):
    """A LoRA key naming a block of layers (unet.down_blocks.0, a CrossAttnDownBlock2D with no weight of its own) was a
    traceback ('object has no attribute weight') in merge and sample; the demo said it in one line. One check serves all three."""
    from finetune.config import ModelConfig
    from finetune.demo.engine import _check_lora_fits
    from finetune.errors import FinetuneError
    from finetune.formats.kohya import LoRA, LoRALayer, load_lora, save_lora_file
    from finetune.models.loading import load_base_model
    from conftest import SHIPPED_BASE

    layer = LoRALayer(down=torch.zeros(4, 32), up=torch.zeros(32, 4), alpha=4.0)
    lora = save_lora_file(LoRA({"unet.down_blocks.0": layer}), tmp_path / "block.safetensors", "diffusers")
    said = "does not fit this base model: LoRA layer unet.down_blocks.0 is not a layer with weights in the base model"
    assert main(["merge", "--base", str(SHIPPED_BASE), "--lora", str(lora), str(tmp_path / "merged")]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading")]  # progress bars
    assert err == [f"error: LoRA {lora} {said}: the LoRA was trained on another architecture"], err
    assert main(["sample", "--base", str(SHIPPED_BASE), "--lora", str(lora), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "s")]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading")]
    assert err == [f"error: LoRA {lora} {said}: the LoRA was trained on another architecture"], err
    model = load_base_model(ModelConfig(pretrained=str(SHIPPED_BASE)))
    with pytest.raises(FinetuneError, match=r"^LoRA 'block' does not fit base model base: LoRA layer unet.down_blocks.0 is not a layer with weights "
                                            r"in the base model: the LoRA was trained on another architecture$"):
        _check_lora_fits({"unet": model.unet, "text_encoder": model.text_encoder}, load_lora(lora), "block", "base")


def test_export_from_inside_the_run_or_checkpoint_names_the_file_after_the_run(tmp_path, monkeypatch, capsys):
    """'finetune export . webui --to kohya' in the run's folder wrote webui/.safetensors (and .safetensors.md): the run's name
    was read from the path as given, whose folder '.' has none; a checkpoint's step was lost the same way."""
    checkpoints = fake_checkpoints(tmp_path / "stars", [5])
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": torch.randn(4, 32),
               "unet.down_blocks.0.attentions.0.proj_in.lora.up.weight": torch.randn(32, 4)}, str(checkpoints / "checkpoint-5" / "pytorch_lora_weights.safetensors"))
    shutil.copyfile(checkpoints / "checkpoint-5" / "pytorch_lora_weights.safetensors", checkpoints.parent / "pytorch_lora_weights.safetensors")
    for inside, name in ((checkpoints.parent, "stars"), (checkpoints / "checkpoint-5", "stars-step00000005")):
        monkeypatch.chdir(inside)
        assert main(["export", ".", str(tmp_path / "webui"), "--to", "kohya"]) == 0
        assert f"wrote {tmp_path / 'webui' / name}.safetensors (kohya layout), its model card {tmp_path / 'webui' / name}.md" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "webui").iterdir()) == ["stars-step00000005.md", "stars-step00000005.safetensors", "stars.md", "stars.safetensors"]


@pytest.mark.parametrize("command", [["sample", "--prompt", "a star", "--lora"], ["export", "--to", "kohya"]])
def test_a_run_stopped_before_its_outputs_names_its_latest_checkpoint(command, tmp_path, capsys):
    # Ctrl-C, or a crash, leaves checkpoints and no pytorch_lora_weights.safetensors in the output_dir: `sample --lora RUN`
    # said "LoRA RUN not found", of a folder that is there and holds the LoRA in each checkpoint (README: every checkpoint
    # is also a usable result).
    run = tmp_path / "run"
    checkpoints = fake_checkpoints(run, [50, 61])
    argv = [*command, str(run)] if command[0] == "sample" else [command[0], str(run), str(tmp_path / "out"), *command[1:]]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {run} holds no pytorch_lora_weights.safetensors yet (its run has not ended), but its checkpoints hold the LoRA of their step: "
        f"pass one, e.g. {checkpoints / 'checkpoint-61'}, the latest (or finish the run with --resume latest)"]
