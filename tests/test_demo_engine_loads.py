"""The demo's engine without a page: what its summary says of a request, and what it holds in memory as it loads models."""

from __future__ import annotations

import pytest

from finetune.demo_engine import DemoEngine, Request


@pytest.fixture
def engine(tiny_model, tmp_path):
    (tmp_path / "adapters").mkdir()
    return DemoEngine(str(tiny_model), tmp_path / "adapters")


def test_a_negative_prompt_at_guidance_1_is_said_to_change_nothing(engine):
    """sample said so (its notes); the demo, whose guidance slider goes down to 0, rendered the same image with and
    without the negative prompt and said nothing."""
    _, _, _, summary = engine.render(Request(prompt="a red circle", negative_prompt="blurry", guidance=1.0, steps=1))
    assert "note: negative prompts act through classifier-free guidance, which is off at guidance 1 (1 or below)" in summary
    assert "raise the guidance above 1 to use them" in summary
    _, _, _, summary = engine.render(Request(prompt="a red circle", negative_prompt="blurry", guidance=5.0, steps=1))
    assert "note" not in summary
