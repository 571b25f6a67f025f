"""Cached latents and text embeddings: exact, invalidated by any change, reusable from disk."""

import os
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune.data.cache import EncodingCache, caption_key
from finetune.errors import FinetuneError
from finetune.training.trainer import train
from numerics import loss_rtol


def test_cached_run_has_the_same_losses_as_the_uncached_one(make_recipe, tmp_path):
    common = dict(train__max_steps=6, data__random_flip=True, train__batch_size=2)
    plain = train(make_recipe(output_dir=str(tmp_path / "plain"), **common))
    # Two loader processes: the items that name views (not pixels) travel between processes too.
    cached = train(make_recipe(
        output_dir=str(tmp_path / "cached"), train__cache_latents=True, train__cache_text_embeddings=True, data__num_workers=2, **common
    ))  # fmt: skip
    assert torch.allclose(torch.tensor(plain.losses), torch.tensor(cached.losses), rtol=loss_rtol(1e-5), atol=1e-6)


def test_lookup_encodes_only_the_rows_not_cached():
    cache = EncodingCache()
    calls = []

    def encode(rows):
        calls.append(list(rows))
        return torch.tensor([[float(len(captions[i]))] for i in rows])

    captions = ["a cat", "a dog"]
    cache.lookup([caption_key(c) for c in captions], encode, torch.device("cpu"))
    cache.lookup([caption_key(c) for c in captions], encode, torch.device("cpu"))
    captions[1] = "a dog "  # one caption changes by a space
    result = cache.lookup([caption_key(c) for c in captions], encode, torch.device("cpu"))
    assert calls == [[0], [1], [1]]  # each row alone, so no entry depends on the rows that missed with it
    assert result.flatten().tolist() == [5.0, 6.0]


def test_two_processes_writing_the_same_disk_entry_at_once_both_succeed(tmp_path, monkeypatch):
    """Processes share the disk cache, and all of them encode a shared caption at the first step. Here
    the second writes the whole entry while the first is between writing and renaming its file."""
    import finetune.data.cache as cache_module

    first, second = EncodingCache(tmp_path), EncodingCache(tmp_path)
    save_file = cache_module.save_file

    def save_while_the_other_process_writes(tensors, path):
        save_file(tensors, path)
        if not second.stored("k"):
            second.lookup(["k"], lambda rows: torch.ones(len(rows), 3), torch.device("cpu"))

    monkeypatch.setattr(cache_module, "save_file", save_while_the_other_process_writes)
    values = first.lookup(["k"], lambda rows: torch.ones(len(rows), 3), torch.device("cpu"))
    assert torch.equal(values, torch.ones(1, 3))
    assert [p.name for p in tmp_path.iterdir()] == ["k.safetensors"]  # no partial file left behind
    assert torch.equal(EncodingCache(tmp_path).lookup(["k"], lambda rows: 1 / 0, torch.device("cpu")), torch.ones(1, 3))


def test_a_failed_disk_write_leaves_no_partial_file_and_a_stale_one_is_removed(tmp_path, monkeypatch):
    import finetune.data.cache as cache_module

    def disk_full(tensors, path):
        Path(path).write_bytes(b"half an entry")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module, "save_file", disk_full)
    with pytest.raises(FinetuneError, match="train.cache_dir: .* cannot be written .*No space left"):  # one line, not a traceback
        EncodingCache(tmp_path).lookup(["k"], lambda rows: torch.ones(len(rows), 3), torch.device("cpu"))
    assert list(tmp_path.iterdir()) == []

    # What a killed run leaves (no finally runs): removed when a cache opens the folder, once it is old
    # enough that no live process can still be writing it.
    stale, fresh = tmp_path / ".a.1.partial", tmp_path / ".b.2.partial"
    for path in (stale, fresh):
        path.write_bytes(b"half an entry")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    EncodingCache(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name]


def test_disk_cache_is_reused_by_a_later_run(make_recipe, tmp_path, monkeypatch):
    settings = dict(train__max_steps=2, train__cache_latents=True, train__cache_text_embeddings=True, train__cache_dir=str(tmp_path / "cache"))
    train(make_recipe(output_dir=str(tmp_path / "a"), **settings))
    latent_dirs = list((tmp_path / "cache").glob("latents-*"))
    text_dirs = list((tmp_path / "cache").glob("text-*"))
    assert len(latent_dirs) == 1 and len(text_dirs) == 1
    entries = len(list(latent_dirs[0].glob("*.safetensors")))
    assert entries == 4  # the 4 images, center-cropped, unflipped: one entry each
    # The second run must not run the encoders at all: every entry comes from disk.
    import finetune.methods.base as base_module

    def must_not_encode(*args, **kwargs):
        raise AssertionError("encoder called although everything is cached on disk")

    monkeypatch.setattr(base_module, "posterior_moments", must_not_encode)
    monkeypatch.setattr(base_module, "encode_prompts", must_not_encode)
    train(make_recipe(output_dir=str(tmp_path / "b"), **settings))


def test_a_cached_view_is_never_decoded_again_and_a_changed_image_is_encoded_anew(make_recipe, image_folder, tmp_path, monkeypatch):
    """Items name their views (image digest, crop, flip, size): a cache hit skips decoding altogether."""
    import shutil

    import numpy as np
    from PIL import Image

    import finetune.data.files_as_checked as files_module
    import finetune.methods.base as base_module

    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    decoded, encoded = [], []
    open_rgb, posterior_moments = files_module.open_rgb, base_module.posterior_moments
    monkeypatch.setattr(files_module, "open_rgb", lambda example, **kw: decoded.append(example.source) or open_rgb(example, **kw))
    monkeypatch.setattr(base_module, "posterior_moments", lambda vae, pixels: encoded.append(len(pixels)) or posterior_moments(vae, pixels))
    settings = dict(data__image_dir=str(folder), train__max_steps=6, train__batch_size=2, train__cache_latents=True, train__cache_dir=str(tmp_path / "cache"))

    train(make_recipe(output_dir=str(tmp_path / "a"), **settings))  # 3 epochs of 4 images
    assert len(decoded) == 4 and sum(encoded) == 4  # each image's one view (center crop, no flip), once

    first = sorted(folder.glob("*.png"))[0]
    pixels = np.asarray(Image.open(first).convert("RGB")).copy()
    pixels[:8] = 255 - pixels[:8]
    Image.fromarray(pixels).save(first)
    decoded.clear()
    encoded.clear()
    train(make_recipe(output_dir=str(tmp_path / "b"), **settings))  # the disk cache serves the other three
    assert decoded == [str(first)] and sum(encoded) == 1


def test_with_loader_workers_the_first_epoch_is_decoded_by_them(make_recipe, tmp_path, monkeypatch):
    """Views likely new (the first epoch) come decoded from the loader processes; the training process
    decodes nothing, and later epochs are served by the cache."""
    import finetune.data.files_as_checked as files_module

    in_training_process = []
    open_rgb = files_module.open_rgb
    monkeypatch.setattr(files_module, "open_rgb", lambda example, **kw: in_training_process.append(example.source) or open_rgb(example, **kw))
    # Loader processes start after the patch but count into their own copies of the list.
    train(make_recipe(train__max_steps=6, train__batch_size=2, train__cache_latents=True, data__num_workers=2))
    assert in_training_process == []


def test_under_bf16_the_cache_keeps_bf16_and_the_losses_match(make_recipe, tmp_path, monkeypatch):
    """The VAE's outputs are bf16 there, so a bf16 entry holds all their bits. The losses agree to bf16
    rounding, not bit for bit, as they did with fp32 entries (the same numbers): under autocast a view
    encoded in another batch (a cache hit) rounds differently from one encoded in this batch (measured:
    up to one bf16 step, 0.002, in the tiny VAE's moments)."""
    import finetune.methods.base as base_module

    methods = []
    setup = base_module.DiffusionMethod.setup
    monkeypatch.setattr(base_module.DiffusionMethod, "setup", lambda self, *a, **k: methods.append(self) or setup(self, *a, **k))
    common = dict(train__max_steps=4, train__batch_size=2, train__mixed_precision="bf16", data__random_flip=True)
    plain = train(make_recipe(output_dir=str(tmp_path / "plain"), **common))
    cached = train(make_recipe(output_dir=str(tmp_path / "cached"), train__cache_latents=True, train__cache_text_embeddings=True, **common))
    assert torch.allclose(torch.tensor(plain.losses), torch.tensor(cached.losses), rtol=2e-3)
    memory = methods[-1].latent_cache.memory
    assert memory and all(value.dtype == torch.bfloat16 for value in memory.values())


@pytest.mark.parametrize("source", ["files", "alpha"])
def test_a_cached_view_reads_its_loss_mask_once_and_a_changed_mask_is_cut_anew(make_recipe, tmp_path, monkeypatch, source):
    """With cached latents each view's loss mask is cached beside them, at their size: later epochs and later
    runs read no mask file (nor, for source alpha, the image's transparency), and a changed mask is another
    entry, so it trains as an uncached run with that mask does."""
    import finetune.data.loss_mask as loss_mask_module
    import finetune.data_check.check as check_module
    import finetune.data_check.mask_check as mask_check_module
    from test_loss_mask import half_mask, masked_folder

    folder = masked_folder(tmp_path / "data")
    for i in range(4):  # four different masks: one mask on two images is one cache entry per view
        mask = half_mask(64, 64)
        mask.paste(0, (0, 8 * i, 32, 8 * i + 8))
        mask.save(folder / "masks" / f"{i}.png")
        if source == "alpha":  # the masks as the images' transparency
            image = Image.open(folder / f"{i}.png").convert("RGBA")
            image.putalpha(mask)
            image.save(folder / f"{i}.png")
    reader = "read_mask_file" if source == "files" else "alpha_mask"
    reads, read = [], getattr(loss_mask_module, reader)
    name = str if source == "files" else lambda image: hash(image.tobytes())  # a mask file's path, or the image's pixels
    for module in (check_module, mask_check_module):  # the check reads transparency in both, mask files in mask_check
        if hasattr(module, reader):
            monkeypatch.setattr(module, reader, lambda image: reads.append(name(image)) or read(image))
    settings = dict(data__image_dir=str(folder), data__loss_mask={"source": source}, train__max_steps=4, train__batch_size=2)
    cached = dict(train__cache_latents=True, train__cache_dir=str(tmp_path / "cache"))

    train(make_recipe(output_dir=str(tmp_path / "first"), **settings, **cached))  # 2 epochs of 4 images, one view each
    # Each mask is read twice by the check, cut for loss-masks.png, and for its first epoch only (not in both: 5).
    assert sorted(Counter(reads).values()) == [4] * 4
    reads.clear()
    before = train(make_recipe(output_dir=str(tmp_path / "again"), **settings, **cached))
    assert sorted(Counter(reads).values()) == [3] * 4  # the disk cache serves every epoch

    changed = half_mask(64, 64).transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # image 0 now trains its right half
    if source == "files":
        changed.save(folder / "masks" / "0.png")
    else:
        image = Image.open(folder / "0.png")
        image.putalpha(changed)
        image.save(folder / "0.png")
    reads.clear()
    after = train(make_recipe(output_dir=str(tmp_path / "changed"), **settings, **cached))
    assert sorted(Counter(reads).values()) == [3, 3, 3, 4]  # the changed one is cut again
    uncached = train(make_recipe(output_dir=str(tmp_path / "uncached"), **settings))
    assert torch.allclose(torch.tensor(after.losses), torch.tensor(uncached.losses), rtol=loss_rtol(1e-5), atol=1e-6)
    assert not torch.allclose(torch.tensor(after.losses), torch.tensor(before.losses), rtol=1e-3)


def test_a_pixel_digest_is_of_the_whole_image_without_holding_its_bytes(monkeypatch):
    """pixel_digest names cached latents by the image's size and every pixel (the same digest whatever its bands), and
    holds no copy of the pixels as bytes: tobytes() whole held two (its chunks, then their join), 73 MB of a 12 MP photo
    in each data-check thread."""
    import hashlib
    import tracemalloc

    import numpy as np

    from finetune.data import images

    pixels = np.random.default_rng(0).integers(0, 256, (1024, 4096, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    whole = hashlib.blake2b(b"4096x1024" + pixels.tobytes(), digest_size=16).hexdigest()
    tracemalloc.start()
    try:
        assert images.pixel_digest(image) == whole
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < pixels.nbytes / 2, peak
    odd = Image.fromarray(pixels[:37, :45])
    monkeypatch.setattr(images, "DIGEST_BAND_BYTES", 45 * 3 * 4)  # bands of 4 rows, the last of 1
    assert images.pixel_digest(odd) == hashlib.blake2b(b"45x37" + pixels[:37, :45].tobytes(), digest_size=16).hexdigest()
    changed = pixels[:37, :45].copy()
    changed[36, 44, 2] ^= 1  # the last band's last value
    assert images.pixel_digest(Image.fromarray(changed)) != images.pixel_digest(odd)
