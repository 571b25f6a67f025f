"""A resume of a run that started from trained weights (lora.init_from, controlnet.pretrained): the checkpoint
holds them, so the file or folder may be gone and the key left out; the record keeps where they began
(finetune.models.start_weights)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from controlnet_helpers import METADATA, controlnet_recipe, layoutless_refusal
from diffusers import ControlNetModel, UNet2DConditionModel

from finetune.checkpoints.run_files import CONTROLNET_DIR
from finetune.errors import FinetuneError
from finetune.models.start_weights import keep_where_weights_began
from finetune.outputs.pipeline_io import save_model_folder
from finetune.training.trainer import train


def test_a_controlnet_run_resumes_without_its_pretrained_folder_and_keeps_it_in_the_record(make_recipe, pairs_folder, tiny_model, tmp_path, capsys):
    """It was refused ('ControlNet X not found') once the folder had moved, and a resume without the key warned
    'settings changed' and its outputs lost finetune.controlnet_pretrained. The ControlNet is not the layout
    ControlNetModel.from_unet makes (a smaller conditioning embedding): the checkpoint brings its layout too."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    pretrained = tmp_path / "edges"
    save_model_folder(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 24, 32)), pretrained / CONTROLNET_DIR, METADATA)
    common = dict(output_dir=str(tmp_path / "continued"), checkpoint__every_n_steps=1)
    train(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(pretrained), train__max_steps=1, **common))
    shutil.rmtree(pretrained)
    # Its layout is kept in the checkpoint's state; one from before it was has it in its controlnet/ (checkpoint.save_outputs).
    state_file = tmp_path / "continued" / "checkpoints" / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["method"].pop("controlnet_config")["conditioning_embedding_out_channels"] == [8, 16, 24, 32]
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    for steps, given in ((2, {"controlnet__pretrained": str(pretrained)}), (3, {})):  # the key as it was (its folder gone), then left out
        shutil.rmtree(tmp_path / "continued" / "checkpoints" / "checkpoint-2" / CONTROLNET_DIR, ignore_errors=steps == 2)  # the state's layout, at 3
        result = train(controlnet_recipe(make_recipe, pairs_folder, train__max_steps=steps, **common, **given), resume="latest")
        out = capsys.readouterr().out
        assert result.final_step == steps and "controlnet.pretrained" not in out and "settings changed" not in out, out
        assert yaml.safe_load((result.output_dir / "recipe_as_run.yaml").read_text())["controlnet"]["pretrained"] == str(pretrained)
        recorded = json.loads((result.output_dir / CONTROLNET_DIR / "finetune_metadata.json").read_text())
        assert recorded["finetune.controlnet_pretrained"] == "edges" and recorded["finetune.steps"] == str(steps)
        assert ControlNetModel.from_pretrained(result.output_dir / CONTROLNET_DIR).config.conditioning_embedding_out_channels == [8, 16, 24, 32]


def test_a_resume_names_the_starting_weights_its_checkpoint_began_from(make_recipe, capsys):
    """Another starting point given at a resume is not read (the checkpoint's weights are): the record keeps the
    checkpoint's, and the run says so."""
    recipe = make_recipe(lora__init_from="other.safetensors")
    keep_where_weights_began(recipe, {"method": "lora", "lora.init_from": "first.safetensors"})
    assert recipe.lora.init_from == "first.safetensors"
    assert capsys.readouterr().out == ("warning: lora.init_from other.safetensors is not read at a resume: the checkpoint holds the weights, which "
                                       "started from first.safetensors (its recipe's lora.init_from); to start from other.safetensors, start a new run\n")  # fmt: skip
    recipe = make_recipe(lora__init_from="other.safetensors")
    keep_where_weights_began(recipe, {"method": "lora"})  # a run that started fresh
    assert recipe.lora.init_from is None and "which started fresh (its recipe had no lora.init_from); to start from" in capsys.readouterr().out
    recipe = make_recipe(lora__init_from=str(Path("first.safetensors").resolve()))  # the same file, written otherwise: no word
    keep_where_weights_began(recipe, {"method": "lora", "lora.init_from": "first.safetensors"})
    assert recipe.lora.init_from == "first.safetensors" and capsys.readouterr().out == ""
    recipe = make_recipe(lora__init_from="mine.safetensors")
    keep_where_weights_began(recipe, None)  # a checkpoint from before the recipe was kept: the recipe as it is
    assert recipe.lora.init_from == "mine.safetensors" and capsys.readouterr().out == ""


@pytest.mark.parametrize("key", ["lora.init_from", "controlnet.pretrained"])
def test_either_starting_weights_key_is_kept_from_the_checkpoint(make_recipe, pairs_folder, key, capsys):
    recipe = make_recipe(method="controlnet", data__image_dir=str(pairs_folder)) if key.startswith("controlnet") else make_recipe()
    keep_where_weights_began(recipe, {"method": recipe.method, key: "began-here"})
    section, name = key.split(".")
    assert getattr(getattr(recipe, section), name) == "began-here" and capsys.readouterr().out == ""


def test_a_resume_keeps_the_record_its_run_made_of_a_relative_folder_that_has_moved(make_recipe, pairs_folder, tiny_model, tmp_path, monkeypatch):
    """runs/edges, moved away, was recorded at a resume as the hub id runs/edges (by its name alone the two are alike):
    the record made when the run started is kept, from the checkpoint's state, or its outputs for a checkpoint older than that."""
    from controlnet_helpers import write_controlnet_run

    monkeypatch.chdir(tmp_path)
    write_controlnet_run(tiny_model, tmp_path / "runs" / "edges", trained=False)
    common = dict(output_dir=str(tmp_path / "continued"), checkpoint__every_n_steps=1, controlnet__pretrained="runs/edges")
    train(controlnet_recipe(make_recipe, pairs_folder, train__max_steps=1, **common))
    shutil.rmtree(tmp_path / "runs")
    state_file = tmp_path / "continued" / "checkpoints" / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["method"].pop("controlnet_started_from") == "edges"
    state_file.write_text(json.dumps(state))  # as written before the record was kept: its controlnet/ has it
    for steps in (2, 3):  # no outputs in checkpoint-2: its state's record, at 3
        result = train(controlnet_recipe(make_recipe, pairs_folder, train__max_steps=steps, checkpoint__save_outputs=False, **common), resume="latest")
        recorded = json.loads((result.output_dir / CONTROLNET_DIR / "finetune_metadata.json").read_text())
        assert (recorded["finetune.controlnet_pretrained"], recorded["finetune.steps"]) == ("edges", str(steps))


def test_an_older_checkpoint_without_the_layout_of_the_controlnet_it_started_from_says_so(make_recipe, pairs_folder, tiny_model, tmp_path):
    """A checkpoint written before checkpoints kept the layout, with checkpoint.save_outputs: false, has nothing to rebuild a
    ControlNet from_unet would not make: its resume failed asking 'another lora.rank?'."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    pretrained = tmp_path / "edges"
    save_model_folder(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 24, 32)), pretrained / CONTROLNET_DIR, METADATA)
    common = dict(output_dir=str(tmp_path / "continued"), checkpoint__every_n_steps=1, checkpoint__save_outputs=False)
    train(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(pretrained), train__max_steps=1, **common))
    checkpoint = tmp_path / "continued" / "checkpoints" / "checkpoint-1"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["method"] = {}  # as written then
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(FinetuneError) as refused:
        train(controlnet_recipe(make_recipe, pairs_folder, train__max_steps=2, **common), resume="latest")
    assert str(refused.value) == layoutless_refusal(checkpoint, pretrained, "controlnet_cond_embedding.blocks.0.bias: shape (8,), not (16,)")


def test_a_run_resumed_from_an_older_checkpoint_keeps_the_layout_and_record_from_then_on(make_recipe, pairs_folder, tiny_model, tmp_path):
    """An older checkpoint keeps neither (here of a layout from_unet makes, so it resumes): the resumed run's checkpoints did
    not either, though the run knew them by then."""
    from controlnet_helpers import write_controlnet_run

    run = write_controlnet_run(tiny_model, tmp_path / "edges", trained=False)
    common = dict(output_dir=str(tmp_path / "continued"), checkpoint__every_n_steps=1, checkpoint__save_outputs=False)
    train(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(run), train__max_steps=1, **common))
    written = json.loads((tmp_path / "continued" / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())["method"]
    assert written["controlnet_started_from"] == "edges"
    state_file = tmp_path / "continued" / "checkpoints" / "checkpoint-1" / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "method": {}}))  # as written then
    train(controlnet_recipe(make_recipe, pairs_folder, train__max_steps=2, **common), resume="latest")
    kept = json.loads((tmp_path / "continued" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())["method"]
    layout = {key: value for key, value in written["controlnet_config"].items() if key != "_name_or_path"}  # where it was loaded from, then
    assert kept["controlnet_started_from"] == "edges" and kept["controlnet_config"] == layout
