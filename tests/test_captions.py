"""Captions: metadata.csv, folder templates and repeats, tag shuffling that keeps the first tags."""

import json
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.captions.captions import edit_tags, training_caption
from finetune.config import DataConfig
from finetune.data.batches import EpochBatchSampler
from finetune.data.items import CaptionedImageDataset
from data_examples import load_examples
from finetune.config.recipe_loading import recipe_from_dict
from finetune.data.sources import Example
from finetune.errors import FinetuneError

TAGS = "sks, dog, grass, sunny, red collar, park, running"


def write_image(path, colour="red", size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def names_and_captions(config):
    return [(Path(e.source).name, e.caption) for e in load_examples(config)]


def test_metadata_csv_captions(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png", "blue")
    (tmp_path / "b.txt").write_text("from the sidecar")
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,"a red square, flat"\n', encoding="utf-8")
    got = names_and_captions(DataConfig(image_dir=str(tmp_path), resolution=64))
    assert got == [("a.png", "a red square, flat"), ("b.png", "from the sidecar")]
    # Excel's CSV where a comma is the decimal mark (German, French) separates columns by semicolons: it "had no file_name column".
    (tmp_path / "metadata.csv").write_text('file_name;text\na.png;a red square, flat\n', encoding="utf-8-sig")
    assert names_and_captions(DataConfig(image_dir=str(tmp_path), resolution=64))[0] == ("a.png", "a red square, flat")
    # A space after the comma (written by hand) is no part of the cell, nor does it hide the quotes (the caption was '"a red square').
    (tmp_path / "metadata.csv").write_text('file_name, text\na.png, "a red square, flat"\n')
    assert names_and_captions(DataConfig(image_dir=str(tmp_path), resolution=64))[0] == ("a.png", "a red square, flat")
    # A caption's commas not in quotes split it into cells: it trained its first tag alone.
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,1girl, solo, smile\n')
    with pytest.raises(FinetuneError, match=r"metadata\.csv line 2 has more cells than its header \(file_name, text\): a caption with commas must be in "
                                            r'double quotes \("1girl, solo, smile"\), as a spreadsheet writes it$'):  # fmt: skip
        load_examples(DataConfig(image_dir=str(tmp_path), resolution=64))
    # Of a file separated by semicolons, the semicolons split it: it was told to quote a caption's commas.
    (tmp_path / "metadata.csv").write_text('file_name;text\na.png;a red square; flat\n')
    with pytest.raises(FinetuneError, match=r"line 2 has more cells than its header \(file_name, text\): this file separates its columns by "
                                            r"semicolons: a caption with semicolons must be in double quotes, as a spreadsheet writes it$"):  # fmt: skip
        load_examples(DataConfig(image_dir=str(tmp_path), resolution=64))
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,"a red square, flat"\n')
    # sd-scripts' .caption sidecars too; .txt first where both are.
    write_image(tmp_path / "c.png", "green")
    (tmp_path / "c.caption").write_text("from a kohya dataset\n")
    (tmp_path / "b.caption").write_text("not read")
    got = names_and_captions(DataConfig(image_dir=str(tmp_path), resolution=64))
    assert got == [("a.png", "a red square, flat"), ("b.png", "from the sidecar"), ("c.png", "from a kohya dataset")]
    (tmp_path / "c.caption").write_text("from notepad", encoding="utf-8-sig")  # a byte-order mark is no part of it
    assert names_and_captions(DataConfig(image_dir=str(tmp_path), resolution=64))[2] == ("c.png", "from notepad")
    (tmp_path / "c.caption").write_bytes("caf\xe9 star".encode("latin-1"))
    with pytest.raises(FinetuneError, match=r"caption .*c.caption is not UTF-8 text: save it as UTF-8"):
        load_examples(DataConfig(image_dir=str(tmp_path), resolution=64))


def test_a_byte_order_mark_is_read_and_a_null_caption_is_a_missing_one(tmp_path):
    write_image(tmp_path / "a.png")
    # Excel's "CSV UTF-8" starts with a byte-order mark, which would become part of the first column's name.
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,from excel\n", encoding="utf-8-sig")
    assert names_and_captions(DataConfig(image_dir=str(tmp_path), resolution=64)) == [("a.png", "from excel")]
    (tmp_path / "metadata.csv").unlink()
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": None}) + "\n")  # not the caption "None"
    with pytest.raises(FinetuneError, match=r"a\.png has no caption"):
        load_examples(DataConfig(image_dir=str(tmp_path), resolution=64))


def test_a_metadata_jsonl_row_is_one_line_whatever_its_caption_holds(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png", "blue")
    # U+2028 and U+0085 may stand raw in a JSON string (text pasted from a web page); datasets reads such rows
    # whole, and str.splitlines cut them in two. Windows line ends (CRLF) end rows too.
    rows = [{"file_name": "a.png", "text": "a red square\u2028on white"}, {"file_name": "b.png", "text": "a blue\x85square"}]
    (tmp_path / "metadata.jsonl").write_bytes("".join(json.dumps(row, ensure_ascii=False) + "\r\n" for row in rows).encode())
    got = names_and_captions(DataConfig(image_dir=str(tmp_path), resolution=64))
    assert got == [("a.png", "a red square\u2028on white"), ("b.png", "a blue\x85square")]


def test_a_caption_is_lines_only_at_line_ends():
    """A caption of several lines trains one line per epoch (as sd-scripts splits at "\\n"); str.splitlines also split at
    U+2028, U+0085 and form feeds, which text pasted from a web page may hold: half the caption trained at a time."""
    from finetune.captions.captions import caption_lines

    config = DataConfig(image_dir=".", resolution=64)
    for caption in ("a red square\u2028on white", "a blue\x85square", "a page\x0cbreak"):
        assert caption_lines(caption) == [caption]
        assert {training_caption(caption, config, seed=0, epoch=epoch, index=0) for epoch in range(8)} == {caption}
    assert caption_lines("a dog\r\n\r\na cat\rsks\n") == ["a dog", "a cat", "sks"]


def test_a_folder_named_dataset_is_no_datasets_row_in_caption_messages(tmp_path):
    """Messages told an image file from a dataset row by "dataset " at the start of its path: the images of a
    folder named "dataset v2" were told to fill a caption column they do not have."""
    from finetune.data_check.check import checked_report

    folder = tmp_path / "dataset v2"
    write_image(folder / "a.png")
    config = DataConfig(image_dir=str(folder.relative_to(tmp_path)), resolution=64)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)  # a relative image_dir: the path starts with "dataset "
        with pytest.raises(FinetuneError, match=r"^image dataset v2/a\.png has no caption: add a\.txt"):
            load_examples(config)
        (folder / "a.txt").write_text("")
        assert "write one in its .txt or metadata row" in checked_report(config).lines()[-1]


@pytest.mark.parametrize("file_form,row_form", [("NFD", "NFC"), ("NFC", "NFD")])
def test_a_name_in_either_unicode_form_finds_its_metadata_row(tmp_path, file_form, row_form):
    """macOS names files decomposed (e + combining accent), most tools write the composed form: one name."""
    import unicodedata

    image = write_image(tmp_path / unicodedata.normalize(file_form, "café.png"))
    rows = [{"file_name": unicodedata.normalize(row_form, "café.png"), "text": "a cup"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    assert names_and_captions(DataConfig(image_dir=str(tmp_path), resolution=64)) == [(image.name, "a cup")]  # not "names no image" either


def test_caption_files_a_metadata_row_overrides_are_said_when_they_differ(tmp_path):
    """A tagger's .txt files written into a folder that has a metadata.jsonl did not train, unseen: the row wins."""
    from finetune.data.sources import read_examples
    from finetune.data_check.check import WARNING, inspect_examples

    def warnings(**settings):
        config = DataConfig(image_dir=str(tmp_path), resolution=64, **settings)
        return [f.message for f in inspect_examples(read_examples(config), config, "data").of_level(WARNING)]

    for name, colour in (("a.png", "red"), ("b.png", "blue"), ("c.png", "green")):
        write_image(tmp_path / name, colour)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "old tags"}) + "\n" for n in ("a.png", "b.png", "c.png")))
    (tmp_path / "a.txt").write_text("old tags\n")  # the same caption: nothing to say
    (tmp_path / "b.txt").write_text("new tags")
    assert warnings() == [f"data folder {tmp_path}: 1 caption file (b.txt) differs from metadata.jsonl, whose rows caption those images and "
                          "train: the files are not read; remove the metadata file to train them, or the files to keep the rows"]
    assert warnings(caption="one prompt") == []  # neither is read
    # Files of another code page are said too, each read once: the error of one counted the folder's others, per file.
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_bytes("caf\xe9 tags".encode("cp1252"))
    reads, read_bytes = Counter(), Path.read_bytes
    with mock.patch.object(Path, "read_bytes", lambda path: reads.update([path.name]) or read_bytes(path)):
        assert warnings()[0].startswith(f"data folder {tmp_path}: 3 caption files (a.txt, b.txt, c.txt) differ from metadata.jsonl")
    assert {name: count for name, count in reads.items() if name.endswith(".txt")} == {"a.txt": 1, "b.txt": 1, "c.txt": 1}


def test_metadata_csv_needs_its_columns_and_is_exclusive_with_jsonl(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("name,caption\na.png,x\n")
    with pytest.raises(FinetuneError, match=r"metadata\.csv must have a header row with 'file_name' and 'text' columns \(has: name, caption\)"):
        load_examples(DataConfig(image_dir=str(tmp_path), resolution=64))
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,x\n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "y"}) + "\n")
    with pytest.raises(FinetuneError, match="has both metadata.jsonl and metadata.csv: keep one"):
        load_examples(DataConfig(image_dir=str(tmp_path), resolution=64))


def test_folder_templates_wrap_captions_or_replace_them(tmp_path):
    write_image(tmp_path / "styled" / "a.png")
    (tmp_path / "styled" / "a.txt").write_text("a cat on a mat")
    write_image(tmp_path / "subject" / "b.png", "blue")  # no caption file: the template is the prompt
    folders = [{"path": "styled", "template": "a painting of {caption}, in sks style"}, {"path": "subject", "template": "a photo of sks dog"}]
    got = names_and_captions(DataConfig(image_dir=str(tmp_path), resolution=64, folders=folders))
    assert got == [("a.png", "a painting of a cat on a mat, in sks style"), ("b.png", "a photo of sks dog")]
    # data.caption is the caption the template wraps
    got = names_and_captions(DataConfig(image_dir=str(tmp_path), resolution=64, caption="x", folders=[{"path": "styled", "template": "<{caption}>"}]))
    assert got == [("a.png", "<x>")]


def test_repeats_multiply_an_images_uses_per_epoch(tmp_path):
    write_image(tmp_path / "rare" / "r.png", "green")
    write_image(tmp_path / "common" / "c0.png")
    write_image(tmp_path / "common" / "c1.png", "blue")
    folders = [{"path": "rare", "repeats": 3}, {"path": "common"}]
    examples = load_examples(DataConfig(image_dir=str(tmp_path), resolution=64, caption="x", folders=folders))
    assert Counter(Path(e.source).name for e in examples) == {"r.png": 3, "c0.png": 1, "c1.png": 1}
    sampler = EpochBatchSampler(len(examples), batch_size=1, num_processes=1, process_index=0, seed=0)
    for epoch in range(2):
        used = [Path(examples[i].source).name for m in range(5) for i in sampler.global_batch_indices(epoch * 5 + m)]
        assert Counter(used) == {"r.png": 3, "c0.png": 1, "c1.png": 1}
    # Each repeat is its own item: with random crops the three uses differ.
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "rare" / "r.png")
    config = DataConfig(image_dir=str(tmp_path), resolution=64, caption="x", crop="random", folders=[{"path": "rare", "repeats": 3}])
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0)
    assert len({dataset[(i, 0)]["pixel_values"].sum().item() for i in range(3)}) > 1


def test_each_folders_share_of_an_epoch_is_reported_and_one_folder_under_two_templates_is_no_copy(tmp_path):
    from finetune.data.sources import read_examples
    from finetune.data_check.check import inspect_examples

    write_image(tmp_path / "rare" / "r.png", "green")
    write_image(tmp_path / "common" / "c0.png")
    write_image(tmp_path / "common" / "c1.png", "blue")
    folders = [{"path": "rare", "repeats": 3, "template": "{caption}"}, {"path": "common"}, {"path": "rare", "template": "a photo of {caption}"}]
    config = DataConfig(image_dir=str(tmp_path), resolution=64, caption="x", folders=folders)
    lines = inspect_examples(read_examples(config), config, "photos").lines()
    assert "uses per epoch by folder: 'rare' ({caption}) 1 x3 = 3 (50%), 'common' 2 x1 = 2 (33%), 'rare' (a photo of {caption}) 1 x1 = 1 (17%)" in lines
    assert lines[0] == "photos: 4 images (3 files, some under two templates), 4 used, 0 skipped; 6 uses per epoch"
    assert not [line for line in lines if "same pixels" in line], lines
    copied = tmp_path / "common" / "c2.png"  # a real copy is still named
    copied.write_bytes((tmp_path / "common" / "c0.png").read_bytes())
    lines = inspect_examples(read_examples(config), config, "photos").lines()
    assert [line for line in lines if "same pixels" in line] == [f"warning: image {tmp_path / 'common' / 'c0.png'} has the same pixels as {copied}: "
                                                                 "each copy trains as its own image (remove copies, or use data.folders repeats)"]  # fmt: skip


def test_folder_settings_are_validated(tmp_path):
    with pytest.raises(ValueError, match="must be at least 1 \\(1 means no repeat"):
        DataConfig(image_dir="x", folders=[{"path": "a", "repeats": 0}])
    with pytest.raises(FinetuneError, match="data.folders are subfolders of data.image_dir"):
        recipe_from_dict({"data": {"dataset": "some/dataset", "folders": [{"path": "a"}]}})
    write_image(tmp_path / "a.png")
    with pytest.raises(FinetuneError, match=r"data folder .*nothere not found: check data.folders path 'nothere'"):
        load_examples(DataConfig(image_dir=str(tmp_path), caption="x", folders=[{"path": "nothere"}]))


def test_shuffle_keeps_the_first_tags_and_the_tag_set():
    orders = set()
    for seed in range(30):
        shuffled = edit_tags(TAGS, keep_tokens=2, rng=np.random.default_rng(seed))
        tags = shuffled.split(", ")
        assert tags[:2] == ["sks", "dog"]
        assert sorted(tags) == sorted(TAGS.split(", "))
        orders.add(shuffled)
    assert len(orders) > 10  # really shuffled
    assert edit_tags("a, b", keep_tokens=5, rng=np.random.default_rng(0)) == "a, b"


def test_tag_shuffle_is_deterministic_per_seed_epoch_and_index():
    shuffled = DataConfig(image_dir="x", shuffle_tags=True, keep_tokens=1)
    first = training_caption(TAGS, shuffled, seed=3, epoch=0, index=4)
    assert first == training_caption(TAGS, shuffled, seed=3, epoch=0, index=4)
    others = {training_caption(TAGS, shuffled, seed=3, epoch=e, index=4) for e in range(1, 12)}
    assert len(others | {first}) > 3
    assert training_caption(TAGS, DataConfig(image_dir="x"), seed=3, epoch=0, index=4) == TAGS  # off: untouched
    assert training_caption("one caption without tags", shuffled, 3, 0, 0) == "one caption without tags"


def test_tag_dropout_leaves_out_tags_at_its_rate_and_never_the_kept_ones():
    """sd-scripts' caption_tag_dropout_rate: each tag past keep_tokens is dropped with that probability, in its
    order unless shuffled too; the shuffle alone draws as it did without dropout."""
    dropping = DataConfig(image_dir="x", tag_dropout=0.25, keep_tokens=1)
    tags, dropped = TAGS.split(", "), []
    for index in range(400):
        caption = training_caption(TAGS, dropping, seed=0, epoch=0, index=index).split(", ")
        assert caption[0] == "sks" and caption == [tag for tag in tags if tag in caption]  # the trigger stays; order kept
        dropped.append(len(tags) - len(caption))
    assert np.mean(dropped) / (len(tags) - 1) == pytest.approx(0.25, abs=0.03)
    both = DataConfig(image_dir="x", shuffle_tags=True, tag_dropout=0.25, keep_tokens=1)
    shuffled = DataConfig(image_dir="x", shuffle_tags=True, keep_tokens=1)
    for index in range(20):  # the same shuffle, then some tags left out of it
        order = training_caption(TAGS, shuffled, seed=0, epoch=0, index=index).split(", ")
        kept = training_caption(TAGS, both, seed=0, epoch=0, index=index).split(", ")
        assert kept == [tag for tag in order if tag in kept]
    with pytest.raises(ValueError, match="data.keep_tokens keeps the first tags in place"):
        DataConfig(image_dir="x", keep_tokens=1)
    assert training_caption(TAGS, DataConfig(image_dir="x", tag_dropout=0.0), 0, 0, 0) == TAGS


def test_dataset_shuffles_tags_without_changing_the_images(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text(TAGS)
    common = dict(image_dir=str(tmp_path), resolution=64, crop="random", random_flip=True)
    shuffled_config = DataConfig(**common, shuffle_tags=True, keep_tokens=1)
    plain = CaptionedImageDataset(load_examples(DataConfig(**common)), DataConfig(**common), seed=5)
    shuffled = CaptionedImageDataset(load_examples(shuffled_config), shuffled_config, seed=5)
    captions = set()
    for epoch in range(8):
        item, reference = shuffled[(0, epoch)], plain[(0, epoch)]
        assert torch.equal(item["pixel_values"], reference["pixel_values"])  # its own random stream
        assert item["caption"].startswith("sks, ") and item["caption"] == shuffled[(0, epoch)]["caption"]
        captions.add(item["caption"])
        assert reference["caption"] == TAGS
    assert len(captions) > 3


def test_keep_tokens_separator_keeps_the_tags_around_it_in_place_and_does_not_train():
    """sd-scripts' keep_tokens_separator: a kohya dataset's `sks, dog ||| grass, sunny` trained the words '|||', and
    'dog ||| grass' as one tag, with the tags before it shuffled away from the front."""
    config = DataConfig(image_dir="x", shuffle_tags=True, keep_tokens=1, keep_tokens_separator="|||")
    orders = set()
    for index in range(30):
        caption = training_caption("sks, dog ||| grass, sunny, park, tree ||| masterpiece", config, seed=0, epoch=0, index=index)
        tags = caption.split(", ")
        assert tags[:2] == ["sks", "dog"] and tags[-1] == "masterpiece" and "|||" not in caption
        assert sorted(tags[2:-1]) == ["grass", "park", "sunny", "tree"]
        orders.add(caption)
    assert len(orders) > 5  # the middle really shuffled
    assert training_caption("sks ||| dog", config, 0, 0, 0) == "sks, dog"  # no comma: still split
    # A caption without it: keep_tokens, drawn exactly as before the separator existed (the pinned curves' captions).
    plain = DataConfig(image_dir="x", shuffle_tags=True, keep_tokens=1)
    assert [training_caption(TAGS, config, 3, 0, i) for i in range(10)] == [training_caption(TAGS, plain, 3, 0, i) for i in range(10)]


def test_a_held_out_items_caption_leaves_out_the_keep_tokens_separator_as_training_does():
    """validation.loss_images scored 'sks, dog ||| grass, sunny' with the bars in: words training never sees."""
    config = DataConfig(image_dir="x", resolution=64, shuffle_tags=True, keep_tokens_separator="|||")
    example = Example(source="a.png", caption="sks, dog ||| grass, sunny ||| masterpiece", load=lambda: Image.new("RGB", (64, 64)), size=(64, 64))
    held = CaptionedImageDataset([example], config, seed=0, held_out=frozenset({0}))
    assert held[(0, 0)]["caption"] == held[(0, 5)]["caption"] == "sks, dog, grass, sunny, masterpiece"


def test_keep_tokens_separator_without_shuffle_or_dropout_or_as_a_comma_is_refused():
    with pytest.raises(ValueError, match=r"data.keep_tokens_separator keeps the tags before it in place .*set data.shuffle_tags: true"):
        DataConfig(image_dir="x", keep_tokens_separator="|||")
    for separator in ("", " ", ","):
        with pytest.raises(ValueError, match="must be text without a comma that captions hold between tags"):
            DataConfig(image_dir="x", shuffle_tags=True, keep_tokens_separator=separator)
    with pytest.raises(FinetuneError, match=r"method vae trains the autoencoder on reconstructions, so .*data.keep_tokens_separator"):
        recipe_from_dict({"method": "vae", "data": {"image_dir": "x", "shuffle_tags": True, "keep_tokens_separator": "|||"}})


def test_shuffle_or_dropout_that_changes_no_caption_is_said():
    """data.shuffle_tags on captions written as sentences (no commas), or with no more tags than keep_tokens, trained
    them as written, without a word: the switch looked on and did nothing."""
    from finetune.captions.captions import unmoved_tags_warning

    shuffled = DataConfig(image_dir="x", shuffle_tags=True, keep_tokens=1)
    said = unmoved_tags_warning(["a photo of sks dog on grass", "sks dog, sitting"], shuffled)
    assert said == ("warning: data.shuffle_tags changes no caption: it shuffles the comma-separated tags after the first data.keep_tokens (1), and no "
                    "caption has two or more of them (a sentence without commas is left as it is): write captions as tags ('sks, dog, grass, sunny'), "
                    "or lower data.keep_tokens, or set data.shuffle_tags off")  # fmt: skip
    assert unmoved_tags_warning(["a photo of sks dog on grass", TAGS], shuffled) is None  # one caption it shuffles
    dropping = DataConfig(image_dir="x", tag_dropout=0.1)
    assert "data.tag_dropout changes no caption" in unmoved_tags_warning(["a photo of sks dog"], dropping)  # one tag, never dropped
    assert unmoved_tags_warning(["sks, dog"], dropping) is None
    assert unmoved_tags_warning(["a photo of sks dog"], DataConfig(image_dir="x")) is None  # both off


def test_a_run_whose_shuffle_changes_no_caption_says_so_at_its_start(make_recipe, capsys):
    """The tiny data's captions are two tags ('a ... shape, top left'): with keep_tokens 1 one is left to shuffle."""
    from finetune.training.trainer import train

    train(make_recipe(train__max_steps=1, data__shuffle_tags=True, data__keep_tokens=1))
    assert "warning: data.shuffle_tags changes no caption" in capsys.readouterr().out
    train(make_recipe(train__max_steps=1, data__shuffle_tags=True, output_dir=str(make_recipe().output_dir + "-two")))
    assert "changes no caption" not in capsys.readouterr().out


def test_check_data_says_a_shuffle_that_changes_no_caption_as_training_does(tmp_path, tiny_model, image_folder, capsys):
    from finetune.cli.main import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{pretrained: {tiny_model}}}\ndata: {{image_dir: {image_folder}, resolution: 64, shuffle_tags: true, keep_tokens: 1}}\n")
    assert main(["check-data", str(recipe)]) == 0
    assert "warning: data.shuffle_tags changes no caption" in capsys.readouterr().out
    assert main(["check-data", str(recipe), "data.keep_tokens=0"]) == 0
    assert "changes no caption" not in capsys.readouterr().out


def test_captions_holding_sd_scripts_separator_unread_here_are_said():
    """A kohya dataset's 'sks, dog ||| grass' without data.keep_tokens_separator trains the bars as words."""
    from finetune.captions.captions import tag_warnings

    captions = ["a photo of a dog", "sks, dog ||| grass, sunny"]
    assert tag_warnings(captions, DataConfig(image_dir="x")) == [
        "warning: captions hold '|||' (e.g. 'sks, dog ||| grass, sunny'), sd-scripts' keep_tokens_separator, which trains here as words: set "
        "data.keep_tokens_separator: '|||' with data.shuffle_tags: true to keep the tags before it in place, or remove it from the captions"]
    assert tag_warnings(captions, DataConfig(image_dir="x", shuffle_tags=True, keep_tokens_separator="|||")) == []
    assert tag_warnings(["sks, dog, grass"], DataConfig(image_dir="x")) == []


def test_tag_dropout_never_drops_the_tags_kept_around_the_separator():
    """The tags before the separator and after a second one stay, as data.tag_dropout's docs say; only the middle drops."""
    config = DataConfig(image_dir="x", tag_dropout=0.9, keep_tokens_separator="|||")
    captions = [training_caption("sks, dog ||| grass, sunny, park, tree ||| masterpiece", config, seed=0, epoch=0, index=i) for i in range(20)]
    assert all(caption.startswith("sks, dog, ") and caption.endswith(", masterpiece") for caption in captions), captions
    assert min(len(caption.split(", ")) for caption in captions) < 7  # the middle's tags were dropped


def test_captions_written_in_a_json_file_that_is_not_read_are_named_with_the_missing_caption(tmp_path):
    """A metadata.json (for metadata.jsonl) or sd-scripts' meta_cap.json beside the images: each image was told "add a.txt,
    a metadata.jsonl or metadata.csv entry", and the file the captions were written in went unnamed."""
    write_image(tmp_path / "a.png")
    config = DataConfig(image_dir=str(tmp_path), resolution=64)
    (tmp_path / "meta_cap.json").write_text(json.dumps({"a": {"caption": "a red square"}}))
    with pytest.raises(FinetuneError) as raised:
        load_examples(config)
    assert str(raised.value).startswith(f"image {tmp_path / 'a.png'} has no caption: add a.txt, a metadata.jsonl or metadata.csv entry, or set "
                                        "data.caption to one prompt for all images (meta_cap.json beside it is not read: a folder's captions "
                                        "in JSON are read from metadata.jsonl, one object a line with file_name and text)")  # fmt: skip
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": None}) + "\n")
    with pytest.raises(FinetuneError) as raised:  # a metadata.jsonl is read: its row's missing caption is the news
        load_examples(config)
    assert "a.png has no caption" in str(raised.value) and "meta_cap.json" not in str(raised.value)
