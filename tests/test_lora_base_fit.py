"""A LoRA of another base (an SDXL or SD2.x one given to SD1.5, here one of the tiny model given to the toy-world base) is
said by `finetune sample`, `merge` and `eval` from the LoRA file's header and the base's configs, before torch loads: it was said
once torch, diffusers and the base had loaded, 23 to 25 s in. LoRAs that load are not refused: ours with the UNet and the
text encoder, their kohya export, a DoRA."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHIPPED_BASE
from safetensors import safe_open
from safetensors.numpy import save_file
from test_fast_errors import said_without_the_training_stack

from finetune.formats.lora_base_fit import lora_base_problem


def lora_file(path, layers: dict[str, tuple[int, int]], down: str = ".lora_A.weight", up: str = ".lora_B.weight"):
    """A LoRA file of rank-4 layers named `layers` (module: (input width, output width)), written without torch."""
    tensors = {}
    for module, (width_in, width_out) in layers.items():
        tensors[module + down] = np.zeros((4, width_in), np.float32)
        tensors[module + up] = np.zeros((width_out, 4), np.float32)
    save_file(tensors, str(path))
    return str(path)


CROSS_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def test_a_lora_of_another_base_is_said_before_the_training_stack_loads(tmp_path):
    base_unet, base_clip = SHIPPED_BASE / "unet" / "config.json", SHIPPED_BASE / "text_encoder" / "config.json"
    narrow = lora_file(tmp_path / "narrow.safetensors", {CROSS_KEY: (32, 32)})  # trained on a base reading 32-wide text
    sdxl = lora_file(tmp_path / "sdxl.safetensors", {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v": (2048, 640)},
                     ".lora_down.weight", ".lora_up.weight")  # fmt: skip
    clip = lora_file(tmp_path / "clip.safetensors", {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, 32)}, ".lora_down.weight", ".lora_up.weight")
    named_sdxl = lora_file(tmp_path / "te2.safetensors", {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280)},
                           ".lora_down.weight", ".lora_up.weight")  # fmt: skip
    sample = ["sample", "--base", str(SHIPPED_BASE), "--prompt", "a star", "--out", str(tmp_path / "out")]
    said = said_without_the_training_stack([
        [*sample, "--lora", narrow],
        ["merge", "--base", str(SHIPPED_BASE), "--lora", narrow, str(tmp_path / "merged")],
        ["eval", "--base", str(SHIPPED_BASE), "--lora", narrow, "--out", str(tmp_path / "report.json")],
        [*sample, "--lora", sdxl],
        [*sample, "--lora", clip],
        [*sample, "--lora", named_sdxl],
    ])  # fmt: skip
    fix = "(SD1.x: 768, SD2.x: 1024, SDXL: 2048): the LoRA was trained on another base; pass that one as --base"
    assert said[0] == said[1] == said[2] == (f"LoRA {narrow} does not fit base model {SHIPPED_BASE}: its layer {CROSS_KEY}.lora_A reads text 32 wide, "
                                  f"the base's {base_unet} has cross_attention_dim 64 {fix}")  # fmt: skip
    assert said[3] == (f"LoRA {sdxl} does not fit base model {SHIPPED_BASE}: its layer lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v"
                       f".lora_down reads text 2048 wide, the base's {base_unet} has cross_attention_dim 64 {fix}")  # fmt: skip
    assert said[4] == (f"LoRA {clip} does not fit base model {SHIPPED_BASE}: its layer lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down "
                       f"reads text 32 wide, the base's {base_clip} has hidden_size 64 {fix}")  # fmt: skip
    assert said[5].startswith(f"LoRA {named_sdxl} is an SDXL LoRA (lora_te1_/lora_te2_ or text_encoder_2 names)"), said[5]


@pytest.mark.parametrize("dora", [False, True])
def test_loras_of_the_base_are_not_refused(dora, tiny_model, tmp_path):
    """The tiny model's own LoRA (UNet and text encoder, every attention layer), as we save it and as its kohya export,
    and a DoRA: each fits its base; each on the toy-world base (64 wide where the tiny model is 32) does not."""
    import torch

    from finetune.config import ModelConfig
    from finetune.config.methods import LoRAConfig
    from finetune.formats.dora import names_magnitudes
    from finetune.formats.kohya import load_lora, save_lora_file
    from finetune.methods.lora import add_lora, save_lora
    from finetune.models.loading import load_base_model

    model = load_base_model(ModelConfig(pretrained=str(tiny_model)))
    settings = LoRAConfig(rank=4, alpha=4, use_dora=dora)
    add_lora(model.unet, ["to_q", "to_k", "to_v", "to_out.0"], torch.float32, settings)
    add_lora(model.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], torch.float32, settings)
    ours = save_lora({"unet": model.unet, "text_encoder": model.text_encoder}, tmp_path / "ours" / "pytorch_lora_weights.safetensors", {})
    kohya = save_lora_file(load_lora(ours), tmp_path / "kohya.safetensors", "kohya")
    for path in (ours, kohya):
        keys = safe_open(str(path), "np").keys()
        assert names_magnitudes(keys) == dora and any("te_" in key or key.startswith("text_encoder.") for key in keys), path
        assert lora_base_problem(path, str(tiny_model)) is None, path
        assert "does not fit base model" in lora_base_problem(path, str(SHIPPED_BASE)), path


def test_a_single_file_base_without_configs_is_read_by_its_own_tensors(tmp_path):
    """A webui single-file base with no --base-config: its cross-attention and CLIP widths are read from its header (diffusers
    picks the hub configs it loads with by the same tensors); a .ckpt's from its pickle's shapes (`test_a_ckpt_base_...`)."""
    from finetune.formats.lora_base_fit import SD1_CLIP_KEYS
    from finetune.models.single_file_configs import CROSS_ATTENTION_KEY

    base = tmp_path / "sd15.safetensors"
    save_file({CROSS_ATTENTION_KEY: np.zeros((320, 768), np.float16), SD1_CLIP_KEYS[0]: np.zeros((768, 768), np.float16)}, str(base))
    sd15 = lora_file(tmp_path / "sd15-lora.safetensors", {CROSS_KEY: (768, 320), "text_encoder.text_model.encoder.layers.0.self_attn.k_proj": (768, 768)})
    sd2 = lora_file(tmp_path / "sd2-lora.safetensors", {CROSS_KEY: (1024, 320)})
    clip = lora_file(tmp_path / "clip.safetensors", {"text_encoder.text_model.encoder.layers.0.self_attn.k_proj": (1024, 1024)})
    assert lora_base_problem(sd15, str(base)) is None
    assert lora_base_problem(sd2, str(base)) == (
        f"LoRA {sd2} does not fit base model {base}: its layer {CROSS_KEY}.lora_A reads text 1024 wide, the base's sd15.safetensors has "
        f"{CROSS_ATTENTION_KEY.removesuffix('.weight')} reading text 768 (SD1.x: 768, SD2.x: 1024, SDXL: 2048): the LoRA was trained on "
        "another base; pass that one as --base")  # fmt: skip
    assert f"the base's sd15.safetensors has {SD1_CLIP_KEYS[0].removesuffix('.weight')} reading text 768 " in lora_base_problem(clip, str(base))
    assert lora_base_problem(sd2, str(tmp_path / "sd15.ckpt")) is None  # not there: loading says it


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_ckpt_base_is_read_by_its_own_tensors_before_it_loads(wrapped, tmp_path, monkeypatch, capsys):
    """A .ckpt base's widths from its pickle's tensor shapes, nothing of it unpickled but dicts and shapes (and its weights
    not read): `finetune merge` said an SD2.x LoRA on an SD1.x .ckpt only as the LoRA loaded into the loaded base. As webui
    files keep it, the state dict may sit under "state_dict", beside the run's step."""
    import huggingface_hub.constants
    import torch
    from test_base_model_errors import fake_hub_cache

    from finetune.cli.main import main
    from finetune.formats.lora_base_fit import SD1_CLIP_KEYS
    from finetune.models.single_file_configs import CROSS_ATTENTION_KEY, SD1_CONFIGS

    fake_hub_cache(tmp_path / "hub", SD1_CONFIGS, SHIPPED_BASE)  # offline, the configs the .ckpt is read with are at hand
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    state = {CROSS_ATTENTION_KEY: torch.zeros(320, 768, dtype=torch.float16), SD1_CLIP_KEYS[0]: torch.zeros(768, 768, dtype=torch.float16)}
    base = tmp_path / "sd15.ckpt"
    torch.save({"state_dict": state, "global_step": 470000} if wrapped else state, base)
    sd15 = lora_file(tmp_path / "sd15-lora.safetensors", {CROSS_KEY: (768, 320), "text_encoder.text_model.encoder.layers.0.self_attn.k_proj": (768, 768)})
    sd2 = lora_file(tmp_path / "sd2-lora.safetensors", {CROSS_KEY: (1024, 320)})
    assert lora_base_problem(sd15, str(base)) is None
    fix = "(SD1.x: 768, SD2.x: 1024, SDXL: 2048): the LoRA was trained on another base; pass that one as --base"
    capsys.readouterr()
    assert main(["merge", "--base", str(base), "--lora", sd2, str(tmp_path / "merged")]) == 2  # before the base loads
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: LoRA {sd2} does not fit base model {base}: its layer {CROSS_KEY}.lora_A reads text 1024 wide, the base's sd15.ckpt has "
        f"{CROSS_ATTENTION_KEY.removesuffix('.weight')} reading text 768 {fix}"]  # fmt: skip


def test_a_ckpt_holding_other_objects_is_not_read_for_its_shapes(tmp_path):
    """The .ckpt's pickle is read by an unpickler that finds no callable but the tensor builders: one that would run code as it
    loads gives no shapes (loading refuses it: finetune.models.base_folder.pickle_refusal), and runs nothing."""
    import os

    import torch

    from finetune.models.single_file_configs import CROSS_ATTENTION_KEY
    from finetune.models.single_file_shapes import tensor_shapes

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    torch.save({"state_dict": {CROSS_ATTENTION_KEY: torch.zeros(320, 768)}, "callback": RunsCode()}, tmp_path / "model.ckpt")
    assert tensor_shapes(tmp_path / "model.ckpt", (CROSS_ATTENTION_KEY,)) == {}
    assert not (tmp_path / "ran").exists()
    torch.save({"state_dict": {CROSS_ATTENTION_KEY: torch.zeros(320, 768)}}, tmp_path / "plain.ckpt")
    assert tensor_shapes(tmp_path / "plain.ckpt", (CROSS_ATTENTION_KEY,)) == {CROSS_ATTENTION_KEY: (320, 768)}


def test_a_lora_of_a_base_as_wide_but_of_another_depth_is_said_before_the_training_stack_loads(tmp_path):
    """Layers the toy-world base does not have, in a LoRA as wide as its own (here: one layer each, of a base with more text-encoder
    layers, UNet blocks, attentions or transformer blocks): said only as the LoRA loaded into the loaded base, 23 to 25 s in."""
    import json

    unet_file, clip_file = SHIPPED_BASE / "unet" / "config.json", SHIPPED_BASE / "text_encoder" / "config.json"
    unet, clip = json.loads(unet_file.read_text()), json.loads(clip_file.read_text())
    width, text_layers, down = unet["cross_attention_dim"], clip["num_hidden_layers"], unet["down_block_types"]
    plain = next(i for i, kind in enumerate(down) if "Attn" not in kind)  # a block without attentions (a DownBlock2D)
    crossed = next(i for i, kind in enumerate(unet["up_block_types"]) if "Attn" in kind)
    places = {
        f"text_encoder.text_model.encoder.layers.{text_layers}.self_attn.q_proj":
            f"is in text-encoder layer {text_layers}, which the base's {clip_file} does not have (its num_hidden_layers is {text_layers})",
        f"lora_te_text_model_encoder_layers_{text_layers}_self_attn_q_proj":
            f"is in text-encoder layer {text_layers}, which the base's {clip_file} does not have (its num_hidden_layers is {text_layers})",
        f"unet.down_blocks.{len(down)}.attentions.0.transformer_blocks.0.attn2.to_k":
            f"is in down block {len(down)}, which the base's {unet_file} does not have (its down_block_types are {len(down)})",
        f"unet.down_blocks.{plain}.attentions.0.transformer_blocks.0.attn2.to_k":
            f"is in down block {plain}'s attentions, which the base's {unet_file} does not have (its down_block_types[{plain}] is {down[plain]})",
        f"unet.up_blocks.{crossed}.attentions.{unet['layers_per_block'] + 1}.transformer_blocks.0.attn2.to_k":
            f"is in up block {crossed}'s attentions {unet['layers_per_block'] + 1}, which the base's {unet_file} does not have (its layers_per_block "
            f"is {unet['layers_per_block']})",
        f"unet.up_blocks.{crossed}.attentions.0.transformer_blocks.{unet['transformer_layers_per_block']}.attn2.to_k":
            f"is in up block {crossed}'s transformer block {unet['transformer_layers_per_block']}, which the base's {unet_file} does not have (its "
            f"transformer_layers_per_block is {unet['transformer_layers_per_block']})",
    }  # fmt: skip
    loras = []
    for i, key in enumerate(places):
        kohya = key.startswith("lora_")
        loras.append(lora_file(tmp_path / f"{i}.safetensors", {key: (width, width)}, *((".lora_down.weight", ".lora_up.weight") if kohya else ())))
    said = said_without_the_training_stack([["merge", "--base", str(SHIPPED_BASE), "--lora", lora, str(tmp_path / "merged")] for lora in loras])
    for lora, (key, place), line in zip(loras, places.items(), said):
        layer = key + (".lora_down" if key.startswith("lora_") else ".lora_A")
        assert line == (f"LoRA {lora} does not fit base model {SHIPPED_BASE}: its layer {layer} {place}: the LoRA was trained on another base; "
                        "pass that one as --base"), line  # fmt: skip


def test_an_sd2_single_file_base_says_its_text_encoders_width(tmp_path):
    """SD2.x's OpenCLIP packs q, k and v in one tensor: its width was left to loading, so a LoRA of SD1.x's text encoder alone
    (768 wide) on an SD2.x file (1024) was said only as it loaded into the loaded base."""
    from finetune.formats.lora_base_fit import SD2_CLIP_KEY
    from finetune.models.single_file_configs import CROSS_ATTENTION_KEY

    base = tmp_path / "sd21.safetensors"
    save_file({CROSS_ATTENTION_KEY: np.zeros((320, 1024), np.float16), SD2_CLIP_KEY: np.zeros((3 * 1024, 1024), np.float16)}, str(base))
    te = "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"
    sd1 = lora_file(tmp_path / "sd1-te.safetensors", {te: (768, 768)})
    assert lora_base_problem(lora_file(tmp_path / "sd2-te.safetensors", {te: (1024, 1024)}), str(base)) is None
    assert lora_base_problem(sd1, str(base)) == (
        f"LoRA {sd1} does not fit base model {base}: its layer {te}.lora_A reads text 768 wide, the base's sd21.safetensors has "
        f"{SD2_CLIP_KEY.removesuffix('_weight')} reading text 1024 (SD1.x: 768, SD2.x: 1024, SDXL: 2048): the LoRA was trained on another "
        "base; pass that one as --base")  # fmt: skip
