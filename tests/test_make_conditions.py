"""finetune make-conditions: the training folder it writes from a folder of photos, its record of how, and its refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
from controlnet_helpers import controlnet_recipe
from PIL import Image

from finetune.cli.main import main
from finetune.controlnet.conditions import make_condition_folders
from finetune.errors import FinetuneError
from finetune.methods.controlnet import ControlNetMethod
from finetune.toyworld.datasets import write_folder
from finetune.toyworld.world import draw, sample_scenes
from finetune.training.trainer import train


def test_make_conditions_into_a_file_is_one_line(tmp_path, capsys):
    from finetune.cli.main import main

    (tmp_path / "notes.txt").write_text("not a folder")
    assert main(["make-conditions", str(Path(__file__).parent.parent / "datasets" / "star"), str(tmp_path / "notes.txt" / "out"), "--kind", "canny"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{tmp_path / 'notes.txt'} is a file, not a folder: give a folder for the conditioning images and metadata.jsonl")


def test_make_conditions_writes_a_training_folder(make_recipe, tmp_path, capsys):
    source = write_folder(tmp_path / "photos", 4, seed=4, include_held_out="all", metadata=False)  # .txt captions only
    (source / "0003.txt").unlink()
    out = tmp_path / "controlnet-data"
    assert main(["make-conditions", str(source), str(out), "--kind", "mask"]) == 0
    said = capsys.readouterr().out
    assert "wrote 4 mask conditioning images" in said
    assert said.splitlines()[-1] == f"next: finetune train recipes/controlnet.yaml data.image_dir={out}"  # the command that trains on it

    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    scenes = sample_scenes(4, seed=4, include_held_out="all")
    for i, row in enumerate(rows):
        assert row["file_name"] == f"{i:04d}.png" and row["conditioning_file_name"] == f"conditioning/{i:04d}.png"
        assert (out / row["file_name"]).read_bytes() == (source / row["file_name"]).read_bytes()
        truth = draw(scenes[i], 64, np.random.default_rng([4, i]))[1]
        found = np.asarray(Image.open(out / row["conditioning_file_name"]))[..., 0] > 127
        assert (found & truth).sum() / (found | truth).sum() > 0.9
    assert rows[0]["text"] == (source / "0000.txt").read_text().strip() and rows[3]["text"] == ""

    method = ControlNetMethod(controlnet_recipe(make_recipe, out))
    method.check_data()  # ready for training as written
    assert len(method.pairs) == 4

    for kind in ("canny", "luminance"):
        [(folder, count, _)] = make_condition_folders(source, tmp_path / kind, kind)
        assert count == 4 and Image.open(folder / "conditioning" / "0000.png").size == (64, 64)
    with pytest.raises(SystemExit):
        main(["make-conditions", "--help"])
    assert capsys.readouterr().out.startswith("usage: finetune make-conditions")
    assert main(["make-conditions", str(tmp_path / "nowhere"), str(out), "--kind", "canny"]) == 2
    assert capsys.readouterr().err.strip() == f"error: input folder {tmp_path / 'nowhere'} not found: give the folder of photos to make conditioning images from"


def test_a_controlnet_records_how_its_conditioning_was_made_and_sample_says_it(make_recipe, tiny_model, pairs_folder, tmp_path, capsys):
    """make-conditions writes its kind and thresholds beside metadata.jsonl; a ControlNet trained on the folder
    records them, and `finetune sample` says what kind of --condition it wants (a photo given to an edge
    ControlNet is the usual mistake), except for one made as its training images were. A folder of conditioning images made
    otherwise records nothing."""
    from finetune.checkpoints.run_files import CONTROLNET_DIR
    from finetune.sampling.adapter_records import saved_model_metadata

    source = write_folder(tmp_path / "photos", 2, seed=4)
    data = tmp_path / "edges"
    assert main(["make-conditions", str(source), str(data), "--kind", "canny", "--low", "25", "--high", "50"]) == 0
    assert json.loads((data / "conditioning.json").read_text()) == {"kind": "canny", "low": 25.0, "high": 50.0, "sigma": 1.0}
    run = train(controlnet_recipe(make_recipe, data, output_dir=str(tmp_path / "run"), train__max_steps=1)).output_dir
    assert json.loads(saved_model_metadata(run / CONTROLNET_DIR)["finetune.conditioning"])["kind"] == "canny"
    capsys.readouterr()
    sample = ["sample", "--base", str(tiny_model), "--prompt", "a shape", "--steps", "1", "--num-images", "1", "--condition", str(source / "0000.png")]
    assert main([*sample, "--controlnet", str(run), "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert ("note: this ControlNet was trained on canny (low 25, high 50, sigma 1) conditioning images (finetune make-conditions); "
            "--condition is used as it is: give one of that kind") in out  # fmt: skip
    # the photo itself, the usual mistake, is said to be one; its canny image is not
    assert (f"note: --condition {source / '0000.png'} is no canny image (make-conditions makes them black and white; it has colours): "
            "a photo steers as the ControlNet never learned; make its canny image with finetune make-conditions PHOTOS OUT --kind canny (it reads a folder)") in out  # fmt: skip
    assert main([*sample[:-1], str(data / "conditioning" / "0000.png"), "--controlnet", str(run), "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    # one of the very images it trained on (its folder's conditioning.json records the same) is not asked to be one of that kind
    assert "is no canny image" not in out and "note: this ControlNet was trained on" not in out
    assert main(["make-conditions", str(source), str(tmp_path / "edges20"), "--kind", "canny"]) == 0  # canny of other thresholds
    capsys.readouterr()
    assert main([*sample[:-1], str(tmp_path / "edges20" / "conditioning" / "0000.png"), "--controlnet", str(run), "--out", str(tmp_path / "s")]) == 0
    assert "note: this ControlNet was trained on canny (low 25, high 50, sigma 1)" in capsys.readouterr().out

    other = train(controlnet_recipe(make_recipe, pairs_folder, output_dir=str(tmp_path / "other"), train__max_steps=1)).output_dir
    assert "finetune.conditioning" not in saved_model_metadata(other / CONTROLNET_DIR)
    capsys.readouterr()
    assert main([*sample, "--controlnet", str(other), "--out", str(tmp_path / "s2")]) == 0
    assert "note: this ControlNet was trained on" not in capsys.readouterr().out


def test_a_photo_among_a_canny_folders_validation_conditions_is_said_at_the_start_and_by_check_data(make_recipe, tmp_path, capsys):
    """controlnet.validation_conditions naming a photo, not its canny image, steered every validation grid as the ControlNet
    never learns to be steered, without a word; the folder's canny images among them are not said."""
    import yaml

    source = write_folder(tmp_path / "photos", 2, seed=4)
    data = tmp_path / "edges"
    assert main(["make-conditions", str(source), str(data), "--kind", "canny"]) == 0
    conditions = [str(source / "0000.png"), str(data / "conditioning" / "0001.png")]
    recipe = controlnet_recipe(make_recipe, data, controlnet__validation_conditions=conditions, validation__prompts=["a shape"])
    said = (f"warning: controlnet.validation_conditions image {source / '0000.png'} is no canny image (make-conditions makes them black and "
            "white; it has colours): a photo steers as the ControlNet never learned; make its canny image with finetune make-conditions "
            "PHOTOS OUT --kind canny (it reads a folder)")  # fmt: skip
    method = ControlNetMethod(recipe)
    method.check_data()
    assert [line for line in method.start_lines if "validation_conditions" in line] == [said]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    capsys.readouterr()
    assert main(["check-data", str(tmp_path / "recipe.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.count("validation_conditions image") == 1 and f"{said}\n" in out


def test_make_conditions_reads_csv_captions_and_will_not_leave_two_caption_files(tmp_path):
    source = write_folder(tmp_path / "photos", 2, seed=4, metadata=False)
    for text in source.glob("*.txt"):
        text.unlink()
    (source / "metadata.csv").write_text("file_name,text\n0000.png,first\n0001.png,second\n", encoding="utf-8")
    [(folder, count, uncaptioned)] = make_condition_folders(source, tmp_path / "out", "canny")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [row["text"] for row in rows] == ["first", "second"] and uncaptioned == 0
    # In place, its metadata.jsonl would sit beside metadata.csv, which training refuses as ambiguous.
    with pytest.raises(FinetuneError, match=r"metadata\.csv would sit beside the metadata\.jsonl this writes .*: write to another folder"):
        make_condition_folders(source, source, "canny")
    assert not (source / "metadata.jsonl").exists() and not (source / "conditioning").exists()


def test_make_conditions_refuses_two_images_of_one_stem_before_writing_anything(tmp_path):
    source = write_folder(tmp_path / "photos", 2, seed=4, metadata=False)
    Image.open(source / "0000.png").convert("RGB").save(source / "0001.jpg")  # 0001.png and 0001.jpg: one conditioning name
    with pytest.raises(FinetuneError, match=r"^images 0001\.jpg and 0001\.png would share conditioning/0001\.png: rename one$"):
        make_condition_folders(source, tmp_path / "out", "canny")
    assert not (tmp_path / "out").exists()  # so renaming one is all it takes to run it again
    (source / "0001.jpg").rename(source / "0002.jpg")
    assert make_condition_folders(source, tmp_path / "out", "canny") == [(tmp_path / "out", 3, 1)]  # 0002.jpg has no caption
