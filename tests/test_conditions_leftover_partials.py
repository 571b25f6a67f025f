"""A hidden `.NAME.partial` that a killed make-conditions (SIGKILL: no cleanup) left was written over by the next
run only where that run wrote NAME again; the partial of an image no longer in the input folder stayed for good.
The next run removes make-conditions' own partial files, and no other file."""

import os

import numpy as np
from PIL import Image

from finetune.cli.main import main


def photos(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / name)


def test_make_conditions_removes_a_killed_runs_partial_files_and_only_those(tmp_path):
    source, out = tmp_path / "photos", tmp_path / "data"
    photos(source, ["a.png"])
    (out / "conditioning").mkdir(parents=True)
    ours = [out / "conditioning" / ".gone.png.partial", out / ".gone.JPG.partial", out / ".metadata.jsonl.partial", out / ".conditioning.json.partial"]
    users = [out / "conditioning" / ".notes.partial", out / "gone.png.partial", out / ".mine.txt.partial", out / ".partial"]
    for path in ours + users:
        path.write_bytes(b"left")
    assert main(["make-conditions", str(source), str(out), "--kind", "luminance"]) == 0
    assert [path for path in ours if path.exists()] == []
    assert all(path.read_bytes() == b"left" for path in users)
    assert sorted(os.listdir(out / "conditioning")) == [".notes.partial", "a.png"]


def test_in_the_input_folder_itself_only_the_conditioning_partials_go(tmp_path):
    """There an image's `.NAME.partial` is no copy of this command's (it copies no image onto itself)."""
    folder = tmp_path / "photos"
    photos(folder, ["a.png"])
    (folder / "conditioning").mkdir()
    (folder / "conditioning" / ".gone.png.partial").write_bytes(b"left")
    (folder / ".b.png.partial").write_bytes(b"someone else's")
    assert main(["make-conditions", str(folder), str(folder), "--kind", "luminance"]) == 0
    assert not (folder / "conditioning" / ".gone.png.partial").exists()
    assert (folder / ".b.png.partial").read_bytes() == b"someone else's"
