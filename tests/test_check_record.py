"""The data check's record (finetune/data_check/check_record.py): a second check takes an unchanged file's results from it
instead of decoding the file again, and says all it said the first time; a changed file, or a record that cannot be
trusted, is checked afresh."""

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import finetune.data_check.check
from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.cli.main import main
from finetune.config import DataConfig
from finetune.data.sources import read_examples
from finetune.data_check.check import inspect_examples
from finetune.data_check.check_record import RECORD_NAME, CheckRecord
from odd_images import captioned, noise, write_odd_folder
from train_command_files import write_recipe

RESUME_IS_EXACT = not torch.cuda.is_available()  # on CPU a resumed run's weights are the uninterrupted run's bit for bit (tests/test_distributed.py)


@pytest.fixture
def decoded(monkeypatch) -> Counter:
    """How many times the data check has decoded each image since the test began."""
    counts, decode = Counter(), finetune.data_check.check.decode

    def counted_decode(example, *args, **kwargs):
        counts[example.source] += 1
        return decode(example, *args, **kwargs)

    monkeypatch.setattr(finetune.data_check.check, "decode", counted_decode)
    return counts


def masked_folder(folder: Path) -> Path:
    """Images with loss mask files, and with transparency (data.loss_mask.source files or alpha)."""
    for index, name in enumerate(["a.png", "b.png", "c.png"]):
        image = noise(96, 64, seed=index).convert("RGBA")
        image.putalpha(255 if name == "c.png" else 0)  # c opaque everywhere: it trains whole
        if name == "a.png":
            image.paste((0, 0, 0, 255), (16, 16, 80, 48))  # some of it opaque: it masks
        captioned(folder, name, image)
        mask = Image.new("L", (96, 64), 0)
        mask.paste(255, (8, 8, 72, 56))
        (folder / "masks").mkdir(exist_ok=True)
        mask.save(folder / "masks" / name)
    return folder


def kept(report) -> list:
    """All a report tells training: its lines (the record's count aside), findings, and every usable image's facts."""
    lines = [re.sub(r"; \d+ unchanged since the last check, not decoded again$", "", line) for line in report.lines()]
    usable = [(e.source, e.size, e.digest, e.file_stamp, e.mask_area, e.mask_digest, e.mask_file_stamp, e.load_mask is not None) for e in report.usable]
    return [lines, report.findings, report.skipped, usable]


CONFIGS = {
    "odd images": lambda tmp: DataConfig(image_dir=str(write_odd_folder(tmp / "odd")), resolution=64),
    "mask files": lambda tmp: DataConfig(image_dir=str(masked_folder(tmp / "m")), resolution=64, loss_mask={"source": "files"}),
    "alpha masks": lambda tmp: DataConfig(image_dir=str(masked_folder(tmp / "m")), resolution=64, loss_mask={"source": "alpha"}),
}


@pytest.mark.parametrize("kind", CONFIGS)
def test_a_second_check_decodes_no_unchanged_image_and_says_all_the_first_said(kind, tmp_path, decoded):
    config = CONFIGS[kind](tmp_path)
    fresh = inspect_examples(read_examples(config), config, "data")  # no record: as every check was
    first_record = CheckRecord(tmp_path / RECORD_NAME)
    first = inspect_examples(read_examples(config), config, "data", first_record)
    first_record.save()
    entries = json.loads((tmp_path / RECORD_NAME).read_text())["files"]
    images = {e.source for e in read_examples(config)}
    assert first.unchanged == 0 and images & set(entries), entries.keys()
    decoded.clear()
    second = inspect_examples(read_examples(config), config, "data", CheckRecord(tmp_path / RECORD_NAME))
    assert set(decoded) == images - set(entries)  # only those the check refused (unreadable ones) are read again
    assert second.unchanged == len(images & set(entries))
    assert second.lines()[0].endswith(f"; {second.unchanged} unchanged since the last check, not decoded again")
    assert kept(second) == kept(first) == kept(fresh)
    assert second.bucket_of == first.bucket_of


def test_an_image_rewritten_with_its_size_and_mtime_kept_is_decoded_again(tmp_path, decoded):
    folder = tmp_path / "data"
    for name in ("a.png", "b.png"):
        captioned(folder, name, noise(64, 64, seed=len(name) + ord(name[0])))
    config = DataConfig(image_dir=str(folder), resolution=64)
    record = CheckRecord(tmp_path / RECORD_NAME)
    before = {e.source: e.digest for e in inspect_examples(read_examples(config), config, "data", record).usable}
    record.save()
    changed = folder / "a.png"
    was = changed.stat()
    noise(64, 64, seed=99).save(changed)
    assert changed.stat().st_size == was.st_size  # noise of one size compresses to one size: only its pixels differ
    os.utime(changed, ns=(was.st_atime_ns, was.st_mtime_ns))  # as `cp -p` or `touch -r` set it back
    decoded.clear()
    after = inspect_examples(read_examples(config), config, "data", CheckRecord(tmp_path / RECORD_NAME))
    assert set(decoded) == {str(changed)} and after.unchanged == 1
    fresh = inspect_examples(read_examples(config), config, "data")
    assert {e.source: e.digest for e in after.usable} == {e.source: e.digest for e in fresh.usable}
    assert after.usable[0].digest != before[str(changed)]


def one_image_checked(tmp_path):
    """A folder of one image, checked once with its record saved in tmp_path: (the folder, its DataConfig)."""
    folder = tmp_path / "data"
    captioned(folder, "a.png", noise(64, 64))
    config = DataConfig(image_dir=str(folder), resolution=64)
    record = CheckRecord(tmp_path / RECORD_NAME)
    inspect_examples(read_examples(config), config, "data", record)
    record.save()
    return folder, config


@pytest.mark.parametrize("record_text", ["{not json", json.dumps({"finetune_data_check": 0, "files": {}}), json.dumps([1, 2]),
                                         "wrong fields", "other code"])  # fmt: skip
def test_a_corrupt_or_foreign_record_is_checked_afresh(record_text, tmp_path, decoded):
    folder, config = one_image_checked(tmp_path)
    if record_text == "wrong fields":  # this version's record, its entry's facts not of their types
        written = json.loads((tmp_path / RECORD_NAME).read_text())
        for entry in written["files"].values():
            entry["ImageFacts"]["size"] = "64x64"
        record_text = json.dumps(written)
    if record_text == "other code":  # this version's record, made by another finetune's data/ or data_check/ modules
        written = json.loads((tmp_path / RECORD_NAME).read_text())
        record_text = json.dumps(written | {"code": "0" * 32})
    (tmp_path / RECORD_NAME).write_text(record_text)
    decoded.clear()
    report = inspect_examples(read_examples(config), config, "data", CheckRecord(tmp_path / RECORD_NAME))
    assert set(decoded) == {str(folder / "a.png")} and report.unchanged == 0 and report.usable[0].size == (64, 64)


def test_a_resume_decodes_no_image_again_and_check_data_writes_no_output_dir(tiny_model, image_folder, tmp_path, decoded, capsys):
    recipe = write_recipe(tmp_path, "lora", image_folder, tiny_model, train={"batch_size": 2, "max_steps": 1}, logging={"tensorboard": False},
                          checkpoint={"every_n_steps": 1})  # fmt: skip
    assert main(["check-data", str(recipe)]) == 0
    assert not (tmp_path / "run").exists()  # check-data makes no folder
    images = set(decoded)
    assert main(["train", str(recipe)]) == 0
    assert (tmp_path / "run" / RECORD_NAME).is_file()
    decoded.clear()
    capsys.readouterr()
    assert main(["train", str(recipe), "--resume", "latest", "train.max_steps=2"]) == 0
    assert not decoded and f"; {len(images)} unchanged since the last check, not decoded again" in capsys.readouterr().out
    assert main(["check-data", str(recipe)]) == 0 and not decoded  # check-data reads the run's record too
    # The resume, on the record's sizes and digests, continues the curve of a run never stopped.
    assert main(["train", str(recipe), "train.max_steps=2", f"output_dir={tmp_path / 'straight'}"]) == 0
    resumed, straight = (load_file(tmp_path / name / LORA_WEIGHTS_NAME) for name in ("run", "straight"))
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor) if RESUME_IS_EXACT else torch.allclose(resumed[name], tensor, rtol=1e-3, atol=1e-6), name


def test_a_record_made_under_other_warning_filters_is_not_taken(tmp_path, decoded):
    """`python -W ignore` hears none of Pillow's warnings, and `-W error` refuses the image: the warnings a record kept
    under other filters are not the ones this check would say."""
    folder, config = one_image_checked(tmp_path)
    decoded.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert inspect_examples(read_examples(config), config, "data", CheckRecord(tmp_path / RECORD_NAME)).unchanged == 0
    assert set(decoded) == {str(folder / "a.png")}


def test_only_the_main_process_writes_the_record(tmp_path, monkeypatch):
    """Every process of a launch checks the same files; one writes what they read, and the others do not race it."""
    folder = tmp_path / "data"
    captioned(folder, "a.png", noise(64, 64))
    config = DataConfig(image_dir=str(folder), resolution=64)
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        record = CheckRecord(tmp_path / RECORD_NAME)
        inspect_examples(read_examples(config), config, "data", record)
        record.save()
        assert (tmp_path / RECORD_NAME).is_file() == (rank == "0")
