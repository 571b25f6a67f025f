"""Found by walking through the demo as a user: train, start the demo on those adapters, compare with `finetune sample`."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.demo.engine import DemoEngine, Request
from finetune.sampling.inference import SampleRequest, sample_to_folder

PROMPT = "a large red striped circle on a blue background, center"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_a_weak_lora_in_bf16_renders_as_finetune_sample_renders_it(tiny_model, adapters_dir, tmp_path):
    """The demo merged LoRAs into the weights: in bf16 a weak LoRA's update is below half a weight's last bit and was
    rounded away (strength 0.1 gave the base's image, bit for bit), while `finetune sample` (peft's layers) shows it."""
    engine = DemoEngine(str(tiny_model), adapters_dir, device="cpu", precision="bf16")
    weights = {name: tensor.clone() for name, tensor in engine.base.unet.state_dict().items()}
    request = Request(prompt=PROMPT, seed=4, steps=3, guidance=5.0, size=64, loras=[("trained", 1.0)], strengths=[0.0, 0.1])
    images, labels, _, _ = engine.render(request)
    base, at_zero, weak = (pixels(image) for image in images[0])
    assert labels == ["base", "trained x0", "trained x0.1"]
    sample_to_folder(SampleRequest(str(tiny_model), str(adapters_dir / "trained"), 0.1, [PROMPT], None, 1, 4, 3, 5.0, 64, tmp_path,
                                   device="cpu", precision="bf16"))  # fmt: skip
    sampled = pixels(Image.open(tmp_path / "00000-prompt0_seed4.png"))
    assert np.array_equal(at_zero, base)
    assert not np.array_equal(weak, base)
    assert np.abs(weak - sampled).max() <= 1, np.abs(weak - sampled).max()  # merged in bf16: 6 levels off
    assert all(torch.equal(tensor, weights[name]) for name, tensor in engine.base.unet.state_dict().items())


def test_values_gradio_refuses_through_the_api_name_the_input_and_print_no_traceback(demo, capfd):
    """gradio's own checks (a name not in a list, a number past a slider's range) printed a traceback in the demo's
    terminal for every such request, and said "Value 0 is less than minimum value 1." of no input in particular. The
    adapter lists are checked by the engine: gradio checks a copy of them once Rescan (or a page load) updates them."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(demo.url, verbose=False)
    client.predict(api_name="/rescan")  # the lists of this session are gradio's copies from here on
    capfd.readouterr()
    for odd, named in ((dict(steps=0), "steps: Value 0 is less than minimum value 1"), (dict(lora_2="nope"), "unknown lora 'nope': pick one from the list"),
                       (dict(conditioning_kind="bogus"), "use the upload as is"), (dict(seed=-1), "seed: Value -1 is less than"),
                       (dict(model="trained"), "unknown pipeline 'trained'"), (dict(lora_1=["trained"]), "LoRA 1 must be a name from its list"),
                       (dict(sampler="heun"), "sampler (as the webui names them): Value: heun is not in the list of choices: ['ddim'")):  # fmt: skip
        with pytest.raises(AppError) as refused:
            client.predict(api_name="/generate", **{"prompt": PROMPT, "steps": 2, "conditioning_image": None, **odd})
        assert str(refused.value).strip("'\"").startswith(named), refused.value
    assert "Traceback" not in capfd.readouterr().err


def test_a_checkbox_sent_text_through_the_api_is_refused_naming_it(demo):
    """include_base="false" read as ticked (any text is true): the base column came anyway."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(demo.url, verbose=False)
    for name, label in (("include_base", "add a column with the base model alone"), ("separate", "each LoRA in its own columns")):
        with pytest.raises(AppError, match=f"^'{label}.*' must be true or false, got 'false'$"):
            client.predict(api_name="/generate", **{"prompt": PROMPT, "steps": 1, "conditioning_image": None, "lora_1": "trained", name: "false"})
    _, gallery, _ = client.predict(api_name="/generate", prompt=PROMPT, steps=1, conditioning_image=None, lora_1="trained", include_base=False)
    assert [item["caption"] for item in gallery] == ["trained x1, seed 0"]


def test_long_column_labels_stay_within_their_columns():
    """Three LoRAs on a pipeline ('quickstart+quickstart, step 30+db x0.25') ran into the next column's label, hiding both
    strengths: a label is written in lines that fit its column."""
    from PIL import ImageFont

    from finetune.demo.page import MIN_CELL, header_lines, labelled_grid

    labels = ["base", "quickstart+quickstart, step 30+db x0.25", "quickstart+quickstart, step 30+db x0.5", "a_very_long_run_name_with_no_plus_at_all x1"]
    grid = np.asarray(labelled_grid([[Image.new("RGB", (64, 64), "gray")] * 4], labels, [0]))
    header = grid[: grid.shape[0] - MIN_CELL]
    for boundary in (64 + c * MIN_CELL for c in range(1, 4)):  # a 64 px margin for the seeds, then the columns
        assert (header[:, boundary - 2 : boundary + 2] == 255).all(), f"a label crosses into the column at x={boundary}"
    font = ImageFont.load_default(size=14)
    for label in labels:
        lines = header_lines(label, MIN_CELL - 8, font)
        assert "".join(lines).replace(" ", "") == label.replace(" ", "") and all(font.getlength(line) <= MIN_CELL - 8 for line in lines)


def test_rescan_clears_a_selection_whose_adapter_is_gone(demo, adapters_dir):
    """A checkpoint rotated away (or a run deleted) stayed selected after Rescan, and Generate then refused it."""
    import shutil

    from gradio_client import Client

    client = Client(demo.url, verbose=False)
    shutil.copy(adapters_dir / "trained" / "pytorch_lora_weights.safetensors", adapters_dir / "soon-gone.safetensors")
    try:
        client.predict(api_name="/rescan")
        (adapters_dir / "soon-gone.safetensors").unlink()
        _, _, *lists = client.predict("db", "edges", "soon-gone", "trained", "(none)", api_name="/rescan")
        assert [update["value"] for update in lists] == ["db", "edges", "(none)", "trained", "(none)"]
        assert ["soon-gone", "soon-gone"] not in lists[2]["choices"]
    finally:
        (adapters_dir / "soon-gone.safetensors").unlink(missing_ok=True)
        demo.engine.rescan()


def test_a_count_sent_as_a_fraction_through_the_api_is_refused_naming_it(demo):
    """steps=2.5 rendered 2 steps (and rows=1.5 one row, seed=1.5 seed 2) without a word."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(demo.url, verbose=False)
    for name, value, said in (("steps", 2.5, "steps must be a whole number from 1 to 100, got 2.5"), ("seed", 1.5, "seed must be a whole number"),
                              ("rows", 1.5, "rows (seeds seed, seed+1, ...) must be a whole number from 1 to 4")):  # fmt: skip
        with pytest.raises(AppError, match=f"^{re.escape(said)}"):
            client.predict(api_name="/generate", **{"prompt": PROMPT, "steps": 1, "conditioning_image": None, name: value})
    assert client.predict(api_name="/generate", prompt=PROMPT, steps=2.0, guidance=2.5, conditioning_image=None)[2].startswith("1 column x 1 row in")


def test_a_conditioning_image_sent_as_text_through_the_api_is_one_line(demo, capfd):
    """Text or a number for the image failed gradio's own validation with a traceback in the demo's terminal and the
    generic 'The upstream Gradio app has raised an exception'."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(demo.url, verbose=False)
    capfd.readouterr()
    for odd in ("just text", 5):
        with pytest.raises(AppError, match=rf"^conditioning image, or a photo to make one from must be an image file, got '{odd}'$"):
            client.predict(api_name="/generate", prompt=PROMPT, steps=1, controlnet="edges/controlnet", conditioning_image=odd)
    assert "Traceback" not in capfd.readouterr().err


def test_rescan_keeps_a_selection_by_a_runs_folder_under_the_name_it_is_listed_by(demo):
    """A model or ControlNet picked by its run's folder (db/pipeline, edges/controlnet: the names the demo listed before, and
    still takes) went back to the base and none on Rescan; it stays picked, by the name listed now. Such a name in a list
    of another kind (a pipeline's folder as a LoRA) still goes back to none."""
    from gradio_client import Client

    client = Client(demo.url, verbose=False)
    _, _, *lists = client.predict("db/pipeline", "edges/controlnet", "db/pipeline", "trained", "(none)", api_name="/rescan")
    assert [update["value"] for update in lists] == ["db", "edges", "(none)", "trained", "(none)"]
