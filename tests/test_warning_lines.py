"""Every warning a run gives reads as the project's do (`warning: ...` on the console), not as Python
logging's `WARNING finetune.data.cache: ...`, which only the command line's logging set-up printed at all."""

from safetensors.torch import save_file
import torch

from finetune.data.cache import EncodingCache


def test_a_damaged_cache_entry_is_one_warning_line(tmp_path, capsys):
    cache = EncodingCache(tmp_path / "cache")
    (tmp_path / "cache" / "abc.safetensors").write_bytes(b"cut short")
    save_file({"value": torch.ones(2)}, str(tmp_path / "cache" / "good.safetensors"))
    assert cache._load("abc") is None and cache._load("good") is not None
    assert capsys.readouterr().out == f"warning: cache entry {tmp_path / 'cache' / 'abc.safetensors'} is damaged: encoding it again\n"
    assert not (tmp_path / "cache" / "abc.safetensors").exists()  # encoded again and stored by the caller
