"""make-conditions' lines about its input: a folder not there (or a photo given for its folder) says what to give, and
images left out two or more folders down are said whatever their kind."""

import os

import numpy as np
from PIL import Image

from finetune.cli.main import main


def noise(path, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def test_an_input_that_is_no_folder_says_what_to_give(tmp_path, monkeypatch, capsys):
    """It was "input folder X not found", which said neither where a relative path was looked for nor what to give."""
    monkeypatch.chdir(tmp_path)
    noise(tmp_path / "photos" / "0.png")
    out = tmp_path / "out"
    for given in ("nowhere", str(tmp_path / "photos" / "0.png")):
        assert main(["make-conditions", given, str(out), "--kind", "luminance"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: input folder nowhere not found: give the folder of photos to make conditioning images from (relative paths are read from the "
        f"current folder, {os.getcwd()})",
        f"error: input folder {tmp_path / 'photos' / '0.png'} is a file: give the folder of photos that holds it ({tmp_path / 'photos'})",
    ]  # fmt: skip
    assert not out.exists()


def test_a_folder_two_down_of_only_unread_kinds_is_said(tmp_path, capsys):
    """A folder two levels down holding only .gif files was said by no line: the line of folders too deep looked for
    images make-conditions reads, the line of unread kinds only one level down."""
    source = tmp_path / "photos"
    noise(source / "0.png")
    noise(source / "2023" / "jan" / "a.gif"), noise(source / "2023" / "jan" / "b.gif")
    assert main(["make-conditions", str(source), str(tmp_path / "out"), "--kind", "luminance"]) == 0
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert warned == [f"warning: images in subfolders of subfolders of {source} (2023/jan) got no conditioning images (make-conditions reads "
                      f"the folder and the subfolders just below it): run make-conditions on {source / '2023'} too, or move them up; of them, "
                      "training does not read 2 images (.gif, e.g. a.gif): convert them to PNG or JPEG first"]  # fmt: skip


def test_an_unreadable_image_after_others_says_the_run_again_needs_overwrite(tmp_path, capsys):
    """A truncated photo stopped make-conditions with the images before it already given conditioning images; run again once
    it was removed, make-conditions refused as if a finished run's were there ("already holds 2 conditioning images")."""
    source, out = tmp_path / "photos", tmp_path / "data"
    for name in ("a.png", "b.png", "c.jpg"):
        noise(source / name, size=32)
    (source / "c.jpg").write_bytes((source / "c.jpg").read_bytes()[:200])  # cut short: its header reads, its pixels do not
    assert main(["make-conditions", str(source), str(out), "--kind", "luminance"]) == 2
    err = capsys.readouterr().err
    assert f"image {source / 'c.jpg'} cannot be read" in err
    assert err.strip().endswith("make-conditions stopped there, the images before it given their conditioning images: "
                                "run it again with --overwrite once that image is fixed or removed")
    assert sorted(os.listdir(out / "conditioning")) == ["a.png", "b.png"]
    (source / "c.jpg").unlink()
    assert main(["make-conditions", str(source), str(out), "--kind", "luminance", "--overwrite"]) == 0  # as the line says


def test_an_unreadable_first_image_is_said_alone(tmp_path, capsys):
    """With nothing written before it, a run again needs no --overwrite, and the line says none."""
    source, out = tmp_path / "photos", tmp_path / "data"
    noise(source / "a.jpg", size=32)
    noise(source / "b.png", size=32)
    (source / "a.jpg").write_bytes((source / "a.jpg").read_bytes()[:200])
    assert main(["make-conditions", str(source), str(out), "--kind", "luminance"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"image {source / 'a.jpg'} cannot be read" in err and err.endswith("): fix or remove it")
    (source / "a.jpg").unlink()
    assert main(["make-conditions", str(source), str(out), "--kind", "luminance"]) == 0


def test_an_unreadable_first_image_of_a_later_subfolder_says_it_too(tmp_path, capsys):
    """sd-scripts' N_name subfolders are written one after the other: the folders before it have their conditioning images."""
    source, out = tmp_path / "photos", tmp_path / "data"
    noise(source / "1_a" / "a.png", size=32)
    noise(source / "2_b" / "b.jpg", size=32)
    (source / "2_b" / "b.jpg").write_bytes((source / "2_b" / "b.jpg").read_bytes()[:200])
    assert main(["make-conditions", str(source), str(out), "--kind", "luminance"]) == 2
    assert capsys.readouterr().err.strip().endswith("run it again with --overwrite once that image is fixed or removed")
    assert os.listdir(out / "1_a" / "conditioning") == ["a.png"]
