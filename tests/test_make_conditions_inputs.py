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
