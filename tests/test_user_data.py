"""A user's own data, as a walkthrough of docs/data.md found it: held-out images in the epoch's count, captions
of several lines, two images sharing one caption file, and folders of folders for make-conditions."""

import json
import re
import shlex

import numpy as np
import pytest
import yaml
from conftest import SHIPPED_BASE
from PIL import Image
from transformers import CLIPTokenizer

from finetune.captions.overrides import imageless_caption_files
from finetune.captions.tokens import long_captions_line
from finetune.cli.main import main
from finetune.config import DataConfig
from finetune.controlnet.conditions import make_condition_folders
from finetune.data.items import CaptionedImageDataset
from finetune.data.sources import read_examples
from finetune.data_check.check import FATAL, inspect_examples
from finetune.errors import FinetuneError
from finetune.methods.controlnet import ControlNetMethod
from finetune.outputs.metadata import dataset_metadata


def noise(path, size=(64, 64), seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def captioned_folder(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        noise(folder / f"{i}.png", seed=i)
        (folder / f"{i}.txt").write_text(f"image {i}")
    return folder


def test_the_epoch_counts_leave_out_the_held_out_images(tmp_path, capsys):
    """validation.loss_images keeps images out of training: the summary's uses per epoch (and each folder's share) are what trains."""
    root = tmp_path / "data"
    captioned_folder(root / "subject", 2), captioned_folder(root / "style", 4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"pretrained": str(SHIPPED_BASE)}, "data": {"image_dir": str(root), "resolution": 64, "folders": [{"path": "subject", "repeats": 5}, {"path": "style"}]},
                                      "train": {"batch_size": 1}, "validation": {"loss_images": 2}}))  # fmt: skip
    assert main(["check-data", str(recipe)]) == 0
    out = capsys.readouterr().out
    held = [line for line in out.splitlines() if line.startswith("held out: ")]
    assert len(held) == 1, out
    trained = int(held[0].split("leaving ")[1].split(" ")[0])
    first = out.splitlines()[0]
    assert first.startswith(f"data folder {root}: 6 images, 6 used, 0 skipped; {trained} uses per epoch (2 held out by validation.loss_images)"), first
    shares = next(line for line in out.splitlines() if line.startswith("uses per epoch by folder: "))
    assert sum(int(part.split(" = ")[1].split(" ")[0]) for part in shares.split(", ")) == trained


def test_two_images_sharing_one_caption_file_is_one_line_naming_both(tmp_path, make_recipe, monkeypatch, capsys):
    folder = captioned_folder(tmp_path / "photos", 2)
    noise(folder / "0.jpg", seed=9)  # a converted copy beside 0.png: which one is "image 0"?
    expected = (f"images 0.jpg and 0.png share the caption file {folder / '0.txt'}: remove one image (a copy?), "
                "or rename it with a caption file of its own, or caption each in a metadata.jsonl row")  # fmt: skip
    assert main(["check-data", "--image-dir", str(folder), "--resolution", "64"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {expected}"
    import finetune.training.trainer as trainer

    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(FinetuneError, match=f"^{re.escape(expected)}$"):
        trainer.train(make_recipe(data__image_dir=str(folder)))
    # One prompt for all, or a metadata row of its own, is no ambiguity.
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "0.jpg", "text": "the jpeg"}) + "\n")
    assert sorted(e.caption for e in read_examples(DataConfig(image_dir=str(folder)))) == ["image 0", "image 1", "the jpeg"]
    (folder / "metadata.jsonl").unlink()
    assert len(read_examples(DataConfig(image_dir=str(folder), caption="a photo"))) == 3


def test_each_line_of_a_caption_of_several_lines_is_a_caption_of_its_own(tmp_path, capsys):
    """As SimpleTuner and sd-scripts' enable_wildcard read them: one line each epoch, not the lines glued into one prompt."""
    folder = tmp_path / "photos"
    folder.mkdir()
    noise(folder / "a.png")
    (folder / "a.txt").write_text("\ufeffsks dog, grass, sunny\r\n\r\nsks dog, on a sofa\r\n")  # a Windows editor's file
    config = DataConfig(image_dir=str(folder), resolution=64, folders=[{"path": ".", "template": "photo of {caption}"}], shuffle_tags=True, keep_tokens=1)
    [example] = read_examples(config)
    assert example.caption == "photo of sks dog, grass, sunny\nphoto of sks dog, on a sofa"  # the template wraps each line
    dataset = CaptionedImageDataset([example], config, seed=0)
    captions = {dataset[(0, epoch)]["caption"] for epoch in range(12)}
    assert captions == {"photo of sks dog, grass, sunny", "photo of sks dog, sunny, grass", "photo of sks dog, on a sofa"}
    assert main(["check-data", "--image-dir", str(folder), "--resolution", "64"]) == 0
    assert (f"converted: image {folder / 'a.png'}: caption of 2 lines, each a caption of its own: one line trains each epoch "
            "(to train them together, join them with commas on one line)") in capsys.readouterr().out.splitlines()  # fmt: skip
    # Each line is counted as a prompt of its own: in tokens, and in the tags an output records.
    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED_BASE, subfolder="tokenizer")
    two_lines = "a dog " * 30 + "\n" + "a cat " * 30  # 60 tokens each
    assert long_captions_line(tokenizer, {"a.png": two_lines}, 75) is None
    assert "(the longest: a.png, 60 tokens)" in long_captions_line(tokenizer, {"a.png": two_lines}, 50)
    tags = json.loads(dataset_metadata([example])["finetune.tag_frequency"])
    assert tags == {"photos": {"photo of sks dog": 1, "grass": 1, "sunny": 1, "on a sofa": 1}}


def test_make_conditions_writes_each_image_subfolder_as_its_own_training_folder(tmp_path, make_recipe, capsys):
    """A folder of sd-scripts' `N_name` folders: each subfolder gets its conditioning images and metadata.jsonl (they were left out unseen)."""
    source = tmp_path / "photos"
    captioned_folder(source / "10_sks dog", 2), captioned_folder(source / "1_style", 3)
    out = tmp_path / "controlnet-data"
    assert main(["make-conditions", str(source), str(out), "--kind", "luminance"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"wrote 2 luminance conditioning images and metadata.jsonl to {out / '10_sks dog'}",
                       f"wrote 3 luminance conditioning images and metadata.jsonl to {out / '1_style'}",
                       'note: train the subfolders as data.folders entries, in the recipe\'s data section: '
                       'folders: [{path: "10_sks dog", repeats: 10}, {path: "1_style", repeats: 1}]',
                       f"next: finetune train recipes/controlnet.yaml data.image_dir={out} "
                       "'data.folders=[{path: \"10_sks dog\", repeats: 10}, {path: \"1_style\", repeats: 1}]'"]  # fmt: skip
    from finetune.config.recipe_loading import load_recipe

    typed = shlex.split(printed[-1].removeprefix("next: "))  # the command as the shell splits it: the recipe reads the folder
    assert [(entry.path, entry.repeats) for entry in load_recipe(typed[2], typed[3:]).data.folders] == [("10_sks dog", 10), ("1_style", 1)]
    method = ControlNetMethod(make_recipe(method="controlnet", data__image_dir=str(out), data__folders=[{"path": "10_sks dog", "repeats": 10}, {"path": "1_style"}]))
    method.check_data()  # ready to train as written
    assert len(method.pairs) == 23 and method.data_metadata()["finetune.conditioning"] == '{"kind": "luminance"}'
    # A clash in one subfolder stops the command before any folder is written.
    noise(source / "1_style" / "0.jpg")
    with pytest.raises(FinetuneError, match=r"^images 0.jpg and 0.png would share conditioning/0.png: rename one$"):
        make_condition_folders(source, tmp_path / "again", "canny")
    assert not (tmp_path / "again").exists()


def test_make_conditions_names_the_images_it_made_no_conditioning_for(tmp_path, capsys):
    """An animated .gif beside the photos, in the folder or a subfolder, and a phone's export two levels down (2023/jan) got no
    conditioning image, and the output's data check cannot say them (they are not there): make-conditions says each."""
    source = captioned_folder(tmp_path / "photos", 1)
    noise(source / "anim.gif", size=(8, 8)), captioned_folder(source / "best", 1), noise(source / "best" / "clip.gif", size=(8, 8))
    captioned_folder(source / "2023" / "jan", 1)
    out = tmp_path / "controlnet-data"
    assert main(["make-conditions", str(source), str(out), "--kind", "luminance"]) == 0
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert warned == [f"warning: 1 image in {source} got no conditioning image (.gif, e.g. anim.gif): convert it to PNG or JPEG and run make-conditions again with --overwrite",
                      f"warning: 1 image in {source / 'best'} got no conditioning image (.gif, e.g. clip.gif): convert it to PNG or JPEG and run make-conditions again with --overwrite",
                      f"warning: images in subfolders of subfolders of {source} (2023/jan) got no conditioning images (make-conditions reads the folder "
                      f"and the subfolders just below it): run make-conditions on {source / '2023'} too, or move them up"]  # fmt: skip
    only_subfolders = tmp_path / "albums"  # photos in subfolders alone: the .gif beside them is said too
    captioned_folder(only_subfolders / "best", 1), noise(only_subfolders / "cover.gif", size=(8, 8))
    assert main(["make-conditions", str(only_subfolders), str(tmp_path / "albums-data"), "--kind", "luminance"]) == 0
    assert f"warning: 1 image in {only_subfolders} got no conditioning image (.gif, e.g. cover.gif)" in capsys.readouterr().out


def test_a_folder_of_only_photos_of_unread_kinds_says_so(tmp_path, capsys):
    """An iPhone's .HEIC photos are images, of a kind training does not read: not "no images"."""
    for name in ("IMG_0001.HEIC", "IMG_0002.HEIC"):
        (tmp_path / name).write_bytes(b"\x00\x00\x00\x18ftypheic")
        (tmp_path / name).with_suffix(".txt").write_text("a photo")
    assert main(["check-data", "--image-dir", str(tmp_path), "--resolution", "64"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: data folder {tmp_path} has no images training reads, only 2 it does not "
                                               "(.heic, e.g. IMG_0001.HEIC): convert them to PNG or JPEG")  # fmt: skip
    (tmp_path / "IMG_0002.HEIC").unlink()  # one: "convert it", as every other message of unread kinds says (sources.convert_unread)
    assert main(["check-data", "--image-dir", str(tmp_path), "--resolution", "64"]) == 2
    assert capsys.readouterr().err.strip().endswith("only 1 it does not (.heic, e.g. IMG_0001.HEIC): convert it to PNG or JPEG")


def test_a_broken_link_among_the_images_is_named(tmp_path):
    """A linked image whose file was moved: it would have been left out unseen, its caption with it."""
    captioned_folder(tmp_path, 1)
    (tmp_path / "gone.png").symlink_to(tmp_path / "moved" / "gone.png")
    (tmp_path / "gone.txt").write_text("the moved one")
    config = DataConfig(image_dir=str(tmp_path), resolution=64)
    report = inspect_examples(read_examples(config), config, "data")
    assert [f.message for f in report.of_level(FATAL)] == [
        f"image {tmp_path / 'gone.png'} is a link to {tmp_path / 'moved' / 'gone.png'}, which is not there: fix the link or remove it"
    ]


def test_a_caption_file_whose_image_is_gone_is_said_and_one_beside_an_unread_image_is_not(tmp_path, capsys):
    """0002.txt left behind when its image was removed (or renamed 002.jpg) trains nothing: the check names it. anim.txt beside
    anim.gif is not named (the .gif is said), nor a hidden file, nor any caption file where data.caption replaces them all."""
    folder = captioned_folder(tmp_path / "photos", 1)
    (folder / "0002.txt").write_text("the caption of an image deleted since")
    (folder / "anim.gif").write_bytes(b"GIF89a"), (folder / "anim.txt").write_text("a gif")
    (folder / "._0.txt").write_bytes(b"\0\5\26\7")  # macOS's metadata beside a copied caption file
    assert main(["check-data", "--image-dir", str(folder), "--resolution", "64"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "names no image" in line]
    assert said == [f"warning: data folder {folder}: 1 caption file (0002.txt) names no image in it and trains nothing: "
                    "rename it as its image (0001.jpg's caption is 0001.txt), or remove it"], said  # fmt: skip
    assert imageless_caption_files(folder, DataConfig(image_dir=str(folder), caption="a photo")) is None


def test_a_file_that_is_no_image_is_not_also_told_to_get_a_caption(tmp_path, capsys):
    """notes.jpg, a text file under an image's name, was two fatal lines, the first asking for notes.txt; an image that decodes
    without a caption is still told to get one."""
    folder = captioned_folder(tmp_path / "photos", 1)
    (folder / "notes.jpg").write_text("not an image\n")
    noise(folder / "uncaptioned.png")
    assert main(["check-data", "--image-dir", str(folder), "--resolution", "64"]) == 1
    fatal = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fatal: ")]
    assert len(fatal) == 2 and fatal[0].startswith(f"fatal: image {folder / 'notes.jpg'} cannot be read (UnidentifiedImageError"), fatal
    assert fatal[1].startswith(f"fatal: image {folder / 'uncaptioned.png'} has no caption: add uncaptioned.txt"), fatal


def test_make_conditions_names_a_subfolder_of_only_unread_kinds(tmp_path, capsys):
    """A subfolder holding only .gif files gets no output folder (no image make-conditions reads), so it was left out
    without a word, where a .gif beside photos in a subfolder is said."""
    source = captioned_folder(tmp_path / "photos", 1)
    (source / "clips").mkdir()
    noise(source / "clips" / "a.gif", size=(8, 8)), noise(source / "clips" / "b.gif", size=(8, 8))
    out = tmp_path / "controlnet-data"
    assert main(["make-conditions", str(source), str(out), "--kind", "luminance"]) == 0
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert warned == [f"warning: 2 images in {source / 'clips'} got no conditioning image (.gif, e.g. a.gif): convert them to PNG or JPEG "
                      "and run make-conditions again with --overwrite"]  # fmt: skip
    assert not (out / "clips").exists()
