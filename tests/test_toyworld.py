"""Toy world: generator correctness, the shipped evaluator's accuracy, metric sanity.

Fast (well under a minute on CPU): uses the shipped classifier, never retrains.
"""

import errno
import io
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.toyworld import metrics
from finetune.toyworld.classifier import DEFAULT_PATH, load_classifier, predict
from finetune.toyworld.datasets import generate, write_folder
from finetune.toyworld.world import (
    ATTRIBUTES,
    HELD_OUT_SHAPES,
    HELD_OUT_STYLES,
    RGB,
    WORLD_WORDS,
    Scene,
    caption,
    draw,
    parse_caption,
    sample_scenes,
)

# Seeds used to train / validate the shipped classifier are 0 and 1_000_003.
FRESH_SEED = 4242


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def samples():
    """400 fresh samples of every attribute (held-out ones included)."""
    return generate(400, FRESH_SEED, include_held_out="all")


# ------------------------------------------------------------------------ generator


def test_same_seed_same_bytes_different_seed_different():
    a = [_png(s[0]) for s in generate(12, 7, "all")]
    b = [_png(s[0]) for s in generate(12, 7, "all")]
    c = [_png(s[0]) for s in generate(12, 8, "all")]
    assert a == b
    assert a != c


def test_samples_are_prefix_stable():
    assert sample_scenes(5, 11) == sample_scenes(50, 11)[:5]


def test_captions_match_pixels(samples):
    areas = {"small": [], "large": []}
    for image, text, scene, mask in samples:
        assert text == caption(scene)
        pixels = np.asarray(image)
        assert image.size == (64, 64) and image.mode == "RGB"
        assert 0 < mask.sum() < 64 * 64 / 4
        # the mask's centroid lies in the captioned position
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean(), ys.mean()
        if scene.position == "center":
            assert abs(cx - 32) < 6 and abs(cy - 32) < 6
        else:
            vertical, horizontal = scene.position.split()
            assert (cy < 32) == (vertical == "top"), (text, cy)
            assert (cx < 32) == (horizontal == "left"), (text, cx)
        # the dominant colour inside the mask is the named colour
        colours, counts = np.unique(pixels[mask], axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == RGB[scene.colour], text
        # everything outside the mask is the named background
        assert (pixels[~mask] == RGB[scene.background]).all(), text
        # striped shapes have a second colour inside the mask, solid ones do not
        assert (len(colours) == 2) == (scene.style == "striped"), text
        areas[scene.size].append(mask.sum())
    assert min(areas["large"]) > max(areas["small"])


def test_scenes_never_put_a_shape_on_its_own_colour():
    assert all(s.colour != s.background for s in sample_scenes(2000, 1, "all"))
    with pytest.raises(ValueError):
        Scene("circle", "blue", "blue", "small", "center")
    with pytest.raises(ValueError):
        Scene("hexagon", "red", "blue", "small", "center")


def test_held_out_modes():
    base = sample_scenes(2000, 2, "no")
    assert not any(s.shape in HELD_OUT_SHAPES or s.style in HELD_OUT_STYLES for s in base)
    assert {s.shape for s in base} == set(ATTRIBUTES["shape"]) - set(HELD_OUT_SHAPES)
    only_shape = sample_scenes(200, 2, "only_shape")
    assert all(s.shape == "star" and s.style == "solid" for s in only_shape)
    only_style = sample_scenes(200, 2, "only_style")
    assert all(s.style == "striped" and s.shape != "star" for s in only_style)
    every = sample_scenes(2000, 2, "all")
    for name, vocab in ATTRIBUTES.items():
        assert {getattr(s, name) for s in every} == set(vocab), name
    with pytest.raises(ValueError):
        sample_scenes(1, 0, "maybe")


def test_parse_caption_round_trips_and_tolerates_prompts():
    for scene in sample_scenes(500, 3, "all"):
        expected = asdict(scene)
        if scene.style == "solid":
            expected["style"] = None  # canonical captions do not say "solid"
        assert parse_caption(caption(scene)) == expected, caption(scene)
        assert set(caption(scene).replace(",", "").split()) <= set(WORLD_WORDS)
    assert list(WORLD_WORDS) == sorted(WORLD_WORDS)
    p = parse_caption("a photo of sks star")
    assert p["shape"] == "star" and p["colour"] is None and p["background"] is None
    p = parse_caption("a sks star on a blue background")
    assert p["shape"] == "star" and p["background"] == "blue" and p["colour"] is None
    p = parse_caption("A large Red striped cross on a grey background, in the centre")
    assert p == {
        "shape": "cross", "colour": "red", "background": "gray",
        "size": "large", "position": "center", "style": "striped",
    }  # fmt: skip
    # Plurals: "crosses" (an -es plural) read as no shape, so prompt adherence never checked it.
    assert [parse_caption(f"two red {word}")["shape"] for word in ("crosses", "stars", "circles")] == ["cross", "star", "circle"]
    assert parse_caption("crossed stripes")["shape"] is None and parse_caption("crosse")["shape"] is None
    p = parse_caption("a star on a red background")  # red is no background colour
    assert p["background"] == "red" and p["colour"] is None
    assert parse_caption("nothing here") == dict.fromkeys(ATTRIBUTES)


def test_write_folder(tmp_path):
    out = write_folder(tmp_path / "ds", 5, seed=9, include_held_out="only_style", conditioning=True)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [f"{i:04d}.png" for i in range(5)]
    for row, (image, text, _, mask) in zip(rows, generate(5, 9, "only_style")):
        assert row["text"] == text == (out / row["file_name"]).with_suffix(".txt").read_text().strip()
        assert _png(Image.open(out / row["file_name"])) == _png(image)
        cond = np.asarray(Image.open(out / row["conditioning_file_name"]).convert("L")) > 127
        assert np.array_equal(cond, mask)


def test_partial_captions_name_a_subset_of_the_scene_and_leave_images_alone(tmp_path):
    full = write_folder(tmp_path / "full", 200, seed=4)
    partial = write_folder(tmp_path / "partial", 200, seed=4, partial_captions=0.3)
    rows = [json.loads(line) for line in (partial / "metadata.jsonl").read_text().splitlines()]
    changed, named_or_not = 0, {name: set() for name in ("shape", "colour", "size", "background", "position")}
    for row, (_, _, scene, _) in zip(rows, generate(200, 4)):
        assert (partial / row["file_name"]).read_bytes() == (full / row["file_name"]).read_bytes()
        if row["text"] == caption(scene):
            continue
        changed += 1
        named = parse_caption(row["text"])
        # Whatever a partial caption names is true of the image; "shape" names no shape.
        assert all(value is None or value == getattr(scene, name) for name, value in named.items()), row
        assert named["shape"] is not None or " shape" in row["text"]
        for name in named_or_not:
            named_or_not[name].add(named[name] is not None)
    assert all(seen == {True, False} for seen in named_or_not.values()), named_or_not  # each one sometimes left out
    assert 40 <= changed <= 80  # about 30% of 200 (a partial caption can come out complete by chance)
    assert write_folder(tmp_path / "again", 200, seed=4, partial_captions=0.3).joinpath("metadata.jsonl").read_text() == (
        partial / "metadata.jsonl"
    ).read_text()


def test_other_sizes_render():
    image, mask = draw(Scene("star", "red", "blue", "large", "top left"), size=128, rng=0)
    assert image.size == (128, 128) and mask.shape == (128, 128) and mask[:64, :64].any()


# ----------------------------------------------------------------------- classifier


def test_shipped_classifier_is_small_and_accurate(samples):
    assert DEFAULT_PATH.exists() and DEFAULT_PATH.stat().st_size < 2_000_000
    model = load_classifier()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    preds = predict([s[0] for s in samples], model)
    for name in ATTRIBUTES:
        acc = np.mean([p[name] == getattr(s[2], name) for p, s in zip(preds, samples)])
        assert acc >= 0.98, (name, acc)


def test_the_classifier_s_size_is_the_one_its_docstring_and_docs_give():
    # The docstring said ~0.26 M parameters, docs/toyworld.md 0.27 M (267,229): the model has 267,229.
    from finetune.toyworld.classifier import ToyWorldClassifier

    count = sum(p.numel() for p in ToyWorldClassifier().parameters())
    assert f"~{count / 1e6:.2f} M parameters" in ToyWorldClassifier.__doc__
    docs = (Path(__file__).resolve().parent.parent / "docs" / "toyworld.md").read_text()
    assert f"A {count / 1e6:.2f} M-parameter CNN ({count:,} weights)" in docs


# -------------------------------------------------------------------------- metrics


def test_control_iou_own_masks_vs_chance(samples):
    images, masks = [s[0] for s in samples], [s[3] for s in samples]
    own = metrics.control_iou(images, masks)
    chance = metrics.chance_iou(images, masks)
    assert own > 0.9
    assert chance < 0.3 and own - chance > 0.6
    # PIL mask images and other sizes are accepted
    mask_images = [Image.fromarray(m.astype(np.uint8) * 255).resize((128, 128)) for m in masks[:20]]
    assert metrics.control_iou(images[:20], mask_images) > 0.85


def test_frechet_distance_real_vs_real_much_smaller_than_real_vs_noise(samples):
    real_a = [s[0] for s in samples[:200]]
    real_b = [s[0] for s in generate(200, FRESH_SEED + 1, "all")]
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(200)]
    real_real = metrics.frechet_distance(real_a, real_b)
    real_noise = metrics.frechet_distance(real_a, noise)
    assert 0 <= real_real * 5 < real_noise, (real_real, real_noise)


def test_prompt_adherence_subject_fidelity_and_prior_drift(samples):
    images, prompts = [s[0] for s in samples], [s[1] for s in samples]
    scores = metrics.prompt_adherence(images, prompts)
    assert scores["all"] > 0.95 and scores["n"] == len(images)
    assert set(scores) == set(ATTRIBUTES) | {"all", "n"}
    # captions with the wrong colour do not adhere
    wrong = [p.replace(" red ", " green ") if " red " in p else p.replace(" ", " red ", 1) for p in prompts]
    assert metrics.prompt_adherence(images, wrong)["colour"] < 0.2

    stars = [s[0] for s in generate(60, 5, "only_shape")]
    others = [s[0] for s in generate(60, 5, "no")]
    assert metrics.subject_fidelity(stars, "star") > 0.95
    assert metrics.prior_drift(others, "star") < 0.05
    assert metrics.attribute_share([s[0] for s in generate(60, 5, "only_style")], "style", "striped") > 0.95


def test_make_world_data_takes_every_held_out_mode_and_refuses_what_it_cannot_write(tmp_path, capsys):
    """docs/toyworld.md lists four --include-held-out modes (the CLI took two); a folder already holding images got
    a metadata.jsonl of the new ones while the others stayed and trained too; -3 images were 'written'."""
    from finetune.cli.main import main

    assert main(["make-world-data", str(tmp_path / "style"), "--num-images", "3", "--include-held-out", "only_style"]) == 0
    captions = [caption.read_text() for caption in sorted((tmp_path / "style").glob("*.txt"))]
    assert len(captions) == 3 and all("striped" in caption for caption in captions), captions  # none written would pass all() alone
    (tmp_path / "a-file").write_text("")
    for arguments, message in (
        ([str(tmp_path / "style"), "--num-images", "2"], r"style is not empty: give a new or empty folder"),
        ([str(tmp_path / "new"), "--num-images", "-3"], r"--num-images must be at least 1, got -3$"),
        ([str(tmp_path / "new"), "--partial-captions", "1.5"], r"--partial-captions is a share of the images, from 0 to 1; got 1.5$"),
        ([str(tmp_path / "a-file")], r"a-file is a file: give a new or empty folder"),
    ):
        assert main(["make-world-data", *arguments]) == 2
        assert re.search(message, capsys.readouterr().err.strip()), arguments
    assert len(list((tmp_path / "style").glob("*.png"))) == 3 and not (tmp_path / "new").exists()


def test_make_sample_data_rewrites_the_shipped_sets_but_never_a_users_files(tmp_path, capsys):
    """It wrote over datasets/star in place: a user's own 0000.png and caption were replaced, and their other
    images stayed beside a metadata.jsonl that no longer listed them."""
    from finetune.cli.main import main

    shipped = Path(__file__).resolve().parent.parent / "datasets"
    copy = tmp_path / "copy"
    shutil.copytree(shipped, copy)
    (copy / "star" / "0003.png").unlink()  # part of the shipped set: nothing of the user's to lose
    (copy / "star" / ".DS_Store").write_bytes(b"Bud1")  # macOS's Finder showed the folder: refused as a file of the user's
    assert main(["make-sample-data", str(copy)]) == 0
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*"))
    assert all(p.read_bytes() == (shipped / p.relative_to(copy)).read_bytes() for p in copy.rglob("*") if p.is_file())

    own = tmp_path / "own"
    (own / "star").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(own / "star" / "0000.png")
    (own / "star" / "0000.txt").write_text("my own red square\n")
    mine = {p.name: p.read_bytes() for p in (own / "star").iterdir()}
    assert main(["make-sample-data", str(own)]) == 2
    assert re.search(r"star/0000\.png is not the sample's own: .* move your files out, or give another folder$", capsys.readouterr().err.strip())
    assert sorted(p.name for p in own.iterdir()) == ["star"]  # nothing written, no partial folder left
    assert {p.name: p.read_bytes() for p in (own / "star").iterdir()} == mine
    for inside_a_file in (own / "star" / "0000.txt", own / "star" / "0000.txt" / "datasets"):  # was a NotADirectoryError traceback
        assert main(["make-sample-data", str(inside_a_file)]) == 2
        assert capsys.readouterr().err.strip().endswith(f"{inside_a_file} is a file or inside one: give a folder to write star/ and striped/ in")


def test_make_sample_data_fills_an_empty_set_folder_in_place(tmp_path, monkeypatch):
    """An empty star/ was renamed aside and replaced: a shell working in it was left in a deleted folder (and a mount
    point cannot be renamed). It is filled in place, as atomic_files.folder_written_whole does, and emptied again on a stop."""
    from finetune.toyworld.sample_data import make_sample_data

    def empty_star(root: Path) -> tuple[Path, int]:
        (root / "star").mkdir(parents=True)
        return root / "star", (root / "star").stat().st_ino

    star, inode = empty_star(tmp_path / "filled")
    make_sample_data(tmp_path / "filled")
    assert star.stat().st_ino == inode and len(list(star.glob("*.png"))) == 6 and (star / "masks").is_dir()

    star, inode = empty_star(tmp_path / "stopped")
    import finetune.toyworld.sample_data as sample_data

    def stopped_at_the_check(folder, sample):  # both sets written, neither in place yet
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_data, "_refuse_unlike_files", stopped_at_the_check)
    with pytest.raises(KeyboardInterrupt):
        make_sample_data(tmp_path / "stopped")
    assert star.stat().st_ino == inode and not any(star.iterdir())  # emptied again
    assert [p.name for p in star.parent.iterdir()] == ["star"]  # no partial folder left, nor striped/


def test_make_sample_data_rewrites_a_set_folder_in_place(tmp_path, monkeypatch):
    """A set folder with the sample's files was replaced by one renamed into its place (losing its inode, permissions, and a
    shell working in it), and an empty one got its files renamed in from a folder beside it, which fails where it is a mount
    point (another file system). Its contents are swapped in place, as make-tiny-model's and merge's are."""
    from finetune.toyworld.sample_data import make_sample_data

    make_sample_data(tmp_path / "again")
    star = tmp_path / "again" / "star"
    star.chmod(0o750)
    inode = star.stat().st_ino
    make_sample_data(tmp_path / "again")
    assert star.stat().st_ino == inode and star.stat().st_mode & 0o777 == 0o750 and len(list(star.glob("*.png"))) == 6
    assert sorted(p.name for p in star.parent.iterdir()) == ["star", "striped"]

    mounted = tmp_path / "mounted" / "star"
    mounted.mkdir(parents=True)
    real_rename = Path.rename

    def rename_within_file_systems(self, target):  # the mount point's file system is mounted/star alone
        if (mounted in Path(target).absolute().parents) != (mounted in Path(self).absolute().parents):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_within_file_systems)
    make_sample_data(tmp_path / "mounted")
    assert len(list(mounted.glob("*.png"))) == 6 and (mounted / "masks").is_dir()
