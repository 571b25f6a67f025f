"""A folder of many images given as data.dataset loads slowly (datasets' imagefolder searches its files at every
load: 2 to 3 ms per file measured); check-data and train's data check say that data.image_dir reads the same images
and captions without that cost, and only where it does. The threshold is lowered, so a few tiny files stand for many."""

import json

import pytest
from PIL import Image

from finetune.cli.main import main
from finetune.config import DataConfig
from finetune.data.sources import read_examples
from conftest import SHIPPED_BASE  # a base check-data finds offline (the default hub id is in no cache)

ADVICE = "which datasets' imagefolder searches for its files at every load"


@pytest.fixture
def many_images(tmp_path, monkeypatch):
    monkeypatch.setattr("finetune.data.image_folder_datasets.SLOW_IMAGE_FOLDER_COUNT", 3)
    folder = tmp_path / "photos"
    folder.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 0, 0)).save(folder / f"{i}.png")  # other pixels each: no copies said
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def check_data(folder, tmp_path, capsys, *overrides) -> str:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{pretrained: {SHIPPED_BASE}}}\ndata:\n  dataset: {folder}\n  resolution: 64\n")
    assert main(["check-data", str(recipe), *overrides]) == 0
    return capsys.readouterr().out


def test_a_folder_of_many_images_as_a_dataset_is_told_image_dir_reads_it_without_the_cost(many_images, tmp_path, capsys):
    out = check_data(many_images, tmp_path, capsys)
    assert (f"warning: dataset {many_images} is a folder of 4 images, {ADVICE} (about 2 ms an image): data.image_dir: {many_images} "
            "(with data.dataset: null) reads the same images and their captions (metadata.jsonl) without that cost") in out.splitlines()
    # What it advises is true: the same images, with the same captions.
    as_dataset = sorted(example.caption for example in read_examples(DataConfig(dataset=str(many_images), resolution=64)))
    assert as_dataset == sorted(example.caption for example in read_examples(DataConfig(image_dir=str(many_images), resolution=64)))
    assert as_dataset == [f"caption {i}" for i in range(4)]


def test_it_is_not_said_where_image_dir_would_read_other_images_or_captions(many_images, tmp_path, capsys, monkeypatch):
    assert ADVICE not in check_data(many_images, tmp_path, capsys, "data.dataset_split=train[:3]")  # a part of the images
    # Another image column (a ControlNet's conditioning images), which data.image_dir does not read as such.
    rows = [{**json.loads(line), "conditioning_image_file_name": "0.png"} for line in (many_images / "metadata.jsonl").read_text().splitlines()]
    (many_images / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert ADVICE not in check_data(many_images, tmp_path, capsys)
    (many_images / "metadata.jsonl").write_text("".join(json.dumps({key: row[key] for key in ("file_name", "text")}) + "\n" for row in rows))
    (many_images / "more").mkdir()  # imagefolder reads subfolders' images too
    Image.new("RGB", (64, 64), "blue").save(many_images / "more" / "x.png")
    (many_images / "metadata.jsonl").write_text((many_images / "metadata.jsonl").read_text() + json.dumps({"file_name": "more/x.png", "text": "x"}) + "\n")
    assert ADVICE not in check_data(many_images, tmp_path, capsys)
    (many_images / "more" / "x.png").unlink()
    (many_images / "metadata.jsonl").write_text("".join(json.dumps({key: row[key] for key in ("file_name", "text")}) + "\n" for row in rows))
    assert ADVICE in check_data(many_images, tmp_path, capsys)  # as it was: said again
    monkeypatch.setattr("finetune.data.image_folder_datasets.SLOW_IMAGE_FOLDER_COUNT", 4)  # no more than the threshold: quick enough
    assert ADVICE not in check_data(many_images, tmp_path, capsys)
