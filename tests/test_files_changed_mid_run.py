"""An image or loss mask changed after the data check, or while a run trains: never served stale from the latent cache,
read once written when caught half-rewritten, said in one line where its change cannot train."""

import io
import os
import re
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.data.cache import EncodingCache
from finetune.errors import FinetuneError


def test_a_mask_edited_after_the_check_stops_a_cached_run_instead_of_being_cached_under_the_old_one(tmp_path):
    """Its views are named by the mask the check read; stored under that name, an edited mask would be served
    to a later run whose mask is the checked one again (an edit undone)."""
    from finetune.config import DataConfig
    from finetune.data.cache import EncodingCache
    from finetune.data.items import CaptionedImageDataset
    from data_examples import load_examples
    from finetune.errors import FinetuneError
    from test_loss_mask import half_mask, masked_folder

    folder = masked_folder(tmp_path / "data", count=2)
    config = DataConfig(image_dir=str(folder), resolution=64, loss_mask={"source": "files"})
    examples = load_examples(config)
    dataset = CaptionedImageDataset(examples, config, seed=0, latent_cache=EncodingCache())
    assert dataset[(0, 0)]["mask_key"] is not None
    half_mask(64, 64).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "masks" / "0.png")
    with pytest.raises(FinetuneError, match=rf"^the loss mask of image {folder / '0.png'} changed since this run's data check: restart"):
        dataset[(0, 0)]
    with pytest.raises(FinetuneError, match="changed since this run's data check"):
        dataset.render_mask((0, dataset[(1, 0)]["view"][1]))  # as the training process cuts a view not cached yet (same plan)
    uncached = CaptionedImageDataset(examples, config, seed=0)  # read every step: the edit simply takes effect
    assert float(uncached[(0, 0)]["loss_mask"][0, :, 32:].mean()) == 1.0


def test_an_image_edited_after_the_check_stops_a_cached_run_and_a_touched_one_trains_on(tmp_path):
    """As for masks: a view cut from an edited image would be cached under the name of the checked pixels.
    A file that was only touched or copied over with the same pixels (its time or size changed) trains on."""
    from finetune.config import DataConfig
    from finetune.data.items import CaptionedImageDataset
    from data_examples import load_examples
    from finetune.errors import FinetuneError

    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (200 * i, 40, 90)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a square")
    config = DataConfig(image_dir=str(folder), resolution=64)
    examples = load_examples(config)
    stat = os.stat(folder / "0.png")
    assert examples[0].file_stamp == (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    dataset = CaptionedImageDataset(examples, config, seed=0, latent_cache=EncodingCache())
    checked = dataset[(0, 0)]["pixel_values"]

    os.utime(folder / "0.png", ns=(0, 12345))  # touched: decoded in full, the same pixels
    Image.open(folder / "0.png").save(folder / "0.png", compress_level=0)  # re-saved: another size, the same pixels
    assert torch.equal(dataset[(0, 0)]["pixel_values"], checked)

    Image.new("RGB", (64, 64), (0, 255, 0)).save(folder / "0.png")
    with pytest.raises(FinetuneError, match=rf"^image {folder / '0.png'} changed since this run's data check: restart the run"):
        dataset[(0, 0)]
    with pytest.raises(FinetuneError, match="changed since this run's data check"):
        dataset.render((0, dataset[(1, 0)]["view"][1]))  # as the training process cuts a view the loader left out (same plan)
    uncached = CaptionedImageDataset(examples, config, seed=0)  # decoded every step: the edit simply takes effect
    assert float(uncached[(0, 0)]["pixel_values"][1].mean()) == 1.0


@pytest.mark.parametrize("where", ["memory", "disk", "none"])
def test_an_image_replaced_mid_run_is_never_served_stale_at_a_later_epoch(tmp_path, where):
    """A view cached in the first epoch is served by its key at the next (no pixels decoded): an image replaced meanwhile
    trained on as it was, unseen, to the end of the run. Now each use stats the file: with the cache (in memory or on
    disk) a changed image stops the run with one line; without it the edit trains (it is decoded every use) unless its
    size changed, as the view planned for the checked size would be stretched."""
    from finetune.config import DataConfig
    from finetune.data.items import CaptionedImageDataset
    from data_examples import load_examples
    from finetune.errors import FinetuneError

    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (200 * i, 40, 90)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a square")
    config = DataConfig(image_dir=str(folder), resolution=64, random_flip=False)
    cache = {"memory": EncodingCache(), "disk": EncodingCache(tmp_path / "cache"), "none": None}[where]
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0, latent_cache=cache)
    first = dataset[(0, 0)]
    if cache is not None:
        cache.lookup([first["latent_key"]], lambda rows: torch.zeros(1, 8), torch.device("cpu"))  # as the first step encodes it
        assert "pixel_values" not in dataset[(0, 1)]  # the next epoch's view is served by its key
    def replace(size: tuple[int, int]) -> None:  # a while after the check: a file system's times may be coarser than this test
        Image.new("RGB", size, (0, 255, 0)).save(folder / "0.png")
        os.utime(folder / "0.png", ns=(time.time_ns() + 10**9 * size[0], time.time_ns() + 10**9 * size[0]))

    replace((64, 64))
    if cache is not None:
        with pytest.raises(FinetuneError, match=rf"^image {folder / '0.png'} changed since this run's data check: restart the run"):
            dataset[(0, 1)]
    else:
        assert float(dataset[(0, 1)]["pixel_values"][1].mean()) == 1.0  # the edit trains
    replace((96, 64))
    expected = "changed size since this run's data check \\(96x64, was 64x64\\)" if cache is None else "changed since this run's data check"
    with pytest.raises(FinetuneError, match=rf"^image {folder / '0.png'} {expected}: restart the run to train with it"):
        dataset[(0, 1)]
    (folder / "0.png").unlink()
    with pytest.raises(FinetuneError, match=rf"^image {folder / '0.png'} was removed since this run's data check: put it back, or restart"):
        dataset[(0, 1)]


def test_a_mask_file_replaced_mid_run_is_never_served_stale_from_the_cache(tmp_path):
    """As for images: a cached view's mask is served by its key at a later epoch, so an edited mask file trained on as it
    was; now it stops the run with one line, and a touched mask file with the same pixels trains on."""
    from finetune.config import DataConfig
    from finetune.data.items import CaptionedImageDataset
    from data_examples import load_examples
    from test_loss_mask import half_mask, masked_folder

    folder = masked_folder(tmp_path / "data", count=2)
    config = DataConfig(image_dir=str(folder), resolution=64, random_flip=False, loss_mask={"source": "files"})
    cache = EncodingCache()
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0, latent_cache=cache)
    key = dataset[(0, 0)]["mask_key"]
    cache.lookup([key], lambda rows: torch.ones(1, 1, 8, 8), torch.device("cpu"))  # as the first step stores it
    assert "loss_mask" not in dataset[(0, 1)]  # served by its key
    later = time.time_ns() + 10**10  # a file system's times may be coarser than this test
    os.utime(folder / "masks" / "0.png", ns=(later, later))  # touched: read and compared once, the same pixels
    assert dataset[(0, 1)]["mask_key"] == key
    half_mask(64, 64).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "masks" / "0.png")
    os.utime(folder / "masks" / "0.png", ns=(later + 10**9, later + 10**9))
    with pytest.raises(FinetuneError, match=rf"^the loss mask of image {folder / '0.png'} changed since this run's data check: restart"):
        dataset[(0, 1)]


def test_an_image_rewritten_in_place_mid_run_is_read_once_written(tmp_path, monkeypatch):
    """A tool rewriting a file in place (the same pixels: an optimiser, a save over it) was caught half-written by the use
    that found it changed: 'cannot be read: fix or remove it' stopped a cached run (reproduced with the tiny model and
    PIL saving over an image mid-run). A file still changing is read again once written; one that stays cut still stops."""
    from finetune.config import DataConfig
    import finetune.data.files_as_checked as files_module
    from finetune.data.items import CaptionedImageDataset
    from data_examples import load_examples

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 40, 90)).save(folder / "0.png")
    (folder / "0.txt").write_text("a square")
    whole = (folder / "0.png").read_bytes()
    config = DataConfig(image_dir=str(folder), resolution=64, random_flip=False)
    cache = EncodingCache()
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0, latent_cache=cache)
    cache.lookup([dataset[(0, 0)]["latent_key"]], lambda rows: torch.zeros(1, 8), torch.device("cpu"))
    reads = []

    def read_while_the_rewrite_ends(example, *args, **kwargs):
        reads.append(example.source)
        try:
            return open_rgb(example, *args, **kwargs)
        finally:
            if len(reads) == 1:
                (folder / "0.png").write_bytes(whole)  # the rewrite ends while the first read fails

    open_rgb = files_module.open_rgb
    monkeypatch.setattr(files_module, "open_rgb", read_while_the_rewrite_ends)
    (folder / "0.png").write_bytes(whole[: len(whole) // 2])  # the rewrite, half done
    assert "pixel_values" not in dataset[(0, 1)]  # the same pixels once written: served by its key
    assert len(reads) == 2
    (folder / "0.png").write_bytes(whole[: len(whole) // 2])  # and left so
    with pytest.raises(FinetuneError, match=rf"^image {folder / '0.png'} cannot be read "):
        dataset[(0, 1)]


def test_a_mask_rewritten_in_place_mid_run_is_read_once_written(tmp_path, monkeypatch):
    """As for images: a mask file caught half-rewritten (the same pixels) by the use that found it changed stopped the run."""
    from types import SimpleNamespace

    from finetune.config import DataConfig
    import finetune.data.files_as_checked as files_module
    from finetune.data.items import CaptionedImageDataset
    from data_examples import load_examples
    from test_loss_mask import masked_folder

    folder = masked_folder(tmp_path / "data", count=1)
    config = DataConfig(image_dir=str(folder), resolution=64, random_flip=False, loss_mask={"source": "files"})
    cache = EncodingCache()
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0, latent_cache=cache)
    key = dataset[(0, 0)]["mask_key"]
    cache.lookup([key], lambda rows: torch.ones(1, 1, 8, 8), torch.device("cpu"))
    mask = folder / "masks" / "0.png"
    whole = mask.read_bytes()
    mask.write_bytes(whole[: len(whole) // 2])  # the rewrite, half done: it ends while the reader waits
    monkeypatch.setattr(files_module, "time", SimpleNamespace(sleep=lambda seconds: mask.write_bytes(whole)))
    assert dataset[(0, 1)]["mask_key"] == key


def test_without_the_cache_an_image_rewritten_in_place_is_read_once_written_and_a_cut_one_is_one_line(tmp_path, monkeypatch):
    """Uncached, a changed file's size is read again at each use (require_checked_size): caught half-rewritten (empty, or
    cut), Pillow's UnidentifiedImageError or OSError escaped from the data loader as a traceback. Now it is read once
    written, as with the cache, and a file left cut is the data check's one line."""
    from types import SimpleNamespace

    from finetune.config import DataConfig
    import finetune.data.files_as_checked as files_module
    from finetune.data.items import CaptionedImageDataset
    from data_examples import load_examples

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 40, 90)).save(folder / "0.png")
    (folder / "0.txt").write_text("a square")
    image = folder / "0.png"
    whole = image.read_bytes()
    config = DataConfig(image_dir=str(folder), resolution=64, random_flip=False)
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0)
    image.write_bytes(b"")  # the rewrite begun (opened for writing): it ends while the reader waits
    monkeypatch.setattr(files_module, "time", SimpleNamespace(sleep=lambda seconds: image.write_bytes(whole)))
    assert float(dataset[(0, 1)]["pixel_values"][0].mean()) > 0  # the same pixels, once written
    monkeypatch.setattr(files_module, "time", SimpleNamespace(sleep=lambda seconds: None))  # and left cut
    for cut, said in ((0, "is empty"), (len(whole) // 2, "cannot be read")):
        image.write_bytes(whole[:cut])
        later = time.time_ns() + 10**9 * (cut + 1)  # a file system's times may be coarser than this test
        os.utime(image, ns=(later, later))
        with pytest.raises(FinetuneError, match=rf"^image {image} {said}"):
            dataset[(0, 1)]


def test_without_the_cache_a_touched_image_has_its_size_read_once_not_at_every_use(tmp_path, monkeypatch):
    """require_checked_size read a changed file's size at each of its uses, for the rest of the run: a PNG's EXIF is read by
    decoding it whole, so each use of a touched PNG (a backup tool, `touch`) decoded it twice. Its size is read once a stamp."""
    from finetune.config import DataConfig
    import finetune.data.files_as_checked as files_module
    from finetune.data.items import CaptionedImageDataset
    from data_examples import load_examples

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 40, 90)).save(folder / "0.png")
    (folder / "0.txt").write_text("a square")
    config = DataConfig(image_dir=str(folder), resolution=64, random_flip=False)
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0)
    reads = []
    read_upright_size = files_module.read_upright_size
    monkeypatch.setattr(files_module, "read_upright_size", lambda example: reads.append(example.source) or read_upright_size(example))
    later = time.time_ns() + 10**10  # a file system's times may be coarser than this test
    os.utime(folder / "0.png", ns=(later, later))
    for epoch in range(3):
        dataset[(0, epoch)]
    assert reads == [str(folder / "0.png")]
    os.utime(folder / "0.png", ns=(later + 10**9, later + 10**9))  # touched again: read again, once
    dataset[(0, 3)], dataset[(0, 4)]
    assert len(reads) == 2


@pytest.mark.parametrize("kind", ["image", "conditioning image"])
def test_without_the_cache_a_file_caught_half_rewritten_at_its_decode_is_read_once_written(tmp_path, monkeypatch, pairs_folder, kind):
    """Uncached images and a ControlNet's conditioning images are decoded at each use. Only their size check waited for a
    file caught half-rewritten: a rewrite begun after that check (an unchanged file needs no read) was caught by the decode,
    and Pillow's error stopped the run. The decode now waits as the size check does; a file left cut still stops."""
    import shutil
    from types import SimpleNamespace

    from finetune.config.recipe_loading import recipe_from_dict
    from finetune.controlnet.data import ControlNetDataset
    from finetune.controlnet.pairs import checked_pairs
    import finetune.data.files_as_checked as files_module
    import finetune.data.images as images_module
    from finetune.data.items import CaptionedImageDataset
    from data_examples import load_examples

    if kind == "image":
        folder = tmp_path / "data"
        folder.mkdir()
        Image.new("RGB", (64, 64), (200, 40, 90)).save(folder / "0.png")
        (folder / "0.txt").write_text("a square")
        recipe = recipe_from_dict({"data": {"image_dir": str(folder), "resolution": 64, "random_flip": False}})
        dataset, path, key = CaptionedImageDataset(load_examples(recipe.data), recipe.data, seed=0), folder / "0.png", "pixel_values"
    else:
        folder = shutil.copytree(pairs_folder, tmp_path / "pairs")
        recipe = recipe_from_dict({"method": "controlnet", "data": {"image_dir": str(folder), "resolution": 64, "random_flip": False}})
        pairs, _ = checked_pairs(recipe)
        dataset, path, key = ControlNetDataset(pairs, recipe.data, seed=0, empty_prompt_share=0.0), Path(pairs[0].conditioning.source), "conditioning_pixel_values"
    expected = dataset[(0, 0)][key]
    whole, decodes, decode = path.read_bytes(), [], images_module.decode

    def decode_as_the_rewrite_begins(example, *args):
        if example.source == str(path) and not decodes:
            path.write_bytes(whole[: len(whole) // 2])  # the rewrite in place begins after the size check
        decodes.append(example.source)
        return decode(example, *args)

    def the_rewrite_ends(seconds):
        path.write_bytes(whole)
        later = time.time_ns() + 10**10  # a file system's times may be coarser than this test
        os.utime(path, ns=(later, later))

    monkeypatch.setattr(images_module, "decode", decode_as_the_rewrite_begins)
    monkeypatch.setattr(files_module, "time", SimpleNamespace(sleep=the_rewrite_ends))
    assert torch.equal(dataset[(0, 1)][key], expected)  # the same pixels, once written
    assert decodes.count(str(path)) == 2
    path.write_bytes(whole[: len(whole) // 2])  # and left cut
    monkeypatch.setattr(files_module, "time", SimpleNamespace(sleep=lambda seconds: None))
    with pytest.raises(FinetuneError, match=rf"^image {re.escape(str(path))} cannot be read "):
        dataset[(0, 2)]


def test_without_the_cache_a_jpeg_caught_with_its_header_written_and_its_pixels_not_is_read_once_written(tmp_path, monkeypatch):
    """A JPEG's size is in its header, which a rewrite writes first: caught half-rewritten, the size read of the changed
    file passed and the decode that followed stopped the run ('cannot be read ... image file is truncated'), where a PNG
    (whose size read decodes it whole) was read once written. The changed file's pixels are read too, once a stamp."""
    from types import SimpleNamespace

    import numpy as np

    from finetune.config import DataConfig
    import finetune.data.files_as_checked as files_module
    from finetune.data.items import CaptionedImageDataset
    from data_examples import load_examples

    folder = tmp_path / "data"
    folder.mkdir()
    image = folder / "0.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image, quality=95)
    (folder / "0.txt").write_text("a square")
    whole = image.read_bytes()
    config = DataConfig(image_dir=str(folder), resolution=64, random_flip=False)
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0)
    image.write_bytes(whole[: len(whole) // 2])  # the rewrite, its header written: it ends while the reader waits
    monkeypatch.setattr(files_module, "time", SimpleNamespace(sleep=lambda seconds: image.write_bytes(whole)))
    assert float(dataset[(0, 1)]["pixel_values"].abs().mean()) > 0


@pytest.mark.parametrize("how", ["loader", "training process"])
def test_with_the_cache_an_image_rewritten_between_its_check_and_its_decode_is_not_stored_under_the_checked_key(tmp_path, monkeypatch, how):
    """A view to be cached was decoded after require_as_checked's stat found the file as checked: a rewrite in that gap
    was decoded and its view stored under the checked pixels' key, to be served to later runs. The file is statted again
    after the decode: other pixels stop the run, the same pixels (a save over it) are the view, from one full decode."""
    from finetune.config import DataConfig
    import finetune.data.images as images_module
    from finetune.data.items import CaptionedImageDataset
    from data_examples import load_examples

    folder = tmp_path / "data"
    folder.mkdir()
    image = folder / "0.png"
    Image.new("RGB", (64, 64), (200, 40, 90)).save(image)
    (folder / "0.txt").write_text("a square")
    whole = image.read_bytes()
    config = DataConfig(image_dir=str(folder), resolution=64, random_flip=False)
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0, latent_cache=EncodingCache())
    decodes, decode, rewrite = [], images_module.decode, []

    def decode_as_a_rewrite_lands(example, *args):
        if rewrite:
            image.write_bytes(rewrite.pop())  # after the use's stat, before its decode
            later = time.time_ns() + 10**9 * (len(decodes) + 1)  # a file system's times may be coarser than this test
            os.utime(image, ns=(later, later))
        decodes.append(example.source)
        return decode(example, *args)

    monkeypatch.setattr(images_module, "decode", decode_as_a_rewrite_lands)
    use = (lambda: dataset[(0, 0)]["pixel_values"]) if how == "loader" else (lambda: dataset.render((0, plan)))  # (a view left out)
    entry = dataset[(0, 0)]
    plan, checked = entry["view"][1], entry["pixel_values"]
    assert len(decodes) == 1  # an unchanged file: one decode for the entry made
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 255, 0)).save(buffer, format="PNG")
    rewrite.append(buffer.getvalue())
    with pytest.raises(FinetuneError, match=rf"^image {re.escape(str(image))} changed since this run's data check: restart the run"):
        use()
    image.write_bytes(whole)
    later = time.time_ns() + 10**11
    os.utime(image, ns=(later, later))
    Image.open(io.BytesIO(whole)).save(buffer := io.BytesIO(), format="PNG", compress_level=0)  # the same pixels, other bytes
    rewrite.append(buffer.getvalue())
    assert torch.equal(use(), checked)
