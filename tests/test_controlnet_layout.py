"""A resume from a checkpoint that keeps no layout of the ControlNet its run started from (written before checkpoints kept
it, with checkpoint.save_outputs: false): one of a layout ControlNetModel.from_unet does not make is one line before its
weights load, written under DeepSpeed too (test_resume_start_weights.py: without DeepSpeed, from a training run).

DeepSpeed's checkpoint is built here as its engine writes it (`pytorch_model/mp_rank_00_model_states.pt`, ZeRO-3's
`zero_pp_rank_<i>_mp_rank_00_model_states.pt`: the module's state, and `param_shapes`, a group's names and shapes), not by
a launch of DeepSpeed (slow): the layout check reads those files' shapes alone."""

import json
from collections import OrderedDict

import pytest
import torch
from controlnet_helpers import controlnet_recipe, layoutless_refusal
from diffusers import ControlNetModel, UNet2DConditionModel

from finetune.checkpoints.checkpoint import DEEPSPEED_FOLDER
from finetune.checkpoints.run_files import STATE_FILE
from finetune.errors import FinetuneError
from finetune.methods.controlnet import ControlNetMethod
from finetune.models.loading import load_base_model
from finetune.models.start_weights import resumed_method


def deepspeed_checkpoint(checkpoint, controlnet: ControlNetModel, began: str, file: str = "mp_rank_00_model_states.pt") -> None:
    """A checkpoint of a run started from `began` that trained `controlnet` under DeepSpeed, keeping no layout: its state's
    method part empty (as written before), no controlnet/ (checkpoint.save_outputs: false), no trainable_<i> files."""
    (checkpoint / DEEPSPEED_FOLDER).mkdir(parents=True)
    shapes = OrderedDict((name, parameter.shape) for name, parameter in controlnet.named_parameters())
    torch.save({"module": controlnet.state_dict(), "buffer_names": [], "optimizer": None, "param_shapes": [shapes], "frozen_param_shapes": None,
                "ds_config": {"zero_optimization": {"stage": 2}}, "ds_version": "0.19.8"}, checkpoint / DEEPSPEED_FOLDER / file)  # fmt: skip
    (checkpoint / STATE_FILE).write_text(json.dumps({"step": 1, "processes": 1, "method": {}, "recipe": {"method": "controlnet", "controlnet.pretrained": began}}))


def resumed(make_recipe, pairs_folder, checkpoint) -> ControlNetMethod:
    """The method as a resume from `checkpoint` sets it up, up to where the checkpoint's weights would load."""
    method = resumed_method(controlnet_recipe(make_recipe, pairs_folder), checkpoint)
    method.check_data()
    method.setup(load_base_model(method.recipe.model))
    return method


@pytest.mark.parametrize("file", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"])
def test_a_layoutless_deepspeed_checkpoint_of_another_layout_is_one_line_before_its_weights_load(file, make_recipe, pairs_folder, tiny_model, tmp_path):
    """It has no trainable_<i> files, which the check read: its resume ended in DeepSpeed's size mismatch as the engine loaded it."""
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    began = tmp_path / "edges"
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    deepspeed_checkpoint(checkpoint, ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 24, 32)), str(began), file)
    with pytest.raises(FinetuneError) as refused:
        resumed(make_recipe, pairs_folder, checkpoint)
    assert str(refused.value) == layoutless_refusal(checkpoint, began, "controlnet_cond_embedding.conv_in.weight: shape (8, 3, 3, 3), not (16, 3, 3, 3)")


def test_a_layoutless_deepspeed_checkpoint_of_the_layout_from_unet_makes_resumes(make_recipe, pairs_folder, tiny_model, tmp_path):
    """Its shapes fit the ControlNet made from the UNet: nothing to say (DeepSpeed loads its weights)."""
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    deepspeed_checkpoint(checkpoint, ControlNetModel.from_unet(unet), str(tmp_path / "edges"))
    method = resumed(make_recipe, pairs_folder, checkpoint)
    assert method.unknown_layout == (checkpoint, str(tmp_path / "edges"))



def test_the_layout_check_reads_deepspeeds_model_states_weights_only(make_recipe, pairs_folder, tiny_model, tmp_path):
    """It read them with weights_only=False before the resume's check of DeepSpeed's files: an object made to run code ran."""
    from test_untrusted_checkpoints import RunsCodeWhenUnpickled

    from finetune.checkpoints.pickles import refuse_unknown_objects

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    deepspeed_checkpoint(checkpoint, ControlNetModel.from_unet(unet), str(tmp_path / "edges"))
    states, marker = checkpoint / DEEPSPEED_FOLDER / "mp_rank_00_model_states.pt", tmp_path / "code-ran"
    torch.save({**torch.load(states, weights_only=True), "extra": RunsCodeWhenUnpickled(marker)}, states)
    resumed(make_recipe, pairs_folder, checkpoint)
    assert not marker.exists()
    with pytest.raises(FinetuneError, match=r"mp_rank_00_model_states.pt holds objects DeepSpeed 0.19's checkpoints do not \(os.makedirs\)"):
        refuse_unknown_objects(checkpoint, checkpoint / DEEPSPEED_FOLDER)  # as the resume checks it, before DeepSpeed loads it
