"""Walkthrough of the encoder caches (train.cache_latents, cache_text_embeddings, cache_dir): what a user
hits when the cache folder cannot be used, or the settings make the cache grow without paying off."""

import errno
import os
import re

import pytest
import torch

from finetune.data.cache import EncodingCache
from finetune.errors import FinetuneError


def test_a_cache_dir_that_cannot_be_made_is_one_line_naming_the_key(tmp_path):
    in_the_way = tmp_path / "cache"
    in_the_way.write_text("a file where the cache folder would go")
    with pytest.raises(FinetuneError, match=r"train.cache_dir: .*cache/latents-0 cannot be written \(NotADirectoryError: Not a directory\): a file is "
                                            r"in its way: choose another train.cache_dir \(or remove it to cache in memory\)$"):  # not "free space"
        EncodingCache(in_the_way / "latents-0")
    # The recipe says so when it loads, before the models do (the cache folder is made after them, named by its encoder).
    from finetune.config import TrainConfig

    with pytest.raises(ValueError, match=r"cache_dir\n  Value error, [^\n]*cache is a file, not a folder: give a folder for the cached encodings \(or remove the key to cache in memory\)"):
        TrainConfig(cache_dir=str(in_the_way / "sub"), cache_latents=True)


def test_a_read_only_cache_still_serves_what_it_holds(tmp_path, monkeypatch):
    """A filled cache on a read-only disk: a stale partial file it cannot remove is no reason to stop."""
    cache = EncodingCache(tmp_path)
    cache.lookup(["k"], lambda rows: torch.ones(len(rows), 3), torch.device("cpu"))
    (tmp_path / ".old.1.partial").write_bytes(b"left by a killed run")
    monkeypatch.setattr("finetune.data.cache.STALE_PARTIAL_SECONDS", -1)

    def read_only(self, missing_ok=False):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("pathlib.Path.unlink", read_only)
    values = EncodingCache(tmp_path).lookup(["k"], lambda rows: 1 / 0, torch.device("cpu"))
    assert torch.equal(values, torch.ones(1, 3))


def test_caches_of_inputs_that_rarely_repeat_are_warned_about(make_recipe, tmp_path, capsys):
    from PIL import Image

    from finetune.training.trainer import train

    wide = tmp_path / "wide"  # 96x64 photos cut to 64x64: a random crop moves across 32 columns
    wide.mkdir()
    for i in range(2):
        Image.new("RGB", (96, 64), (40 * i, 90, 200)).save(wide / f"{i}.png")
        (wide / f"{i}.txt").write_text("sks, a dog, grass")
    caches = dict(train__max_steps=1, train__cache_latents=True, train__cache_text_embeddings=True)
    train(make_recipe(output_dir=str(tmp_path / "random"), data__image_dir=str(wide), data__crop="random", data__shuffle_tags=True, **caches))
    printed = capsys.readouterr().out
    assert "warning: train.cache_latents with data.crop: random: nearly every crop is new" in printed
    assert "warning: train.cache_text_embeddings with data.shuffle_tags or tag_dropout: nearly every caption is new" in printed
    train(make_recipe(output_dir=str(tmp_path / "center"), data__image_dir=str(wide), **caches))
    assert "warning: train.cache" not in capsys.readouterr().out
    # Square images cut square never move; one prompt without tags never changes; a trained text encoder's captions are not cached.
    square = dict(data__crop="random", data__shuffle_tags=True, data__caption="a photo of sks dog")
    train(make_recipe(output_dir=str(tmp_path / "square"), **square, **caches))
    assert "warning: train.cache" not in capsys.readouterr().out
    train(make_recipe(output_dir=str(tmp_path / "te"), data__image_dir=str(wide), data__shuffle_tags=True, lora__train_text_encoder=True, **caches))
    assert "warning: train.cache_text_embeddings" not in capsys.readouterr().out


def test_a_disk_cache_says_what_it_holds_at_the_start(make_recipe, tmp_path, capsys):
    """So a user sees whether a later run reuses the cache, or starts another folder (another base, dtype, clip skip)."""
    from finetune.training.trainer import train

    caches = dict(train__max_steps=1, train__cache_latents=True, train__cache_text_embeddings=True, train__cache_dir=str(tmp_path / "cache"))
    train(make_recipe(output_dir=str(tmp_path / "first"), **caches))
    printed = capsys.readouterr().out
    assert f"train.cache_dir: latents in {tmp_path / 'cache'}/latents-" in printed and printed.count(": empty: every entry is encoded in this run") == 2
    train(make_recipe(output_dir=str(tmp_path / "again"), **caches))
    printed = capsys.readouterr().out
    for what in ("latents", "text embeddings"):  # one step of 2 images: 2 views and 2 captions
        assert re.search(rf"train.cache_dir: {what} in .*: 2 entries \(\d+\.\d MB\) from earlier runs", printed)
    # A trained text encoder's embeddings are not cached: no line says they are.
    train(make_recipe(output_dir=str(tmp_path / "te"), lora__train_text_encoder=True, **caches))
    assert "text embeddings in" not in capsys.readouterr().out


def test_a_damaged_entry_of_a_read_only_cache_is_one_line(tmp_path, monkeypatch):
    """On a read-only disk even unlinking a file that is not there fails (EROFS): neither the damaged entry
    nor the partial file of the write that failed may turn the one line into a traceback."""
    (tmp_path / "k.safetensors").write_bytes(b"cut off")
    cache = EncodingCache(tmp_path)

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("pathlib.Path.unlink", read_only)
    monkeypatch.setattr("finetune.data.cache.save_file", read_only)
    with pytest.raises(FinetuneError, match="train.cache_dir: .* cannot be written .*Read-only file system"):
        cache.lookup(["k"], lambda rows: torch.ones(len(rows), 3), torch.device("cpu"))


@pytest.mark.parametrize("code, remedy", [(errno.EACCES, "fix the folder's permissions or choose"), (errno.EPERM, "fix the folder's permissions or choose"),
                                          (errno.ENOSPC, "free space or choose"), (errno.EDQUOT, "free space or choose"),
                                          (errno.EIO, "choose")])  # fmt: skip
def test_an_unwritable_cache_says_what_fixes_it(tmp_path, monkeypatch, code, remedy):
    """Freeing space fixes a full disk or quota, not a folder the run may not write (EPERM advised freeing space)."""
    cache = EncodingCache(tmp_path / "cache")

    def refused(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("finetune.data.cache.save_file", refused)
    with pytest.raises(FinetuneError, match=rf"cannot be written \(\w+: {re.escape(os.strerror(code))}\): {remedy} another train.cache_dir \(or remove it"):
        cache.lookup(["k"], lambda rows: torch.ones(len(rows), 3), torch.device("cpu"))


def test_the_shuffled_tags_warning_reads_a_caption_s_lines_as_training_does():
    """A caption holding U+2028 (text pasted from a web page) is one line to training (captions.caption_lines cuts at line
    ends alone), whose tags shuffle: the warning cut it at U+2028 too, into lines of too few tags, and said nothing."""
    from finetune.captions.captions import training_caption
    from finetune.config import DataConfig
    from finetune.data.sources import Example
    from finetune.methods.base import any_tags_to_move

    caption = "sks, dog\u2028grass, sky"
    data = DataConfig(image_dir="x", shuffle_tags=True, keep_tokens=1)
    assert len({training_caption(caption, data, seed=0, epoch=epoch, index=0) for epoch in range(20)}) > 1  # training moves its tags
    assert any_tags_to_move([Example("x/0.png", caption, lambda: None)], data)
    assert not any_tags_to_move([Example("x/0.png", "sks, dog\ngrass, sky", lambda: None)], data)  # two lines, each of one tag to move


def test_a_partial_file_whose_writer_on_this_machine_has_ended_is_removed_at_once(tmp_path):
    """What a run killed mid-write (SIGKILL, the OOM killer) leaves: it never kept a restarted run from writing its entries
    (each write has a partial file of its own), but stayed an hour, a Ctrl-C'd run's restart and each after it leaving it
    there. Its name now says its writer: one of this machine that has ended is removed when a cache next opens the folder;
    one still running, one of another machine (a shared disk) or of a finetune that named none waits for the hour."""
    import subprocess
    import sys

    from finetune.data.cache import HOST, partial_path

    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    killed = partial_path(tmp_path, "a", pid=ended.pid)
    running = partial_path(tmp_path, "b")  # this process's
    elsewhere = tmp_path / killed.name.replace(f"@{HOST}.", f"@{HOST}x.")
    unnamed = tmp_path / ".d.0123456789abcdef0123456789abcdef.partial"
    for path in (killed, running, elsewhere, unnamed):
        path.write_bytes(b"half an entry")
    cache = EncodingCache(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (running, elsewhere, unnamed))
    cache.lookup(["a"], lambda rows: torch.ones(len(rows), 3), torch.device("cpu"))  # its entry written as ever
    assert (tmp_path / "a.safetensors").is_file()
