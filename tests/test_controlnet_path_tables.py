"""A ControlNet's table of image paths (data.dataset=pairs.csv of `image,conditioning_image,text`): its conditioning
column is read as its image column is (finetune/data/image_paths.py), each path from the table's folder; a caption
column given as the conditioning column is refused before any image is decoded, a missing file named by its row."""

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from test_image_path_tables import write_table
from finetune.controlnet.pairs import inspect_pairs
from finetune.errors import FinetuneError

COLUMNS = ("image", "conditioning_image", "text")


def pairs_table(pairs_folder, folder, name="pairs.csv", columns=COLUMNS):
    """`pairs_folder`'s images, conditioning images and captions copied into `folder`/pairs, listed in a table beside it."""
    shutil.copytree(pairs_folder, folder / "pairs")
    rows = [json.loads(line) for line in (folder / "pairs" / "metadata.jsonl").read_text().splitlines()]
    (folder / "pairs" / "metadata.jsonl").unlink()  # the table alone names the pairs
    cells = [(f"pairs/{row['file_name']}", f"pairs/{row['conditioning_file_name']}", row["text"]) for row in rows]
    return write_table(folder, cells, name, columns=columns), rows


def test_a_csv_of_images_conditioning_images_and_captions_trains_a_step_from_any_folder(make_recipe, pairs_folder, tmp_path, monkeypatch):
    from finetune.training.trainer import train

    table, rows = pairs_table(pairs_folder, tmp_path / "data")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the paths are the table's, not the current folder's
    recipe = make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(table), train__max_steps=1)
    # It said "column 'conditioning_image' (controlnet.conditioning_column) holds Value('large_string'), not decoded images: cast it with dataset.cast_column(...)".
    pairs, report = inspect_pairs(recipe)
    assert report.findings == []
    assert [pair.conditioning.source for pair in pairs] == [f"dataset {table} row {i} column 'conditioning_image'" for i in range(len(rows))]
    assert [pair.image.caption for pair in pairs] == [row["text"] for row in rows]
    for pair, row in zip(pairs, rows):  # each row's own conditioning image, as its file holds it
        assert np.array_equal(np.asarray(pair.conditioning.load().convert("RGB")), np.asarray(Image.open(pairs_folder / row["conditioning_file_name"]).convert("RGB")))
    result = train(recipe)
    assert result.final_step == 1 and len(result.losses) == 1 and result.saved_files[0].is_dir()


@pytest.mark.parametrize("kind", ["pairs.csv", "pairs.jsonl"])
def test_a_caption_column_given_as_the_conditioning_column_is_one_line_before_any_image_is_decoded(kind, make_recipe, pairs_folder, tmp_path, monkeypatch):
    import datasets

    table, rows = pairs_table(pairs_folder, tmp_path, kind)
    monkeypatch.setattr(datasets.Image, "decode_example", lambda *args, **kwargs: pytest.fail("an image was decoded"))
    recipe = make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(table), controlnet__conditioning_column="text")
    with pytest.raises(FinetuneError, match=rf"^dataset {table} column 'text' \(controlnet.conditioning_column\) holds text, not image file names "
                                            rf"\(row 0: {re.escape(repr(rows[0]['text']))}\): set controlnet.conditioning_column to the column of image paths"):  # fmt: skip
        inspect_pairs(recipe)


def test_conditioning_paths_from_another_folder_are_one_line_and_a_missing_one_is_named_by_its_row(make_recipe, pairs_folder, tmp_path):
    table, rows = pairs_table(pairs_folder, tmp_path / "data")
    moved = shutil.copy(table, tmp_path / "pairs.csv")  # its paths now start from the wrong folder: images and conditioning images alike
    with pytest.raises(FinetuneError, match=rf"^dataset {moved} column 'conditioning_image' \(controlnet.conditioning_column\) names image files that are not there"):
        inspect_pairs(make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(moved)))
    gone = tmp_path / "data" / "pairs" / rows[1]["conditioning_file_name"]
    gone.unlink()
    pairs, report = inspect_pairs(make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(table)))
    assert [(finding.source, finding.message.split(":")[0]) for finding in report.findings] == [
        (f"dataset {table} row 1", f"image dataset {table} row 1 column 'conditioning_image' is the file pairs/{rows[1]['conditioning_file_name']}, "
                                   f"which is not there (looked for at {gone}, from the data file's folder)"),  # fmt: skip
    ]
    assert [pair.image.source for pair in pairs] == [f"dataset {table} row {i}" for i in range(len(rows)) if i != 1]


def test_a_table_with_a_folders_metadata_names_reads_its_conditioning_file_name_column(make_recipe, pairs_folder, tmp_path):
    """A folder's metadata.jsonl names (file_name, conditioning_file_name, text) as a table's columns, the recipe's defaults unchanged."""
    table, rows = pairs_table(pairs_folder, tmp_path, columns=("file_name", "conditioning_file_name", "text"))
    # It was "has no conditioning column 'conditioning_image' (controlnet.conditioning_column); its columns are: 'file_name', ...".
    pairs, report = inspect_pairs(make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(table)))
    assert report.findings == []
    assert [pair.conditioning.source for pair in pairs] == [f"dataset {table} row {i} column 'conditioning_file_name'" for i in range(len(rows))]


def test_a_tables_columns_of_paths_are_offered_as_its_image_columns_are(make_recipe, pairs_folder, tmp_path):
    table, _ = pairs_table(pairs_folder, tmp_path, columns=("file_name", "conditioning_file_name", "text"))
    # Its file_name column is the images': it trained each image as its own conditioning image, without a word.
    with pytest.raises(FinetuneError, match=r"controlnet.conditioning_column 'file_name' is data.image_column too, so each image would be its own "
                                            r"conditioning image: set it to the conditioning images' column \('conditioning_file_name'\)$"):  # fmt: skip
        inspect_pairs(make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(table), controlnet__conditioning_column="file_name"))
    table, _ = pairs_table(pairs_folder, tmp_path / "canny", columns=("image", "canny", "text"))
    # It named the columns, none as the conditioning images' (the captions are text too, not image files).
    with pytest.raises(FinetuneError, match=r"has no conditioning column 'conditioning_image' \(controlnet.conditioning_column\); "
                                            r"its columns are: 'image', 'canny', 'text': set controlnet.conditioning_column=canny$"):  # fmt: skip
        inspect_pairs(make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(table)))


def test_a_tables_pairs_are_read_from_one_open_of_it(make_recipe, pairs_folder, tmp_path, monkeypatch):
    """The conditioning column and the images are read from the one dataset opened: a hub dataset's second open resolved
    it again, a large table was parsed again."""
    import datasets

    table, rows = pairs_table(pairs_folder, tmp_path)
    opened, load_dataset = [], datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: opened.append(args) or load_dataset(*args, **kwargs))
    pairs, report = inspect_pairs(make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(table)))
    assert report.findings == [] and len(pairs) == len(rows)
    assert len(opened) == 1
