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
