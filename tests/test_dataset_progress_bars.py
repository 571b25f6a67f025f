"""datasets' "Generating train split" bar, reading a local folder or data file given as data.dataset: done in a blink,
it was drawn before the data check's own bar (by every process of a launch). Its errors are said as before, and the
bars are given back for a hub dataset's downloads."""

import datasets
import pytest
from PIL import Image

from finetune.config import DataConfig
from data_examples import load_examples
from finetune.errors import FinetuneError


def image_folder(folder, rows):
    folder.mkdir()
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), color).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text(rows)


def test_a_local_dataset_is_read_without_datasets_bar_and_its_errors_are_said(tmp_path, capsys):
    image_folder(tmp_path / "folder", '{"file_name": "0.png", "text": "a red thing"}\n{"file_name": "1.png", "text": "a blue thing"}\n')
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (64, 64), "red")], "text": ["a red thing"]}).to_parquet(str(tmp_path / "train.parquet"))
    capsys.readouterr()
    for dataset, count in ((tmp_path / "folder", 2), (tmp_path / "train.parquet", 1)):  # each read anew: a cache of its own
        assert len(load_examples(DataConfig(dataset=str(dataset), resolution=64))) == count
        err = capsys.readouterr().err
        assert "Generating train split" not in err and "examples/s" not in err, err
        assert not datasets.are_progress_bars_disabled()  # given back: a hub dataset's downloads show theirs
    image_folder(tmp_path / "bad", '{"file_name": "0.png", "text": "a red thing"}\n{"file_name": \n')
    with pytest.raises(FinetuneError, match=r"dataset folder .*bad cannot be read \(\w+: .*\): fix its metadata.jsonl/metadata.csv"):
        load_examples(DataConfig(dataset=str(tmp_path / "bad"), resolution=64))
    assert not datasets.are_progress_bars_disabled()
