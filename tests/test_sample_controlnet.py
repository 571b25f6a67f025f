"""`finetune sample --controlnet`: the grid is conditioning | samples, the ControlNet really steers
(and exactly not at creation or at scale 0), run folders and unlocked decoders load, and half-given
options are one line before any model loads."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from controlnet_helpers import METADATA, write_controlnet_run
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image

from finetune.cli.main import main
from finetune.controlnet.folder import check_controlnet_fits
from finetune.errors import FinetuneError
from finetune.outputs.pipeline_io import save_model_folder
import finetune.sampling.inference as inference
from finetune.toyworld.world import Scene, draw, mask_image

torch.set_num_threads(1)
PROMPT = "a small red circle on a blue background, top left"


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("controlnets")
    return {kind: write_controlnet_run(tiny_model, root / kind, trained=kind == "trained") for kind in ("fresh", "trained")}


@pytest.fixture(scope="module")
def condition(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("condition") / "mask.png"
    mask_image(draw(Scene("square", "red", "blue", "large", "bottom right"), 64)[1]).save(path)
    return path


def sample(tiny_model, out: Path, *options: str) -> list[np.ndarray]:
    """Run `finetune sample` (2 images, 2 steps); return the two images as arrays."""
    argv = ["sample", "--base", str(tiny_model), "--prompt", PROMPT, "--num-images", "2", "--steps", "2", "--out", str(out), *options]
    assert main(argv) == 0
    return [np.asarray(Image.open(out / f"00000-prompt0_seed{k}.png")) for k in range(2)]


def test_grid_is_conditioning_then_samples_and_the_controlnet_steers(tiny_model, runs, condition, tmp_path):
    plain = sample(tiny_model, tmp_path / "plain")
    steered = sample(tiny_model, tmp_path / "steered", "--controlnet", str(runs["trained"] / "controlnet"), "--condition", str(condition))

    grid = np.asarray(Image.open(tmp_path / "steered" / "00000-grid.png"))
    assert grid.shape == (64, 160 + 3 * 64, 3)  # label | conditioning | 2 samples
    assert np.array_equal(grid[:, 160:224], np.asarray(Image.open(condition).convert("RGB")))
    assert np.array_equal(grid[:, 224:288], steered[0]) and np.array_equal(grid[:, 288:352], steered[1])
    assert sorted(p.name for p in (tmp_path / "steered").iterdir()) == ["00000-grid.png", "00000-prompt0_seed0.png", "00000-prompt0_seed1.png"]

    # The trained ControlNet changes the images; the same one at scale 0, or a fresh one (zero
    # convs), gives exactly the base model's images: same seeds, prompts and scheduler, nothing added.
    assert not np.array_equal(steered[0], plain[0])
    off = sample(tiny_model, tmp_path / "off", "--controlnet", str(runs["trained"]), "--condition", str(condition), "--conditioning-scale", "0")
    fresh = sample(tiny_model, tmp_path / "fresh", "--controlnet", str(runs["fresh"]), "--condition", str(condition))
    for images in (off, fresh):
        assert all(np.array_equal(a, b) for a, b in zip(images, plain))

    # The conditioning image matters, not only the ControlNet's presence.
    empty = tmp_path / "empty.png"
    Image.new("RGB", (64, 64)).save(empty)
    other = sample(tiny_model, tmp_path / "other", "--controlnet", str(runs["trained"]), "--condition", str(empty))
    assert not np.array_equal(other[0], steered[0])


def test_condition_is_resized_and_center_cropped_to_the_model_resolution(tiny_model, runs, tmp_path):
    wide = tmp_path / "wide.png"
    pixels = np.zeros((128, 256, 3), dtype=np.uint8)
    pixels[:, 40:216] = 255  # the centre square (64:192) is white; squeezing or a side crop would show black
    Image.fromarray(pixels).save(wide)
    sample(tiny_model, tmp_path / "out", "--controlnet", str(runs["trained"]), "--condition", str(wide))
    cell = np.asarray(Image.open(tmp_path / "out" / "00000-grid.png"))[:, 160:224]
    assert cell.shape == (64, 64, 3) and cell.min() == 255


def test_each_image_records_its_controlnet_as_the_webuis_controlnet_extension_does(tiny_model, runs, condition, tmp_path):
    """An image sampled with a ControlNet said nothing of it: its settings now end with the unit the webui's ControlNet
    extension writes (`ControlNet 0: "Module: none, Model: name [hash], Weight: ..."`), the ControlNet by its run's name and
    the webui's hash of its weights file (which the extension loads as it is), no path of this machine."""
    sample(tiny_model, tmp_path / "out", "--controlnet", str(runs["trained"]), "--condition", str(condition), "--conditioning-scale", "0.5")
    text = Image.open(tmp_path / "out" / "00000-prompt0_seed1.png").text["parameters"]
    settings, unit = text.splitlines()[-1].split(", ControlNet 0: ")
    assert settings.endswith(f"Seed: 1, Size: 64x64, Model: {tiny_model.name}") and str(tmp_path) not in text
    with open(runs["trained"] / "controlnet" / "diffusion_pytorch_model.safetensors", "rb") as weights:
        weights.seek(2**20)  # the webui's old model hash: sha256 of the 64 KiB from 1 MiB in
        webui_hash = hashlib.sha256(weights.read(2**16)).hexdigest()[:8]
    fields = dict(item.strip().split(": ") for item in json.loads(unit).split(","))  # as the extension parses a unit
    assert fields == {"Module": "none", "Model": f"trained [{webui_hash}]", "Weight": "0.5", "Resize Mode": "Crop and Resize",
                      "Guidance Start": "0.0", "Guidance End": "1.0", "Pixel Perfect": "False", "Control Mode": "Balanced"}
    assert unit.startswith('"Module: none, Model: trained [')  # quoted whole, as the webui quotes a setting holding ',' or ':'
    sample(tiny_model, tmp_path / "plain")
    assert "ControlNet" not in Image.open(tmp_path / "plain" / "00000-prompt0_seed0.png").text["parameters"]
    # A checkpoint's by its run and step, as its LoRA is named; a hub download by its repository's name.
    from finetune.sampling.sample_files import controlnet_name

    assert controlnet_name(tmp_path / "edges" / "checkpoints" / "checkpoint-200" / "controlnet") == "edges-step00000200"
    assert controlnet_name(tmp_path / "models--lllyasviel--sd-controlnet-canny" / "snapshots" / "abc123") == "sd-controlnet-canny"


def test_run_folder_with_an_unlocked_decoder_samples_with_its_unet(tiny_model, tmp_path):
    run = write_controlnet_run(tiny_model, tmp_path / "run", trained=True)
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.weight.add_(1.0)  # a decoder that trained
    save_model_folder(unet, run / "unet", METADATA)

    pipeline = inference.load_sampling_pipeline(str(tiny_model), controlnet=str(run))
    assert torch.equal(pipeline.unet.conv_out.weight, unet.conv_out.weight)
    saved = ControlNetModel.from_pretrained(run / "controlnet")
    assert all(torch.equal(a, b) for a, b in zip(pipeline.controlnet.parameters(), saved.parameters()))
    # The demo too: the ControlNet's columns sample with its UNet, the base column with the base's.
    from finetune.demo import engine as demo_engine

    used = []
    real_generate = demo_engine.generate
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo_engine, "generate", lambda pipe, *a, **k: used.append(pipe.unet.conv_out.weight.sum().item()) or real_generate(pipe, *a, **k))
        engine = demo_engine.DemoEngine(str(tiny_model), tmp_path)
        engine.render(demo_engine.Request(prompt="x", steps=1, controlnet="run/controlnet", conditioning_image=Image.new("RGB", (64, 64))))
    assert used == [engine.base.unet.conv_out.weight.sum().item(), unet.conv_out.weight.sum().item()]

    # On a fine-tuned model (a DreamBooth pipeline) it would replace that model's UNet: refused, in both.
    from finetune.models.tiny_model import make_tiny_model

    dreambooth = make_tiny_model(tmp_path / "db" / "pipeline", seed=1)
    (dreambooth / "finetune_metadata.json").write_text('{"finetune.method": "dreambooth"}')
    refused = r"brings its own UNet, which would replace the fine-tuned UNet of \S*db/pipeline: use it on the base model it was trained on"
    with pytest.raises(FinetuneError, match=refused):
        inference.load_sampling_pipeline(str(dreambooth), controlnet=str(run))
    with pytest.raises(FinetuneError, match=refused):
        engine.rescan()
        engine.render(demo_engine.Request(prompt="x", steps=1, model="db/pipeline", controlnet="run/controlnet", conditioning_image=Image.new("RGB", (64, 64))))

    # A unet/ folder from another run (other metadata) is not this ControlNet's decoder.
    save_model_folder(unet, run / "unet", {**METADATA, "finetune.steps": "7"})
    pipeline = inference.load_sampling_pipeline(str(tiny_model), controlnet=str(run / "controlnet"))
    assert not torch.equal(pipeline.unet.conv_out.weight, unet.conv_out.weight)


def test_an_unlocked_decoder_cut_short_is_one_line_in_sample_and_the_demo(tiny_model, tmp_path):
    """The UNet a run with controlnet.unlock_unet_decoder saved beside its ControlNet, cut short (a copy, or a run still
    writing): sample ended in diffusers' traceback where the demo said one line; both load it with one function now."""
    from finetune.demo import engine as demo_engine

    run = write_controlnet_run(tiny_model, tmp_path / "run", trained=True)
    save_model_folder(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet"), run / "unet", METADATA)
    weights = run / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    said = rf"^could not load the UNet {re.escape(str(run / 'unet'))} its ControlNet was trained with: "
    with pytest.raises(FinetuneError, match=said):
        inference.load_sampling_pipeline(str(tiny_model), controlnet=str(run))
    engine = demo_engine.DemoEngine(str(tiny_model), tmp_path)
    with pytest.raises(FinetuneError, match=said + r".*press Rescan once it is whole\)$"):
        engine.render(demo_engine.Request(prompt="x", steps=1, controlnet="run/controlnet", conditioning_image=Image.new("RGB", (64, 64))))


class TrainingCallback:  # an object besides tensors, as a training run's pickle may hold
    pass


def test_an_unlocked_decoder_of_pickle_weights_is_refused_by_the_demo_and_checked_by_sample(tiny_model, tmp_path):
    """The demo (which never unpickles: it loads folders users download) loaded the UNet beside a ControlNet from its
    .bin; sample reads it as it reads a --controlnet's .bin: only a file torch.load(weights_only=True) reads."""
    import shutil

    from finetune.demo import engine as demo_engine

    run = write_controlnet_run(tiny_model, tmp_path / "run", trained=True)
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.weight.add_(1.0)
    unet.save_pretrained(run / "unet", safe_serialization=False)
    shutil.copy(run / "controlnet" / "finetune_metadata.json", run / "unet")
    assert [file.name for file in (run / "unet").glob("diffusion_pytorch_model*")] == ["diffusion_pytorch_model.bin"]

    engine = demo_engine.DemoEngine(str(tiny_model), tmp_path)
    with pytest.raises(FinetuneError) as refused:
        engine.render(demo_engine.Request(prompt="x", steps=1, controlnet="run/controlnet", conditioning_image=Image.new("RGB", (64, 64))))
    said = str(refused.value)
    assert said.startswith(f"the UNet {run / 'unet'} its ControlNet was trained with holds pickle weights (diffusion_pytorch_model.bin), "
                           "which the demo does not load") and "convert that folder to safetensors" in said
    assert "\n" not in said and "press Rescan" not in said  # not a copy cut short

    pipeline = inference.load_sampling_pipeline(str(tiny_model), controlnet=str(run))  # tensors alone: sample reads them
    assert torch.equal(pipeline.unet.conv_out.weight, unet.conv_out.weight)
    torch.save({**unet.state_dict(), "callback": TrainingCallback()}, run / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(FinetuneError, match=rf"^the UNet {re.escape(str(run / 'unet'))} its ControlNet was trained with: diffusion_pytorch_model.bin "
                                            r"holds objects besides its weights \(test_sample_controlnet\.TrainingCallback\)"):
        inference.load_sampling_pipeline(str(tiny_model), controlnet=str(run))


def test_controlnet_of_another_architecture_is_one_line(tiny_model, tmp_path, capsys):
    controlnet = ControlNetModel.from_pretrained(write_controlnet_run(tiny_model, tmp_path / "run", trained=False) / "controlnet")
    other = ControlNetModel.from_config({**controlnet.config, "cross_attention_dim": controlnet.config.cross_attention_dim * 2})
    other.save_pretrained(tmp_path / "other")
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    code = main(["sample", "--base", str(tiny_model), "--controlnet", str(tmp_path / "other"), "--condition", str(tmp_path / "x.png"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit base model" in err and "cross_attention_dim" in err

    # The demo refuses it in the same line, naming it as its list does (one check: controlnet_folder.check_controlnet_fits).
    from finetune.demo import engine as demo_engine

    engine = demo_engine.DemoEngine(str(tiny_model), tmp_path)
    with pytest.raises(FinetuneError, match=r"^ControlNet 'other' does not fit base model .*: its cross_attention_dim is 64, the UNet's is 32$"):
        engine.render(demo_engine.Request(prompt="x", steps=1, controlnet="other", conditioning_image=Image.new("RGB", (64, 64))))


def test_a_controlnet_fits_a_unet_of_its_layout():
    unet = {"block_out_channels": [32, 64], "cross_attention_dim": 64, "in_channels": 4, "down_block_types": ["A", "B"], "layers_per_block": 2}
    check_controlnet_fits({**unet, "block_out_channels": (32, 64), "cross_attention_dim": [64], "conditioning_channels": 3}, unet, "ControlNet c", "b")
    check_controlnet_fits({"in_channels": 4}, unet, "ControlNet c", "b")  # a key one config lacks is not compared
    with pytest.raises(FinetuneError, match=r"^ControlNet c does not fit base model b: its layers_per_block is 1, the UNet's is 2$"):
        check_controlnet_fits({**unet, "layers_per_block": 1}, unet, "ControlNet c", "b")


@pytest.mark.parametrize(
    "case",
    ["no condition", "condition missing", "no config.json", "a pipeline", "a UNet", "controlnet missing", "condition without controlnet", "scale without controlnet"],
)
def test_half_given_control_options_are_one_line_before_any_model_loads(case, tiny_model, runs, condition, tmp_path, capsys, monkeypatch):
    empty_folder = tmp_path / "not-a-controlnet"
    empty_folder.mkdir()
    options, pattern = {
        "no condition": (["--controlnet", str(runs["fresh"])], r"needs a conditioning image: pass --condition IMAGE"),
        "condition missing": (["--controlnet", str(runs["fresh"]), "--condition", str(tmp_path / "nope.png")], r"conditioning image \S+nope\.png not found"),
        # What the folder is, as training's controlnet.pretrained says it (it was "has no config.json" for any).
        "no config.json": (["--controlnet", str(empty_folder), "--condition", str(condition)],
                           r"--controlnet \S+not-a-controlnet is a folder with no config\.json, not a ControlNet: --controlnet must be a diffusers ControlNet folder"),
        "a pipeline": (["--controlnet", str(tiny_model), "--condition", str(condition)],
                       r"--controlnet \S+ is a Stable Diffusion pipeline folder \(model_index\.json\) with no controlnet/ folder, not a ControlNet: "
                       r"--controlnet must be .* or a controlnet run's output folder; to sample with the pipeline itself, pass it as --base$"),
        "a UNet": (["--controlnet", str(tiny_model / "unet"), "--condition", str(condition)],
                   rf"holds a UNet2DConditionModel, not a ControlNet: .*; to sample with its pipeline, pass {re.escape(str(tiny_model))} as --base$"),
        "controlnet missing": (["--controlnet", str(tmp_path / "gone"), "--condition", str(condition)], r"ControlNet \S+gone not found"),
        "condition without controlnet": (["--condition", str(condition)], r"pass --controlnet PATH too"),
        "scale without controlnet": (["--conditioning-scale", "0.5"], r"pass --controlnet PATH too"),
    }[case]

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(inference, "load_base_model", no_model)
    assert main(["sample", "--base", str(tiny_model), "--prompt", "x", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(pattern, err), err


def test_a_conditioning_scale_over_the_webuis_weights_is_said_once_and_sampled(tiny_model, runs, condition, tmp_path, capsys):
    """--conditioning-scale 2.5 is recorded in each image's ControlNet unit, whose weight the webui's extension (a 0-2
    slider) will not set from PNG Info: one line says so, and the images are drawn at it all the same."""
    controlnet = ["--controlnet", str(runs["trained"]), "--condition", str(condition)]
    sample(tiny_model, tmp_path / "strong", *controlnet, "--conditioning-scale", "2.5")
    notes = [line for line in capsys.readouterr().out.splitlines() if "--conditioning-scale" in line]
    assert notes == ["note: --conditioning-scale 2.5 is over 2, the most the webui's ControlNet extension takes as a unit's weight: the images "
                     "record it (ControlNet 0: Weight), and its PNG Info will not set that weight from them (sampling goes on at it)"]  # fmt: skip
    assert "Weight: 2.5" in Image.open(tmp_path / "strong" / "00000-prompt0_seed0.png").text["parameters"]
    sample(tiny_model, tmp_path / "within", *controlnet, "--conditioning-scale", "2")
    assert "--conditioning-scale" not in capsys.readouterr().out
