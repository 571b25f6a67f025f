"""An image or loss mask replaced after the data check by other pixels of the same length, its mtime set back as `cp -p`,
`rsync -t` or `touch -r` leave it: its stat stamp (size, mtime_ns) was the checked one, so a cached run cut its next
view from the new pixels and stored it under the checked pixels' key, where a later run (the file put back, or another
file of those pixels) was served it. The stamp holds the ctime and inode too, which no copy tool sets back."""

import os

import pytest
import torch
from PIL import Image

from finetune.data.cache import EncodingCache
from finetune.errors import FinetuneError


def _replace_keeping_size_and_mtime(path, image: Image.Image) -> None:
    """What `cp -p other.png path` does, for a file of the same length: new bytes, the old atime and mtime."""
    before = os.stat(path)
    image.save(path, compress_level=0)  # uncompressed PNG: the same length for the same size and mode
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_an_image_replaced_with_its_size_and_mtime_kept_is_not_cached_under_the_checked_pixels(tmp_path):
    from data_examples import load_examples
    from finetune.config import DataConfig
    from finetune.data.items import CaptionedImageDataset

    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (200 * i, 40, 90)).save(folder / f"{i}.png", compress_level=0)
        (folder / f"{i}.txt").write_text("a square")
    config = DataConfig(image_dir=str(folder), resolution=64)  # random flips: the second epoch may cut a view not cached yet
    cache = EncodingCache(tmp_path / "cache")
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0, latent_cache=cache)
    assert float(dataset[(0, 0)]["pixel_values"][1].mean()) < 0  # green 40 of 255: the checked pixels

    _replace_keeping_size_and_mtime(folder / "0.png", Image.new("RGB", (64, 64), (0, 255, 0)))
    with pytest.raises(FinetuneError, match=rf"^image {folder / '0.png'} changed since this run's data check: restart the run"):
        dataset[(0, 0)]  # was: the green square's view, to be cached under the checked image's key
    with pytest.raises(FinetuneError, match="changed since this run's data check"):
        dataset.render((0, dataset[(1, 0)]["view"][1]))  # as the training process cuts a view the loader left out


def test_a_mask_file_replaced_with_its_size_and_mtime_kept_stops_a_cached_run(tmp_path):
    from data_examples import load_examples
    from finetune.config import DataConfig
    from finetune.data.items import CaptionedImageDataset
    from test_loss_mask import half_mask, masked_folder

    folder = masked_folder(tmp_path / "data", count=2)
    mask = folder / "masks" / "0.png"
    half_mask(64, 64).save(mask, compress_level=0)  # before the check, as the folder's mask
    config = DataConfig(image_dir=str(folder), resolution=64, random_flip=False, loss_mask={"source": "files"})
    cache = EncodingCache()
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0, latent_cache=cache)
    cache.lookup([dataset[(0, 0)]["mask_key"]], lambda rows: torch.ones(1, 1, 8, 8), torch.device("cpu"))

    _replace_keeping_size_and_mtime(mask, half_mask(64, 64).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    with pytest.raises(FinetuneError, match=rf"^the loss mask of image {folder / '0.png'} changed since this run's data check: restart"):
        dataset[(0, 1)]  # was: served by the checked mask's key, unseen


def test_a_file_only_copied_over_with_its_own_bytes_and_times_trains_on(tmp_path):
    """The ctime moved, the pixels did not: read and compared once, then taken by its new stamp."""
    from data_examples import load_examples
    from finetune.config import DataConfig
    from finetune.data.items import CaptionedImageDataset

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 40, 90)).save(folder / "0.png", compress_level=0)
    (folder / "0.txt").write_text("a square")
    config = DataConfig(image_dir=str(folder), resolution=64, random_flip=False)
    cache = EncodingCache()
    dataset = CaptionedImageDataset(load_examples(config), config, seed=0, latent_cache=cache)
    checked = dataset[(0, 0)]["pixel_values"]
    _replace_keeping_size_and_mtime(folder / "0.png", Image.open(folder / "0.png").convert("RGB"))
    assert torch.equal(dataset[(0, 0)]["pixel_values"], checked)
