"""A stop (Ctrl-C) while a file is written leaves the old file or the new one, never a half-written one, and no
hidden .NAME.partial beside it: DreamBooth's class_images.json, and make-conditions' conditioning images, image
copies, metadata.jsonl and conditioning.json (which a stopped rerun leaves out, rather than the old kind's)."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.controlnet.conditions import make_condition_folders
from finetune.dreambooth.class_image_names import RECORD_FILE, read_generation_records
from finetune.dreambooth.class_images import write_generation_record
from finetune.errors import FinetuneError


def stopped_halfway_through_write_text(monkeypatch, name: str | None = None):
    """Path.write_text (of the file `name`, or any) writes half its text, then the user presses Ctrl-C."""
    real = Path.write_text

    def half_then_stop(self, text, *args, **kwargs):
        if name is not None and name not in self.name:
            return real(self, text, *args, **kwargs)
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half_then_stop)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def photos(folder: Path, n: int = 2) -> Path:
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{'ab'[i]}.png")
    return folder


def test_a_stop_while_the_class_image_records_are_written_keeps_the_old_ones(tmp_path, monkeypatch):
    """A stop between writing .class_images.json.partial and its rename left the hidden partial file behind."""
    folder = tmp_path / "class"
    write_generation_record(folder, "aaaaaaaaaa", {"prompt": "a dog"})
    before = files(folder)
    stopped_halfway_through_write_text(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        write_generation_record(folder, "bbbbbbbbbb", {"prompt": "a cat"})
    monkeypatch.undo()
    assert files(folder) == before and list(files(folder)) == [RECORD_FILE]
    assert read_generation_records(folder) == {"aaaaaaaaaa": {"prompt": "a dog"}}


def test_a_stop_while_make_conditions_rewrites_a_folders_own_metadata_keeps_it(tmp_path, monkeypatch):
    """Rewriting the folder's own metadata.jsonl in place: a stop left .metadata.jsonl.partial beside it."""
    folder = photos(tmp_path / "photos")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{n}.png", "text": f"a {n}"}) + "\n" for n in "ab"))
    own = (folder / "metadata.jsonl").read_bytes()
    stopped_halfway_through_write_text(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        make_condition_folders(folder, folder, "luminance")
    monkeypatch.undo()
    assert (folder / "metadata.jsonl").read_bytes() == own
    assert not [p for p in folder.rglob(".*")]


def test_a_stop_while_make_conditions_writes_its_record_leaves_no_half_record(tmp_path, monkeypatch):
    """conditioning.json was written in place: a stop left half of it. It is written whole or not at all (a rerun
    removes the old one first: see the next test)."""
    out = tmp_path / "out"
    make_condition_folders(photos(tmp_path / "photos"), out, "luminance")
    stopped_halfway_through_write_text(monkeypatch, "conditioning.json")
    with pytest.raises(KeyboardInterrupt):
        make_condition_folders(tmp_path / "photos", out, "luminance", overwrite=True)
    monkeypatch.undo()
    assert not (out / "conditioning.json").exists() and not [p for p in out.rglob(".*")]


@pytest.mark.parametrize("stopped", ["conditioning image", "image copy"])
def test_a_stop_while_make_conditions_writes_an_image_leaves_no_half_image(tmp_path, monkeypatch, stopped):
    """A conditioning image (or the copy of an image) was written under its final name: a stop left a truncated PNG
    that a rerun refused to replace without --overwrite, and that training reads as a broken image."""
    source, out = photos(tmp_path / "photos"), tmp_path / "out"
    calls = []
    if stopped == "conditioning image":
        real = Image.Image.save

        def half_then_stop(self, fp, *args, **kwargs):
            calls.append(fp)
            if len(calls) < 2:
                return real(self, fp, *args, **kwargs)
            whole = io.BytesIO()
            real(self, whole, *args, **kwargs)
            Path(fp).write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
            raise KeyboardInterrupt

        monkeypatch.setattr(Image.Image, "save", half_then_stop)
    else:
        real = shutil.copyfile

        def half_then_stop(src, dst, *args, **kwargs):
            calls.append(dst)
            if len(calls) < 2:
                return real(src, dst, *args, **kwargs)
            Path(dst).write_bytes(Path(src).read_bytes()[:100])
            raise KeyboardInterrupt

        monkeypatch.setattr(shutil, "copyfile", half_then_stop)
    with pytest.raises(KeyboardInterrupt):
        make_condition_folders(source, out, "luminance")
    monkeypatch.undo()
    assert len(calls) == 2
    written = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in written if p.name.startswith(".")]
    for path in written:
        Image.open(path).load()  # each whole


def test_a_stop_while_make_conditions_rewrites_a_folder_as_another_kind_leaves_no_record_of_the_old_kind(tmp_path, monkeypatch):
    """A rerun as masks (--overwrite) stopped after the first image kept conditioning.json saying luminance over a mix
    of both kinds, and a ControlNet trained on the folder recorded luminance for `finetune sample` and the demo."""
    from finetune.controlnet.conditioning_records import conditioning_record
    from finetune.controlnet.conditions import make_condition_folders

    source, out = photos(tmp_path / "photos"), tmp_path / "out"
    (source / "sub").mkdir()
    shutil.copy(source / "a.png", source / "sub" / "a.png")
    make_condition_folders(source, out, "luminance")
    assert conditioning_record(out) == conditioning_record(out / "sub") == {"kind": "luminance"}
    real, calls = shutil.copyfile, []

    def stop_at_the_second(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        make_condition_folders(source, out, "mask", overwrite=True)
    monkeypatch.undo()
    assert conditioning_record(out) is None and conditioning_record(out / "sub") == {"kind": "luminance"}  # not yet rewritten


def test_a_half_image_a_kill_left_hidden_is_no_conditioning_image_a_rerun_refuses_to_replace(tmp_path):
    """A SIGKILL mid-write leaves a hidden `.a.png.partial` (atomic_write has no way out to remove it): the rerun said
    'already holds 1 conditioning images' of a folder holding none, as of Finder's .DS_Store."""
    source, out = photos(tmp_path / "photos"), tmp_path / "out"
    (out / "conditioning").mkdir(parents=True)
    (out / "conditioning" / ".a.png.partial").write_bytes(b"\x89PNG half")
    (out / "conditioning" / ".DS_Store").write_bytes(b"Bud1")
    make_condition_folders(source, out, "luminance")
    assert sorted(p.name for p in (out / "conditioning").iterdir() if not p.name.startswith(".")) == ["a.png", "b.png"]
    with pytest.raises(FinetuneError, match="already holds 2 conditioning images"):
        make_condition_folders(source, out, "luminance")
