"""ControlNet training as a user sets it up: a `datasets` dataset with a conditioning column, a
conditioning image drawn in its alpha channel, diffusers' images/ + conditioning_images/ layout, and
another model's folder given as the ControlNet to start from or sample with."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.controlnet.folder import check_control_options
from finetune.errors import FinetuneError
from finetune.methods.controlnet import ControlNetMethod
from finetune.toyworld.datasets import generate
from finetune.toyworld.world import mask_image
from conftest import SHIPPED_BASE  # a base check-data finds offline (the default hub id is in no cache)


def test_a_conditioning_column_of_file_paths_is_one_line_naming_it(make_recipe, tmp_path):
    import datasets

    samples = generate(2, seed=3)
    paths = []
    for i, (_, _, _, mask) in enumerate(samples):
        mask_image(mask).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    data = datasets.Dataset.from_dict({"image": [s[0] for s in samples], "guide": paths, "text": [s[1] for s in samples]})
    data.save_to_disk(tmp_path / "saved")
    recipe = make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(tmp_path / "saved"), controlnet__conditioning_column="guide")
    with pytest.raises(FinetuneError, match=r"column 'guide' \(controlnet.conditioning_column\) holds .*string.*not decoded images: "
                                            r"cast it with dataset.cast_column\('guide', datasets.Image\(\)\)"):  # fmt: skip
        ControlNetMethod(recipe).check_data()


@pytest.mark.parametrize("part, class_name", [("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")])
def test_a_unet_or_vae_folder_given_as_the_controlnet_is_one_line_naming_its_class(part, class_name, make_recipe, tiny_model, pairs_folder, tmp_path):
    folder = tiny_model / part
    recipe = make_recipe(method="controlnet", data__image_dir=str(pairs_folder), controlnet__pretrained=str(folder))
    with pytest.raises(FinetuneError, match=rf"^controlnet.pretrained {folder} holds a {class_name}, not a ControlNet"):
        ControlNetMethod(recipe).check_data()  # it said the folder was trained with controlnet.unlock_unet_decoder
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FinetuneError, match=rf"^--controlnet {copy} holds a {class_name}, not a ControlNet"):
        check_control_options(str(copy), str(pairs_folder / "metadata.jsonl"), None)  # it loaded the model and failed on meta tensors


def test_the_controlnet_of_a_saved_controlnet_pipeline_is_continued(make_recipe, tiny_model, pairs_folder, tmp_path):
    from controlnet_helpers import write_controlnet_run

    pipeline = write_controlnet_run(tiny_model, tmp_path / "pipeline", trained=True)  # controlnet/ ...
    shutil.copytree(tiny_model / "unet", pipeline / "unet")  # ... beside the base's own unet/, as save_pretrained writes them
    for given in (pipeline, pipeline / "controlnet"):
        recipe = make_recipe(method="controlnet", data__image_dir=str(pairs_folder), controlnet__pretrained=str(given))
        method = ControlNetMethod(recipe)
        method.check_data()  # it said the ControlNet was trained with controlnet.unlock_unet_decoder
        assert method.load_from == str(pipeline / "controlnet")


def test_a_conditioning_image_drawn_only_in_its_alpha_channel_is_one_line(make_recipe, pairs_folder, tmp_path):
    folder = tmp_path / "pairs"
    shutil.copytree(pairs_folder, folder)
    row = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
    mask = np.asarray(Image.open(folder / row["conditioning_file_name"]).convert("L"))
    white_on_clear = np.dstack([mask, mask, mask, mask])  # white shape, transparent (black) background
    Image.fromarray(white_on_clear, "RGBA").save(folder / row["conditioning_file_name"])
    recipe = make_recipe(method="controlnet", data__image_dir=str(folder))
    with pytest.raises(FinetuneError, match=r"conditioning image .* is one colour once its transparency is flattened onto white"):
        ControlNetMethod(recipe).check_data()  # it trained on an all-white conditioning image

    black_on_clear = np.dstack([255 - mask, 255 - mask, 255 - mask, mask])  # flattened onto white, the shape stays
    Image.fromarray(black_on_clear, "RGBA").save(folder / row["conditioning_file_name"])
    ControlNetMethod(recipe).check_data()


def test_diffusers_images_and_conditioning_images_subfolders_are_one_line(make_recipe, pairs_folder, tmp_path):
    folder = tmp_path / "diffusers-layout"
    (folder / "images").mkdir(parents=True)
    shutil.copytree(pairs_folder / "conditioning", folder / "conditioning_images")
    rows = [json.loads(line) for line in (pairs_folder / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        shutil.copy(pairs_folder / row["file_name"], folder / "images" / row["file_name"])
    lines = [{"file_name": f"images/{row['file_name']}", "conditioning_image": f"conditioning_images/{Path(row['conditioning_file_name']).name}",
              "text": row["text"]} for row in rows]  # fmt: skip
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    recipe = make_recipe(method="controlnet", data__image_dir=str(folder))
    with pytest.raises(FinetuneError, match=r"has no images of its own: its metadata file names them in a subfolder \(images/"):
        ControlNetMethod(recipe).check_data()  # it said the folder has no images


def test_resuming_with_only_mid_control_switched_is_one_line_naming_it(make_recipe, pairs_folder, monkeypatch):
    import finetune.training.trainer as trainer

    first = trainer.train(make_recipe(method="controlnet", data__image_dir=str(pairs_folder), train__max_steps=2, checkpoint__every_n_steps=2))
    checkpoint = first.output_dir / "checkpoints" / "checkpoint-2"
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))  # said before it loads
    recipe = make_recipe(method="controlnet", data__image_dir=str(pairs_folder), train__max_steps=4, controlnet__only_mid_control=True)
    with pytest.raises(FinetuneError, match=r"trained other weights or optimizer groups than this recipe would \(controlnet.only_mid_control False -> True\)"):
        trainer.train(recipe, resume=str(checkpoint))  # it loaded the model, then named only a count of parameters


def test_validation_rows_show_different_conditioning_images_when_folders_repeat_them(make_recipe, pairs_folder):
    folders = [{"path": ".", "repeats": 3}]
    recipe = make_recipe(method="controlnet", data__image_dir=str(pairs_folder), data__folders=folders, validation__prompts=["a", "b", "c"])
    method = ControlNetMethod(recipe)
    method.check_data()
    conditions = [image.tobytes() for image in method.validation_conditions()]
    assert len(set(conditions)) == 3  # the first pair three times, repeated


@pytest.mark.parametrize("options, said", [
    (["--kind", "mask", "--threshold", "-5"], "mask --threshold must be 0 or more (an RGB distance; below 0 every pixel is shape), got -5.0"),
    (["--kind", "canny", "--sigma", "-1"], "canny --sigma must be 0 to 50 (pixels of blur), got -1.0"),
    (["--kind", "canny", "--low", "50", "--high", "10"], "canny thresholds must satisfy 0 <= low <= high, got low=50.0, high=10.0"),
])  # fmt: skip
def test_make_conditions_refuses_degenerate_thresholds_before_writing_anything(options, said, tmp_path, capsys):
    from finetune.cli.main import main

    star = Path(__file__).parent.parent / "datasets" / "star"
    assert main(["make-conditions", str(star), str(tmp_path / "out"), *options]) == 2  # a negative threshold wrote all-white masks
    assert capsys.readouterr().err.strip() == f"error: {said}"
    assert not (tmp_path / "out").exists()  # bad canny thresholds left an empty conditioning/ folder


def test_make_conditions_refuses_captions_under_another_key_than_text(tmp_path, capsys):
    from finetune.cli.main import main

    star = Path(__file__).parent.parent / "datasets" / "star"
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = []
    for image in sorted(star.glob("*.png")):
        shutil.copy(image, photos / image.name)
        rows.append({"file_name": image.name, "caption": image.with_suffix(".txt").read_text().strip()})
    (photos / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["make-conditions", str(photos), str(tmp_path / "out"), "--kind", "mask"]) == 2  # it wrote every caption as ""
    said = f"error: {photos / 'metadata.jsonl'} has no 'text' captions (its rows have 'caption', 'file_name'): rename the key that holds the captions to text"
    assert capsys.readouterr().err.startswith(said)
    assert not (tmp_path / "out").exists()


def test_a_float_depth_map_of_values_0_to_1_is_one_line(make_recipe, pairs_folder, tmp_path):
    folder = tmp_path / "pairs"
    shutil.copytree(pairs_folder, folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    size = Image.open(folder / rows[0]["file_name"]).size
    depth = np.linspace(0, 1, size[0] * size[1], dtype=np.float32).reshape(size[1], size[0])
    Image.fromarray(depth, "F").save(folder / "depth.tif")  # as a depth estimator's output is often saved
    rows[0]["conditioning_file_name"] = "depth.tif"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = make_recipe(method="controlnet", data__image_dir=str(folder))
    with pytest.raises(FinetuneError, match=r"conditioning image .*depth.tif holds 32-bit float values of 0-1, which train as levels 0-255"):
        ControlNetMethod(recipe).check_data()  # it trained on an all but black conditioning image


def test_conditioning_file_names_written_on_windows_are_found(make_recipe, pairs_folder, tmp_path):
    folder = tmp_path / "pairs"
    shutil.copytree(pairs_folder, folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        row["conditioning_file_name"] = row["conditioning_file_name"].replace("/", "\\")  # conditioning\0000.png
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    method = ControlNetMethod(make_recipe(method="controlnet", data__image_dir=str(folder)))
    method.check_data()  # it said each conditioning image was not found
    assert [Path(pair.conditioning.source).parent for pair in method.pairs] == [folder / "conditioning"] * len(rows)


def test_check_data_says_a_missing_validation_conditioning_image_stops_training(make_recipe, pairs_folder, tmp_path, capsys):
    from finetune.cli.main import main

    recipe = tmp_path / "recipe.json"
    data = {"method": "controlnet", "model": {"pretrained": str(SHIPPED_BASE)}, "data": {"image_dir": str(pairs_folder), "resolution": 64}, "validation": {"prompts": ["a star"]},
            "controlnet": {"validation_conditions": [str(tmp_path / "gone.png")]}}  # fmt: skip
    recipe.write_text(json.dumps(data))
    assert main(["check-data", str(recipe)]) == 1  # it said ready to train; training stopped at once
    said = f"result: training would stop: validation conditioning image {tmp_path / 'gone.png'} not found: check controlnet.validation_conditions"
    assert capsys.readouterr().out.strip().splitlines()[-1] == said
