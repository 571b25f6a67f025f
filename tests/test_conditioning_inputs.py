"""Conditioning images, metadata files and masks as users bring them: metadata saved by Excel in other
encodings, make-conditions over a folder with metadata columns of its own, odd conditioning images given to
sample and the demo, a ControlNet of other than RGB conditioning, the demo's API sent what is no number, mask
files named in another Unicode form or case, and a conditioning image made from a phone photo's stored pixels."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from finetune.config import DataConfig
from finetune.data.sources import read_examples
from finetune.errors import FinetuneError


def noise(path, size=(64, 64), seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def captions(folder):
    return {e.source.rsplit("/", 1)[1]: e.caption for e in read_examples(DataConfig(image_dir=str(folder), resolution=64))}


@pytest.mark.parametrize("encoding, separator", [("utf-8-sig", ","), ("utf-16", ","), ("utf-16", "\t")])
def test_metadata_saved_by_excel_with_a_byte_order_mark_is_read(tmp_path, encoding, separator):
    """Excel's "CSV UTF-8" starts with a byte-order mark; its "Unicode text" is UTF-16 with one, columns separated by tabs."""
    noise(tmp_path / "a.png")
    rows = [["file_name", "text"], ["a.png", "a café, by night"]]
    text = "\r\n".join(separator.join(f'"{cell}"' if "," in cell and separator == "," else cell for cell in row) for row in rows)
    (tmp_path / "metadata.csv").write_bytes(text.encode(encoding))
    assert captions(tmp_path) == {"a.png": "a café, by night"}
    (tmp_path / "metadata.csv").unlink()
    (tmp_path / "metadata.jsonl").write_bytes(json.dumps({"file_name": "a.png", "text": "a café"}, ensure_ascii=False).encode(encoding))
    assert captions(tmp_path) == {"a.png": "a café"}


def test_metadata_in_another_encoding_is_one_line_naming_the_file(tmp_path):
    noise(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_bytes("file_name,text\na.png,a café\n".encode("cp1252"))  # Excel's plain "CSV" on Windows
    with pytest.raises(FinetuneError, match=f"^{re.escape(str(tmp_path / 'metadata.csv'))} is not UTF-8 text: save it as UTF-8 \\(Excel: 'CSV UTF-8'"):
        captions(tmp_path)
    (tmp_path / "metadata.csv").unlink()
    (tmp_path / "metadata.jsonl").write_bytes('{"file_name": "a.png", "text": "a café"}'.encode("cp1252"))
    with pytest.raises(FinetuneError, match=f"^{re.escape(str(tmp_path / 'metadata.jsonl'))} is not UTF-8 text"):
        captions(tmp_path)


def test_make_conditions_keeps_every_column_and_row_of_the_users_metadata(tmp_path):
    """Rewriting a folder's own metadata.jsonl in place (or writing another folder from a metadata.csv) adds the
    conditioning column: the user's other columns, and rows naming no image, stay."""
    from finetune.controlnet.conditions import make_condition_folders

    folder = tmp_path / "photos"
    folder.mkdir()
    noise(folder / "a.png"), noise(folder / "b.png", seed=1)
    rows = [{"file_name": "a.png", "text": "a cat", "source": "flickr", "depth_file_name": "depth/a.png"},
            {"file_name": "b.png", "text": "a dog", "tags": ["dog", "grass"]}, {"file_name": "typo.png", "text": "a cow"}]  # fmt: skip
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    make_condition_folders(folder, folder, "luminance")
    written = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert written == [{**rows[0], "conditioning_file_name": "conditioning/a.png"}, {**rows[1], "conditioning_file_name": "conditioning/b.png"}, rows[2]]

    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("file_name,text,source\na.png,a cat,flickr\nb.png,a dog,own\n")
    make_condition_folders(folder, tmp_path / "out", "luminance", overwrite=True)
    written = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert [row["source"] for row in written] == ["flickr", "own"] and [row["text"] for row in written] == ["a cat", "a dog"]


def test_make_conditions_keeps_the_columns_of_a_row_naming_its_image_in_another_letter_case(tmp_path):
    """A `Cat.PNG` row is `cat.png`'s, as its caption is read (and training finds it): its other columns were dropped,
    and the row kept again as one naming no image, which then named cat.png a second time."""
    from finetune.captions.metadata_files import read_metadata_captions
    from finetune.controlnet.conditions import make_condition_folders

    (tmp_path / "in").mkdir()
    noise(tmp_path / "in" / "cat.png")
    (tmp_path / "in" / "metadata.jsonl").write_text(json.dumps({"file_name": "Cat.PNG", "text": "a cat", "source": "flickr"}) + "\n")
    assert make_condition_folders(tmp_path / "in", tmp_path / "out", "luminance") == [(tmp_path / "out", 1, 0)]
    written = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert written == [{"file_name": "cat.png", "text": "a cat", "source": "flickr", "conditioning_file_name": "conditioning/cat.png"}]
    assert read_metadata_captions(tmp_path / "out" / "metadata.jsonl") == {"cat.png": "a cat"}


def test_make_conditions_replaces_no_file_of_another_folder_without_overwrite(tmp_path):
    """The output folder's own metadata.jsonl, and its images of the input images' names, were replaced without --overwrite
    (only conditioning images already there were refused): a folder of the user's data lost its captions and images."""
    from finetune.controlnet.conditions import make_condition_folders

    (tmp_path / "in").mkdir(), (tmp_path / "out").mkdir()
    noise(tmp_path / "in" / "a.png"), noise(tmp_path / "out" / "a.png", seed=1)
    (tmp_path / "out" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "my own caption"}) + "\n")
    kept = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    with pytest.raises(FinetuneError, match=r"out already holds metadata.jsonl and 1 other file, which this would replace: .*--overwrite"):
        make_condition_folders(tmp_path / "in", tmp_path / "out", "luminance")
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == kept
    (tmp_path / "out" / "metadata.jsonl").unlink()
    (tmp_path / "out" / "a.png").write_bytes((tmp_path / "in" / "a.png").read_bytes())  # a copy of the same image loses nothing
    make_condition_folders(tmp_path / "in", tmp_path / "out", "luminance")
    make_condition_folders(tmp_path / "in", tmp_path / "out", "luminance", overwrite=True)  # a rerun's, with --overwrite
    assert json.loads((tmp_path / "out" / "metadata.jsonl").read_text())["conditioning_file_name"] == "conditioning/a.png"


def test_make_conditions_refuses_images_whose_conditioning_names_differ_only_in_letter_case(tmp_path):
    """IMG_1.JPG and img_1.png made conditioning/IMG_1.png and conditioning/img_1.png: one file on macOS and Windows,
    where the second was written over the first and both images trained with its edges."""
    from finetune.controlnet.conditions import make_condition_folders

    noise(tmp_path / "IMG_1.png"), noise(tmp_path / "img_1.jpg", seed=1)
    with pytest.raises(FinetuneError, match=r"^images IMG_1\.png and img_1\.jpg would share conditioning/img_1\.png on macOS or Windows, which ignore letter case: rename one$"):
        make_condition_folders(tmp_path, tmp_path / "out", "luminance")
    assert not (tmp_path / "out").exists()


def odd_conditions(folder):
    """{name: path}: conditioning images that would steer as blank ones, a tiny one, and two that are fine once read."""
    folder.mkdir(exist_ok=True)
    shape = np.zeros((64, 64), np.uint8)
    shape[16:48, 16:48] = 255
    Image.fromarray(np.dstack([np.full_like(shape, 255)] * 3 + [shape]), "RGBA").save(folder / "alpha_only.png")  # white on clear
    Image.fromarray(shape.astype(np.float32) / 255, "F").save(folder / "depth.tif")  # float values 0-1
    Image.new("RGB", (8, 8), "white").save(folder / "tiny.png")
    Image.fromarray(shape.astype(np.uint16) * 257).save(folder / "deep.png")  # 16-bit: scaled to 8 bits
    Image.fromarray(np.dstack([255 - shape] * 3 + [shape]), "RGBA").save(folder / "black_on_clear.png")  # flattened onto white: the shape stays
    return {path.name: path for path in folder.iterdir()}


def test_sample_reads_its_condition_as_training_reads_conditioning_images(tmp_path):
    """A condition that would steer as a blank image (drawn in its alpha channel only, float values 0-1) or that is
    far smaller than the images is one line, as for training's pairs; 16-bit and black-on-clear images are read as there."""
    from controlnet_helpers import load_condition

    paths = odd_conditions(tmp_path)
    with pytest.raises(FinetuneError, match=r"^conditioning image .*alpha_only.png is one colour once its transparency is flattened onto white"):
        load_condition(paths["alpha_only.png"], 64)
    with pytest.raises(FinetuneError, match=r"^conditioning image .*depth.tif holds 32-bit float values of 0-1"):
        load_condition(paths["depth.tif"], 64)
    expected = f"conditioning image {paths['tiny.png']} is 8x8, smaller than 32 px on its short side (half of the 64 px sampled): give a larger one, or a smaller --resolution"
    with pytest.raises(FinetuneError, match=f"^{re.escape(expected)}$"):
        load_condition(paths["tiny.png"], 64)
    for name in ("deep.png", "black_on_clear.png"):
        pixels = np.asarray(load_condition(paths[name], 64))
        assert pixels.shape == (64, 64, 3) and pixels[32, 32].tolist() == ([255] * 3 if name == "deep.png" else [0] * 3) and pixels[0, 0].tolist() == ([0] * 3 if name == "deep.png" else [255] * 3)


def test_the_demo_reads_an_upload_as_sample_reads_its_condition(tmp_path):
    from finetune.demo.conditioning import conditioning_image
    from finetune.demo.inputs import read_upload

    paths = odd_conditions(tmp_path)
    with pytest.raises(FinetuneError, match=r"^conditioning image alpha_only\.png \(uploaded\) is one colour once its transparency is flattened onto white"):
        read_upload(str(paths["alpha_only.png"]))
    with pytest.raises(FinetuneError, match=r"^conditioning image depth\.tif \(uploaded\) holds 32-bit float values of 0-1"):
        read_upload(str(paths["depth.tif"]))
    with pytest.raises(FinetuneError, match=r"^conditioning image \(uploaded\) is 8x8, smaller than 32 px on its short side .*, or a smaller size$"):
        conditioning_image(read_upload(str(paths["tiny.png"])), "as uploaded", 64)
    from controlnet_helpers import load_condition

    for name in ("deep.png", "black_on_clear.png"):
        assert np.array_equal(np.asarray(conditioning_image(read_upload(str(paths[name])), "as uploaded", 64)), np.asarray(load_condition(paths[name], 64)))


def test_the_demo_api_names_an_input_that_is_no_number(demo):
    """Through the API a slider may be sent null or text: one line naming it (gradio's own check failed on it as a
    generic 'the app raised an exception'); an empty seed reads as 0, as before."""
    import gradio as gr
    from gradio_client import Client

    client = Client(demo.url, verbose=False)
    for name, value, said in (("steps", None, "steps must be a number from 1 to 100, got None"),
                              ("guidance", "high", "guidance must be a number from 0 to 20, got 'high'"),
                              ("strength_1", None, "strength 1 must be a number from -2 to 2, got None"),
                              ("conditioning_scale", None, "conditioning scale must be a number from 0 to 2, got None")):  # fmt: skip
        with pytest.raises(Exception, match=f"^{re.escape(said)}$"):
            client.predict(api_name="/generate", **{"prompt": "a circle", "steps": 2, "conditioning_image": None, name: value})
    assert client.predict(api_name="/generate", prompt="a circle", steps=2, seed=None, conditioning_image=None)[2].startswith("1 column x 1 row in")
    # NaN passes gradio's bounds check (a raw JSON request may send it; gradio_client cannot): refused too.
    from finetune.demo.inputs import number_required

    slider = number_required(gr.Slider(0, 20, value=5.0, step=0.5, label="guidance"))
    with pytest.raises(gr.Error) as refused:
        slider.preprocess(float("nan"))
    assert refused.value.message == "guidance must be a number from 0 to 20, got nan"
    assert slider.preprocess(7.5) == 7.5


def test_a_controlnet_of_other_than_rgb_conditioning_is_one_line_in_training_sample_and_the_demo(tiny_model, make_recipe, pairs_folder, tmp_path, capsys):
    """Conditioning images are read as RGB: a 1-channel ControlNet failed mid-run on torch's shape error; now it is
    one line before any model loads (training, sample) or listed as refused with the reason (the demo)."""
    from finetune.cli.main import main
    from finetune.demo.adapter_scan import scan_adapters
    from finetune.methods.controlnet import ControlNetMethod

    folder = tmp_path / "adapters" / "depth"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", "conditioning_channels": 1}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    said = "takes 1-channel conditioning images (its config.json's conditioning_channels), but conditioning images are read as RGB (3 channels)"
    with pytest.raises(FinetuneError, match=f"^controlnet.pretrained {re.escape(str(folder))} {re.escape(said)}"):
        ControlNetMethod(make_recipe(method="controlnet", data__image_dir=str(pairs_folder), controlnet__pretrained=str(folder))).check_data()
    condition = tmp_path / "c.png"
    Image.new("RGB", (64, 64)).save(condition)
    assert main(["sample", "--base", str(tiny_model), "--controlnet", str(folder), "--condition", str(condition), "--prompt", "x", "--out", str(tmp_path / "out")]) == 2
    assert f"--controlnet {folder} {said}" in capsys.readouterr().err
    assert scan_adapters(tmp_path / "adapters")["depth"].refused.startswith(said)


def test_a_loss_mask_is_found_in_either_unicode_form_and_any_letter_case_as_a_caption_file_is(tmp_path):
    """macOS writes `café` decomposed (NFD), most tools composed; a mask saved by either is the image's mask."""
    import unicodedata

    from finetune.data_check.check import inspect_examples

    nfd, nfc = unicodedata.normalize("NFD", "café"), unicodedata.normalize("NFC", "café")
    (tmp_path / "masks").mkdir()
    for seed, (image, mask) in enumerate(((f"{nfc}.png", f"{nfd}.png"), (f"{nfd} 2.jpg", f"{nfc} 2.png"), ("Straße.png", "STRASSE.png"))):
        noise(tmp_path / image, seed=seed)
        (tmp_path / image).with_suffix(".txt").write_text("a caption")
        Image.new("L", (64, 64), 255).save(tmp_path / "masks" / mask)
    config = DataConfig(image_dir=str(tmp_path), resolution=64, loss_mask={"source": "files"})
    report = inspect_examples(read_examples(config), config, "data")
    assert [f.message for f in report.findings if f.level == "fatal"] == [] and len(report.usable) == 3
    assert all(example.load_mask is not None for example in report.usable)


def test_a_conditioning_image_made_from_a_phone_photos_stored_pixels_says_to_save_it_upright(make_recipe, tmp_path):
    """Training turns the photo upright by its EXIF orientation, and its conditioning image and mask by theirs: one
    made from the stored pixels (the two files the same size on disk) said only 'they must be the same size'."""
    from finetune.controlnet.conditions import make_condition_folders
    from finetune.controlnet.pairs import inspect_pairs

    photos = tmp_path / "photos"
    photos.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 96x64 lying down; upright it is 64x96
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(photos / "phone.jpg", exif=exif)
    (photos / "phone.txt").write_text("a photo")
    [(folder, _, _)] = make_condition_folders(photos, tmp_path / "data", "luminance")
    assert Image.open(folder / "conditioning" / "phone.png").size == (64, 96)  # written upright
    recipe = make_recipe(method="controlnet", data__image_dir=str(folder))
    assert [f.message for f in inspect_pairs(recipe)[1].findings if f.level == "fatal"] == []

    Image.open(photos / "phone.jpg").convert("L").convert("RGB").save(folder / "conditioning" / "phone.png")  # from the stored pixels
    (fatal,) = [f.message for f in inspect_pairs(recipe)[1].findings if f.level == "fatal"]
    assert fatal.endswith("is 96x64 but image " + str(folder / "phone.jpg") + " is 64x96 upright: save the conditioning image upright: "
                          "the image is turned by its EXIF orientation (finetune make-conditions writes them so)")  # fmt: skip


def test_make_conditions_reads_each_input_folder_once(tmp_path, monkeypatch):
    """The folders are all checked before any is written, and written from that check (it was done again per folder)."""
    import finetune.controlnet.conditions as conditions

    for folder in (tmp_path / "in", tmp_path / "in" / "10_cat"):
        folder.mkdir(parents=True)
        noise(folder / "a.png")
        (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a cat"}) + "\n")
    checked = []
    original = conditions._checked_input
    monkeypatch.setattr(conditions, "_checked_input", lambda source, *rest: checked.append(source) or original(source, *rest))
    made = conditions.make_condition_folders(tmp_path / "in", tmp_path / "out", "luminance")
    assert [count for _, count, _ in made] == [1, 1] and checked == [tmp_path / "in", tmp_path / "in" / "10_cat"]
    assert json.loads((tmp_path / "out" / "10_cat" / "metadata.jsonl").read_text())["text"] == "a cat"
