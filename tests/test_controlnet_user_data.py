"""ControlNet data laid out as creators lay it out by hand: conditioning images beside their images,
named by metadata.jsonl rows; validation conditioning images of their own."""

import json
import re

import numpy as np
import pytest
from controlnet_helpers import controlnet_recipe
from PIL import Image

from finetune.controlnet.conditions import make_condition_folders
from finetune.controlnet.pairs import inspect_pairs
from finetune.errors import FinetuneError
from finetune.methods.controlnet import ControlNetMethod


def write_pairs_beside(folder, count=3):
    """`0.png` with its edges in `0_edges.png` in the same folder, as many tutorials lay pairs out."""
    folder.mkdir()
    rows = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (64, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        Image.fromarray(pixels[..., 0]).save(folder / f"{i}_edges.png")
        rows.append({"file_name": f"{i}.png", "conditioning_file_name": f"{i}_edges.png", "text": f"photo {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_conditioning_images_beside_their_images_are_not_trained_as_images(make_recipe, tmp_path):
    folder = write_pairs_beside(tmp_path / "pairs")
    pairs, report = inspect_pairs(controlnet_recipe(make_recipe, folder))
    assert [(p.image.source, p.conditioning.source) for p in pairs] == [(str(folder / f"{i}.png"), str(folder / f"{i}_edges.png")) for i in range(3)]
    assert report.findings == []  # not "image 0_edges.png has no conditioning image"
    assert report.found == 3


def test_a_validation_conditioning_image_too_small_to_steer_stops_before_the_model_loads(make_recipe, pairs_folder, tmp_path):
    """As `finetune sample --condition` refuses one under half the sampled size: validation samples at data.resolution (64)."""
    small = tmp_path / "small.png"
    Image.open(pairs_folder / "conditioning" / "0000.png").resize((20, 20)).save(small)
    recipe = controlnet_recipe(make_recipe, pairs_folder, controlnet__validation_conditions=[str(small)], validation__prompts=["x"])
    with pytest.raises(FinetuneError, match=r"^controlnet.validation_conditions: conditioning image \S+small.png is 20x20, smaller than 32 px"):
        ControlNetMethod(recipe).check_data()
    Image.open(pairs_folder / "conditioning" / "0000.png").resize((32, 32)).save(small)  # half the size: as sample takes it
    ControlNetMethod(recipe).check_data()


def test_conditioning_file_names_differing_in_letter_case_find_their_files(make_recipe, tmp_path):
    """A metadata.jsonl written on macOS or Windows, whose file systems ignore case, read on Linux: found as
    captions and masks are, beside the images or in a subfolder."""
    folder = write_pairs_beside(tmp_path / "pairs")
    (folder / "conditioning").mkdir()
    (folder / "1_edges.png").rename(folder / "conditioning" / "1_Edges.PNG")
    (folder / "2_edges.png").rename(folder / "2_EDGES.png")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[1]["conditioning_file_name"] = "conditioning/1_edges.png"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs, report = inspect_pairs(controlnet_recipe(make_recipe, folder))
    assert report.findings == []
    assert [p.conditioning.source for p in pairs] == [str(folder / name) for name in ("0_edges.png", "conditioning/1_Edges.PNG", "2_EDGES.png")]


def test_a_float_depth_map_in_millimetres_is_one_line_not_clipped_white(make_recipe, tmp_path):
    """Read as levels 0-255, a float map of 0-1000 trained three quarters white; one of 0-200 is levels and trains."""
    folder = write_pairs_beside(tmp_path / "pairs", count=2)
    (folder / "depth").mkdir()
    for i, top in enumerate((1000.0, 200.0)):
        (folder / f"{i}_edges.png").unlink()
        Image.fromarray(np.linspace(0, top, 96 * 64, dtype=np.float32).reshape(64, 96), "F").save(folder / "depth" / f"{i}.tif")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "conditioning_file_name": f"depth/{i}.tif", "text": "x"}) + "\n" for i in range(2)))
    pairs, report = inspect_pairs(controlnet_recipe(make_recipe, folder))
    assert [p.conditioning.source for p in pairs] == [str(folder / "depth" / "1.tif")]
    assert [f.message for f in report.findings] == [
        f"conditioning image {folder / 'depth' / '0.tif'} holds 32-bit float values of 0 to 1000, which train as levels 0-255 "
        "(clipped to black or white outside them): save it as an 8- or 16-bit PNG (values scaled to 0-255 or 0-65535)"
    ]


def test_16_bit_depth_tiffs_beside_their_images_are_not_said_to_be_unread(make_recipe, tmp_path):
    """A depth estimator's 16-bit TIFFs named as conditioning images are read; a TIFF no row names is still said."""
    folder = write_pairs_beside(tmp_path / "pairs", count=2)
    rows = []
    for i in range(2):
        (folder / f"{i}_edges.png").unlink()
        Image.fromarray(np.full((64, 96), 1000 * (i + 1), dtype=np.uint16)).save(folder / f"{i}_depth.tif")
        rows.append({"file_name": f"{i}.png", "conditioning_file_name": f"{i}_depth.tif", "text": "x"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = controlnet_recipe(make_recipe, folder)
    pairs, report = inspect_pairs(recipe)
    assert len(pairs) == 2 and [f.message for f in report.findings] == []
    Image.fromarray(np.zeros((64, 96), dtype=np.uint16)).save(folder / "stray.tif")
    assert [f.message for f in inspect_pairs(recipe)[1].findings] == [
        f"data folder {folder} has 1 image training does not read (.tif, e.g. stray.tif): convert it to PNG or JPEG"
    ]


def test_make_conditions_does_not_take_conditioning_images_beside_their_images_for_photos(tmp_path):
    """Hand-made edges beside the photos, made again as canny: each photo gets one, and the old edges no row of their own
    (they trained as uncaptioned images)."""
    folder = write_pairs_beside(tmp_path / "pairs")
    make_condition_folders(folder, tmp_path / "canny", "canny")
    rows = [json.loads(line) for line in (tmp_path / "canny" / "metadata.jsonl").read_text().splitlines()]
    assert [(row["file_name"], row["conditioning_file_name"], row["text"]) for row in rows] == [
        (f"{i}.png", f"conditioning/{i}.png", f"photo {i}") for i in range(3)
    ]
    assert sorted(path.name for path in (tmp_path / "canny").glob("*.png")) == ["0.png", "1.png", "2.png"]


def test_conditioning_images_beside_their_images_named_in_another_letter_case_are_partners(make_recipe, tmp_path):
    """A row's `0_Edges.PNG` is `0_edges.png`, as training reads it (and a `1_Depth.TIF` is `1_depth.tif`): make-conditions
    took 0_edges.png for a photo of its own, and check-data said 1_depth.tif was an image training does not read."""
    folder = write_pairs_beside(tmp_path / "pairs", count=2)
    (folder / "1_edges.png").unlink()
    Image.fromarray(np.full((64, 96), 1000, dtype=np.uint16)).save(folder / "1_depth.tif")
    rows = [{"file_name": "0.png", "conditioning_file_name": "0_Edges.PNG", "text": "photo 0"},
            {"file_name": "1.png", "conditioning_file_name": "1_Depth.TIF", "text": "photo 1"}]  # fmt: skip
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs, report = inspect_pairs(controlnet_recipe(make_recipe, folder))
    assert len(pairs) == 2 and [f.message for f in report.findings] == []
    make_condition_folders(folder, tmp_path / "canny", "canny")
    written = [json.loads(line) for line in (tmp_path / "canny" / "metadata.jsonl").read_text().splitlines()]
    assert [row["file_name"] for row in written] == ["0.png", "1.png"]


def test_a_metadata_csv_names_conditioning_images_as_a_metadata_jsonl_does(make_recipe, tmp_path):
    """Hugging Face's imagefolder reads either file, and captions come from either: the spreadsheet a creator keeps pairs in."""
    folder = write_pairs_beside(tmp_path / "pairs")
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("file_name,conditioning_file_name,text\n" + "".join(f"{i}.png,{i}_edges.png,\"photo {i}, edges\"\n" for i in range(3)))
    pairs, report = inspect_pairs(controlnet_recipe(make_recipe, folder))
    assert report.findings == []
    assert [(p.image.caption, p.conditioning.source) for p in pairs] == [(f"photo {i}, edges", str(folder / f"{i}_edges.png")) for i in range(3)]
    (folder / "metadata.csv").write_text("file_name,text\n0.png,photo\n")
    with pytest.raises(FinetuneError, match=r"metadata.csv names no conditioning images: its columns are 'file_name', 'text'; add conditioning_file_name"):
        inspect_pairs(controlnet_recipe(make_recipe, folder))


def test_make_conditions_in_place_refuses_to_orphan_conditioning_images_beside_the_images(tmp_path):
    folder = write_pairs_beside(tmp_path / "pairs")
    before = (folder / "metadata.jsonl").read_text()
    with pytest.raises(FinetuneError, match=r"names conditioning images beside the images \(0_edges.png\), which rewriting it in place"):
        make_condition_folders(folder, folder, "canny")
    assert (folder / "metadata.jsonl").read_text() == before and not (folder / "conditioning").exists()


def test_make_conditions_makes_one_for_an_image_another_row_also_names(tmp_path):
    """A before/after set: `after.png`'s row names `before.png`, which has a row of its own: both are photos."""
    folder = write_pairs_beside(tmp_path / "pairs", count=2)
    rows = [{"file_name": "0.png", "original": "1.png", "text": "after"}, {"file_name": "1.png", "text": "before"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for i in range(2):
        (folder / f"{i}_edges.png").unlink()
    make_condition_folders(folder, tmp_path / "canny", "canny")
    written = [json.loads(line) for line in (tmp_path / "canny" / "metadata.jsonl").read_text().splitlines()]
    assert [(row["file_name"], row["conditioning_file_name"]) for row in written] == [("0.png", "conditioning/0.png"), ("1.png", "conditioning/1.png")]


def test_a_make_conditions_folder_trains_as_a_dataset_without_naming_its_conditioning_column(make_recipe, tmp_path):
    """datasets reads the folder's conditioning_file_name key as an image column named `conditioning`: read as the
    folder's conditioning images (recipes/controlnet.yaml names conditioning_image); its conditioning.json is recorded."""
    folder = write_pairs_beside(tmp_path / "pairs", count=2)
    for i in range(2):
        (folder / f"{i}_edges.png").unlink()
        (folder / f"{i}.txt").write_text(f"photo {i}")
    (folder / "metadata.jsonl").unlink()
    make_condition_folders(folder, tmp_path / "canny", "canny")
    recipe = make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(tmp_path / "canny"), controlnet__conditioning_column="conditioning_image")
    pairs, report = inspect_pairs(recipe)
    assert report.findings == []
    assert [p.conditioning.source for p in pairs] == [f"dataset {tmp_path / 'canny'} row {i} column 'conditioning'" for i in range(2)]
    assert [np.asarray(p.conditioning.load()).tolist() for p in pairs] == [np.asarray(Image.open(tmp_path / "canny" / "conditioning" / f"{i}.png")).tolist() for i in range(2)]
    assert json.loads(ControlNetMethod(recipe).data_metadata()["finetune.conditioning"])["kind"] == "canny"
    # Another column named, and missing: the one line says which column holds them.
    with pytest.raises(FinetuneError, match=r"has no conditioning column 'hint' \(controlnet.conditioning_column\); its columns are: 'image', 'conditioning', 'text': "
                                            r"set controlnet.conditioning_column=conditioning$"):
        inspect_pairs(make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(tmp_path / "canny"), controlnet__conditioning_column="hint"))


def as_metadata_csv(folder):
    """The folder's metadata.jsonl written as the metadata.csv a spreadsheet keeps (Hugging Face's imagefolder reads either)."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("file_name,conditioning_file_name,text\n" + "".join(f"{r['file_name']},{r['conditioning_file_name']},{r['text']}\n" for r in rows))


def test_conditioning_images_a_metadata_csv_names_beside_their_images_are_read_as_a_metadata_jsonls_are(make_recipe, tmp_path):
    """The data check's unread-.tif warning and make-conditions read a metadata.csv's rows too: a depth TIFF it names was
    'an image training does not read', and make-conditions made hand-made edges it names into photos of their own."""
    depth = write_pairs_beside(tmp_path / "depth", count=2)
    rows = [{"file_name": f"{i}.png", "conditioning_file_name": f"{i}_depth.tif", "text": f"photo {i}"} for i in range(2)]
    for i in range(2):
        (depth / f"{i}_edges.png").unlink()
        Image.fromarray(np.full((64, 96), 1000 * (i + 1), dtype=np.uint16)).save(depth / f"{i}_depth.tif")
    (depth / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    as_metadata_csv(depth)
    pairs, report = inspect_pairs(controlnet_recipe(make_recipe, depth))
    assert len(pairs) == 2 and [f.message for f in report.findings] == []
    Image.new("RGB", (96, 64)).save(depth / "2.png")  # no row: the line names the file to add it to
    assert [f.message for f in inspect_pairs(controlnet_recipe(make_recipe, depth))[1].findings] == [
        f"image {depth / '2.png'} has no conditioning image: give it a conditioning_file_name in {depth / 'metadata.csv'} (finetune make-conditions writes one)"
    ]

    edges = write_pairs_beside(tmp_path / "edges", count=2)
    as_metadata_csv(edges)
    make_condition_folders(edges, tmp_path / "canny", "canny")
    written = [json.loads(line) for line in (tmp_path / "canny" / "metadata.jsonl").read_text().splitlines()]
    assert [(row["file_name"], row["conditioning_file_name"], row["text"]) for row in written] == [(f"{i}.png", f"conditioning/{i}.png", f"photo {i}") for i in range(2)]
    with pytest.raises(FinetuneError, match=r"metadata.csv names conditioning images beside the images \(0_edges.png\), which rewriting it in place"):
        make_condition_folders(edges, edges, "canny")


def test_a_conditioning_column_that_is_the_image_column_is_refused(make_recipe, tmp_path):
    import datasets

    images = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    datasets.Dataset.from_dict({"image": images, "hint": images[::-1], "text": ["a", "b"]}).save_to_disk(tmp_path / "ds")
    # It trained each image as its own conditioning image, without a word.
    with pytest.raises(FinetuneError, match=r"ds: controlnet.conditioning_column 'image' is data.image_column too, so each image would be its own "
                                            r"conditioning image: set it to the conditioning images' column \('hint'\)$"):  # fmt: skip
        inspect_pairs(make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(tmp_path / "ds"), controlnet__conditioning_column="image"))
    # With no other image column there is none to name: it said to set one, '(the dataset has no other image column)'.
    datasets.Dataset.from_dict({"image": images, "text": ["a", "b"]}).save_to_disk(tmp_path / "alone")
    with pytest.raises(FinetuneError, match=r"alone: .* its own conditioning image: the dataset has no other image column: add the conditioning "
                                            r"images to it as a column of their own, and set it to that$"):  # fmt: skip
        inspect_pairs(make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(tmp_path / "alone"), controlnet__conditioning_column="image"))


def test_a_conditioning_image_of_its_images_shape_at_another_scale_trains_the_same_view(make_recipe, tmp_path):
    import datasets

    from finetune.controlnet.data import ControlNetDataset

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    edges = Image.fromarray(np.kron(np.random.default_rng(1).integers(0, 2, (12, 16), dtype=np.uint8) * 255, np.ones((8, 8), np.uint8))).convert("RGB")
    # A dataset's depth maps at half its photos' size (diffusers' script resizes each): it was "they must be the same size".
    half, quarter = edges.resize((64, 48), Image.NEAREST), edges.resize((32, 24), Image.NEAREST)
    datasets.Dataset.from_dict({"image": [image] * 3, "conditioning_image": [edges, half, quarter], "text": ["a"] * 3}).save_to_disk(tmp_path / "ds")
    recipe = make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(tmp_path / "ds"), data__crop="center", data__random_flip=False)
    pairs, report = inspect_pairs(recipe)
    assert [f.message for f in report.findings if f.level == "fatal"] == [  # too small to steer at data.resolution 64, as a training image would be
        f"conditioning image dataset {tmp_path / 'ds'} row 2 column 'conditioning_image' is 32x24, smaller than 32 px on its short side "
        "(half of data.resolution 64): remove it, upscale it to 32 px or more, lower data.min_image_size, or train at a lower data.resolution"]
    items = ControlNetDataset(pairs, recipe.data, seed=0, empty_prompt_share=0.0)
    full, scaled = (items[(index, 0)]["conditioning_pixel_values"] for index in range(2))
    assert (full - scaled).abs().mean() < 0.05  # the same view of the edges, at either scale


def test_a_metadata_file_lacking_several_pair_columns_names_them_all_in_one_line(make_recipe, tmp_path):
    """ControlNet's fill50k names its columns source, target and prompt: each reader said the one it reads (file_name
    and text, then, fixed and rerun, the conditioning column), so a user learnt of them one rerun at a time."""
    folder = write_pairs_beside(tmp_path / "pairs", count=2)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("target,source,prompt\n" + "".join(f"{r['file_name']},{r['conditioning_file_name']},{r['text']}\n" for r in rows))
    with pytest.raises(FinetuneError, match=f"^{re.escape(str(folder / 'metadata.csv'))} lacks the columns 'file_name' \\(the image\\), 'conditioning_file_name' "
                                            r"\(its conditioning image, or the column controlnet.conditioning_column names\), 'text' \(its caption, or the "
                                            r"column data.caption_column names\): its columns are 'target', 'source', 'prompt'; rename 'target' to 'file_name', "
                                            r"'source' to 'conditioning_file_name', 'prompt' to 'text' \(ControlNet's fill50k names\)$"):  # fmt: skip
        inspect_pairs(controlnet_recipe(make_recipe, folder))
    (folder / "metadata.csv").unlink()  # a metadata.jsonl with the image named, not its conditioning image nor caption
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": r["file_name"], "hint": r["conditioning_file_name"], "caption": "c"}) + "\n" for r in rows))
    with pytest.raises(FinetuneError, match=r"metadata.jsonl lacks the columns 'conditioning_file_name' \(.*\), 'text' \(.*\): its columns are 'file_name', "
                                            r"'hint', 'caption'; rename its columns to those, or name the ones that hold them in controlnet.conditioning_column and data.caption_column$"):  # fmt: skip
        inspect_pairs(controlnet_recipe(make_recipe, folder))
    # With one prompt for every image, no caption column is needed: the one missing is said by its reader, as before.
    with pytest.raises(FinetuneError, match=r"metadata.jsonl names no conditioning images: its rows have 'caption', 'file_name', 'hint'"):
        inspect_pairs(controlnet_recipe(make_recipe, folder, data__caption="a photo"))
    pairs, report = inspect_pairs(controlnet_recipe(make_recipe, folder, data__caption_column="caption", controlnet__conditioning_column="hint"))
    assert len(pairs) == 2 and report.findings == []


def test_a_metadata_jsonl_of_no_json_rows_is_said_by_its_line_not_as_lacking_every_column(make_recipe, tmp_path):
    """The columns check (2af644b) reads the rows leniently, leaving out lines that are no JSON object: a metadata.jsonl
    pretty-printed as one JSON array, or of rows in single quotes, read as a file of no columns ('lacks the columns ...: its
    columns are none; rename its columns'), where the reader had said the line and to write one JSON object a line."""
    folder = write_pairs_beside(tmp_path / "pairs", count=2)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for text in (json.dumps(rows, indent=2), "".join(f"{row}\n" for row in rows)):
        (folder / "metadata.jsonl").write_text(text)
        with pytest.raises(FinetuneError, match=f"^{re.escape(str(folder / 'metadata.jsonl'))} line 1: expected a JSON object .*: write each row as one JSON object on one line"):
            inspect_pairs(controlnet_recipe(make_recipe, folder))


def test_conditioning_images_renamed_or_moved_are_said_with_the_row_and_the_file_that_may_be_theirs(make_recipe, tmp_path):
    """A conditioning image not found was 'fix its conditioning_file_name in metadata.jsonl': not which line, nor that the
    file renamed after the metadata was written (0_edges.png to 0_edges_canny.png) was there, nor that a whole folder was gone."""
    folder = write_pairs_beside(tmp_path / "pairs", count=2)
    (folder / "0_edges.png").rename(folder / "0_edges_canny.png")
    (folder / "1_edges.png").unlink()
    pairs, report = inspect_pairs(controlnet_recipe(make_recipe, folder))
    assert [f.message for f in report.findings] == [
        f"conditioning image {folder / '0_edges.png'} of image {folder / '0.png'} not found ({folder / 'metadata.jsonl'} line 1 names it); "
        f"{folder} has 0_edges_canny.png: if that is this image's, write conditioning_file_name '0_edges_canny.png' there",
        f"conditioning image {folder / '1_edges.png'} of image {folder / '1.png'} not found ({folder / 'metadata.jsonl'} line 2 names it): "
        "fix its conditioning_file_name there, or put the conditioning image at that path"]  # fmt: skip
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({**row, "conditioning_file_name": "edges/" + row["conditioning_file_name"]}) + "\n" for row in rows))
    pairs, report = inspect_pairs(controlnet_recipe(make_recipe, folder))  # 0_edges_canny.png is named like no partner beside the images now
    assert any(f.message.startswith(f"image {folder / '0_edges_canny.png'} has no conditioning image") for f in report.findings)
    assert report.findings[2].message == (f"conditioning image {folder / 'edges' / '1_edges.png'} of image {folder / '1.png'} not found ({folder / 'metadata.jsonl'} "
                                          f"line 2 names it), nor is its folder {folder / 'edges'}: put the conditioning images there, or write the folder they are "
                                          "in into conditioning_file_name")  # fmt: skip
