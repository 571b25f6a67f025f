"""ControlNet, the model: a no-op at creation (whatever the conditioning), only the ControlNet trains
(or the unlocked decoder), the saved folder reproduces it in diffusers, mixed precision, resume, and
the recipe checks. Data: test_controlnet_data.py; control-use scores: test_control_use.py."""

import json
import shutil

import numpy as np
import pytest
import torch
from controlnet_helpers import Capture, controlnet_recipe, set_up, write_controlnet_run, zero_convs
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel
from PIL import Image

from finetune.checkpoints.run_files import CONTROLNET_DIR
from finetune.errors import FinetuneError
from finetune.methods import METHODS
from finetune.methods.controlnet import ControlNetMethod
from finetune.models.loading import load_base_model
from finetune.training.trainer import train
from numerics import bit_identical_on_cpu


def random_inputs(unet, seed=0, batch=2):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    conditioning = torch.rand(batch, 3, 64, 64, generator=generator)
    return latents, torch.tensor([10, 700][:batch]), text, conditioning


# ---------------------------------------------------------------------------------------------------
# The model


def test_registered_as_a_method():
    assert METHODS["controlnet"] is ControlNetMethod


@pytest.mark.parametrize("only_mid_control", [False, True])
def test_attached_controlnet_changes_nothing_at_creation(make_recipe, pairs_folder, only_mid_control):
    method = set_up(controlnet_recipe(make_recipe, pairs_folder, controlnet__only_mid_control=only_mid_control))
    unet, controlnet = method.base.unet, method.controlnet
    # A copy of the UNet's encoder, with zero convs on every output.
    copied = controlnet.down_blocks.state_dict()
    for name, tensor in unet.down_blocks.state_dict().items():
        assert torch.equal(copied[name], tensor), name
    assert all(not conv.any() for conv in zero_convs(controlnet).values())
    assert all(not p.requires_grad for p in unet.parameters())
    assert all(p.dtype == torch.float32 for p in controlnet.parameters())

    latents, timesteps, text, _ = random_inputs(unet)
    with torch.no_grad():
        alone = unet(latents, timesteps, text).sample
        for seed, scale in enumerate([0.0, 0.5, 1.0, 3.0, 100.0]):
            conditioning = random_inputs(unet, seed=seed)[3]
            batch = {"conditioning_pixel_values": conditioning, "conditioning_scale": scale}
            assert torch.equal(method.predict({"controlnet": controlnet}, latents, timesteps, text, batch), alone), scale


def test_training_changes_only_the_controlnet_and_the_saved_folder_reproduces_it(make_recipe, pairs_folder, monkeypatch):
    recipe = controlnet_recipe(
        make_recipe, pairs_folder, train__max_steps=3, optimizer__weight_decay=0.0,
        validation={"prompts": ["a red circle"], "num_inference_steps": 1, "images_per_prompt": 1, "at_start": False},
    )
    capture = Capture(monkeypatch)
    result = train(recipe)
    method, fresh = capture.method, load_base_model(recipe.model)
    trained = method.controlnet

    for name, conv in zero_convs(trained).items():
        assert conv.abs().sum() > 0, f"zero conv {name} did not learn"
    # The conditioning images reach it: the first conv of its conditioning embedding learns from their
    # pixels once the zero convs behind it have (step 3; no weight decay, so an all-zero input would
    # leave these weights exactly as created).
    created = set_up(recipe).controlnet.controlnet_cond_embedding.conv_in.weight
    assert not torch.equal(trained.controlnet_cond_embedding.conv_in.weight.cpu(), created)
    for part in ("unet", "vae", "text_encoder"):
        after_training = getattr(method.base, part).state_dict()
        for name, tensor in getattr(fresh, part).state_dict().items():
            assert torch.equal(after_training[name].cpu(), tensor), f"{part}.{name}"

    folder = result.output_dir / "controlnet"
    assert result.saved_files == [folder]
    assert json.loads((folder / "finetune_metadata.json").read_text())["finetune.method"] == "controlnet"
    loaded = ControlNetModel.from_pretrained(folder)
    latents, timesteps, text, conditioning = random_inputs(fresh.unet)
    with torch.no_grad():
        expected = trained(latents, timesteps, text, conditioning, return_dict=False)
        got = loaded(latents, timesteps, text, conditioning, return_dict=False)
    for a, b in zip([*expected[0], expected[1]], [*got[0], got[1]]):
        assert torch.equal(a, b)

    # diffusers' own pipeline takes it; the validation grid is conditioning | sample, one row per prompt.
    pipeline = StableDiffusionControlNetPipeline.from_pretrained(
        recipe.model.pretrained, controlnet=loaded, safety_checker=None, requires_safety_checker=False
    )
    image = pipeline("a red circle", image=Image.new("RGB", (64, 64)), num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)
    assert Image.open(result.sample_grids[-1]).size == (160 + 2 * 64, 64)

    # controlnet.pretrained continues from the saved folder.
    resumed = set_up(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(folder)))
    continued = resumed.controlnet.state_dict()
    for name, tensor in trained.state_dict().items():
        assert torch.equal(continued[name], tensor), name


def test_a_run_from_a_pretrained_controlnet_says_which_and_its_outputs_record_it(make_recipe, pairs_folder, tiny_model, tmp_path):
    """As a lora.init_from start is said and recorded: the steps an output records are its own run's, from those weights."""
    from controlnet_helpers import write_controlnet_run

    from finetune.outputs.metadata import started_from

    run = write_controlnet_run(tiny_model, tmp_path / "edges", trained=False)
    recorded = {"finetune.method": "controlnet", "finetune.steps": "7", "finetune.conditioning": '{"kind": "canny", "low": 20.0, "high": 40.0, "sigma": 1.0}'}
    (run / "controlnet" / "finetune_metadata.json").write_text(json.dumps(recorded))
    method = set_up(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(run)))
    assert method.start_lines[0] == (f"starting from the ControlNet {run} (controlnet.pretrained): trained 7 steps, on canny (low 20, high 40, sigma 1) "
                                     "conditioning images, no prediction type recorded, taken to be the base's (epsilon)")  # fmt: skip
    assert method.start_lines[1].startswith(f"the data folder {pairs_folder} records no conditioning kind")  # test_continued_controlnet_conditioning

    assert method.start_metadata() == {"finetune.controlnet_pretrained": "edges"}
    fresh = ControlNetMethod(controlnet_recipe(make_recipe, pairs_folder))
    fresh.check_data()
    assert fresh.start_metadata() == {}  # made from the UNet: nothing to record
    # A local folder by its name only (not the user's folders), the run's for its controlnet/; a hub id whole.
    assert [started_from(p) for p in (str(run), str(run / "controlnet"), "lllyasviel/sd-controlnet-canny")] == ["edges", "edges", "lllyasviel/sd-controlnet-canny"]


def test_a_run_from_a_checkpoint_records_which_run_the_checkpoint_is_of(make_recipe, pairs_folder, tiny_model, tmp_path):
    """It recorded "checkpoint-500", which every run has: now the run's name and the checkpoint, as found under output_dir."""
    from controlnet_helpers import write_controlnet_run

    run = write_controlnet_run(tiny_model, tmp_path / "edges", trained=False)
    checkpoint = run / "checkpoints" / "checkpoint-500"
    shutil.copytree(run / CONTROLNET_DIR, checkpoint / CONTROLNET_DIR)
    for given in (checkpoint, checkpoint / CONTROLNET_DIR):
        method = ControlNetMethod(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(given)))
        method.check_data()
        assert method.start_metadata() == {"finetune.controlnet_pretrained": "edges/checkpoints/checkpoint-500"}


def test_a_folder_that_holds_no_controlnet_says_what_it_is_before_any_model_loads(make_recipe, pairs_folder, tiny_model, tmp_path):
    """controlnet.pretrained of a folder that is there said 'not found': now what it is, and what to give instead."""
    def refusal(folder):
        with pytest.raises(FinetuneError) as refused:
            ControlNetMethod(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(folder))).check_data()
        return str(refused.value).replace(str(folder), "FOLDER")

    expected = ("controlnet.pretrained must be a diffusers ControlNet folder (a ControlNetModel's config.json beside its weights, as "
                "ControlNetModel.from_pretrained reads it), a controlnet run's output folder, a hub id, or null to start from the UNet")
    from_unet = "to make a new ControlNet of a pipeline's UNet, set controlnet.pretrained: null (it copies model.pretrained's UNet)"
    assert refusal(tiny_model) == f"controlnet.pretrained FOLDER is a Stable Diffusion pipeline folder (model_index.json) with no controlnet/ folder, not a ControlNet: {expected}; {from_unet}"
    assert refusal(tiny_model / "unet").endswith(f"holds a UNet2DConditionModel, not a ControlNet: pass a ControlNetModel folder (its config.json says _class_name ControlNetModel); {from_unet}")
    assert refusal(pairs_folder) == f"controlnet.pretrained FOLDER is a folder of images (0000.png, ...), not a ControlNet: {expected}"
    lora_run = tmp_path / "lora-run"
    lora_run.mkdir()
    (lora_run / "recipe.yaml").write_text("method: lora\n")
    assert refusal(lora_run) == f"controlnet.pretrained FOLDER is a lora run's output folder (its recipe.yaml) with no controlnet/ folder, not a ControlNet: {expected}"
    stopped = tmp_path / "stopped"  # a controlnet run that has saved checkpoints, not yet its output
    (stopped / "checkpoints" / "checkpoint-2" / "controlnet").mkdir(parents=True)
    (stopped / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (stopped / "checkpoints" / "checkpoint-2" / "controlnet" / "config.json").write_text("{}")
    (stopped / "recipe.yaml").write_text("method: controlnet\n")
    assert refusal(stopped).endswith(f"is a controlnet run's output folder with no controlnet/ folder yet, not a ControlNet: {expected}; "
                                     "its checkpoints hold one, e.g. FOLDER/checkpoints/checkpoint-2 (the latest)")
    assert refusal(stopped / "checkpoints").endswith("is a run's checkpoints folder, not a ControlNet: "
                                                     f"{expected}; pick a checkpoint (checkpoint-N, of step N), e.g. FOLDER/checkpoint-2, the latest")
    assert refusal(tmp_path / "nowhere") == f"ControlNet FOLDER not found: {expected}"


def test_unlocked_decoder_and_mid_only_control(make_recipe, pairs_folder, monkeypatch, capsys, tmp_path):
    recipe = controlnet_recipe(
        make_recipe, pairs_folder, train__max_steps=2,
        controlnet={"unlock_unet_decoder": True, "only_mid_control": True},
    )
    capture = Capture(monkeypatch)
    result = train(recipe)
    method, fresh = capture.method, load_base_model(recipe.model)
    unet = method.base.unet

    # Decoder trained, encoder untouched.
    trained_state, fresh_state = unet.state_dict(), fresh.unet.state_dict()
    changed = {name.split(".")[0] for name in fresh_state if not torch.equal(trained_state[name].cpu(), fresh_state[name])}
    assert changed == {"up_blocks", "conv_norm_out", "conv_out"}
    # Mid-only: the down zero convs never left zero; the mid one did.
    convs = zero_convs(method.controlnet)
    assert all(not convs[f"down.{i}"].any() for i in range(len(method.controlnet.controlnet_down_blocks)))
    assert convs["mid"].any()

    assert result.saved_files == [result.output_dir / "controlnet", result.output_dir / "unet"]
    saved_weights = UNet2DConditionModel.from_pretrained(result.output_dir / "unet").state_dict()
    for name, tensor in trained_state.items():
        assert torch.equal(saved_weights[name], tensor), name
    # The saved ControlNet adds nothing to the down blocks in diffusers either: mid-only anywhere.
    loaded = ControlNetModel.from_pretrained(result.output_dir / "controlnet")
    latents, timesteps, text, conditioning = random_inputs(unet)
    with torch.no_grad():
        down, mid = loaded(latents, timesteps, text, conditioning, return_dict=False)
    assert all(not residual.any() for residual in down) and mid.any()

    # finetune sample takes the run's UNet with its ControlNet, and says so.
    from finetune.cli.main import main

    condition = sorted((pairs_folder / "conditioning").glob("*.png"))[0]
    arguments = ["--condition", str(condition), "--prompt", "x", "--num-images", "1", "--steps", "1", "--out", str(tmp_path / "s")]
    assert main(["sample", "--controlnet", str(result.output_dir), *arguments]) == 0
    assert f"trained with controlnet.unlock_unet_decoder: sampling with the UNet its run saved ({result.output_dir / 'unet'})" in capsys.readouterr().out


def test_a_controlnet_trained_without_mid_only_control_continues_with_it_as_training_reads_it(make_recipe, pairs_folder, tiny_model, tmp_path):
    """controlnet.pretrained trained with down residuals (here random zero convs): its down convs are zeroed and frozen
    after it loads, so the validation samples, the saved folder and `finetune sample` (this module, in diffusers' pipeline)
    add no down residual, as the training loss does (`predict` replaces them by zeros)."""
    run = write_controlnet_run(tiny_model, tmp_path / "earlier", trained=True)
    method = set_up(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(run), controlnet__only_mid_control=True))
    latents, timesteps, text, conditioning = random_inputs(method.base.unet)
    with torch.no_grad():
        down, mid = method.controlnet(latents, timesteps, text, conditioning, return_dict=False)
    assert all(not residual.any() for residual in down) and mid.any()
    assert not any(p.requires_grad for p in method.controlnet.controlnet_down_blocks.parameters())


def test_mixed_precision_trains_and_samples(make_recipe, pairs_folder, monkeypatch):
    """Frozen parts in bf16, the ControlNet in fp32: its residuals (autocast's bf16, not accelerate's fp32 outputs, which
    the UNet's bf16 norm weights refuse on the CPU) meet bf16 features, in training and validation."""
    recipe = controlnet_recipe(
        make_recipe, pairs_folder, train__max_steps=1, train__mixed_precision="bf16",
        validation={"prompts": ["a red circle"], "num_inference_steps": 1, "images_per_prompt": 1, "at_start": False},
    )
    capture = Capture(monkeypatch)
    result = train(recipe)
    assert capture.method.base.unet.dtype == torch.bfloat16
    assert {p.dtype for p in capture.method.controlnet.parameters()} == {torch.float32}
    assert len(result.sample_grids) == 1 and np.isfinite(result.losses).all()


@bit_identical_on_cpu
def test_resumed_run_matches_an_uninterrupted_one(make_recipe, pairs_folder, tmp_path, monkeypatch):
    def run(output_dir, max_steps, resume=None):
        recipe = controlnet_recipe(
            make_recipe, pairs_folder, output_dir=str(output_dir), train__max_steps=max_steps,
            checkpoint__every_n_steps=2, data__crop="random", data__random_flip=True,
        )
        capture = Capture(monkeypatch)
        train(recipe, resume=resume)
        return capture.method.controlnet.state_dict()

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "stopped", 2)
    resumed = run(tmp_path / "stopped", 4, resume="latest")
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name


def test_recipe_checks(make_recipe, pairs_folder, tmp_path):
    with pytest.raises(FinetuneError, match="controlnet.empty_prompt_share; set data.caption_dropout to 0"):
        controlnet_recipe(make_recipe, pairs_folder, data__caption_dropout=0.1)
    with pytest.raises(FinetuneError, match="has 2 images for 3 validation.prompts"):
        controlnet_recipe(make_recipe, pairs_folder, controlnet__validation_conditions=["a.png", "b.png"], validation__prompts=["x", "y", "z"])
    with pytest.raises(FinetuneError, match="controlnet.empty_prompt_share': must be between 0 and 1"):
        controlnet_recipe(make_recipe, pairs_folder, controlnet__empty_prompt_share=1.5)
    with pytest.raises(FinetuneError, match=r"ControlNet \S+nowhere not found"):
        ControlNetMethod(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(tmp_path / "nowhere"))).check_data()
    with pytest.raises(FinetuneError, match=r"validation conditioning image \S+missing.png not found"):
        ControlNetMethod(
            controlnet_recipe(make_recipe, pairs_folder, controlnet__validation_conditions=[str(tmp_path / "missing.png")], validation__prompts=["x"])
        ).check_data()
