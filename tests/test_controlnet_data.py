"""ControlNet data: one crop and flip for image and conditioning, the empty-prompt share, `datasets`
sources with their own columns, bad input as one line before any model loads, and `make-conditions`
(canny edges, luminance, toy-world masks)."""

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from controlnet_helpers import controlnet_recipe
from PIL import Image

from finetune.cli.main import main
from finetune.config import DataConfig
from finetune.controlnet.conditions import border_mask, canny, luminance
from finetune.controlnet.data import ControlNetDataset
from finetune.controlnet.pairs import Pair, paired_views
from finetune.data.items import CaptionedImageDataset, item_rng
from finetune.data.sources import Example
from finetune.errors import FinetuneError
from finetune.methods.controlnet import ControlNetMethod
from finetune.toyworld.datasets import generate, write_folder
from finetune.toyworld.world import mask_image
from finetune.training.trainer import train
import finetune.training.trainer as trainer_module
from conftest import SHIPPED_BASE  # a base check-data finds offline (the default hub id is in no cache)


# ---------------------------------------------------------------------------------------------------
# Data


def test_image_and_conditioning_get_the_same_crop_and_flip():
    pixels = np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    conditioning = Image.fromarray(np.ascontiguousarray(pixels[..., ::-1]))  # a pixel-exact function of the image
    config = DataConfig(image_dir="unused", resolution=64, crop="random", random_flip=True)
    example = Example("image.png", "a caption", lambda: image)
    dataset = ControlNetDataset([Pair(example, Example("cond.png", "", lambda: conditioning))], config, seed=1, empty_prompt_share=0.0)
    images = CaptionedImageDataset([example], config, seed=1)
    views = set()
    for epoch in range(12):
        image_view, conditioning_view = paired_views(image, conditioning, config, item_rng(1, epoch, 0))
        assert np.array_equal(np.asarray(conditioning_view), np.asarray(image_view)[..., ::-1])
        views.add(np.asarray(image_view).tobytes())
        # The image's view is the one a LoRA run draws for the same image, seed and epoch.
        item = dataset[(0, epoch)]
        assert torch.equal(item["pixel_values"], images[(0, epoch)]["pixel_values"])
        # Conditioning in [0, 1], the image in [-1, 1]: the same pixels, channels reversed.
        image_levels = ((item["pixel_values"] + 1) * 127.5).round()
        conditioning_levels = (item["conditioning_pixel_values"] * 255).round()
        assert 0.0 <= item["conditioning_pixel_values"].min() and item["conditioning_pixel_values"].max() <= 1.0
        assert torch.equal(conditioning_levels, image_levels.flip(0))
    assert len(views) >= 6  # crops and flips really varied


def test_empty_prompt_share(pairs_folder):
    from finetune.config.recipe_loading import recipe_from_dict
    from finetune.controlnet.pairs import checked_pairs

    recipe = recipe_from_dict({"method": "controlnet", "data": {"image_dir": str(pairs_folder), "resolution": 64}})
    pairs, _ = checked_pairs(recipe)
    captions = [pair.image.caption for pair in pairs]

    def drawn(share):
        dataset = ControlNetDataset(pairs, recipe.data, seed=0, empty_prompt_share=share)
        return [dataset[(i, epoch)]["caption"] for epoch in range(50) for i in range(len(pairs))]

    assert drawn(0.0) == captions * 50
    assert drawn(1.0) == [""] * 200
    half = drawn(0.5)
    assert half == drawn(0.5)  # deterministic per (seed, epoch, index)
    assert 0.4 < half.count("") / len(half) < 0.6
    assert all(c in ("", captions[i % 4]) for i, c in enumerate(half))


def test_a_conditioning_image_edited_mid_run_trains_unless_its_size_changed(pairs_folder, tmp_path):
    """A conditioning image is decoded at every use (never cached): an edit trains as it now is. One whose size changed
    was cut by its image's plan all the same, stretched unseen; one removed stopped with the loader's traceback. Each
    use stats it as an uncached image's (files_as_checked.require_checked_size): those stop with one line naming it."""
    from finetune.config.recipe_loading import recipe_from_dict
    from finetune.controlnet.pairs import checked_pairs

    folder = shutil.copytree(pairs_folder, tmp_path / "pairs")
    recipe = recipe_from_dict({"method": "controlnet", "data": {"image_dir": str(folder), "resolution": 64, "random_flip": False}})
    pairs, _ = checked_pairs(recipe)
    dataset = ControlNetDataset(pairs, recipe.data, seed=0, empty_prompt_share=0.0)
    conditioning = Path(pairs[0].conditioning.source)
    width, height = Image.open(conditioning).size
    assert dataset[(0, 0)]["conditioning_pixel_values"].min() < 1.0

    def replace(size: tuple[int, int]) -> None:  # a while after the check: a file system's times may be coarser than this test
        Image.new("RGB", size, (255, 255, 255)).save(conditioning)
        later = time.time_ns() + 10**9 * size[0]
        os.utime(conditioning, ns=(later, later))

    replace((width, height))
    assert float(dataset[(0, 1)]["conditioning_pixel_values"].min()) == 1.0  # the edit trains
    replace((width + 32, height))
    with pytest.raises(FinetuneError, match=rf"^conditioning image {re.escape(str(conditioning))} changed size since this run's data check "
                                            rf"\({width + 32}x{height}, was {width}x{height}\): restart the run to train with it"):
        dataset[(0, 1)]
    conditioning.unlink()
    with pytest.raises(FinetuneError, match=rf"^conditioning image {re.escape(str(conditioning))} was removed since this run's data check: put it back"):
        dataset[(0, 1)]


def test_a_conditioning_image_pillow_warned_about_trains_and_is_said(pairs_folder, tmp_path):
    """Its warning was a finding of its pair's check, and any finding left the pair out of training: a conditioning JPEG
    whose EXIF was cut short trained without its pair, unsaid as such, and with every pair so a crash (IndexError)."""
    from test_image_warnings import cut_exif_photo, pillows_warning

    from finetune.config.recipe_loading import recipe_from_dict
    from finetune.controlnet.pairs import checked_pairs
    from finetune.data_check.check import WARNING

    folder = shutil.copytree(pairs_folder, tmp_path / "pairs")
    cut_exif_photo(folder / "conditioning" / "0000.jpg").with_suffix(".txt").unlink()
    metadata = folder / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("conditioning/0000.png", "conditioning/0000.jpg"))
    recipe = recipe_from_dict({"method": "controlnet", "data": {"image_dir": str(folder), "resolution": 64}})
    pairs, report = checked_pairs(recipe)
    assert [Path(pair.conditioning.source).name for pair in pairs] == ["0000.jpg", "0001.png", "0002.png", "0003.png"]
    assert [finding.message for finding in report.findings if finding.level == WARNING] == [
        f"conditioning image {folder / 'conditioning' / '0000.jpg'}: Pillow warned while reading it: {pillows_warning(folder / 'conditioning' / '0000.jpg')} "
        "(it reads as decoded; re-save it to be rid of this)"]


def test_datasets_source_with_custom_columns(make_recipe, tmp_path):
    import datasets

    samples = generate(3, seed=2)
    masks = [mask_image(mask) for _, _, _, mask in samples]
    data = datasets.Dataset.from_dict({"picture": [s[0] for s in samples], "hint": masks, "prompt": [s[1] for s in samples]})
    data.save_to_disk(tmp_path / "saved")
    recipe = make_recipe(
        method="controlnet", data__image_dir=None, data__dataset=str(tmp_path / "saved"),
        data__image_column="picture", data__caption_column="prompt", controlnet__conditioning_column="hint",
    )
    method = ControlNetMethod(recipe)
    method.check_data()
    dataset, collate_fn = method.training_data(None)
    batch = collate_fn([dataset[(i, 0)] for i in range(3)])
    for i, (_, _, _, mask) in enumerate(samples):
        assert torch.equal(batch["conditioning_pixel_values"][i, 0] > 0.5, torch.from_numpy(mask))
    assert batch["pixel_values"].shape == (3, 3, 64, 64)

    missing = make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(tmp_path / "saved"), data__image_column="picture", data__caption_column="prompt")
    with pytest.raises(FinetuneError, match=r"has no conditioning column 'conditioning_image' \(controlnet.conditioning_column\); its columns are: 'picture', 'hint', 'prompt'"):
        ControlNetMethod(missing).check_data()


def broken_copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(folder, copy)
    return copy


def rewrite_metadata(folder: Path, edit) -> None:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(edit(row)) + "\n" for row in rows))


BAD_INPUTS = {
    "no conditioning entry": (
        lambda f: rewrite_metadata(f, lambda row: {k: v for k, v in row.items() if k != "conditioning_file_name" or row["file_name"] != "0001.png"}),
        r"image \S+/0001\.png has no conditioning image: give it a conditioning_file_name in \S+metadata\.jsonl",
    ),
    "conditioning file missing": (
        lambda f: (f / "conditioning" / "0002.png").unlink(),
        r"conditioning image \S+/conditioning/0002\.png of image \S+/0002\.png not found",
    ),
    "sizes differ": (
        lambda f: Image.new("RGB", (32, 48)).save(f / "conditioning" / "0000.png"),
        r"conditioning image \S+/conditioning/0000\.png is 32x48 but image \S+/0000\.png is 64x64: they must be the same size",
    ),
    "conditioning unreadable": (
        lambda f: (f / "conditioning" / "0003.png").write_bytes(b"not a png"),
        r"image \S+/conditioning/0003\.png cannot be read",
    ),
    "no metadata": (
        lambda f: (f / "metadata.jsonl").unlink(),
        r"data folder \S+ has no metadata\.jsonl naming conditioning images",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_before_any_model_loads(case, make_recipe, pairs_folder, tmp_path, monkeypatch):
    breaking, pattern = BAD_INPUTS[case]
    folder = broken_copy(pairs_folder, tmp_path)
    breaking(folder)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(trainer_module, "load_base_model", no_model)
    with pytest.raises(FinetuneError, match=pattern) as error:
        train(controlnet_recipe(make_recipe, folder))
    assert "\n" not in str(error.value)


def test_a_metadata_file_with_a_byte_order_mark_is_read(make_recipe, pairs_folder, tmp_path):
    """Windows editors write one; captions read such a file too."""
    folder = broken_copy(pairs_folder, tmp_path)
    metadata = folder / "metadata.jsonl"
    metadata.write_bytes(b"\xef\xbb\xbf" + metadata.read_bytes())
    method = ControlNetMethod(controlnet_recipe(make_recipe, folder))
    method.check_data()
    assert len(method.pairs) == 4 and all(pair.image.caption for pair in method.pairs)


def test_subfolders_with_their_own_metadata_repeats_and_templates(make_recipe, tmp_path):
    root = tmp_path / "root"
    write_folder(root / "a", 2, seed=1, conditioning=True)
    write_folder(root / "b", 3, seed=2, conditioning=True)
    folders = [{"path": "a", "repeats": 3, "template": "{caption}, style a"}, {"path": "b"}]
    recipe = controlnet_recipe(make_recipe, root, data__folders=folders, train__max_steps=2)
    method = ControlNetMethod(recipe)
    method.check_data()

    sources = [Path(pair.image.source) for pair in method.pairs]
    assert [source.parent.name for source in sources] == ["a"] * 6 + ["b"] * 3  # a's two pairs, three times each
    assert all(pair.image.caption.endswith(", style a") for pair in method.pairs[:6])
    assert not any(pair.image.caption.endswith(", style a") for pair in method.pairs[6:])
    for pair in method.pairs:  # each image with the conditioning image its own folder names
        assert Path(pair.conditioning.source) == Path(pair.image.source).parent / "conditioning" / Path(pair.image.source).name
    assert method.data_reports[0].lines()[0].endswith("5 images, 5 used, 0 skipped; 9 uses per epoch")
    assert len(train(recipe).losses) == 2

    # One folder under two templates: each copy keeps its own caption.
    twice = ControlNetMethod(controlnet_recipe(make_recipe, root, data__folders=[{"path": "b", "template": "A {caption}"}, {"path": "b", "template": "B {caption}"}]))
    twice.check_data()
    assert [pair.image.caption[0] for pair in twice.pairs] == ["A"] * 3 + ["B"] * 3


def test_with_skip_bad_images_bad_pairs_are_left_out_and_listed(make_recipe, tmp_path, capsys):
    folder = write_folder(tmp_path / "pairs", 6, seed=5, conditioning=True)
    for case in ("no conditioning entry", "conditioning file missing", "sizes differ", "conditioning unreadable"):
        BAD_INPUTS[case][0](folder)  # breaks the pairs of images 0001, 0002, 0000 and 0003
    Image.new("RGB", (8, 8)).save(folder / "0004.png")  # and image 0004 is too small
    method = ControlNetMethod(controlnet_recipe(make_recipe, folder, data__skip_bad_images=True))
    method.check_data()

    assert [Path(pair.image.source).name for pair in method.pairs] == ["0005.png"]
    report = method.data_reports[0]
    assert sorted(Path(finding.source).name for finding in report.skipped) == ["0000.png", "0001.png", "0002.png", "0003.png", "0004.png"]
    lines = report.lines()
    assert lines[0].endswith("6 images, 1 used, 5 skipped; 1 use per epoch")
    for case in ("no conditioning entry", "conditioning file missing", "sizes differ", "conditioning unreadable"):
        assert any(re.search(BAD_INPUTS[case][1], line) for line in lines if line.startswith("skipped: ")), case
    assert any("smaller than 32 px on its short side" in line for line in lines)

    # Without the switch the first bad pair stops the run and says how to skip; check-data lists them all.
    with pytest.raises(FinetuneError, match=r"0001\.png has no conditioning image: .*, or set data.skip_bad_images: true to skip bad images \(4 more problems"):
        ControlNetMethod(controlnet_recipe(make_recipe, folder)).check_data()
    recipe = tmp_path / "controlnet.yaml"
    recipe.write_text(f"method: controlnet\nmodel: {{pretrained: {SHIPPED_BASE}}}\ndata: {{image_dir: {folder}, resolution: 64}}\n")
    assert main(["check-data", str(recipe)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("fatal: ") for line in printed) == 5
    assert any(re.search(BAD_INPUTS["sizes differ"][1], line) for line in printed)
    assert printed[-1].startswith("result: training would stop: 5 fatal problems")


# ---------------------------------------------------------------------------------------------------
# make-conditions


def square_image(colour=(255, 255, 255), background=(0, 0, 0)) -> tuple[Image.Image, np.ndarray]:
    pixels = np.empty((64, 64, 3), dtype=np.uint8)
    pixels[:] = background
    mask = np.zeros((64, 64), dtype=bool)
    mask[20:44, 16:40] = True
    pixels[mask] = colour
    return Image.fromarray(pixels), mask


@pytest.mark.parametrize("colours", [((255, 255, 255), (0, 0, 0)), ((220, 40, 40), (40, 170, 60))], ids=["white-on-black", "red-on-green"])
def test_canny_finds_the_border_of_a_square_and_nothing_else(colours):
    image, mask = square_image(*colours)
    edges = canny(image)
    # The true boundary: pixels of the square next to the outside, and outside pixels next to the square.
    padded = np.pad(mask, 1)
    grown = np.zeros_like(mask)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            grown |= padded[1 + dy : 65 + dy, 1 + dx : 65 + dx]
    near_boundary = grown & ~_eroded(mask)
    assert edges.any() and not (edges & ~near_boundary).any(), "edge pixels away from the square's border"
    # Every side is found along its whole length (corners are rounded by the blur).
    rows, cols = np.nonzero(edges)
    for side in (rows[(cols > 20) & (cols < 36)], cols[(rows > 24) & (rows < 40)]):
        assert len(side) >= 2 * 15
    assert edges.sum() < 0.6 * near_boundary.sum()  # one pixel wide, not the two-pixel band
    assert not canny(Image.new("RGB", (64, 64), (90, 90, 90))).any()


def _eroded(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    out = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out &= padded[1 + dy : 65 + dy, 1 + dx : 65 + dx]
    return out


def test_mask_matches_the_true_shape_and_luminance_is_bt601():
    ious = []
    for image, _, _, truth in generate(40, seed=9, include_held_out="all"):
        found = border_mask(image)
        ious.append((found & truth).sum() / (found | truth).sum())
    assert min(ious) > 0.9, min(ious)

    pixels = np.array([[[100, 100, 100], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    assert luminance(Image.fromarray(pixels)).tolist() == [[100, 76, 150, 29]]
