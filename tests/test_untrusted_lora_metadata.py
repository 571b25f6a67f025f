"""Adapters from a model site steer sampling by their metadata. A LoRA's: the token length its prompts are read in
(finetune.max_token_length, sd-scripts' ss_max_token_length) set how many chunks of 75 tokens every prompt is
encoded in, so a file recording 7,500,000 made `sample`, the demo and `merge`'s result encode each prompt in 100,000
chunks (the UNet attending to 7.7 million states) until memory ran out. Only the lengths training writes are read;
another is one line naming the file. A ControlNet's: how its conditioning images were made, which the demo makes an
uploaded photo's condition with; bounded as make-conditions' own options are."""

import pytest
import torch
from conftest import SHIPPED_BASE
from safetensors.torch import save_file

from finetune.cli.main import main
from finetune.errors import FinetuneError
from finetune.sampling.adapters_as_trained import adapters_max_token_length

LAYER = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"  # a layer of the shipped base (64 wide)


def kohya_lora(path, **metadata):
    tensors = {f"{LAYER}.lora_down.weight": torch.zeros(4, 64), f"{LAYER}.lora_up.weight": torch.zeros(64, 4), f"{LAYER}.alpha": torch.tensor(4.0)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_only_the_token_lengths_training_writes_are_read():
    assert adapters_max_token_length({"a": {"finetune.max_token_length": "150"}, "b": {}}) == 150
    assert adapters_max_token_length({"a": {}}) == 75
    with pytest.raises(FinetuneError, match=r"^b records a max_token_length of 7500000, which no training writes \(75, 150 or 225"):
        adapters_max_token_length({"a": {"finetune.max_token_length": "225"}, "b": {"finetune.max_token_length": "7500000"}})
    # No number either (was read as 75 here while lora.init_from refused it): sd-scripts' "None" alone means 75.
    assert adapters_max_token_length({"a": {"finetune.max_token_length": "None"}}) == 75
    with pytest.raises(FinetuneError, match=r"^a records a max_token_length of many, which no training writes"):
        adapters_max_token_length({"a": {"finetune.max_token_length": "many"}})


@pytest.mark.parametrize("command", ["sample", "merge"])
def test_a_lora_recording_a_vast_token_length_is_one_line_before_any_prompt_is_encoded(tmp_path, capsys, command):
    lora = kohya_lora(tmp_path / "lora.safetensors", ss_max_token_length="7500000")
    args = ["--prompt", "a star", "--out", str(tmp_path / "out"), "--steps", "1"] if command == "sample" else [str(tmp_path / "merged")]
    assert main([command, "--base", str(SHIPPED_BASE), "--lora", str(lora), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {lora} records a max_token_length of 7500000, which no training writes"), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()


def test_a_controlnets_record_of_conditioning_make_conditions_could_not_write_is_one_line():
    """The demo makes a photo's condition with the thresholds a ControlNet's record says (finetune.conditioning): a sigma of
    1e9 from a downloaded folder asked canny for a 48 GB kernel, and a name no maker takes was a TypeError mid-render."""
    import json

    from finetune.controlnet.conditioning_records import recorded_options

    def record(**options):
        return {"finetune.conditioning": json.dumps({"kind": "canny", **options})}

    assert recorded_options(record(low=20, high=40, sigma=1.5), "canny", "ControlNet edges") == {"low": 20.0, "high": 40.0, "sigma": 1.5}
    assert recorded_options(record(sigma=1e9), "mask") == {}  # another kind's record: the upload's own kind is made with defaults
    for options, said in (({"sigma": 1e9}, r"canny --sigma must be 0 to 50 \(pixels of blur\), got 1000000000.0"), ({"radius": 3}, "canny takes no radius")):
        with pytest.raises(FinetuneError, match=rf"^ControlNet edges records conditioning images made in a way make-conditions does not \({said}\): its metadata"):
            recorded_options(record(**options), "canny", "ControlNet edges")


def test_make_conditions_refuses_a_blur_past_the_bound_before_writing_anything(tmp_path, capsys):
    from conftest import REPO

    assert main(["make-conditions", str(REPO / "datasets" / "star"), str(tmp_path / "out"), "--kind", "canny", "--sigma", "1e9"]) == 2
    assert capsys.readouterr().err.strip() == "error: canny --sigma must be 0 to 50 (pixels of blur), got 1000000000.0"
    assert not (tmp_path / "out").exists()


def test_a_prediction_type_no_model_predicts_is_one_line_naming_the_file(tmp_path, capsys):
    lora = kohya_lora(tmp_path / "lora.safetensors", **{"finetune.prediction_type": "noise"})  # was diffusers' ValueError, a traceback
    assert main(["sample", "--base", str(SHIPPED_BASE), "--lora", str(lora), "--prompt", "a star", "--out", str(tmp_path / "out"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {lora} records the prediction type 'noise', which no model predicts (epsilon, v_prediction or sample): its metadata "
                   "is damaged or was edited; use another copy of it"]


def test_a_data_folders_record_make_conditions_could_not_write_is_one_line_before_the_model_loads(make_recipe, pairs_folder, tmp_path, monkeypatch):
    """A downloaded ControlNet data folder's conditioning.json went unchecked into the trained ControlNet's metadata, and the
    demo then refused the user's own ControlNet as damaged or edited (its check above)."""
    import json
    import shutil

    from finetune.training import trainer
    from finetune.training.trainer import train

    folder = tmp_path / "pairs"
    shutil.copytree(pairs_folder, folder)
    (folder / "conditioning.json").write_text(json.dumps({"kind": "canny", "low": 20, "high": 40, "sigma": 1e9}))
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(FinetuneError, match=rf"^{folder / 'conditioning.json'} records conditioning images made in a way make-conditions does not "
                                            r"\(canny --sigma must be 0 to 50 \(pixels of blur\), got 1000000000.0\): make them again"):
        train(make_recipe(method="controlnet", data__image_dir=str(folder)))
    (folder / "conditioning.json").write_text(json.dumps({"kind": "mask", "threshold": "40"}))
    with pytest.raises(FinetuneError, match=r"\(mask's thresholds are numbers\)"):
        train(make_recipe(method="controlnet", data__image_dir=str(folder)))


@pytest.mark.parametrize(("metadata", "said"), [
    ({"finetune.prediction_type": "noise"}, r"records the prediction type 'noise', which no model predicts"),  # was: set model.prediction_type: noise
    ({"finetune.max_token_length": "many"}, r"records a max_token_length of many, which no training writes"),  # was int()'s traceback
])  # fmt: skip
def test_lora_init_from_recording_what_no_training_writes_is_one_line_before_the_model_loads(make_recipe, tmp_path, metadata, said):
    from finetune.methods.lora import LoRAMethod

    lora = kohya_lora(tmp_path / "lora.safetensors", **metadata)
    with pytest.raises(FinetuneError, match=rf"^lora.init_from {lora} {said}.*: its metadata is damaged or was edited; use another copy of it$"):
        LoRAMethod(make_recipe(lora__init_from=str(lora)))


def test_controlnet_pretrained_recording_a_prediction_type_no_model_predicts_is_one_line_before_the_model_loads(make_recipe, pairs_folder, tiny_model, tmp_path):
    """It was advice to set model.prediction_type to it (which recipes refuse), once the model had loaded."""
    import json

    from diffusers import ControlNetModel, UNet2DConditionModel

    from finetune.checkpoints.run_files import METADATA_FILE
    from finetune.methods.controlnet import ControlNetMethod

    folder = tmp_path / "controlnet"
    ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")).save_pretrained(folder)
    (folder / METADATA_FILE).write_text(json.dumps({"finetune.prediction_type": "noise"}))
    method = ControlNetMethod(make_recipe(method="controlnet", data__image_dir=str(pairs_folder), controlnet__pretrained=str(folder)))
    with pytest.raises(FinetuneError, match=rf"^controlnet.pretrained {folder} records the prediction type 'noise', which no model predicts"):
        method.check_data()
