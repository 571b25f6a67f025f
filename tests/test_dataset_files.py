"""`datasets` datasets as users have them, as a walkthrough found them: one data file (parquet, arrow,
jsonl) given as data.dataset. Each is read as meant, or is one line naming the dataset and what to do."""

import pytest
from PIL import Image

from finetune.config import DataConfig
from data_examples import load_examples
from finetune.data.dataset_images import row_image
from finetune.errors import FinetuneError


def two_images():
    import datasets

    return datasets.Dataset.from_dict({"image": [Image.new("RGB", (64, 64), c) for c in ("red", "blue")], "text": ["a red thing", "a blue thing"]})


def test_one_data_file_is_a_dataset_of_its_rows(tmp_path):
    two_images().to_parquet(str(tmp_path / "train.parquet"))
    two_images().save_to_disk(tmp_path / "saved")
    for path in (tmp_path / "train.parquet", next((tmp_path / "saved").glob("*.arrow"))):  # it was "not found", though there
        examples = load_examples(DataConfig(dataset=str(path), resolution=64))
        assert [example.caption for example in examples] == ["a red thing", "a blue thing"]
        assert examples[1].load().convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(FinetuneError, match=r"train.parquet has no split 'test' \(has train\): set data.dataset_split$"):
        load_examples(DataConfig(dataset=str(tmp_path / "train.parquet"), dataset_split="test", resolution=64))


def test_a_local_dataset_datasets_cannot_read_is_one_line_with_the_fix_for_its_kind(tmp_path, monkeypatch):
    two_images().save_to_disk(tmp_path / "saved")
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])  # a copy cut short: it was a traceback
    with pytest.raises(FinetuneError, match=r"saved \(a save_to_disk folder\) cannot be read \(\w+: .*\): save it again"):
        load_examples(DataConfig(dataset=str(tmp_path / "saved"), resolution=64))
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "train.parquet").write_bytes(b"not parquet" * 100)  # no metadata file to fix, as it said
    with pytest.raises(FinetuneError, match=r"folder .*pq cannot be read \(ArrowInvalid: .*\): fix or replace its damaged data file$"):
        load_examples(DataConfig(dataset=str(tmp_path / "pq"), resolution=64))
    (tmp_path / "recipe.yaml").write_text("method: lora\n")  # it was "not found", though there
    with pytest.raises(FinetuneError, match=r"recipe.yaml is a file of no kind datasets reads as data: give a .parquet, "):
        load_examples(DataConfig(dataset=str(tmp_path / "recipe.yaml"), resolution=64))
    (tmp_path / "script").mkdir()
    (tmp_path / "script" / "script.py").write_text("import datasets\n")
    with pytest.raises(FinetuneError, match=r"script cannot be read \(RuntimeError: .*\): the installed datasets runs no loading scripts"):
        load_examples(DataConfig(dataset=str(tmp_path / "script"), resolution=64))
    monkeypatch.chdir(tmp_path / "pq")  # load_dataset("parquet") read the current folder's files: a traceback
    with pytest.raises(FinetuneError, match=r"^data.dataset 'parquet' is a kind of data file, not a dataset: give the path"):
        load_examples(DataConfig(dataset="parquet", resolution=64))


def test_a_dataset_config_there_is_none_of_is_one_line_not_ignored(tmp_path):
    two_images().save_to_disk(tmp_path / "saved")  # it trained the dataset without a word
    with pytest.raises(FinetuneError, match=r"saved is a save_to_disk folder, which has no configs \(no 'mine' to pick\): remove data.dataset_config$"):
        load_examples(DataConfig(dataset=str(tmp_path / "saved"), dataset_config="mine", resolution=64))
    (tmp_path / "folder").mkdir()
    two_images().to_parquet(str(tmp_path / "folder" / "train.parquet"))  # it said fix or replace the data file
    with pytest.raises(FinetuneError, match=r"folder has no config 'mine' \(BuilderConfig 'mine' not found.*\): set data.dataset_config$"):
        load_examples(DataConfig(dataset=str(tmp_path / "folder"), dataset_config="mine", resolution=64))


def test_copies_in_a_dataset_or_a_dreambooth_concept_are_not_told_to_use_data_folders(tmp_path):
    import datasets

    from finetune.data.sources import read_examples
    from finetune.data_check.check import WARNING, inspect_examples

    red = Image.new("RGB", (64, 64), "red")
    datasets.Dataset.from_dict({"image": [red, red], "text": ["a", "b"]}).save_to_disk(tmp_path / "copies")
    config = DataConfig(dataset=str(tmp_path / "copies"), resolution=64)  # data.folders does not apply to a dataset
    [warning] = [f.message for f in inspect_examples(read_examples(config), config, "copies").of_level(WARNING)]
    assert warning.endswith(f"row 0 has the same pixels as dataset {tmp_path / 'copies'} row 1: each copy trains as its own image (remove the copies' rows)")
    for name in ("a.png", "b.png"):
        red.save(tmp_path / name)
    config = DataConfig(image_dir=str(tmp_path), caption="sks", resolution=64)
    config._image_dir_key = "dreambooth.concepts.0.instance_dir"  # as check_data.data_configs names a concept's folder
    [warning] = [f.message for f in inspect_examples(read_examples(config), config, "concept").of_level(WARNING)]
    assert warning.endswith("each copy trains as its own image (remove copies, or raise dreambooth.concepts.0.repeats)")


def test_an_image_stored_as_a_web_address_that_cannot_be_downloaded_says_so(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from finetune.data.sources import read_examples
    from finetune.data_check.check import FATAL, inspect_examples

    # As a dataset made with cast_column(datasets.Image()) over URLs keeps them: each read downloads the image.
    cells = pa.array([{"bytes": None, "path": "http://127.0.0.1:9/a.png"}], type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    features = {"info": {"features": {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}}}
    (tmp_path / "web").mkdir()
    pq.write_table(pa.table({"image": cells, "text": ["a"]}).replace_schema_metadata({"huggingface": json.dumps(features)}), tmp_path / "web" / "train.parquet")
    config = DataConfig(dataset=str(tmp_path / "web"), resolution=64)
    [fatal] = [f.message for f in inspect_examples(read_examples(config), config, "web").of_level(FATAL)]
    assert fatal.startswith(f"image dataset {tmp_path / 'web'} row 0 is the web address http://127.0.0.1:9/a.png, which cannot be read (")
    assert fatal.endswith("datasets downloads it at every read; store the images in the dataset where they can be downloaded, or check the connection")


def test_a_datasets_captions_are_read_as_one_column_not_row_by_row(tmp_path, monkeypatch):
    import datasets

    from finetune.data.sources import read_examples

    rows = 50
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * rows, "text": [f"caption {i}" for i in range(rows)]}).save_to_disk(tmp_path / "ds")
    reads = []
    getitem = datasets.Dataset.__getitem__
    monkeypatch.setattr(datasets.Dataset, "__getitem__", lambda self, key: reads.append(key) or getitem(self, key))
    examples = read_examples(DataConfig(dataset=str(tmp_path / "ds")))
    assert [example.caption for example in examples] == [f"caption {i}" for i in range(rows)]
    # datasets 4+ gives a lazy Column: a caption read a row at a time took 1 ms each (a minute for 50,000 rows, at every start)
    assert len(reads) < 5, reads[:10]


def test_a_folder_of_sd_scripts_image_folders_given_as_a_dataset_says_how_to_train_it(tmp_path):
    from finetune.data.sources import read_examples

    (tmp_path / "kohya" / "10_sks dog").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "kohya" / "10_sks dog" / "1.png")
    (tmp_path / "kohya" / "10_sks dog" / "1.txt").write_text("sks dog")
    # It said the dataset had no column 'image', only 'text': datasets read the captions as a text dataset.
    with pytest.raises(FinetuneError, match=r"kohya is a folder of image folders with .txt captions, .*: train it as data.image_dir=.*kohya "
                                            r"\(with data.dataset=null\), with folders: \[\{path: \"10_sks dog\", repeats: 10\}\] in the recipe's data section$"):  # fmt: skip
        read_examples(DataConfig(dataset=str(tmp_path / "kohya")))
    (tmp_path / "kohya" / "10_sks dog").rename(tmp_path / "kohya" / "2024_sks dog")  # a year, not repeats: the rename is said
    with pytest.raises(FinetuneError, match=r"repeats: 2024\}\] in the recipe's data section; '2024_sks dog' reads as 2024 repeats .*give it repeats 1 there \(and for sd-scripts rename the folder '1_2024_sks dog'\)$"):
        read_examples(DataConfig(dataset=str(tmp_path / "kohya")))


@pytest.mark.parametrize("metadata,word", [("metadata.jsonl", "key"), ("metadata.csv", "column")])
def test_a_folder_datasets_conditioning_file_names_say_the_metadata_key_that_reads_them(tmp_path, metadata, word):
    import json

    from finetune.data.dataset_images import require_image_column
    from finetune.data.dataset_source import open_dataset

    (tmp_path / "data" / "conditioning").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "data" / "1.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "data" / "conditioning" / "1.png")

    def write(key: str) -> None:
        row = {"file_name": "1.png", key: "conditioning/1.png", "text": "a red square"}
        text = json.dumps(row) + "\n" if metadata == "metadata.jsonl" else ",".join(row) + "\n" + ",".join(row.values()) + "\n"
        (tmp_path / "data" / metadata).write_text(text)

    write("conditioning_image")
    config = DataConfig(dataset=str(tmp_path / "data"))
    # It said to cast the column in Python and save it again: in a folder, the key's name is the fix (for a metadata.csv too,
    # whose text datasets reads as a large_string, which the check did not take for file names).
    with pytest.raises(FinetuneError, match=rf"not decoded images: name its {word} 'conditioning_image_file_name' in .*{metadata} \(datasets reads {word}s ending"):
        require_image_column(open_dataset(config), config.dataset, "conditioning_image", "controlnet.conditioning_column")
    write("conditioning_image_file_name")  # as it says
    loaded = open_dataset(config)
    require_image_column(loaded, config.dataset, "conditioning_image", "controlnet.conditioning_column")
    assert loaded[0]["conditioning_image"].getpixel((0, 0)) == 255


def test_a_mistyped_local_dataset_path_is_said_to_be_no_folder_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # offline (tests/conftest.py): "my_data/trian" is looked up on the hub as well
    # It said only that the hub could not be reached: "use a local path", which it was.
    with pytest.raises(FinetuneError, match=r"^dataset my_data/trian is no folder or file here \(.*my_data/trian not found\), and as a hub dataset"):
        load_examples(DataConfig(dataset="my_data/trian", resolution=64))


def test_a_webdataset_shard_is_a_dataset_of_its_samples(tmp_path):
    import tarfile

    Image.new("RGB", (64, 64), "red").save(tmp_path / "0001.png")
    (tmp_path / "0001.txt").write_text("a red thing")
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:  # it was "a file of no kind datasets reads as data"
        for name in ("0001.png", "0001.txt"):
            tar.add(tmp_path / name, arcname=name)
    [example] = load_examples(DataConfig(dataset=str(tmp_path / "shard-000.tar"), image_column="png", caption_column="txt", resolution=64))
    assert example.caption == "a red thing" and example.load().convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_a_datasets_dataset_given_as_an_image_folder_says_to_give_it_as_data_dataset(tmp_path):
    from finetune.data.sources import read_examples

    two_images().save_to_disk(tmp_path / "saved")
    (tmp_path / "repo" / "data").mkdir(parents=True)  # a hub dataset's repository, cloned
    two_images().to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    # Each said the folder "has no images: add some or fix data.image_dir".
    for folder, kind in (("saved", "a save_to_disk folder"), ("repo", "data files")):
        with pytest.raises(FinetuneError, match=rf"folder .*{folder} holds a datasets dataset \({kind}\), not image files: train it as "
                                                rf"data.dataset=.*{folder} \(with data.image_dir=null\)$"):  # fmt: skip
            read_examples(DataConfig(image_dir=str(tmp_path / folder)))
    config = DataConfig(image_dir=str(tmp_path / "saved"), caption="sks")
    config._image_dir_key = "dreambooth.concepts.0.instance_dir"  # a DreamBooth concept reads no datasets
    with pytest.raises(FinetuneError, match=r"not image files: DreamBooth reads image files: write its images to a folder and give that as dreambooth.concepts.0.instance_dir$"):
        read_examples(config)


def test_a_training_image_of_float_values_0_to_1_is_a_fatal_problem_not_a_black_image(tmp_path):
    import datasets
    import numpy as np

    from finetune.data.sources import read_examples
    from finetune.data_check.check import FATAL, inspect_examples

    # datasets stores a float array as a 32-bit float TIFF: read as levels 0-255 it trained all but black.
    depth = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [depth, depth * 255], "text": ["a", "b"]}, features=features).save_to_disk(tmp_path / "floats")
    config = DataConfig(dataset=str(tmp_path / "floats"), resolution=64)
    report = inspect_examples(read_examples(config), config, "floats")
    assert [f.message for f in report.of_level(FATAL)] == [
        f"image dataset {tmp_path / 'floats'} row 0 holds 32-bit float values of 0-1, which train as levels 0-255 (all but black): "
        "save it as an 8- or 16-bit PNG (values scaled to 0-255 or 0-65535)"
    ]
    assert [example.source for example in report.usable] == [f"dataset {tmp_path / 'floats'} row 1"]  # levels 0-255 train as they are


def test_class_labels_as_captions_say_how_to_prompt_each_class(tmp_path):
    for name, colour in (("cat", "red"), ("dog", "blue")):
        (tmp_path / "classes" / name).mkdir(parents=True)
        Image.new("RGB", (64, 64), colour).save(tmp_path / "classes" / name / "1.png")
    # datasets reads class folders as a ClassLabel column: it said "holds int, not text: give each row one caption (e.g. the first ...)".
    with pytest.raises(FinetuneError, match=r"caption column 'label' holds class numbers \(cat, dog\), not text: train the folder as data.image_dir=.*classes "
                                            r"\(with data.dataset=null\) with a data.folders entry per class folder and its prompt"):  # fmt: skip
        load_examples(DataConfig(dataset=str(tmp_path / "classes"), caption_column="label", resolution=64))


def test_a_saved_dataset_of_image_paths_says_to_save_it_with_save_to_disk_which_stores_the_images(tmp_path, monkeypatch):
    import datasets

    Image.new("RGB", (64, 64), "red").save(tmp_path / "1.png")
    datasets.Dataset.from_dict({"image": ["1.png"], "text": ["a red square"]}).save_to_disk(tmp_path / "paths")
    # A data file of paths is read as images (tests/test_image_path_tables.py); a dataset saved with them is told how to store its images.
    with pytest.raises(FinetuneError, match=r"holds Value\('string'\), not decoded images: cast it with dataset.cast_column\('image', datasets.Image\(\)\), "
                                            r"save it with save_to_disk \(which stores the images in it\) and train that folder, or set data.image_column$"):  # fmt: skip
        load_examples(DataConfig(dataset=str(tmp_path / "paths"), resolution=64))
    monkeypatch.chdir(tmp_path)  # as it says (a relative path is read from the current folder)
    datasets.load_from_disk(str(tmp_path / "paths")).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "saved")
    (tmp_path / "1.png").unlink()  # stored in the dataset: the file is no longer needed
    [example] = load_examples(DataConfig(dataset=str(tmp_path / "saved"), resolution=64))
    assert example.caption == "a red square" and example.load().getpixel((0, 0)) == (255, 0, 0)


def test_an_empty_data_path_is_refused_with_its_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # dataset "" read the current folder as a dataset ("dataset folder  cannot be read (IndexError ...)"); image_dir "" was a traceback.
    for key in ("image_dir", "dataset"):
        with pytest.raises(ValueError, match=rf"{key}\n  Value error, is empty: give a folder \(data.image_dir\) or a datasets name or path"):
            DataConfig(**{key: ""})
    from finetune.config.methods import Concept

    with pytest.raises(ValueError, match=r"instance_dir\n  Value error, is empty: give the folder of this concept's images"):  # it was a traceback
        Concept(instance_dir="", instance_prompt="a photo of sks dog")


def test_a_save_to_disk_folder_takes_split_slices_as_a_data_file_does(tmp_path):
    import datasets

    ten = datasets.Dataset.from_dict({"image": [Image.new("RGB", (64, 64), (25 * i, 0, 0)) for i in range(10)], "text": [f"c{i}" for i in range(10)]})
    ten.save_to_disk(tmp_path / "one")
    datasets.DatasetDict({"train": ten, "test": ten.select([9])}).save_to_disk(tmp_path / "dict")
    # A slice read a parquet file's rows but was "no split 'train[:3]'" of the same rows saved with save_to_disk.
    for name, split, captions in (("one", "train[:30%]", ["c0", "c1", "c2"]), ("dict", "train[8:]+test", ["c8", "c9", "c9"]), ("dict", "test", ["c9"])):
        assert [e.caption for e in load_examples(DataConfig(dataset=str(tmp_path / name), dataset_split=split, resolution=64), check=False)] == captions
    with pytest.raises(FinetuneError, match=r"one is a single split saved with save_to_disk \(no split 'test\[:5\]' to pick\): remove data.dataset_split, or give a slice"):
        load_examples(DataConfig(dataset=str(tmp_path / "one"), dataset_split="test[:5]", resolution=64))
    with pytest.raises(FinetuneError, match=r"dict has no split 'valid\[:5\]' \(has train, test\): set data.dataset_split$"):
        load_examples(DataConfig(dataset=str(tmp_path / "dict"), dataset_split="valid[:5]", resolution=64))
    ten.to_parquet(str(tmp_path / "ten.parquet"))  # a malformed slice was "cannot be read ...: fix or replace it"
    for name in ("one", "ten.parquet"):
        with pytest.raises(FinetuneError, match=r"data.dataset_split 'train\[:x\]' is no split or slice \(.*\): give a split's name, or a slice"):
            load_examples(DataConfig(dataset=str(tmp_path / name), dataset_split="train[:x]", resolution=64))


def test_a_saved_split_of_no_rows_is_said_to_have_none_not_to_be_damaged(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    empty = datasets.Dataset.from_dict({"image": [], "text": []}, features=features)
    empty.save_to_disk(tmp_path / "empty")  # it said "cannot be read (IndexError ...): save it again (a copy cut short?)"
    with pytest.raises(FinetuneError, match=r"empty split 'train' has no rows: add rows to it, or give another split \(data.dataset_split\) or dataset"):
        load_examples(DataConfig(dataset=str(tmp_path / "empty"), resolution=64))
    # An empty split beside the one trained made the whole folder unreadable; a damaged one is not read either.
    datasets.DatasetDict({"train": two_images(), "test": empty, "cut": two_images()}).save_to_disk(tmp_path / "dict")
    next((tmp_path / "dict" / "cut").glob("*.arrow")).write_bytes(b"cut short")
    assert len(load_examples(DataConfig(dataset=str(tmp_path / "dict"), resolution=64), check=False)) == 2
    with pytest.raises(FinetuneError, match=r"dict split 'train\[5:\]' has no rows: the slice selects none of them; widen data.dataset_split$"):
        load_examples(DataConfig(dataset=str(tmp_path / "dict"), dataset_split="train[5:]", resolution=64))


def test_a_data_file_of_no_rows_or_a_slice_of_none_says_so_not_to_replace_the_file(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [], "text": []}, features=features).to_parquet(str(tmp_path / "empty.parquet"))
    (tmp_path / "header.csv").write_text("image,text\n")
    two_images().to_parquet(str(tmp_path / "two.parquet"))
    # Each was "dataset file ... cannot be read (ValueError: Instruction "train" corresponds to no data!): fix or replace it".
    for name in ("empty.parquet", "header.csv"):
        with pytest.raises(FinetuneError, match=rf"{name} split 'train' has no rows: add rows to it, or give another split \(data.dataset_split\) or dataset"):
            load_examples(DataConfig(dataset=str(tmp_path / name), resolution=64))
    with pytest.raises(FinetuneError, match=r"two.parquet split 'train\[2:\]' has no rows: the slice selects none of them; widen data.dataset_split$"):
        load_examples(DataConfig(dataset=str(tmp_path / "two.parquet"), dataset_split="train[2:]", resolution=64))


def test_a_caption_column_of_images_is_one_line_naming_the_text_columns_before_decoding_them(tmp_path, monkeypatch):
    import datasets

    images = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    datasets.Dataset.from_dict({"image": images, "hint": images, "prompt": ["a", "b"]}).save_to_disk(tmp_path / "ds")
    # Every image of the column was decoded to say "row 0 ... holds PngImageFile, not text: give each row one caption".
    monkeypatch.setattr(datasets.Image, "decode_example", lambda *args, **kwargs: pytest.fail("an image was decoded"))
    with pytest.raises(FinetuneError, match=r"ds caption column 'hint' \(data.caption_column\) holds images, not text: set data.caption_column to the captions' column \('prompt'\)$"):
        load_examples(DataConfig(dataset=str(tmp_path / "ds"), caption_column="hint", resolution=64))


def test_an_image_stored_as_a_path_relative_to_its_data_file_is_read_from_any_folder(tmp_path, monkeypatch):
    import datasets
    import pyarrow.parquet as pq

    (tmp_path / "data" / "img").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "data" / "img" / "0.png")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    cells = [{"path": "img/0.png", "bytes": None}, {"path": "img/gone.png", "bytes": None}]
    # An Image column of paths alone, as pyarrow writes one: datasets opens them from the current folder.
    pq.write_table(datasets.Dataset.from_dict({"image": cells, "text": ["a", "b"]}, features=features).data.table, tmp_path / "data" / "train.parquet")
    monkeypatch.chdir(tmp_path)  # it was "cannot be read (FileNotFoundError: ... 'img/0.png')" from any folder but data/
    examples = load_examples(DataConfig(dataset=str(tmp_path / "data" / "train.parquet"), resolution=64, skip_bad_images=True), check=False)
    assert examples[0].load().convert("RGB").getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(FinetuneError, match=rf"row 1 is the file img/gone.png, which is not there \(looked for from the current folder and from the dataset's, "
                                            rf"{tmp_path / 'data'}\): put it there, or fix its path in the dataset$"):  # fmt: skip
        examples[1].load()

    # From the hub (owner/name), no folder of the dataset's is there to name: "owner" was named as one, and read from.
    (tmp_path / "owner" / "img").mkdir(parents=True)
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "owner" / "img" / "gone.png")
    paths = datasets.Dataset.from_dict({"image": cells}, features=datasets.Features({"image": datasets.Image()}))
    with pytest.raises(FinetuneError, match=rf"row 1 is the file img/gone.png, which is not there \(looked for from the current folder, {tmp_path}; the hub "
                                            r"dataset owner/name has no folder here to read it from\): put it there, or fix its path in the dataset$"):  # fmt: skip
        row_image(paths, 1, "image", "row 1", "owner/name")


def test_a_row_of_a_slice_or_another_split_is_named_by_its_place_in_its_split(tmp_path):
    import datasets

    from finetune.data.sources import read_examples, source_folder

    ten = datasets.Dataset.from_dict({"image": [Image.new("RGB", (64, 64))] * 10, "text": [f"c{i}" for i in range(9)] + [None]})
    ten.to_parquet(str(tmp_path / "ten.parquet"))
    datasets.DatasetDict({"train": ten, "test": ten}).save_to_disk(tmp_path / "dict")
    # The rows of train[8:] were "row 0" and "row 1": a user looked for the missing caption at row 1, not 9.
    with pytest.raises(FinetuneError, match=r"ten.parquet row 9 has no caption \(a null cell\)"):
        load_examples(DataConfig(dataset=str(tmp_path / "ten.parquet"), dataset_split="train[8:]", resolution=64), check=False)
    examples = read_examples(DataConfig(dataset=str(tmp_path / "dict"), dataset_split="train[1:2]+test[8:]", resolution=64))
    assert [example.source for example in examples] == [f"dataset {tmp_path / 'dict'} row 1"] + [f"dataset {tmp_path / 'dict'} row {row} of split 'test'" for row in (8, 9)]
    assert {source_folder(example) for example in examples} == {tmp_path / "dict"}  # still a row of that dataset


def test_a_column_of_several_images_per_row_is_not_told_to_be_cast_to_one(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"image": [[Image.new("RGB", (64, 64))] * 2], "text": ["x"]}).save_to_disk(tmp_path / "ds")
    # It said "cast it with dataset.cast_column('image', datasets.Image())", which fails on a list.
    with pytest.raises(FinetuneError, match=r"holds List\(Image\(.*\)\), not decoded images: give each row one image \(e.g. the first, with dataset.map"):
        load_examples(DataConfig(dataset=str(tmp_path / "ds"), resolution=64))


def test_a_folder_of_several_configs_without_data_dataset_config_says_to_pick_one(tmp_path):
    two_images().to_parquet(str(tmp_path / "a.parquet"))
    configs = "".join(f"- config_name: {name}\n  data_files:\n  - split: train\n    path: a.parquet\n" for name in ("photos", "sketches"))
    (tmp_path / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")  # a hub repository's layout, downloaded
    # It said "cannot be read (ValueError: Config name is missing.): fix or replace its damaged data file".
    with pytest.raises(FinetuneError, match=r"has several configs \('photos', 'sketches'\): pick one with data.dataset_config$"):
        load_examples(DataConfig(dataset=str(tmp_path), resolution=64))
    assert len(load_examples(DataConfig(dataset=str(tmp_path), dataset_config="sketches", resolution=64), check=False)) == 2


def test_a_dataset_cell_of_bytes_that_are_no_image_is_named_by_its_row_not_by_a_python_object(tmp_path):
    import io

    import datasets

    from finetune.data.sources import read_examples
    from finetune.data_check.check import FATAL, inspect_examples

    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, "PNG")
    rows = {"image": [{"bytes": png.getvalue(), "path": None}, {"bytes": b"not an image", "path": None}], "text": ["a", "b"]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "saved")
    config = DataConfig(dataset=str(tmp_path / "saved"), resolution=64)
    [fatal] = [f.message for f in inspect_examples(read_examples(config), config, "saved").of_level(FATAL)]
    # It read "cannot identify image file <_io.BytesIO object at 0x7f552cde3d30>".
    assert fatal == f"image dataset {tmp_path / 'saved'} row 1 cannot be read (UnidentifiedImageError: cannot identify image file): fix or remove it"
