"""What a new user coming from diffusers' examples and sd-scripts ran into with DreamBooth and ControlNet:
per-concept repeats, a class-image count refused only at training, diffusers' `conditioning_image` key,
make-conditions over an earlier run's images, and a run folder given as controlnet.pretrained."""

import json
import shutil

import pytest
from PIL import Image

from finetune.cli.main import main
from finetune.config.recipe_loading import recipe_from_dict
from finetune.data_check.check import checked_examples
from finetune.data_check.train_inputs import data_configs
from finetune.errors import FinetuneError
from conftest import SHIPPED_BASE  # a base check-data finds offline (the default hub id is in no cache)


def write_images(folder, count):
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(folder / f"{i}.png")
    return folder


def test_dreambooth_concepts_take_repeats_to_balance_few_images_against_many(tmp_path, capsys):
    few, many = write_images(tmp_path / "few", 2), write_images(tmp_path / "many", 5)
    concepts = [{"instance_dir": str(few), "instance_prompt": "sks dog", "repeats": 3}, {"instance_dir": str(many), "instance_prompt": "zwx cat"}]
    recipe = recipe_from_dict({"method": "dreambooth", "data": {"resolution": 64}, "dreambooth": {"concepts": concepts, "prior_preservation": False}})
    (few_items, few_report), (many_items, _) = (checked_examples(config) for config in data_configs(recipe))
    assert len(few_items) == 6 and len(many_items) == 5  # 2 images x 3 uses per epoch, and 5 x 1
    assert "2 used, 0 skipped; 6 uses per epoch" in few_report.lines()[0]
    with pytest.raises(FinetuneError, match="data.folders are subfolders of data.image_dir: .*for DreamBooth, give each concept its repeats"):
        recipe_from_dict({"method": "dreambooth", "data": {"folders": [{"path": "a"}]}, "dreambooth": {"concepts": concepts}})


def test_a_dreambooth_recipe_training_refuses_is_refused_on_load_so_check_data_says_so(tmp_path, capsys):
    folder = write_images(tmp_path / "subject", 2)
    recipe = tmp_path / "r.yaml"
    concept = {"instance_dir": str(folder), "instance_prompt": "sks dog", "class_prompt": "a dog"}
    recipe.write_text(json.dumps({"method": "dreambooth", "data": {"resolution": 64}, "dreambooth": {"concepts": [concept], "num_class_images": 0}}))
    assert main(["check-data", str(recipe)]) == 2
    assert "dreambooth.num_class_images must be at least 1 with prior preservation (or set prior_preservation: false)" in capsys.readouterr().err


def test_controlnet_folders_take_diffusers_conditioning_image_key_and_a_metadata_without_one_is_one_line(make_recipe, pairs_folder, tmp_path):
    from finetune.controlnet.pairs import read_pairs

    folder = tmp_path / "pairs"
    shutil.copytree(pairs_folder, folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    renamed = [{"file_name": row["file_name"], "conditioning_image": row["conditioning_file_name"], "text": row["text"]} for row in rows]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in renamed))
    recipe = make_recipe(method="controlnet", data__image_dir=str(folder))  # controlnet.conditioning_column: conditioning_image
    pairs, unpaired = read_pairs(recipe)
    assert len(pairs) == len(rows) and unpaired == []
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": row["file_name"], "hint": "x.png", "text": "t"}) + "\n" for row in rows))
    with pytest.raises(FinetuneError, match=r"names no conditioning images: its rows have 'file_name', 'hint', 'text'; add conditioning_file_name"):
        read_pairs(recipe)
    # recipes/controlnet.yaml called controlnet.conditioning_column "datasets only": a folder's rows are read by it too.
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": row["file_name"], "hint": row["conditioning_file_name"], "text": "t"}) + "\n" for row in rows))
    assert len(read_pairs(make_recipe(method="controlnet", data__image_dir=str(folder), controlnet__conditioning_column="hint"))[0]) == len(rows)


def test_make_conditions_keeps_an_earlier_runs_conditioning_images_unless_told(tmp_path, capsys):
    source = write_images(tmp_path / "photos", 2)
    assert main(["make-conditions", str(source), str(tmp_path / "data"), "--kind", "canny"]) == 0
    assert main(["make-conditions", str(source), str(tmp_path / "data"), "--kind", "luminance"]) == 2
    assert f"{tmp_path / 'data' / 'conditioning'} already holds 2 conditioning images: write to another folder, or pass --overwrite" in capsys.readouterr().err
    assert main(["make-conditions", str(source), str(tmp_path / "data"), "--kind", "luminance", "--overwrite"]) == 0


def test_controlnet_pretrained_takes_a_controlnet_runs_output_folder(make_recipe, pairs_folder, tmp_path):
    from finetune.methods.controlnet import ControlNetMethod

    run = tmp_path / "earlier-run"
    (run / "controlnet").mkdir(parents=True)
    (run / "controlnet" / "config.json").write_text("{}")
    method = ControlNetMethod(make_recipe(method="controlnet", data__image_dir=str(pairs_folder), controlnet__pretrained=str(run)))
    method.check_data()
    assert method.load_from == str(run / "controlnet")
    method = ControlNetMethod(make_recipe(method="controlnet", data__image_dir=str(pairs_folder), controlnet__pretrained=str(tmp_path)))
    with pytest.raises(FinetuneError, match="is a folder with no config.json, not a ControlNet: controlnet.pretrained must be a diffusers ControlNet folder .*, a controlnet run's output folder"):
        method.check_data()


def test_a_condition_that_is_no_image_names_the_option(tmp_path):
    from controlnet_helpers import load_condition

    (tmp_path / "edges.png").write_text("not an image")
    with pytest.raises(FinetuneError, match=r"^conditioning image .*edges.png cannot be read \(.*\): check --condition \(a PNG or JPEG\)$"):
        load_condition(tmp_path / "edges.png", 64)


def test_a_pipeline_or_controlnet_folder_given_as_the_lora_says_which_option_takes_it(tmp_path):
    from finetune.checkpoints.run_files import resolve_lora_file

    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    with pytest.raises(FinetuneError, match=r"pipeline is a whole pipeline, not a LoRA: use it as the base model \(--base .*pipeline\)$"):
        resolve_lora_file(str(tmp_path / "pipeline"))
    (tmp_path / "controlnet").mkdir()
    (tmp_path / "controlnet" / "config.json").write_text("{}")
    with pytest.raises(FinetuneError, match=r"controlnet is a model folder \(a ControlNet\?\), not a LoRA: pass a ControlNet as --controlnet"):
        resolve_lora_file(str(tmp_path / "controlnet"))
    # With its weights file, as ControlNets are saved: that one .safetensors was taken for the LoRA.
    (tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(FinetuneError, match=r"controlnet is a model folder \(a ControlNet\?\), not a LoRA"):
        resolve_lora_file(str(tmp_path / "controlnet"))
    (tmp_path / "two").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / "two" / name).write_bytes(b"")
    with pytest.raises(FinetuneError, match=r"two holds 2 .safetensors files \(a.safetensors, b.safetensors\) and no pytorch_lora_weights.safetensors: "
                                            r"pass the LoRA file itself$"):
        resolve_lora_file(str(tmp_path / "two"))


def test_review_cases_old_checkpoints_overrides_repeats_in_check_data_and_diffusers_conditioning_folders(make_recipe, pairs_folder, tmp_path, capsys):
    from finetune.checkpoints.resume_changes import changed_settings
    from finetune.config.recipe_loading import load_recipe

    # A setting added since a checkpoint was made is no change at its resume.
    assert changed_settings({"lora.rank": 4}, {"lora.rank": 4, "data.tag_dropout": 0.0}) == []
    assert changed_settings({"lora.rank": 4}, {"lora.rank": 8}) == ["lora.rank 4 -> 8"]
    # The last override of a key is the one named; a nested key's error names the override that set it.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {image_dir: x}\n")
    with pytest.raises(FinetuneError, match=r"^override 'data.resolution=abc': key 'data.resolution'"):
        load_recipe(recipe, ["data.resolution=500", "data.resolution=abc"])
    with pytest.raises(FinetuneError, match=r"^override 'data.folders=\[\{path: x, repeats: a\}\]': key 'data.folders.0.repeats'"):
        load_recipe(recipe, ["data.folders=[{path: x, repeats: a}]"])
    # check-data's --resolution keeps a concept's repeats.
    few = write_images(tmp_path / "few", 2)
    concept = {"instance_dir": str(few), "instance_prompt": "sks dog", "repeats": 3}
    recipe.write_text(json.dumps({"method": "dreambooth", "model": {"pretrained": str(SHIPPED_BASE)}, "data": {"resolution": 64}, "dreambooth": {"concepts": [concept], "prior_preservation": False}}))
    assert main(["check-data", str(recipe), "--resolution", "64"]) == 0 and "6 uses per epoch" in capsys.readouterr().out
    # diffusers' ControlNet layout keeps its conditioning images in a subfolder the metadata names: no warning.
    folder = tmp_path / "pairs"
    shutil.copytree(pairs_folder, folder)
    (folder / "conditioning").rename(folder / "conditioning_images")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        row["conditioning_image"] = row.pop("conditioning_file_name").replace("conditioning/", "conditioning_images/")
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe.write_text(json.dumps({"method": "controlnet", "model": {"pretrained": str(SHIPPED_BASE)}, "data": {"image_dir": str(folder), "resolution": 64}}))
    assert main(["check-data", str(recipe)]) == 0
    assert "subfolders with images" not in capsys.readouterr().out


def test_a_controlnet_trained_with_its_own_unet_decoder_is_not_continued_without_it(make_recipe, pairs_folder, tmp_path):
    from finetune.methods.controlnet import ControlNetMethod

    run = tmp_path / "unlocked-run"
    for part in ("controlnet", "unet"):
        (run / part).mkdir(parents=True)
        (run / part / "config.json").write_text("{}")
        (run / part / "finetune_metadata.json").write_text('{"finetune.method": "controlnet"}')  # the same in both, as one run saves them
    method = ControlNetMethod(make_recipe(method="controlnet", data__image_dir=str(pairs_folder), controlnet__pretrained=str(run)))
    with pytest.raises(FinetuneError, match=r"was trained with controlnet.unlock_unet_decoder and works only with its own UNet .*: set controlnet.pretrained: null$"):
        method.check_data()
