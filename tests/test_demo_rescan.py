"""The demo's Rescan runs outside the render queue: a rescan in the middle of a render must not break it."""

import shutil

import pytest

from finetune.demo_engine import DemoEngine, Request
from finetune.errors import FinetuneError


def test_an_adapter_deleted_and_rescanned_during_a_render_is_one_line(adapters_dir, tiny_model, tmp_path):
    folder = tmp_path / "adapters"
    for name in ("first", "second"):
        shutil.copytree(adapters_dir / "trained", folder / name, ignore=shutil.ignore_patterns("checkpoints", "logs", "samples"))
    engine = DemoEngine(str(tiny_model), folder)

    def delete_the_second_and_rescan(done, total):  # while the first LoRA's column renders
        if (folder / "second").exists():
            shutil.rmtree(folder / "second")
            engine.rescan()

    request = Request(prompt="a red circle", steps=1, loras=[("first", 1.0), ("second", 1.0)], separate=True)
    with pytest.raises(FinetuneError, match=r"^'second' was removed from .* while this request rendered: pick another$"):
        engine.render(request, delete_the_second_and_rescan)  # was a KeyError: the page's generic "error"


def test_a_rescan_while_a_render_stores_what_it_loaded_leaves_the_cache_whole(adapters_dir, tiny_model, tmp_path):
    """Rescan (another thread) emptied the cache in place while a render went over it to make room for the adapter
    it had loaded: 'dictionary changed size during iteration'. Here the rescan falls at that moment, by design."""
    folder = tmp_path / "adapters"
    shutil.copytree(adapters_dir / "trained", folder / "first", ignore=shutil.ignore_patterns("checkpoints", "logs", "samples"))
    engine = DemoEngine(str(tiny_model), folder)

    class RescannedWhileIterated(dict):
        def __iter__(self):
            for key in super().__iter__():  # the dict's own iterator, which a change under it stops
                engine.rescan()  # as Rescan's thread would, between two keys
                yield key

    engine._cache = RescannedWhileIterated({("lora", "earlier", 0, 0): object(), ("lora", "earlier", 0, 1): object()})
    adapter = engine.adapter("first", "lora")
    loaded = engine._cached(adapter, lambda: "loaded")
    assert loaded == "loaded" and list(engine._cache.values()) == ["loaded"]  # kept for the next render (keyed by its file)


def test_a_lora_file_cut_short_is_listed_with_what_is_wrong_and_what_to_do(adapters_dir, tmp_path):
    """Its status said "unreadable safetensors file (SafetensorError)": neither what was wrong nor what to do."""
    from finetune.adapter_scan import scan_adapters

    whole = (adapters_dir / "trained" / "pytorch_lora_weights.safetensors").read_bytes()
    (tmp_path / "copied").mkdir()
    (tmp_path / "copied" / "pytorch_lora_weights.safetensors").write_bytes(whole[: len(whole) // 2])
    refused = scan_adapters(tmp_path)["copied"].refused
    assert refused.startswith("unreadable safetensors file (Error while deserializing header: ")
    assert refused.endswith("; cut short?): copy it again, then Rescan")
