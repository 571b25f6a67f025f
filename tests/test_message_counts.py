"""Counts in the lines a run and check-data say read as the rest do (finetune/counts.py): 'training on
1 process(es)', 'has 1 image(s) ...: convert them'."""

from PIL import Image

from finetune.config import DataConfig
from finetune.data.sources import read_examples
from finetune.data_check.check import inspect_examples
from finetune.training.trainer import train


def test_the_training_line_says_one_process_in_the_singular(make_recipe, capsys):
    train(make_recipe(train__max_steps=1))
    assert capsys.readouterr().out.splitlines()[0] == "training on 1 process (distributed: no), device cpu, mixed precision no"


def test_one_unread_image_is_singular(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "b.gif")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "red"}\n')
    config = DataConfig(image_dir=str(tmp_path), resolution=64)
    lines = [finding.message for finding in inspect_examples(read_examples(config), config, "data").findings]
    assert f"data folder {tmp_path} has 1 image training does not read (.gif, e.g. b.gif): convert it to PNG or JPEG" in lines
