"""A folder's captions that one prompt for every image leaves unread (a DreamBooth concept's instance_prompt, data.caption)
are said by the data check: a DreamBooth folder captioned for sd-scripts, which reads captions there, trained on its
instance prompt alone, and check-data said nothing of its .txt files and metadata.jsonl."""

import json

import yaml
from conftest import SHIPPED_BASE
from PIL import Image

from finetune.cli.main import main


def captioned_folder(folder, captions=True):
    """Three images: a.png captioned by a.txt, b.png and c.png by metadata.jsonl rows (as a creator's folder may mix them)."""
    folder.mkdir()
    for name, colour in (("a", "red"), ("b", "blue"), ("c", "green")):
        Image.new("RGB", (64, 64), colour).save(folder / f"{name}.png")
    if captions:
        (folder / "a.txt").write_text("a red square")
        (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{n}.png", "text": f"a {n} square"}) + "\n" for n in "bc"))
    return folder


def check_dreambooth(tmp_path, folder, capsys, **concept) -> list[str]:
    concepts = [{"instance_dir": str(folder), "instance_prompt": "a sks shape", **concept}]
    recipe = {"method": "dreambooth", "model": {"pretrained": str(SHIPPED_BASE)}, "data": {"image_dir": None, "resolution": 64},
              "output_dir": str(tmp_path / "run"), "dreambooth": {"prior_preservation": False, "concepts": concepts}}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["check-data", str(tmp_path / "recipe.yaml")]) == 0
    return capsys.readouterr().out.splitlines()


def test_a_dreambooth_folders_captions_unread_by_its_instance_prompt_are_said(tmp_path, capsys):
    folder = captioned_folder(tmp_path / "subject")
    lines = check_dreambooth(tmp_path, folder, capsys)
    said = [line for line in lines if line.startswith("captions:")]
    assert said == [f"captions: not read from 1 caption file (a.txt) and metadata.jsonl's 'text' column in {folder}: every image trains as 'a sks shape' "
                    "(dreambooth.concepts.0.instance_prompt); dreambooth.concepts.0.use_captions: true trains with them"], lines  # fmt: skip
    assert lines[-1] == "result: ready to train"  # a note, not a warning: one prompt for every image is often meant

    assert not [line for line in check_dreambooth(tmp_path, folder, capsys, use_captions=True) if line.startswith("captions:")]
    uncaptioned = captioned_folder(tmp_path / "plain", captions=False)
    assert not [line for line in check_dreambooth(tmp_path, uncaptioned, capsys) if line.startswith("captions:")]


def test_data_caption_leaving_a_folders_captions_unread_is_said_naming_it(tmp_path, capsys):
    folder = captioned_folder(tmp_path / "images")
    recipe = {"method": "lora", "model": {"pretrained": str(SHIPPED_BASE)}, "data": {"image_dir": str(folder), "resolution": 64}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    check = ["check-data", str(tmp_path / "recipe.yaml")]
    assert main([*check, "data.caption=a shape"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("captions:")]
    assert said == [f"captions: not read from 1 caption file (a.txt) and metadata.jsonl's 'text' column in {folder}: every image trains as 'a shape' (data.caption); "
                    "data.caption: null trains with them"]  # fmt: skip
    assert main(check) == 0
    assert "captions:" not in capsys.readouterr().out


def test_a_metadata_file_without_captions_is_not_said_unread(tmp_path, capsys):
    """A ControlNet folder's rows name its conditioning images and may caption nothing: with data.caption, nothing is unread."""
    folder = captioned_folder(tmp_path / "pairs", captions=False)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{n}.png", "conditioning_file_name": f"{n}.png"}) + "\n" for n in "abc"))
    recipe = {"method": "lora", "model": {"pretrained": str(SHIPPED_BASE)}, "data": {"image_dir": str(folder), "resolution": 64, "caption": "a shape"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["check-data", str(tmp_path / "recipe.yaml")]) == 0
    assert "captions:" not in capsys.readouterr().out
