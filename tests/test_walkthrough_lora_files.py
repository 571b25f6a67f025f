"""LoRA files other tools write and read: the names ComfyUI and diffusers look for, and the names they use."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_kohya import Settings, UNET_TARGETS, assert_close, load_pipeline, outputs, randomise_lora

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.config.methods import TEXT_ENCODER_TARGETS
from finetune.demo.adapter_scan import scan_adapters
from finetune.formats.kohya import LoRA, LoRALayer, load_lora, module_key, save_lora_file
from finetune.formats.lora_export import export_lora
from finetune.formats.single_file_export import UNET_ROOT, to_original_unet
from finetune.methods.lora import add_lora, save_lora
from finetune.models.tiny_model import make_tiny_model
from finetune.sampling.inference import load_sampling_pipeline

CLIP_PROJECTIONS = [f"self_attn.{name}" for name in TEXT_ENCODER_TARGETS]


def trained_lora(tiny_model, folder):
    """A LoRA of the UNet and the text encoder saved as training saves it; and the outputs of the live model."""
    pipeline = load_pipeline(tiny_model)
    add_lora(pipeline.unet, UNET_TARGETS, torch.float32, Settings)
    add_lora(pipeline.text_encoder, TEXT_ENCODER_TARGETS, torch.float32, Settings)
    randomise_lora(pipeline.unet, 1), randomise_lora(pipeline.text_encoder, 2)
    pipeline.unet.eval(), pipeline.text_encoder.eval()
    path = save_lora({"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}, folder / LORA_WEIGHTS_NAME, {})
    return path, outputs(pipeline)


def diffusers_outputs(tiny_model, path):
    pipeline = load_pipeline(tiny_model)
    pipeline.load_lora_weights(str(path.parent), weight_name=path.name)
    return outputs(pipeline)


def test_text_encoder_keys_are_named_under_text_model_as_comfyui_maps_them_and_load_in_diffusers_alike(tiny_model, tmp_path):
    """They were `text_encoder.encoder.layers...` (transformers 5's CLIPTextModel paths, as diffusers 0.42 itself
    writes them with it): ComfyUI maps only `text_encoder.text_model.encoder.layers.N.<proj>`, so it dropped the
    text encoder's LoRA ('lora key not loaded'), as diffusers with transformers 4 did."""
    (tmp_path / "run").mkdir()
    trained, expected = trained_lora(tiny_model, tmp_path / "run")
    exported = save_lora_file(load_lora(trained), tmp_path / "export" / LORA_WEIGHTS_NAME, "diffusers")
    comfyui_names = {f"text_encoder.text_model.encoder.layers.{n}.{projection}" for n in range(2) for projection in CLIP_PROJECTIONS}
    for path in (trained, exported):
        tensors = load_file(path)
        clip_modules = {key.split(".lora_linear_layer.")[0] for key in tensors if key.startswith("text_encoder.")}
        assert clip_modules == comfyui_names
        assert all(f"{module}.lora_linear_layer.{ab}.weight" in tensors for module in comfyui_names for ab in ("down", "up"))
        assert_close(diffusers_outputs(tiny_model, path), expected)


def test_a_file_written_before_without_text_model_still_loads_alike(tiny_model, tmp_path):
    (tmp_path / "run").mkdir()
    trained, expected = trained_lora(tiny_model, tmp_path / "run")
    with safe_open(str(trained), "pt") as f:
        metadata = f.metadata()
    older = {key.replace("text_encoder.text_model.", "text_encoder."): value for key, value in load_file(trained).items()}
    save_file(older, str(tmp_path / "older.safetensors"), metadata)
    assert load_lora(tmp_path / "older.safetensors").layers.keys() == load_lora(trained).layers.keys()
    exported = save_lora_file(load_lora(tmp_path / "older.safetensors"), tmp_path / "export" / LORA_WEIGHTS_NAME, "diffusers")
    assert load_file(exported).keys() == load_file(trained).keys()
    assert_close(diffusers_outputs(tiny_model, exported), expected)


# --- the UNet named by the original layout's blocks ----------------------------------------------

# Every kind of layer a LoRA or LoCon adapts, so each rule of the original numbering is used.
UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj",
               "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "conv_in", "conv_out", "time_embedding.linear_1")  # fmt: skip


@pytest.fixture(scope="module")
def medium_base(tmp_path_factory):
    """A UNet of SD1.5's block pattern (4 blocks of 2 layers), small."""
    return make_tiny_model(tmp_path_factory.mktemp("medium") / "model", preset="medium", seed=0)


def random_lora(unet, text_encoder) -> LoRA:
    generator = torch.Generator().manual_seed(3)
    layers = {}
    for part, model in (("unet", unet), ("text_encoder", text_encoder)):
        for name, module in model.named_modules():
            if (name.endswith(UNET_LAYERS) if part == "unet" else name.endswith(tuple(CLIP_PROJECTIONS))):
                weight = module.weight
                kernel = tuple(weight.shape[2:])
                down = torch.randn(4, weight.shape[1], *kernel, generator=generator) * 0.2
                up = torch.randn(weight.shape[0], 4, *((1, 1) if kernel else ()), generator=generator) * 0.2
                layers[f"{part}.{name}"] = LoRALayer(down, up, 2.0)
    return LoRA(layers)


def original_paths(kohya_file, folder) -> dict[str, str]:
    """Its UNet layers' kohya names -> their paths in the original layout, as export-checkpoint names the UNet's
    modules (names diffusers' from_single_file reads back exactly: tests/test_single_file.py)."""
    paths = {}
    for key, tensor in load_file(kohya_file).items():
        name = key.split(".")[0]
        if name.startswith("lora_unet_"):
            [original] = to_original_unet({module_key(name).removeprefix("unet.") + ".weight": tensor}, folder)
            paths[name] = original.removeprefix(UNET_ROOT).removesuffix(".weight")
    return paths


def in_original_layout(kohya_file, folder):
    """The same file with its UNet layers named by their original paths."""
    paths = original_paths(kohya_file, folder)
    renamed = {}
    for key, tensor in load_file(kohya_file).items():
        name, suffix = key.split(".", 1)
        renamed[f"lora_unet_{paths[name].replace('.', '_')}.{suffix}" if name in paths else key] = tensor
    path = folder / "original-layout.safetensors"
    save_file(renamed, str(path), {"ss_network_module": "networks.lora"})
    return path


def unet_prediction(pipeline) -> torch.Tensor:
    ids = torch.arange(2, 20).reshape(2, 9)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return pipeline.unet(latents, torch.tensor([10, 700]), pipeline.text_encoder(ids)[0]).sample


def test_a_lora_naming_the_unet_by_the_original_blocks_loads_as_its_diffusers_named_twin(medium_base, tmp_path):
    """It was refused as 'naming the UNet's layers by the original layout's blocks'; sample, merge, eval, export,
    the demo and lora.init_from all read LoRAs through load_lora."""
    base = load_pipeline(medium_base)
    kohya = save_lora_file(random_lora(base.unet, base.text_encoder), tmp_path / "diffusers-names.safetensors", "kohya")
    original = in_original_layout(kohya, tmp_path)
    names = {key.split(".")[0] for key in load_file(original)}
    assert {"lora_unet_input_blocks_1_1_proj_in", "lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_4_0_skip_connection",
            "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k", "lora_unet_middle_block_2_emb_layers_1",
            "lora_unet_output_blocks_2_1_conv", "lora_unet_output_blocks_5_2_conv", "lora_unet_output_blocks_11_1_proj_out",
            "lora_unet_input_blocks_0_0", "lora_unet_out_2", "lora_unet_time_embed_0"} <= names  # fmt: skip
    assert not any(name.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")) for name in names)

    ours, twin = load_lora(original), load_lora(kohya)
    assert ours.layers.keys() == twin.layers.keys()
    assert all(torch.equal(ours.layers[key].delta(), twin.layers[key].delta()) for key in twin.layers)

    # sample's way: the UNet's prediction with the LoRA equals the twin's, and differs from the base's
    predictions = [unet_prediction(load_sampling_pipeline(str(medium_base), str(path))) for path in (original, kohya)]
    assert torch.allclose(predictions[0], predictions[1], atol=1e-5)
    assert not torch.allclose(predictions[0], unet_prediction(base), atol=1e-3)
    exported, *_ = export_lora(original, tmp_path / "export", "kohya")
    assert load_file(exported).keys() == load_file(kohya).keys()
    assert scan_adapters(tmp_path)["original-layout"].refused is None


def test_the_original_block_names_mean_the_layers_diffusers_single_file_conversion_reads_them_as(medium_base, tmp_path):
    """diffusers' convert_ldm_unet_checkpoint (how from_single_file reads an original-layout UNet) as the reference:
    each layer's update, stored under its original name, lands where our reading of the LoRA puts it. (diffusers
    0.42's load_lora_weights cannot load such a file at all: its target modules come out as `7.1.transformer_blocks...`.)"""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    base = load_pipeline(medium_base)
    kohya = save_lora_file(random_lora(base.unet, base.text_encoder), tmp_path / "diffusers-names.safetensors", "kohya")
    original_file = in_original_layout(kohya, tmp_path)
    tensors, checkpoint = load_file(original_file), {}
    for original in original_paths(kohya, tmp_path).values():  # each layer's update from the file, under its original path
        name = "lora_unet_" + original.replace(".", "_")
        layer = LoRALayer(tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"], tensors[f"{name}.alpha"].item())
        checkpoint[f"{UNET_ROOT}{original}.weight"], checkpoint[f"{UNET_ROOT}{original}.bias"] = layer.delta(), torch.zeros(layer.weight_shape[0])
    theirs = {key.removesuffix(".weight"): value for key, value in convert_ldm_unet_checkpoint(checkpoint, dict(base.unet.config)).items() if key.endswith(".weight")}
    ours = {key.removeprefix("unet."): layer.delta() for key, layer in load_lora(original_file).layers.items() if key.startswith("unet.")}
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[key], ours[key]) for key in ours)

