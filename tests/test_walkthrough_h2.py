"""`datasets` datasets as users have them, as a walkthrough found them: one data file (parquet, arrow,
jsonl) given as data.dataset. Each is read as meant, or is one line naming the dataset and what to do."""

import pytest
from PIL import Image

from finetune.config import DataConfig
from finetune.data import load_examples
from finetune.errors import FinetuneError


def two_images():
    import datasets

    return datasets.Dataset.from_dict({"image": [Image.new("RGB", (64, 64), c) for c in ("red", "blue")], "text": ["a red thing", "a blue thing"]})


def test_one_data_file_is_a_dataset_of_its_rows(tmp_path):
    two_images().to_parquet(str(tmp_path / "train.parquet"))
    two_images().save_to_disk(tmp_path / "saved")
    for path in (tmp_path / "train.parquet", next((tmp_path / "saved").glob("*.arrow"))):  # it was "not found", though there
        examples = load_examples(DataConfig(dataset=str(path), resolution=64))
        assert [example.caption for example in examples] == ["a red thing", "a blue thing"]
        assert examples[1].load().convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(FinetuneError, match=r"train.parquet has no split 'test' .*: set data.dataset_split$"):
        load_examples(DataConfig(dataset=str(tmp_path / "train.parquet"), dataset_split="test", resolution=64))
