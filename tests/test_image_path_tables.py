"""A table of image paths as the dataset (data.dataset=images.csv, or a .jsonl or .parquet of the same): a creator's
spreadsheet of `file_name,text` or `image,caption`, its paths read from the table's folder. A caption column given as
the images' is refused before any file is opened; a missing or bad file is named with its row, as a folder's is."""

import json

import pytest
from PIL import Image

from data_examples import load_examples
from finetune.config import DataConfig
from finetune.errors import FinetuneError


def write_table(folder, rows, name="images.csv", columns=("file_name", "text")):
    """A data file of `rows` (tuples in `columns`' order) in `folder`, as a spreadsheet or a script writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if name.endswith(".csv"):
        quoted = [",".join(json.dumps(cell) if "," in cell else cell for cell in row) for row in rows]  # a caption with commas in double quotes
        path.write_text("\n".join([",".join(columns), *quoted]) + "\n")
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(dict(zip(columns, row))) + "\n" for row in rows))
    else:
        import datasets

        datasets.Dataset.from_dict({column: [row[i] for row in rows] for i, column in enumerate(columns)}).to_parquet(str(path))
    return path


def colour_images(folder, colours):
    folder.mkdir(parents=True, exist_ok=True)
    for colour in colours:
        Image.new("RGB", (64, 64), colour).save(folder / f"{colour}.png")


def test_a_csv_of_paths_relative_to_it_trains_a_step_from_any_folder(make_recipe, tmp_path, monkeypatch):
    from finetune.training.trainer import train

    colour_images(tmp_path / "data" / "photos", ("red", "blue"))
    table = write_table(tmp_path / "data", [("photos/red.png", "a red, plain square"), ("photos/blue.png", "a blue square")])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the paths are the table's, not the current folder's
    # It said "holds Value('large_string'), not decoded images: cast it with dataset.cast_column(...)" (and "no column 'image'" for file_name).
    examples = load_examples(DataConfig(dataset=str(table), resolution=64))
    assert [(e.caption, e.load().convert("RGB").getpixel((0, 0))) for e in examples] == [("a red, plain square", (255, 0, 0)), ("a blue square", (0, 0, 255))]
    result = train(make_recipe(data__image_dir=None, data__dataset=str(table), train__max_steps=1, train__batch_size=2))
    assert result.final_step == 1 and len(result.losses) == 1 and result.saved_files[0].is_file()


def test_excels_csv_of_semicolons_is_read_as_a_folders_metadata_csv_is(tmp_path):
    colour_images(tmp_path / "photos", ("red", "blue"))
    # Excel's "CSV UTF-8" where a comma is the decimal mark: a byte-order mark, semicolons, CRLF line ends.
    (tmp_path / "images.csv").write_bytes("\ufefffile_name;text\r\nphotos/red.png;a red, plain square\r\nphotos/blue.png;a blue square\r\n".encode())
    # It was "has no column 'image' ...; its columns are: 'file_name;text', '__index_level_0__'" (with a comma in the first caption,
    # "cannot be read (ParserError: Error tokenizing data ...): fix or replace it").
    examples = load_examples(DataConfig(dataset=str(tmp_path / "images.csv"), resolution=64))
    assert [(e.caption, e.load().convert("RGB").getpixel((0, 0))) for e in examples] == [("a red, plain square", (255, 0, 0)), ("a blue square", (0, 0, 255))]


def test_paths_written_on_windows_read_their_backslashes_as_folders(tmp_path):
    colour_images(tmp_path / "photos", ("red",))
    # It was "names image files that are not there (row 0: photos\red.png, ...)": a spreadsheet made on Windows, trained on Linux.
    table = write_table(tmp_path, [("photos\\red.png", "a red square")])
    [example] = load_examples(DataConfig(dataset=str(table), resolution=64))
    assert example.load().convert("RGB").getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("kind", ["images.jsonl", "images.parquet"])
def test_a_jsonl_or_parquet_of_image_caption_paths_reads_its_files_and_an_absolute_path_as_it_is(kind, tmp_path):
    colour_images(tmp_path / "photos", ("red", "green"))
    rows = [("photos/red.png", "a red square"), (str(tmp_path / "photos" / "green.png"), "a green square")]
    table = write_table(tmp_path / "tables", [("../" + rows[0][0], rows[0][1]), rows[1]], kind, columns=("image", "caption"))
    examples = load_examples(DataConfig(dataset=str(table), caption_column="caption", resolution=64))
    assert [e.load().convert("RGB").getpixel((0, 0)) for e in examples] == [(255, 0, 0), (0, 128, 0)]


@pytest.mark.parametrize("kind", ["images.csv", "images.jsonl", "images.parquet"])
def test_a_caption_column_given_as_the_image_column_is_one_line_before_any_file_is_opened(kind, tmp_path, monkeypatch):
    import datasets

    colour_images(tmp_path / "photos", ("red", "blue"))
    table = write_table(tmp_path, [("photos/red.png", "a red square"), ("photos/blue.png", "a blue square")], kind, columns=("image", "caption"))
    monkeypatch.setattr(datasets.Image, "decode_example", lambda *args, **kwargs: pytest.fail("an image was decoded"))
    with pytest.raises(FinetuneError, match=rf"^dataset {table} column 'caption' \(data.image_column\) holds text, not image file names \(row 0: 'a red square'\): "
                                            r"set data.image_column to the column of image paths \(.png, .*files, read from the data file's folder\)$"):  # fmt: skip
        load_examples(DataConfig(dataset=str(table), image_column="caption", caption_column="image", resolution=64), check=False)
    with pytest.raises(FinetuneError, match=r"holds text, not image file names \(row 1: 'a blue square'\)"):  # named by its row in the split, not in the slice
        load_examples(DataConfig(dataset=str(table), dataset_split="train[1:]", image_column="caption", caption_column="image", resolution=64), check=False)
    # The default columns, image and text: the caption column's hint offers the captions, not the paths.
    with pytest.raises(FinetuneError, match=r"has no column 'text' \(data.caption_column\); its columns are: 'image', 'caption': set data.caption_column=caption, or"):
        load_examples(DataConfig(dataset=str(table), resolution=64), check=False)


def test_a_missing_or_bad_file_is_named_by_its_row_and_path_and_the_rest_train(tmp_path):
    from finetune.data.sources import read_examples
    from finetune.data_check.check import FATAL, inspect_examples

    colour_images(tmp_path / "photos", ("red", "blue"))
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "tiny.png")
    (tmp_path / "photos" / "empty.png").write_bytes(b"")
    (tmp_path / "photos" / "bad.jpg").write_bytes(b"no jpeg" * 20)
    Image.new("RGB", (64, 64)).save(tmp_path / "photos" / "still.gif")  # a folder's .gif is not read, nor trained
    rows = [("photos/red.png", "red"), ("photos/gone.png", "gone"), ("photos/tiny.png", "tiny"), ("photos/empty.png", "empty"),
            ("photos/bad.jpg", "bad"), ("photos/blue.png", ""), ("photos/still.gif", "gif")]  # fmt: skip
    table = write_table(tmp_path, rows)
    config = DataConfig(dataset=str(table), resolution=64)
    report = inspect_examples(read_examples(config), config, f"dataset {table}")
    row = f"image dataset {table} row"
    assert [f.message.split(":")[0] for f in report.of_level(FATAL)] == [
        f"{row} 1 is the file photos/gone.png, which is not there (looked for at {tmp_path / 'photos' / 'gone.png'}, from the data file's folder)",
        f"{row} 2 is 8x8, smaller than 32 px on its short side (half of data.resolution 64)",
        f"{row} 3 (photos/empty.png) is empty (0 bytes",
        f"{row} 4 (photos/bad.jpg) cannot be read (UnidentifiedImageError",
        f"dataset {table} row 5 has no caption (a null cell)",
        f"{row} 6 is the file photos/still.gif, of a kind training does not read (.gif)",
    ]
    assert report.of_level(FATAL)[0].message.endswith(f": put it there, or fix its path in {table}")
    assert [example.source for example in report.usable] == [f"dataset {table} row 0"]
    with pytest.raises(FinetuneError, match=rf"^{row} 1 is the file photos/gone.png, which is not there .*skip_bad_images: true to skip bad images \(5 more problems"):
        load_examples(config)


def test_paths_none_of_whose_first_files_is_there_or_web_addresses_are_one_line_naming_where_they_are_read_from(tmp_path):
    colour_images(tmp_path / "photos", ("red", "blue"))
    table = write_table(tmp_path / "tables", [("photos/red.png", "red"), ("photos/blue.png", "blue")])  # written from tmp_path
    with pytest.raises(FinetuneError, match=rf"column 'file_name' \(data.image_column\) names image files that are not there \(row 0: photos/red.png, looked for at "
                                            rf"{tmp_path / 'tables' / 'photos' / 'red.png'}; nor is the next one\): its paths are read from the data file's folder"):  # fmt: skip
        load_examples(DataConfig(dataset=str(table), resolution=64), check=False)
    table = write_table(tmp_path, [("https://example.com/red.png", "red")], "web.csv")  # datasets would download each at every read
    with pytest.raises(FinetuneError, match=r"column 'file_name' \(data.image_column\) holds web addresses \(row 0: https://example.com/red.png\), not image files: download"):
        load_examples(DataConfig(dataset=str(table), resolution=64), check=False)


@pytest.mark.parametrize("name, bad_row", [("table.csv", "blue.png,a blue, thing,extra\n"), ("table.jsonl", '{"file_name": "blue.png", "text": "b"\n')])
def test_a_table_with_a_bad_row_is_our_one_line_alone(name, bad_row, tmp_path, capfd):
    """datasets logged its own parser error ('Failed to read file ... ParserError', at ERROR) twice, by its handler and the
    root logger's, above the line finetune says of it (which names the file and what to do)."""
    from finetune.cli.main import main

    colour_images(tmp_path, ("red", "blue"))
    table = write_table(tmp_path, [("red.png", "a red thing")], name=name)
    table.write_text(table.read_text() + bad_row)
    assert main(["check-data", "recipes/quickstart.yaml", "data.image_dir=null", f"data.dataset={table}"]) == 2
    out, err = capfd.readouterr()
    assert err.startswith(f"error: dataset file {table} cannot be read (") and err.endswith("): fix or replace it\n") and err.count("\n") == 1, err
    assert "Failed to" not in out + err
