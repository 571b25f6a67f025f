"""Walkthrough of the encoder caches (train.cache_latents, cache_text_embeddings, cache_dir): what a user
hits when the cache folder cannot be used, or the settings make the cache grow without paying off."""

import pytest
import torch

from finetune.cache import EncodingCache
from finetune.errors import FinetuneError


def test_a_cache_dir_that_cannot_be_made_is_one_line_naming_the_key(tmp_path):
    in_the_way = tmp_path / "cache"
    in_the_way.write_text("a file where the cache folder would go")
    with pytest.raises(FinetuneError, match=r"train.cache_dir: .*cache/latents-0 cannot be written \(NotADirectoryError"):
        EncodingCache(in_the_way / "latents-0")


def test_a_read_only_cache_still_serves_what_it_holds(tmp_path, monkeypatch):
    """A filled cache on a read-only disk: a stale partial file it cannot remove is no reason to stop."""
    cache = EncodingCache(tmp_path)
    cache.lookup(["k"], lambda rows: torch.ones(len(rows), 3), torch.device("cpu"))
    (tmp_path / ".old.1.partial").write_bytes(b"left by a killed run")
    monkeypatch.setattr("finetune.cache.STALE_PARTIAL_SECONDS", -1)

    def read_only(self, missing_ok=False):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("pathlib.Path.unlink", read_only)
    values = EncodingCache(tmp_path).lookup(["k"], lambda rows: 1 / 0, torch.device("cpu"))
    assert torch.equal(values, torch.ones(1, 3))
