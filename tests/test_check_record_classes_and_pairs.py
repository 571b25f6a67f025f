"""The data check's record (finetune/data_check/check_record.py) of a DreamBooth run's class images and of a ControlNet's
pairs (each image and its conditioning image): a second check decodes none of them that is unchanged and says all the
first said; one rewritten is decoded again; a resume decodes nothing again and continues the curve of a run never stopped."""

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_check_record import RESUME_IS_EXACT
from test_image_warnings import cut_exif_photo
from train_command_files import corrupt_copy, write_recipe

import finetune.controlnet.pairs
import finetune.data_check.check
from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.cli.main import main
from finetune.config.recipe_loading import recipe_from_dict
from finetune.controlnet.pairs import inspect_pairs
from finetune.data_check.check_record import RECORD_NAME, CheckRecord
from finetune.dreambooth.class_image_plans import inspect_class_images
from odd_images import noise, write_odd_folder

UNCHANGED = re.compile(r"; (\d+|\d+ images? and \d+ conditioning images?) unchanged since the last check, not decoded again$")


@pytest.fixture
def decoded(monkeypatch) -> Counter:
    """How many times the data check has decoded each file since the test began: an image or class image
    (finetune/data_check/check.py), or a conditioning image (finetune/controlnet/pairs.py)."""
    counts = Counter()
    for module in (finetune.data_check.check, finetune.controlnet.pairs):

        def counted_decode(example, *args, decode=module.decode, **kwargs):
            counts[example.source] += 1
            return decode(example, *args, **kwargs)

        monkeypatch.setattr(module, "decode", counted_decode)
    return counts


def said(report) -> list:
    """All a report tells training: its lines (the record's count aside), findings, and every usable image's facts."""
    usable = [(e.source, e.size, e.digest, e.file_stamp, e.caption) for e in report.usable]
    return [[UNCHANGED.sub("", line) for line in report.lines()], report.findings, report.skipped, usable]


def pair_facts(pairs) -> list:
    """What training reads of each pair: both files' sizes, digests (its cache keys, a checkpoint's record) and stamps."""
    return [(p.image.source, p.image.size, p.image.digest, p.image.file_stamp, p.conditioning.source, p.conditioning.size, p.conditioning.digest,
             p.conditioning.file_stamp) for p in pairs]  # fmt: skip


def dreambooth_recipe(instances: Path, classes: Path, count: int, run: Path):
    concept = {"instance_dir": str(instances), "instance_prompt": "a sks shape", "class_prompt": "a shape", "class_dir": str(classes)}
    return recipe_from_dict({"method": "dreambooth", "output_dir": str(run), "data": {"resolution": 64},
                             "dreambooth": {"concepts": [concept], "num_class_images": count}})  # fmt: skip


def conditioning_of(folder: Path, row: int = 0) -> Path:
    return folder / json.loads((folder / "metadata.jsonl").read_text().splitlines()[row])["conditioning_file_name"]


def pairs_with_a_warning(pairs_folder: Path, tmp_path: Path) -> Path:
    """The pairs, one more whose image is corrupt (refused: read again at every check), and a conditioning JPEG Pillow warns of."""
    folder = corrupt_copy(pairs_folder, tmp_path, "controlnet")
    cut_exif_photo(folder / "conditioning" / "0000.jpg").with_suffix(".txt").unlink()
    metadata = folder / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("conditioning/0000.png", "conditioning/0000.jpg"))
    return folder


def test_a_second_check_decodes_no_unchanged_class_image_and_says_all_the_first_said(image_folder, tmp_path, decoded):
    classes = write_odd_folder(tmp_path / "classes")  # converted, too small, copies, corrupt: all said as the first check said them
    cut_exif_photo(classes / "warned.jpg")
    recipe = dreambooth_recipe(image_folder, classes, 30, tmp_path / "run")
    (fresh,), _ = inspect_class_images(recipe)  # no record: as every check was
    first_record = CheckRecord(tmp_path / RECORD_NAME)
    (first,), first_lines = inspect_class_images(recipe, first_record)
    first_record.save()
    files = set(decoded)
    kept = set(json.loads((tmp_path / RECORD_NAME).read_text())["files"])
    assert first.unchanged == 0 and kept < files, kept  # those it refused (unreadable ones) are not kept
    decoded.clear()
    (second,), second_lines = inspect_class_images(recipe, CheckRecord(tmp_path / RECORD_NAME))
    assert set(decoded) == files - kept and second.unchanged == len(kept)
    assert second.lines()[0].endswith(f"; {len(kept)} unchanged since the last check, not decoded again")
    assert said(second) == said(first) == said(fresh) and second_lines == first_lines
    assert any("Pillow warned" in finding.message for finding in second.findings)


def test_a_second_check_decodes_no_unchanged_pair_and_says_all_the_first_said(pairs_folder, tmp_path, decoded):
    folder = pairs_with_a_warning(pairs_folder, tmp_path)
    recipe = recipe_from_dict({"method": "controlnet", "data": {"image_dir": str(folder), "resolution": 64}})
    fresh = inspect_pairs(recipe)
    first_record = CheckRecord(tmp_path / RECORD_NAME)
    first = inspect_pairs(recipe, first_record)
    first_record.save()
    files = set(decoded)
    decoded.clear()
    second = inspect_pairs(recipe, CheckRecord(tmp_path / RECORD_NAME))
    assert set(decoded) == {str(folder / "zz_corrupt.png")}, decoded  # refused, so not kept: its partner is never read
    assert files == {str(folder / "zz_corrupt.png")} | {s for pair in first[0] for s in (pair.image.source, pair.conditioning.source)}
    pairs = len(first[0])
    assert second[1].lines()[0].endswith(f"; {pairs} images and {pairs} conditioning images unchanged since the last check, not decoded again")
    assert said(second[1]) == said(first[1]) == said(fresh[1]) and pair_facts(second[0]) == pair_facts(first[0]) == pair_facts(fresh[0])
    assert any("conditioning image" in finding.message and "Pillow warned" in finding.message for finding in second[1].findings)


@pytest.mark.parametrize("kind", ["class image", "conditioning image"])
def test_a_file_rewritten_with_its_size_and_mtime_kept_is_decoded_again(kind, image_folder, pairs_folder, tmp_path, decoded):
    if kind == "class image":
        classes = tmp_path / "classes"
        classes.mkdir()
        for seed in (1, 2):
            noise(64, 64, seed=seed).save(classes / f"own-{seed}.png")
        recipe, changed = dreambooth_recipe(image_folder, classes, 2, tmp_path / "run"), classes / "own-1.png"
        digests = lambda record=None: {e.source: e.digest for report in inspect_class_images(recipe, record)[0] for e in report.usable}  # noqa: E731
    else:
        folder = shutil.copytree(pairs_folder, tmp_path / "pairs")
        changed = conditioning_of(folder)
        noise(*Image.open(changed).size, seed=1).save(changed)
        recipe = recipe_from_dict({"method": "controlnet", "data": {"image_dir": str(folder), "resolution": 64}})
        digests = lambda record=None: {p.conditioning.source: p.conditioning.digest for p in inspect_pairs(recipe, record)[0]}  # noqa: E731
    record = CheckRecord(tmp_path / RECORD_NAME)
    before = digests(record)
    record.save()
    was = changed.stat()
    noise(*Image.open(changed).size, seed=99).save(changed)
    assert changed.stat().st_size == was.st_size  # noise of one size compresses to one size: only its pixels differ
    os.utime(changed, ns=(was.st_atime_ns, was.st_mtime_ns))  # as `cp -p` or `touch -r` set it back
    decoded.clear()
    after = digests(CheckRecord(tmp_path / RECORD_NAME))
    assert set(decoded) == {str(changed)}
    assert after == digests() and after[str(changed)] != before[str(changed)]


def test_a_dreambooth_resume_decodes_no_image_again_and_continues_the_curve(tiny_model, image_folder, tmp_path, decoded, capsys):
    classes = tmp_path / "classes"
    classes.mkdir()
    noise(64, 64, seed=1).save(classes / "own-1.png")  # one of the user's, one generated by the first run
    concept = {"instance_dir": str(image_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape", "class_dir": str(classes)}
    dreambooth = {"adapter": "lora", "concepts": [concept], "num_class_images": 2, "class_generation": {"num_inference_steps": 2, "batch_size": 1}}
    recipe = write_recipe(tmp_path, "dreambooth", None, tiny_model, train={"batch_size": 1, "max_steps": 1}, logging={"tensorboard": False},
                          checkpoint={"every_n_steps": 1}, dreambooth=dreambooth)  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    generated = [path for path in classes.glob("*.png") if path.name != "own-1.png"]
    assert len(generated) == 1 and str(generated[0]) in decoded  # checked once made
    decoded.clear()
    capsys.readouterr()
    assert main(["train", str(recipe), "--resume", "latest", "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert not decoded, decoded
    assert f"class images {classes} (your own; 1 generated earlier, 0 to generate): 1 image, 1 used, 0 skipped; 1 use per epoch; 1 unchanged since the last check" in out
    assert main(["check-data", str(recipe)]) == 0 and not decoded  # check-data takes the class images' facts too, generated ones with them
    assert f"class images {classes}: 2 images, 2 used, 0 skipped; 2 uses per epoch; 2 unchanged since the last check" in capsys.readouterr().out
    assert main(["train", str(recipe), "train.max_steps=2", f"output_dir={tmp_path / 'straight'}"]) == 0
    assert_same_weights(load_file(tmp_path / "run" / LORA_WEIGHTS_NAME), load_file(tmp_path / "straight" / LORA_WEIGHTS_NAME))


def test_a_controlnet_resume_decodes_no_image_again_and_continues_the_curve(tiny_model, pairs_folder, tmp_path, decoded, capsys):
    recipe = write_recipe(tmp_path, "controlnet", pairs_folder, tiny_model, train={"batch_size": 2, "max_steps": 1}, logging={"tensorboard": False},
                          checkpoint={"every_n_steps": 1})  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    images = {source for source in decoded if "conditioning" not in source}
    assert (tmp_path / "run" / RECORD_NAME).is_file() and len(decoded) == 2 * len(images)  # each image and its conditioning image
    decoded.clear()
    capsys.readouterr()
    assert main(["train", str(recipe), "--resume", "latest", "train.max_steps=2"]) == 0
    said_now = f"; {len(images)} images and {len(images)} conditioning images unchanged since the last check, not decoded again"
    assert not decoded and said_now in capsys.readouterr().out
    assert main(["check-data", str(recipe)]) == 0 and not decoded
    assert main(["train", str(recipe), "train.max_steps=2", f"output_dir={tmp_path / 'straight'}"]) == 0
    assert_same_weights(controlnet_weights(tmp_path / "run"), controlnet_weights(tmp_path / "straight"))


def controlnet_weights(run: Path) -> dict:
    (weights,) = (run / "controlnet").glob("*.safetensors")
    return load_file(weights)


def assert_same_weights(resumed: dict, straight: dict) -> None:
    assert resumed.keys() == straight.keys() and straight
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor) if RESUME_IS_EXACT else torch.allclose(resumed[name], tensor, rtol=1e-3, atol=1e-6), name


def test_a_file_read_as_an_image_and_as_a_conditioning_image_keeps_both(tmp_path):
    """A record's entry held one kind of facts: a file read as both (a pair's image that is another's conditioning image)
    lost the first kind's to the second's, and was decoded again at every check."""
    from finetune.data.images import file_stamp
    from finetune.data_check.check_record import ConditioningFacts, ImageFacts

    path = tmp_path / "a.png"
    noise(64, 64).save(path)
    image = ImageFacts(size=(64, 64), digest="d", heard=(), conversions=(), conversions_as_mask=(), turned=False, alpha_read=False)
    conditioning = ConditioningFacts(size=(64, 64), digest="e", heard=())
    record = CheckRecord(tmp_path / RECORD_NAME)
    record.keep(str(path), file_stamp(str(path)), image)
    record.keep(str(path), file_stamp(str(path)), conditioning)
    record.save()
    for _ in range(2):  # the second time from a record that took the image's facts alone: it kept the other kind's too
        again = CheckRecord(tmp_path / RECORD_NAME)
        assert again.facts(str(path), file_stamp(str(path)), ImageFacts) == image
        again.save()
    assert CheckRecord(tmp_path / RECORD_NAME).facts(str(path), file_stamp(str(path)), ConditioningFacts) == conditioning


def test_a_record_made_by_other_code_reading_conditioning_images_is_not_taken():
    """Conditioning images are read by finetune/controlnet/pairs.py (`read_conditioning`): its code is of the record's too."""
    from finetune.controlnet import pairs
    from finetune.data_check.check_record import facts_code_files

    assert Path(pairs.__file__).resolve() in facts_code_files()
