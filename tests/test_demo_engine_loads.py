"""The demo's engine without a page: what its summary says of a request, and what it holds in memory as it loads models."""

from __future__ import annotations

import weakref

import pytest

from finetune.demo.engine import DemoEngine, Request
import finetune.demo.engine as demo_engine
from finetune.models.tiny_model import make_tiny_model


@pytest.fixture
def engine(tiny_model, tmp_path):
    """The tiny model as base, and two "DreamBooth" pipelines of its architecture to pick as the model."""
    for name, seed in (("first", 1), ("second", 2)):
        make_tiny_model(tmp_path / "adapters" / name / "pipeline", seed=seed)
    return DemoEngine(str(tiny_model), tmp_path / "adapters")


def test_a_negative_prompt_at_guidance_1_is_said_to_change_nothing(engine):
    """sample said so (its notes); the demo, whose guidance slider goes down to 0, rendered the same image with and
    without the negative prompt and said nothing."""
    _, _, _, summary = engine.render(Request(prompt="a red circle", negative_prompt="blurry", guidance=1.0, steps=1))
    assert "note: negative prompts act through classifier-free guidance, which is off at guidance 1 (1 or below)" in summary
    assert "raise the guidance above 1 to use them" in summary
    _, _, _, summary = engine.render(Request(prompt="a red circle", negative_prompt="blurry", guidance=5.0, steps=1))
    assert "note" not in summary


def test_a_pipeline_picked_after_another_loads_once_the_other_is_let_go(engine, monkeypatch):
    """One pipeline is kept (CACHE_SIZE), but the one kept was let go only after the next had loaded: switching held two
    whole models in memory at once."""
    engine.render(Request(prompt="a red circle", steps=1, model="first/pipeline", include_base=False))
    first = weakref.ref(engine.model("first/pipeline").unet)
    load = demo_engine.load_base_model
    alive_at_load = []

    def loading(config):
        alive_at_load.append(first() is not None)
        return load(config)

    monkeypatch.setattr(demo_engine, "load_base_model", loading)
    engine.render(Request(prompt="a red circle", steps=1, model="second/pipeline", include_base=False))
    assert alive_at_load == [False]


def test_a_prompt_line_with_sample_options_is_said_to_be_read_as_words(engine):
    """A validation or sample prompt pasted into the demo, "a red circle --n blurry --d 7", drew another image than
    validation's with no word: the demo reads no options, and its text encoder read them as words."""
    _, _, _, summary = engine.render(Request(prompt="a red circle --n blurry, dark --d 7", steps=1))
    assert ("note: '--n blurry, dark' is an option of validation's and sample's prompts, which is not read here: it is encoded as "
            "words; set the negative prompt, seed, guidance, steps and sampler in their own fields") in summary  # fmt: skip
    _, _, _, summary = engine.render(Request(prompt="a red circle -- on a mat", negative_prompt="x --S 3", steps=1))
    assert "'--S 3' is an option" in summary and "'-- on" not in summary


def test_a_controlnet_cut_short_is_one_line(engine, tiny_model, tmp_path):
    """A ControlNet whose weights were cut short after the scan (a copy, or a run still writing) raised OSError, which the
    page shows as a bare "Error" and a traceback in the demo's terminal."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from PIL import Image

    from finetune.errors import FinetuneError
    from finetune.outputs.pipeline_io import save_model_folder

    folder = tmp_path / "adapters" / "edges" / "controlnet"
    save_model_folder(ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")), folder, {})
    engine.rescan()
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(FinetuneError, match=f"^could not load ControlNet {folder}: .*press Rescan once it is whole"):
        engine.render(Request(prompt="a red circle", steps=1, controlnet="edges/controlnet", conditioning_image=Image.new("RGB", (64, 64))))
