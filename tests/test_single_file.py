"""Loading a base model from one original-format (LDM/webui) .safetensors file, offline; and which files
of a hub repo a hub id downloads.

The test writes such a file itself: an SD1.5-shaped pipeline with tiny widths (4 UNet blocks of 2
layers, 4 VAE blocks of 2 layers) whose diffusers weights are renamed to the original Stable Diffusion
layout, then loads it with `model.single_file_config` pointing at the matching diffusers configs.
"""

import copy

import pytest
import torch
from conftest import REPO
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from finetune.cli import main
from finetune.config import LoRAConfig, ModelConfig
from finetune.demo_engine import DemoEngine
from finetune.errors import FinetuneError
from finetune.methods.lora import add_lora, save_lora
from finetune.models import load_base_model
from finetune.tiny_model import DEFAULT_WORDS, sd15_scheduler_config
from finetune.tokenizer import make_clip_tokenizer


def sd15_shaped_pipeline(tmp_path) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    tokenizer = make_clip_tokenizer(DEFAULT_WORDS, tmp_path / "tok")
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8, sample_size=64,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**sd15_scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def ldm_unet_names() -> list[tuple[str, str]]:
    """(original prefix, diffusers prefix) for SD1.5's UNet layout, most specific first."""
    pairs = []
    for i in range(4):
        for j in range(2):
            pairs.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                pairs.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            pairs.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                pairs.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            pairs.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return pairs


def to_ldm_unet(state: dict) -> dict:
    whole = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
              "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    out = {}
    for name, tensor in state.items():
        new = name
        for hf, sd in whole.items():
            if new.startswith(hf):
                new = sd + new[len(hf):]
        if "resnets" in name:
            for hf, sd in resnet.items():
                new = new.replace(f".{hf}.", f".{sd}.")
        for sd, hf in ldm_unet_names():
            new = new.replace(hf, sd)
        out["model.diffusion_model." + new] = tensor
    return out


def to_ldm_vae(state: dict) -> dict:
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(4):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(2)]
        pairs += [(f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(3)]
        if i < 3:
            pairs += [(f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."), (f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0.")]
    pairs += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    attention = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for name, tensor in state.items():
        new = name
        for sd, hf in pairs:
            new = new.replace(hf, sd)
        if "attentions" in name:
            for sd, hf in attention:
                new = new.replace(hf, sd)
            if tensor.ndim == 2:  # linear in diffusers, 1x1 conv in the original
                tensor = tensor[:, :, None, None]
        out["first_stage_model." + new] = tensor
    return out


@pytest.fixture
def single_file(tmp_path):
    """(the .safetensors file, a diffusers folder with its configs, the pipeline it was written from)."""
    pipeline = sd15_shaped_pipeline(tmp_path)
    configs = tmp_path / "configs"
    pipeline.save_pretrained(configs)
    checkpoint = {
        **to_ldm_unet(pipeline.unet.state_dict()),
        **to_ldm_vae(pipeline.vae.state_dict()),
        # The original layout names the text model's weights text_model.* (transformers 5 drops that level).
        **{"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
           for k, v in pipeline.text_encoder.state_dict().items()},
    }
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(path))
    return path, configs, pipeline


def test_single_safetensors_file_loads_offline_with_local_configs(single_file, tmp_path):
    path, configs, pipeline = single_file
    base = load_base_model(ModelConfig(pretrained=str(path), single_file_config=str(configs)))
    for part in ("unet", "vae"):
        loaded, original = getattr(base, part).state_dict(), getattr(pipeline, part).state_dict()
        assert loaded.keys() == original.keys()
        for name, tensor in original.items():
            assert torch.equal(loaded[name].reshape(tensor.shape), tensor), f"{part}.{name}"
    ids = base.tokenizer(["a red circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(base.text_encoder(ids)[0], pipeline.text_encoder(ids)[0])
    assert not base.vae.training and not any(p.requires_grad for p in base.text_encoder.parameters())

    # A config folder that is not there, or describes another architecture: one line, not a traceback.
    for config in (tmp_path / "confgs", REPO / "finetune" / "assets" / "toyworld-base"):
        with pytest.raises(FinetuneError, match=rf"^could not load base model file .*model\.safetensors with model.single_file_config {config}: "):
            load_base_model(ModelConfig(pretrained=str(path), single_file_config=str(config)))


def test_sample_merge_and_demo_take_a_single_file_base_with_base_config(single_file, tmp_path, capsys):
    path, configs, pipeline = single_file
    # A LoRA of this architecture, with B made non-zero as training would.
    unet = copy.deepcopy(pipeline.unet)
    add_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], torch.float32, LoRAConfig(rank=4, alpha=2.0))
    generator = torch.Generator().manual_seed(0)
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    lora = save_lora({"unet": unet}, tmp_path / "lora.safetensors", {})

    # Offline, a single file needs its configs: the error names the option that gives them.
    assert main(["sample", "--base", str(path), "--prompt", "a red circle", "--out", str(tmp_path / "x")]) == 2
    assert "set --base-config to a local diffusers folder" in capsys.readouterr().err
    assert main(["sample", "--base", str(configs), "--base-config", str(configs), "--prompt", "a", "--out", str(tmp_path / "x")]) == 2
    assert "--base-config describes a single .safetensors/.ckpt base" in capsys.readouterr().err

    out = tmp_path / "samples"
    argv = ["sample", "--base", str(path), "--base-config", str(configs), "--lora", str(lora), "--prompt", "a red circle",
            "--num-images", "1", "--steps", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0 and (out / "grid.png").is_file()

    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(path), "--base-config", str(configs), "--lora", str(lora), str(merged)]) == 0
    sample = torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([10]), torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        expected = unet.eval()(*sample).sample
        assert torch.allclose(UNet2DConditionModel.from_pretrained(merged / "unet")(*sample).sample, expected, atol=1e-5)
        assert not torch.allclose(pipeline.unet(*sample).sample, expected, atol=1e-3)  # the LoRA changed the output

    engine = DemoEngine(str(path), tmp_path / "adapters", base_config=str(configs))
    assert all(torch.equal(a, b) for a, b in zip(engine.base.unet.state_dict().values(), pipeline.unet.state_dict().values()))


def test_a_lora_given_as_the_base_is_named_as_one(quickstart_lora, capsys):
    lora = quickstart_lora / "pytorch_lora_weights.safetensors"
    assert main(["sample", "--base", str(lora), "--prompt", "a star"]) == 2
    assert f"{lora} is a LoRA, not a base model: pass it as --lora, with --base the model it was trained on" in capsys.readouterr().err


SD15_REPO_FILES = [  # stable-diffusion-v1-5/stable-diffusion-v1-5, as the hub lists it
    "model_index.json", "README.md", "v1-inference.yaml", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json", "safety_checker/config.json", "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.bin", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
]  # fmt: skip


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_a_hub_base_downloads_the_parts_of_its_variant_and_not_the_single_file_checkpoints(variant):
    """Not the 11 GB of top-level checkpoints SD1.5's repo also holds, nor the safety checker; with
    model.variant: fp16, the fp16 weights (which from_pretrained then asks for)."""
    from huggingface_hub.utils import filter_repo_objects

    from finetune.models import download_patterns

    allow, ignore = download_patterns(variant)
    fetched = set(filter_repo_objects(SD15_REPO_FILES, allow_patterns=allow, ignore_patterns=ignore))
    weights = {f"{part}/{name}" for part, name in (("text_encoder", "model"), ("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"))}
    suffix = ".fp16.safetensors" if variant else ".safetensors"
    assert {name + suffix for name in weights} <= fetched
    assert not {name for name in fetched if "/" not in name} - {"model_index.json"}  # no top-level checkpoint
    assert not any(name.startswith("safety_checker/") or "non_ema" in name or name.endswith((".bin", ".ckpt")) for name in fetched)
    assert {"tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json", "unet/config.json"} <= fetched
    if not variant:
        assert not any(".fp16." in name for name in fetched)
