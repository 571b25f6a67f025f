"""The data check: every kind of bad or odd image is reported (and handled), training stops on fatal
problems naming the file unless data.skip_bad_images is set, and `finetune check-data` reports the same."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from finetune.cli.main import main
from finetune.config import DataConfig
from finetune.data.items import CaptionedImageDataset
from finetune.data_check.check import CONVERTED, FATAL, WARNING, inspect_examples
from conftest import SHIPPED_BASE  # a base the check finds offline (the default hub id is in no cache)
from data_examples import load_examples
from finetune.data.images import open_rgb
from finetune.data.sources import read_examples
from finetune.errors import FinetuneError
from finetune.training.trainer import train
from odd_images import captioned, noise, save_exif_rotated, write_odd_folder
from train_command_files import corrupt_copy


@pytest.fixture
def odd_folder(tmp_path):
    return write_odd_folder(tmp_path / "odd")


def findings_by_file(report):
    found = {}
    for finding in report.findings + report.skipped:
        found.setdefault(Path(finding.source).name, []).append((finding.level, finding.message))
    return found


def test_every_kind_of_odd_image_is_reported(odd_folder):
    config = DataConfig(image_dir=str(odd_folder), resolution=64)
    report = inspect_examples(read_examples(config), config, "odd")
    found = findings_by_file(report)

    def only(name, level, pattern):
        import re

        entries = [message for lvl, message in found.get(name, []) if lvl == level]
        assert entries and re.search(pattern, entries[0]), (name, found.get(name))
        assert str(odd_folder / name) in entries[0]  # names the file

    only("corrupt.jpg", FATAL, r"cannot be read \(UnidentifiedImageError")
    only("truncated.png", FATAL, r"cannot be read \(OSError: image file is truncated")
    only("tiny.png", FATAL, r"is 20x20, smaller than 32 px on its short side \(half of data.resolution 64\): remove it, upscale it to 32 px "
                            r"or more, lower data.min_image_size, or train at a lower data.resolution$")  # the ways out, not only the last two
    only("uncaptioned.png", FATAL, r"has no caption: add uncaptioned\.txt")
    only("small.png", WARNING, r"is 40x48, upscaled 1\.60x to cover 64x64")
    only("cmyk.jpg", CONVERTED, r"CMYK: converted to RGB")
    only("deep.png", CONVERTED, r"16-bit \(I;16\): scaled to 8-bit RGB")
    only("alpha.png", CONVERTED, r"transparency \(RGBA\): composited on white")
    only("palette.png", CONVERTED, r"palette image: converted to RGB")
    only("rotated.png", CONVERTED, r"EXIF orientation 6: rotated upright")
    only("copy1.png", WARNING, r"has the same pixels as .*copy2\.bmp, .*good\.png: each copy trains as its own image")
    assert "good.png" not in found  # nothing else to say about it
    usable = sorted(Path(e.source).name for e in report.usable)
    assert usable == sorted(["good.png", "small.png", "cmyk.jpg", "deep.png", "alpha.png", "palette.png", "rotated.png", "copy1.png", "copy2.bmp"])
    lines = "\n".join(report.lines())
    assert "odd: 13 images, 9 used, 0 skipped" in lines


def test_an_alpha_channel_opaque_everywhere_is_no_transparency_to_say(tmp_path):
    """A screenshot saved with an alpha channel of 255 everywhere: compositing it on white changes no pixel."""
    captioned(tmp_path, "screenshot.png", noise(64, 64).convert("RGBA"))
    captioned(tmp_path, "grey.png", noise(64, 64).convert("LA"))  # still grey to RGB, said as an opaque L is
    one_clear = np.asarray(noise(64, 64).convert("RGBA")).copy()
    one_clear[0, 0, 3] = 0
    captioned(tmp_path, "cut.png", Image.fromarray(one_clear))  # one transparent pixel is composited on white
    config = DataConfig(image_dir=str(tmp_path), resolution=64)
    converted = {Path(f.source).name: f.message for f in inspect_examples(read_examples(config), config, "data").of_level(CONVERTED)}
    assert converted == {"grey.png": f"image {tmp_path / 'grey.png'}: mode LA: converted to RGB",
                         "cut.png": f"image {tmp_path / 'cut.png'}: transparency (RGBA): composited on white"}


def test_an_image_under_a_min_image_size_set_by_hand_is_not_told_to_lower_the_resolution(tmp_path):
    """data.min_image_size set: a lower data.resolution leaves the limit where it is, so it is not offered."""
    captioned(tmp_path, "tiny.png", noise(20, 20))
    config = DataConfig(image_dir=str(tmp_path), resolution=64, min_image_size=24)
    [finding] = inspect_examples(read_examples(config), config, "data").findings
    assert finding.message.endswith("is 20x20, smaller than 24 px on its short side (data.min_image_size): remove it, upscale it to 24 px or more, or lower data.min_image_size")


def test_a_copy_that_does_not_train_is_not_named_as_a_copy(tmp_path):
    folder = tmp_path / "copies"
    for name in ("a.png", "b.png", "c.png"):
        captioned(folder, name, noise(64, 64, seed=7))
    (folder / "c.txt").unlink()  # no caption: skipped, so it trains nothing
    config = DataConfig(image_dir=str(folder), resolution=64, skip_bad_images=True)
    warnings = [finding.message for finding in inspect_examples(read_examples(config), config, "copies").of_level(WARNING)]
    assert len(warnings) == 1 and warnings[0].endswith(f"a.png has the same pixels as {folder / 'b.png'}: each copy trains as its own image (remove copies, or use data.folders repeats)")


def test_a_folder_of_kohya_folders_gets_the_data_folders_it_needs_and_an_unlisted_one_is_said(tmp_path, capsys):
    """sd-scripts' train_data_dir holds `N_name` folders (N: the repeats); listed in data.folders they train."""
    root = tmp_path / "train"
    for name in ("0.png", "1.png"):
        captioned(root / "10_sks dog", name)
        captioned(root / "1_dog", name)
    captioned(root / "masks", "0.png")  # a masks folder is no image folder
    captioned(root / "conditioning_images", "x.png")  # a folder the metadata points into holds partners, not training images
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "conditioning_image": "conditioning_images/x.png"}) + "\n")
    assert main(["check-data", "--image-dir", str(root), "--resolution", "64"]) == 2
    error = capsys.readouterr().err.strip()
    suggestion = error.split("e.g. ")[1]
    assert error == (f"error: data folder {root} has no images of its own, only subfolders with images (10_sks dog, 1_dog): list each with its "
                     f"repeats in the recipe's data section, e.g. {suggestion}")
    assert suggestion == """folders: [{path: "10_sks dog", repeats: 10}, {path: "1_dog", repeats: 1}]"""
    recipe = tmp_path / "recipe.yaml"  # the suggestion, pasted into a recipe
    recipe.write_text(f"model: {{pretrained: {SHIPPED_BASE}}}\ndata:\n  image_dir: {root}\n  resolution: 64\n  {suggestion}\n")
    assert main(["check-data", str(recipe)]) == 0
    assert "uses per epoch by folder: '10_sks dog' 2 x10 = 20 (91%), '1_dog' 2 x1 = 2 (9%)" in capsys.readouterr().out

    captioned(root, "own.png")
    assert main(["check-data", str(recipe), 'data.folders=[{path: "10_sks dog", repeats: 10}]']) == 0
    out = capsys.readouterr().out
    assert f"warning: data folder {root} holds 1 image that no data.folders entry lists: it does not train (add {{path: .}}" in out
    assert f'warning: data folder {root / "1_dog"} holds 2 images that no data.folders entry lists: they do not train (add {{path: "1_dog"}}' in out
    assert "masks" not in out


def test_a_kohya_folder_whose_number_is_a_year_or_swamps_the_others_is_said_with_the_rename_that_trains_it_once(tmp_path, capsys):
    """`2024_trip` reads as sd-scripts' N_name, 2024 repeats (an epoch that folder 2024 times): the suggestion keeps
    that reading, as sd-scripts has it, and says the rename that gives 1 repeat; so for repeats over 100x the rest."""
    root = tmp_path / "train"
    for name in ("0.png", "1.png"):
        captioned(root / "2024_trip", name)
        captioned(root / "10_sks dog", name)
    assert main(["check-data", "--image-dir", str(root), "--resolution", "64"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        """folders: [{path: "10_sks dog", repeats: 10}, {path: "2024_trip", repeats: 2024}]; '2024_trip' reads as 2024 repeats """
        "(sd-scripts' N_name: each of its images 2024 times an epoch, 99.5% of the epoch): if 2024 is part of its name, give it repeats 1 there (and for sd-scripts rename the folder '1_2024_trip')")
    shutil.rmtree(root / "2024_trip")
    captioned(root / "1_reg", "0.png")  # 10 x 2 uses against 1: a plausible balance, no note
    assert main(["check-data", "--image-dir", str(root), "--resolution", "64"]) == 2
    assert capsys.readouterr().err.strip().endswith('folders: [{path: "10_sks dog", repeats: 10}, {path: "1_reg", repeats: 1}]')
    (root / "10_sks dog").rename(root / "300_sks dog")  # 600 uses against 1
    assert main(["check-data", "--image-dir", str(root), "--resolution", "64"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "'300_sks dog' reads as 300 repeats (sd-scripts' N_name: each of its images 300 times an epoch, 99.8% of the epoch): "
        "if 300 is part of its name, give it repeats 1 there (and for sd-scripts rename the folder '1_300_sks dog')")


def test_a_subfolder_of_a_listed_folder_that_no_entry_lists_is_said(tmp_path, capsys):
    """Only the images directly in an entry's folder train: subject/closeups beside subject's own images trained nothing, unseen."""
    for name in ("0.png", "1.png"):
        captioned(tmp_path / "subject", name)
        captioned(tmp_path / "subject" / "closeups", "c" + name)
    captioned(tmp_path / "subject" / "masks", "0.png")  # its masks are no image folder
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{pretrained: {SHIPPED_BASE}}}\ndata:\n  image_dir: {tmp_path}\n  resolution: 64\n  folders: [{{path: subject, repeats: 2}}]\n")
    assert main(["check-data", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert (f'warning: data folder {tmp_path / "subject" / "closeups"} holds 2 images that no data.folders entry lists: they do not train '
            '(add {path: "subject/closeups"} with its repeats to data.folders to train them)') in out  # fmt: skip
    assert "masks" not in out


def test_a_copy_left_out_by_its_mask_is_not_named_as_a_copy(tmp_path):
    folder = tmp_path / "masked"
    for name in ("a.png", "b.png", "c.png"):
        captioned(folder, name, noise(128, 64, seed=8))
        mask = Image.new("L", (128, 64), 0)
        mask.paste(255, (0, 0, 32, 64) if name == "b.png" else (32, 0, 96, 64))  # b's white is outside its centre crop
        (folder / "masks").mkdir(exist_ok=True)
        mask.save(folder / "masks" / name)
    config = DataConfig(image_dir=str(folder), resolution=64, skip_bad_images=True, loss_mask={"source": "files"})
    report = inspect_examples(read_examples(config), config, "masked")
    assert [Path(e.source).name for e in report.usable] == ["a.png", "c.png"] and "black everywhere in its centre crop" in report.skipped[0].message
    assert [f.message for f in report.of_level(WARNING)] == [f"image {folder / 'a.png'} has the same pixels as {folder / 'c.png'}: each copy "
                                                             "trains as its own image (remove copies, or use data.folders repeats)"]


def test_converted_images_train_as_rgb(odd_folder):
    for name, pixel in [("cmyk.jpg", (255, 0, 0)), ("deep.png", (128, 128, 128)), ("alpha.png", (255, 255, 255))]:
        example = next(e for e in read_examples(DataConfig(image_dir=str(odd_folder))) if e.source.endswith(name))
        image = open_rgb(example)
        assert image.mode == "RGB"
        assert np.abs(np.asarray(image.getpixel((5, 5)), dtype=int) - pixel).max() <= 2, name


def test_exif_rotated_image_comes_out_upright(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    save_exif_rotated(folder / "rotated.png")
    assert Image.open(folder / "rotated.png").size == (96, 64)  # stored on its side
    for bucketing in (False, True):
        config = DataConfig(image_dir=str(folder), caption="x", resolution=64, bucketing={"enabled": bucketing, "step": 16})
        item = CaptionedImageDataset(load_examples(config), config, seed=0)[(0, 0)]
        pixels = ((item["pixel_values"] + 1) * 127.5).round()
        height = pixels.shape[1]
        assert pixels[:, 2, :].mean(dim=1).tolist() == pytest.approx([255, 0, 0], abs=3)  # red on top
        assert pixels[:, height - 3, :].mean(dim=1).tolist() == pytest.approx([0, 0, 255], abs=3)  # blue below
        if bucketing:
            assert tuple(pixels.shape[1:]) == (80, 48)  # a portrait bucket: the upright shape counts
            assert item["original_size"] == (96, 64)


def test_one_corrupt_image_stops_loading_and_names_it(tmp_path):
    folder = tmp_path / "data"
    for i in range(3):
        captioned(folder, f"good{i}.png", noise(64, 64, seed=i))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "broken.txt").write_text("x")
    with pytest.raises(FinetuneError) as error:
        load_examples(DataConfig(image_dir=str(folder), resolution=64))
    message = str(error.value)
    assert "\n" not in message
    assert f"image {folder / 'broken.png'} cannot be read" in message
    assert "set data.skip_bad_images: true" in message
    examples = load_examples(DataConfig(image_dir=str(folder), resolution=64, skip_bad_images=True))
    assert sorted(Path(e.source).name for e in examples) == ["good0.png", "good1.png", "good2.png"]


def test_one_more_problem_is_said_in_the_singular(tmp_path):
    folder = tmp_path / "data"
    captioned(folder, "good.png", noise(64, 64, seed=0))
    for name in ("a_broken.png", "b_broken.png"):
        (folder / name).write_bytes(b"\x89PNG not really")
        (folder / name).with_suffix(".txt").write_text("x")
    with pytest.raises(FinetuneError, match=r"a_broken\.png cannot be read .* \(1 more problem: finetune check-data lists it\)$"):
        load_examples(DataConfig(image_dir=str(folder), resolution=64))


def test_several_problems_are_counted_in_the_one_line_error(odd_folder):
    with pytest.raises(FinetuneError, match=r"corrupt\.jpg cannot be read .* \(3 more problems: finetune check-data lists them\)$"):
        load_examples(DataConfig(image_dir=str(odd_folder), resolution=64))


def test_all_images_bad_is_an_error_even_when_skipping(tmp_path):
    (tmp_path / "a.png").write_text("no")
    with pytest.raises(FinetuneError, match=r"no image is usable \(1 image skipped as bad: "):
        load_examples(DataConfig(image_dir=str(tmp_path), caption="x", resolution=64, skip_bad_images=True))


def test_training_stops_before_it_starts_on_a_corrupt_image(make_recipe, image_folder, tmp_path):
    folder = corrupt_copy(image_folder, tmp_path)
    recipe = make_recipe(data__image_dir=str(folder), train__max_steps=1)
    with pytest.raises(FinetuneError, match=r"zz_corrupt\.png cannot be read.*skip bad images$"):  # the only problem: no "(N more)"
        train(recipe)
    assert not Path(recipe.output_dir).exists()


def test_training_with_the_skip_switch_skips_and_lists_the_file(make_recipe, image_folder, tmp_path, capsys):
    folder = corrupt_copy(image_folder, tmp_path)
    result = train(make_recipe(data__image_dir=str(folder), data__skip_bad_images=True, train__max_steps=1))
    assert result.final_step == 1
    out = capsys.readouterr().out
    assert "5 images, 4 used, 1 skipped" in out
    assert f"skipped: image {folder / 'zz_corrupt.png'} cannot be read" in out


def test_check_data_command_reports_and_fails_on_fatal_problems(odd_folder, capsys):
    code = main(["check-data", "--image-dir", str(odd_folder), "--resolution", "64"])
    out = capsys.readouterr().out
    assert code == 1
    assert "13 images, 9 used, 0 skipped" in out
    assert "sizes: short side 40-64 px" in out
    for name in ("corrupt.jpg", "truncated.png", "tiny.png", "uncaptioned.png"):
        assert any(line.startswith("fatal: ") and name in line for line in out.splitlines()), name
    assert any(line.startswith("converted: ") and "rotated.png" in line for line in out.splitlines())
    assert "result: training would stop: 4 fatal problems; fix them, or set data.skip_bad_images: true" in out


def test_check_data_reads_a_recipe_with_overrides(odd_folder, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"pretrained": str(SHIPPED_BASE)}, "data": {"image_dir": str(odd_folder), "resolution": 64}}))
    code = main(["check-data", str(recipe), "data.skip_bad_images=true", "data.bucketing.enabled=true", "data.bucketing.step=16"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "13 images, 9 used, 4 skipped" in out
    assert "buckets (width x height: images): " in out and "48x80: 1" in out  # the upright rotated photo
    assert "result: ready to train" in out
    # Usable images that do not fill a batch stop training: check-data says so too.
    code = main(["check-data", str(recipe), "data.skip_bad_images=true", "train.batch_size=8", "validation.loss_images=2"])
    out = capsys.readouterr().out
    assert code == 1 and "result: training would stop: 7 training images (repeats counted) (9 before validation.loss_images held some out) are fewer than one batch (train.batch_size 8)" in out
    assert "held out: 2 images for the validation loss (validation.loss_images), leaving 7 of the 9 uses per epoch to train" in out
    code = main(["check-data", str(recipe), "data.skip_bad_images=true", "train.batch_size=16", "data.folders=[{path: ., repeats: 2}]"])
    assert code == 0, capsys.readouterr().out  # 9 images used twice an epoch fill a batch of 16, as training counts them


def test_check_data_without_recipe_or_folder_is_a_one_line_error(capsys, tmp_path):
    assert main(["check-data"]) == 2
    assert capsys.readouterr().err.strip() == "error: check-data needs a recipe or --image-dir: e.g. finetune check-data --image-dir my_photos"
    assert main(["check-data", "--image-dir", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().endswith("nowhere not found: check --image-dir")
    assert main(["check-data", "--image-dir", str(tmp_path), "data.skip_bad_images=true"]) == 2  # an override is no recipe
    assert capsys.readouterr().err.strip() == "error: check-data: key=value overrides need a recipe first, e.g. finetune check-data recipes/lora.yaml data.image_dir=x"


def test_check_data_of_a_recipe_mistyped_in_a_folder_named_with_an_equals_sign_says_the_recipe(capsys, tmp_path, monkeypatch):
    """A sweep's runs/lr=1e-4/lora.yml (lora.yaml mistyped) was taken for an override: 'key=value overrides need a recipe first'."""
    folder = tmp_path / "runs" / "lr=1e-4"
    folder.mkdir(parents=True)
    (folder / "lora.yaml").write_text("data: {image_dir: photos}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["check-data", "runs/lr=1e-4/lora.yml"]) == 2
    assert capsys.readouterr().err.strip() == "error: recipe runs/lr=1e-4/lora.yml not found: did you mean runs/lr=1e-4/lora.yaml?"


def test_check_data_is_listed_with_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "check-data" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["check-data", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: finetune check-data") and "--image-dir" in text and "--resolution" in text


def test_training_warns_once_about_captions_the_text_encoder_cuts(make_recipe, image_folder, tmp_path, capsys):
    folder = tmp_path / "data"
    shutil.copytree(image_folder, folder)
    (folder / "metadata.jsonl").unlink()  # the .txt sidecars caption the images
    sidecars = sorted(folder.glob("*.txt"))
    sidecars[0].write_text("a red circle, " * 30)  # about 120 tokens
    train(make_recipe(data__image_dir=str(folder), train__max_steps=1))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "longer than model.max_token_length (75 tokens)" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"warning: 1 of 4 captions are longer than model.max_token_length (75 tokens) and are cut there (the longest: {sidecars[0].with_suffix('.png')}, ")
    assert warnings[0].endswith("shorten those captions, or raise model.max_token_length to 150 or 225 (sd-scripts' long captions)")
    from finetune.captions.tokens import load_tokenizer, long_captions_line

    recipe = make_recipe()
    line = long_captions_line(load_tokenizer(recipe.model), {"a.png": "a red circle, " * 60}, 150)  # already at 150: only 225 is left
    assert line.endswith("shorten those captions, or raise model.max_token_length to 225 (sd-scripts' long captions)"), line


def test_an_empty_caption_is_a_warning_unless_data_caption_asks_for_none(tmp_path):
    folder = tmp_path / "photos"
    captioned(folder, "a.png")
    captioned(folder, "b.png", caption="  \n")  # an empty .txt
    noise(64, 64, seed=9).save(folder / "c.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "c.png", "text": ""}) + "\n")
    config = DataConfig(image_dir=str(folder), resolution=64)
    report = inspect_examples(read_examples(config), config, "photos")
    assert sorted(Path(f.source).name for f in report.of_level(WARNING)) == ["b.png", "c.png"] and len(report.usable) == 3
    assert all("has an empty caption: it trains as the empty prompt" in f.message for f in report.of_level(WARNING))
    config = DataConfig(image_dir=str(folder), resolution=64, caption="")
    assert inspect_examples(read_examples(config), config, "photos").findings == []


def test_check_data_names_the_option_a_bad_value_came_from(image_folder, capsys):
    assert main(["check-data", "--image-dir", str(image_folder), "--resolution", "100"]) == 2
    assert capsys.readouterr().err.strip() == "error: check-data: --resolution: must be a positive multiple of 8 (the VAE downsamples by 8) (got 100)"


def test_a_folder_below_nested_entries_is_said_once(tmp_path, capsys):
    """Entries a and a/b each look three folders down, so both reached a/b/c/d: its warning was said twice."""
    for folder in ("a", "a/b", "a/b/c", "a/b/c/d"):
        captioned(tmp_path / folder, "0.png")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{pretrained: {SHIPPED_BASE}}}\ndata:\n  image_dir: {tmp_path}\n  resolution: 64\n  folders: [{{path: a}}, {{path: a/b}}]\n")
    assert main(["check-data", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert out.count(f"data folder {tmp_path / 'a' / 'b' / 'c' / 'd'} holds") == 1
    assert out.count(f"data folder {tmp_path / 'a' / 'b' / 'c'} holds") == 1


def test_an_image_refused_after_it_decodes_is_said_with_its_missing_caption(tmp_path, monkeypatch):
    """An image without a caption that decodes but cannot train (float levels, a colour conversion that fails) was told
    only its image problem: fixed, it stopped again on the caption. A file that does not decode (a text file named .png)
    is still told only that, not to get a caption too."""
    from finetune.data.sources import Example
    from finetune.data_check.check import inspect
    import finetune.data_check.check as check_data_module

    Image.new("RGB", (64, 64), "red").save(tmp_path / "odd.png")
    (tmp_path / "text.png").write_text("not an image")
    upright_rgb = check_data_module.upright_rgb

    def conversion_fails_for_odd(image, *args):
        if image.filename.endswith("odd.png"):
            raise ValueError("no conversion")
        return upright_rgb(image, *args)

    monkeypatch.setattr(check_data_module, "upright_rgb", conversion_fails_for_odd)
    config = DataConfig(image_dir=str(tmp_path), resolution=64)
    examples = read_examples(config)
    depth = np.random.default_rng(0).random((64, 64)).astype(np.float32)  # a dataset's float array
    examples.append(Example("dataset floats row 0", None, lambda: Image.fromarray(depth)))
    said = {}
    for example in examples:
        usable, findings, _ = inspect(example, config)
        said[Path(example.source).name] = [f.message.split(": ")[0] for f in findings if f.level == FATAL]
    assert said["odd.png"] == [f"image {tmp_path / 'odd.png'} has no caption", f"image {tmp_path / 'odd.png'} cannot be converted to RGB (ValueError"]
    assert said["dataset floats row 0"] == ["dataset floats row 0 has no caption (a null cell)", "image dataset floats row 0 holds 32-bit float values of 0-1, which train as levels 0-255 (all but black)"]
    assert said["text.png"] == [f"image {tmp_path / 'text.png'} cannot be read (UnidentifiedImageError"]
