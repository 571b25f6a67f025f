"""Writing a pipeline as one original-layout (LDM/webui) .safetensors file (`finetune export-checkpoint`) and
loading a base model from such a file, offline; and which files of a hub repo a hub id downloads.

The file is written from an SD1.5-shaped pipeline with tiny widths (4 UNet blocks of 2 layers, 4 VAE
blocks of 2 layers) and loaded with `model.single_file_config` pointing at the matching diffusers configs:
diffusers' own single-file loader must give back every weight.
"""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import REPO, SHIPPED_BASE, build_recipe
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from finetune.cli.main import main
from finetune.config import LoRAConfig, ModelConfig
from finetune.demo.engine import DemoEngine
from finetune.errors import FinetuneError
from finetune.formats.single_file_export import export_checkpoint
from finetune.methods.lora import add_lora, save_lora
from finetune.models.loading import load_base_model
from finetune.models.tiny_model import DEFAULT_WORDS, sd15_scheduler_config
from finetune.models.tokenizer import make_clip_tokenizer


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


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """(the .safetensors file, a diffusers folder with its configs, the pipeline it was written from): made once for the
    module (about half a second a test); the tests read them, and write in their own tmp_path."""
    tmp_path = tmp_path_factory.mktemp("single-file")
    pipeline = sd15_shaped_pipeline(tmp_path)
    configs = tmp_path / "configs"
    pipeline.save_pretrained(configs)
    path, _ = export_checkpoint(configs, tmp_path / "model.safetensors")
    return path, configs, pipeline


POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def assert_loads_back(path, configs, pipeline, rounded=lambda tensor: tensor):
    """diffusers' single-file loader, through ours, gives back every weight of `pipeline` (as `rounded` makes them)."""
    base = load_base_model(ModelConfig(pretrained=str(path), single_file_config=str(configs)))
    for part in ("unet", "vae", "text_encoder"):
        loaded, original = getattr(base, part).state_dict(), getattr(pipeline, part).state_dict()
        assert loaded.keys() == original.keys()
        for name, tensor in original.items():
            assert torch.equal(loaded[name].reshape(tensor.shape), rounded(tensor)), f"{part}.{name}"
    return base


def test_single_safetensors_file_loads_offline_with_local_configs(single_file, tmp_path):
    """The export's file is what diffusers' (and so the webui's) single-file layout reads: every weight in its place."""
    path, configs, pipeline = single_file
    with safe_open(str(path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        assert f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape() == [32, 32, 1, 1]  # a 1x1 conv there
    # The keys loaders tell SD1.x by, and nothing outside the three parts.
    assert {"model.diffusion_model.output_blocks.11.0.skip_connection.weight", "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"} <= keys
    # Where SD1.x's own files keep the samplers (diffusers' loader also finds an upsampler one place off, the webui does not).
    samplers = [f"input_blocks.{i}.0.op.weight" for i in (3, 6, 9)] + ["output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight"]
    assert {f"model.diffusion_model.{name}" for name in samplers} <= keys
    assert all(key.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")) for key in keys)
    # Every weight, and the position ids the original files hold (transformers no longer saves them).
    assert len(keys) == sum(len(getattr(pipeline, part).state_dict()) for part in ("unet", "vae", "text_encoder")) + 1
    assert torch.equal(load_file(str(path))[POSITION_IDS], torch.arange(77)[None])
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1" and metadata["modelspec.prediction_type"] == "epsilon"
    assert metadata["modelspec.resolution"] == "64x64" and metadata["modelspec.title"] == "model"

    base = assert_loads_back(path, configs, pipeline)
    ids = base.tokenizer(["a red circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(base.text_encoder(ids)[0], pipeline.text_encoder(ids)[0])
    assert not base.vae.training and not any(p.requires_grad for p in base.text_encoder.parameters())

    # A config folder that is not there (said before anything loads), or describes another architecture: one line, not a traceback.
    with pytest.raises(FinetuneError, match=rf"^model.single_file_config {tmp_path / 'confgs'} not found: give the diffusers folder or hub id of the model "):
        load_base_model(ModelConfig(pretrained=str(path), single_file_config=str(tmp_path / "confgs")))
    config = REPO / "finetune" / "assets" / "toyworld-base"
    with pytest.raises(FinetuneError, match=rf"^could not load base model file .*model\.safetensors with model.single_file_config {config}: "):
        load_base_model(ModelConfig(pretrained=str(path), single_file_config=str(config)))


def test_the_medium_preset_exports_and_loads_back_with_a_note(tmp_path, capsys):
    """`finetune make-tiny-model --preset medium` (SD1.5's block pattern) then `finetune export-checkpoint`, as a user runs
    them: its VAE of 1 layer per block was refused. The original layout names each VAE layer within its block, so it holds
    any count, as it holds any width, and diffusers reads it back whole given the configs; the note says the webui will not."""
    from finetune.models.tiny_model import build_tiny_pipeline

    medium, path = tmp_path / "medium", tmp_path / "medium.safetensors"
    assert main(["make-tiny-model", str(medium), "--preset", "medium"]) == 0
    capsys.readouterr()
    assert main(["export-checkpoint", str(medium), str(path)]) == 0, capsys.readouterr().err
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and notes[0].startswith("note: its widths are not SD1.5's (")
    assert "and its VAE has 1 layer per block (SD1.5's: 2): the webui builds SD1.x at SD1.5's and will not load it" in notes[0]
    with safe_open(str(path), "np") as f:
        assert "first_stage_model.decoder.up.0.block.1.conv1.weight" in f.keys()  # the decoder's one layer more than the encoder's
    assert_loads_back(path, medium, build_tiny_pipeline("medium"))


def test_fp16_export_is_half_the_size_and_loads_back_rounded(single_file, tmp_path, capsys):
    path, configs, pipeline = single_file
    half = tmp_path / "half.safetensors"
    assert main(["export-checkpoint", str(configs), str(half), "--precision", "fp16"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {half} (")
    with safe_open(str(half), "pt") as f:
        assert {f.get_slice(key).get_dtype() for key in f.keys() if key != POSITION_IDS} == {"F16"}
        assert f.get_slice(POSITION_IDS).get_dtype() == "I64"  # an index, as in the original files
    assert 0.45 < half.stat().st_size / path.stat().st_size < 0.55
    assert_loads_back(half, configs, pipeline, rounded=lambda tensor: tensor.half().float())

    # Without --precision each weight stays as the pipeline holds it: an fp16 pipeline gives the same file.
    from finetune.outputs.pipeline_io import export_fp16

    fp16_pipeline = export_fp16(configs, tmp_path / "fp16-pipeline")
    as_held = tmp_path / "as-held.safetensors"
    assert main(["export-checkpoint", str(fp16_pipeline), str(as_held)]) == 0
    held, halved = load_file(str(as_held)), load_file(str(half))
    assert held.keys() == halved.keys() and all(torch.equal(held[key], halved[key]) for key in halved)


def test_a_full_run_folder_exports_with_its_metadata_and_a_v_prediction_note(single_file, image_folder, tmp_path, capsys):
    """`finetune export-checkpoint RUN`: a full fine-tune's pipeline/ (here trained to predict v), its recorded metadata in the header."""
    from finetune.training.trainer import train

    _, configs, _ = single_file
    run = tmp_path / "run"
    train(build_recipe(configs, image_folder, run, method="full", model__prediction_type="v_prediction", train__max_steps=1, train__batch_size=1,
                       checkpoint__every_n_steps=1))  # fmt: skip
    out = tmp_path / "webui" / "run.safetensors"
    capsys.readouterr()  # training's own lines
    assert main(["export-checkpoint", str(run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out} (") and 'note: it predicts v (v-prediction): the webui needs run.yaml beside it' in printed
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["finetune.method"] == "full" and metadata["finetune.steps"] == "1" and metadata["modelspec.prediction_type"] == "v"
    assert metadata["finetune.base_model"] == configs.name and str(configs) not in json.dumps(metadata)  # a shared file: the base by name
    trained = UNet2DConditionModel.from_pretrained(run / "pipeline" / "unet")
    base = load_base_model(ModelConfig(pretrained=str(out), single_file_config=str(run / "pipeline")))
    assert all(torch.equal(a, b) for a, b in zip(base.unet.state_dict().values(), trained.state_dict().values(), strict=True))

    # A checkpoint's pipeline/ too (it holds the run's result as of its step); one recording its base's path, as runs
    # before base_paths.json did, is exported with the base's name.
    record = run / "checkpoints" / "checkpoint-1" / "pipeline" / "finetune_metadata.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "finetune.base_model": str(configs)}))
    assert main(["export-checkpoint", str(run / "checkpoints" / "checkpoint-1"), str(tmp_path / "step1.safetensors")]) == 0
    assert load_file(str(tmp_path / "step1.safetensors")).keys() == load_file(str(out)).keys()
    with safe_open(str(tmp_path / "step1.safetensors"), "pt") as f:
        assert f.metadata()["finetune.base_model"] == configs.name


def edited_pipeline(configs, tmp_path, part: str, **changes):
    """A copy of the pipeline folder with `changes` in one part's config.json (or model_index.json: part "")."""
    folder = tmp_path / f"edited-{part}-{'-'.join(changes)}"
    shutil.copytree(configs, folder)
    path = folder / part / ("config.json" if part else "model_index.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


def test_what_the_layout_cannot_hold_is_refused_in_one_line_before_anything_is_written(single_file, tiny_model, tmp_path, capsys):
    path, shared_configs, _ = single_file
    configs = shutil.copytree(shared_configs, tmp_path / "configs")  # its own: a refusal that failed would write over the UNet's weights
    out = tmp_path / "out.safetensors"
    not_sd1 = "cannot be exported as a webui checkpoint: that layout describes SD1.x's architecture, and "
    lora_run = tmp_path / "lora_run"
    lora_run.mkdir()
    save_file({"unet.conv_in.lora.down.weight": torch.zeros(1, 4)}, str(lora_run / "pytorch_lora_weights.safetensors"))
    refusals = {
        str(SHIPPED_BASE): f"{SHIPPED_BASE} {not_sd1}this UNet has 3 blocks of 1 layer (SD1.x's: 4 of 2)",
        str(tiny_model): f"{tiny_model} {not_sd1}this UNet has",
        str(lora_run): f"{lora_run} holds a LoRA, not a whole model: fold it into its base first (finetune merge --lora {lora_run} MERGED)",
        str(lora_run / "pytorch_lora_weights.safetensors"): f"{lora_run / 'pytorch_lora_weights.safetensors'} holds a LoRA, not a whole model",
        str(tmp_path / "missing"): f"export-checkpoint input {tmp_path / 'missing'} not found",
        str(path): f"{path} is not a diffusers pipeline folder (no model_index.json) nor a run's folder holding pipeline/",
    }
    for edit, what in (
        (("unet", {"layers_per_block": 1}), "this UNet has 4 blocks of 1 layer (SD1.x's: 4 of 2)"),
        (("unet", {"up_block_types": ["UpBlock2D"] * 4}), "this UNet's blocks are"),
        (("unet", {"use_linear_projection": True}), "this is SD2-style (OpenCLIP text encoder"),
        (("text_encoder", {"hidden_act": "gelu"}), "this is SD2-style (OpenCLIP text encoder"),
        (("", {"text_encoder": ["transformers", "CLIPTextModelWithProjection"]}), "its text encoder is a CLIPTextModelWithProjection, not a CLIPTextModel"),
        (("vae", {"latent_channels": 16}), "this VAE has 4 blocks of 2 layers and 16 latent channels (SD1.x's: 4 blocks, 4 channels)"),
        (("unet", {"time_cond_proj_dim": 256}), "this UNet takes a guidance embedding (time_cond_proj_dim, as LCM-distilled models)"),
    ):
        folder = edited_pipeline(configs, tmp_path, edit[0], **edit[1])
        refusals[str(folder)] = f"{folder} {not_sd1}{what}"
    for source, message in refusals.items():
        assert main(["export-checkpoint", source, str(out)]) == 2, source
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
        assert not out.exists() and not list(tmp_path.glob(".out.safetensors*"))

    # An existing file is replaced only with --overwrite; the name must be a .safetensors file's.
    out.write_text("keep me")
    assert main(["export-checkpoint", str(configs), str(out)]) == 2
    assert capsys.readouterr().err == f"error: export-checkpoint would replace {out}: give another output, or pass --overwrite\n"
    assert out.read_text() == "keep me"
    assert main(["export-checkpoint", str(configs), str(tmp_path / "webui")]) == 2
    assert capsys.readouterr().err.startswith(f"error: export-checkpoint output {tmp_path / 'webui'} is not a .safetensors file name")
    assert main(["export-checkpoint", str(configs), str(out), "--overwrite"]) == 0
    replaced, exported = load_file(str(out)), load_file(str(path))
    assert replaced.keys() == exported.keys() and all(torch.equal(replaced[key], exported[key]) for key in exported)
    # Never over the weights it reads, a folder, or a path inside a file; nothing is left behind.
    own = configs / "unet" / "diffusion_pytorch_model.safetensors"
    for output, message in ((own, f"export-checkpoint would write {own} inside the pipeline it reads ({configs})"),
                            (tmp_path / "dir.safetensors", f"export-checkpoint output {tmp_path / 'dir.safetensors'} is a folder, or inside a file"),
                            (out / "x.safetensors", f"export-checkpoint output {out / 'x.safetensors'} is a folder, or inside a file")):  # fmt: skip
        (tmp_path / "dir.safetensors").mkdir(exist_ok=True)
        assert main(["export-checkpoint", str(configs), str(output), "--overwrite"]) == 2
        assert capsys.readouterr().err.startswith(f"error: {message}")
    assert "conv_in.weight" in load_file(str(own)) and not list(tmp_path.glob(".*.partial"))  # still the UNet's own weights


def test_a_variants_weights_are_read_and_the_notes_say_what_the_layout_cannot(single_file, tmp_path):
    """A pipeline of fp16 variant files (as model.variant downloads them) exports; the notes name the widths
    the webui would not build and a recorded clip skip, and say nothing at SD1.5's own widths."""
    from finetune.checkpoints.run_files import METADATA_FILE
    from finetune.formats.single_file_export import SD15_WIDTHS, usage_notes

    _, configs, pipeline = single_file
    variant = tmp_path / "variant"
    shutil.copytree(configs, variant)
    for part in ("unet", "vae", "text_encoder"):
        plain = next((variant / part).glob("*.safetensors"))
        plain.rename(plain.with_name(plain.name.replace(".safetensors", ".fp16.safetensors")))
    (variant / METADATA_FILE).write_text(json.dumps({"finetune.clip_skip": "2"}))
    out, notes = export_checkpoint(variant, tmp_path / "variant.safetensors")
    assert load_file(str(out)).keys() == load_file(str(single_file[0])).keys()
    assert len(notes) == 2 and notes[0].startswith("it was trained with clip skip 2: set the same in the webui")
    assert notes[1].startswith("its widths are not SD1.5's ({'unet': [32, 32, 64, 64], 'text_encoder': 32")
    sd15 = {"unet": {"block_out_channels": SD15_WIDTHS["unet"]}, "text_encoder": {"hidden_size": 768}, "vae": {"block_out_channels": SD15_WIDTHS["vae"]}}
    assert usage_notes(out, sd15, {"prediction_type": "epsilon"}, {}) == []


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
    assert main(argv) == 0 and (out / "00000-grid.png").is_file()

    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(path), "--base-config", str(configs), "--lora", str(lora), str(merged)]) == 0
    sample = torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([10]), torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        expected = unet.eval()(*sample).sample
        assert torch.allclose(UNet2DConditionModel.from_pretrained(merged / "unet")(*sample).sample, expected, atol=1e-5)
        assert not torch.allclose(pipeline.unet(*sample).sample, expected, atol=1e-3)  # the LoRA changed the output

    engine = DemoEngine(str(path), tmp_path / "adapters", base_config=str(configs))
    assert all(torch.equal(a, b) for a, b in zip(engine.base.unet.state_dict().values(), pipeline.unet.state_dict().values()))


def test_a_lora_trained_on_a_single_file_base_samples_and_merges_with_its_recorded_configs(single_file, image_folder, tmp_path, capsys):
    """Without --base, sample and merge take the recorded base; a single file loads offline only with the
    configs its run named (model.single_file_config), which the LoRA records too."""
    from finetune.training.trainer import train

    path, configs, _ = single_file
    run = tmp_path / "run"
    train(build_recipe(path, image_folder, run, model__single_file_config=str(configs), train__max_steps=1, train__batch_size=1))
    capsys.readouterr()
    argv = ["sample", "--lora", str(run), "--prompt", "a red circle", "--num-images", "1", "--steps", "2", "--out", str(tmp_path / "s")]
    assert main(argv) == 0, capsys.readouterr().err
    assert f"base model: {path} with the configs {configs} (recorded" in capsys.readouterr().out
    assert main(["merge", "--lora", str(run), str(tmp_path / "merged")]) == 0


def test_a_single_file_base_samples_with_the_clip_skip_its_header_records(single_file, tmp_path, capsys):
    """export-checkpoint's header holds what training recorded; the layout itself cannot say clip skip 2."""
    from PIL import Image

    from finetune.checkpoints.run_files import METADATA_FILE

    _, configs, _ = single_file
    pipeline = tmp_path / "clip-skip-2"
    shutil.copytree(configs, pipeline)
    (pipeline / METADATA_FILE).write_text(json.dumps({"finetune.method": "full", "finetune.clip_skip": "2"}))
    path, _ = export_checkpoint(pipeline, tmp_path / "clip-skip-2.safetensors")

    def sample(*base):
        out = tmp_path / f"samples-{len(list(tmp_path.glob('samples-*')))}"
        assert main(["sample", *base, "--prompt", "a red circle", "--num-images", "1", "--steps", "2", "--out", str(out)]) == 0, capsys.readouterr().err
        return np.asarray(Image.open(out / "00000-prompt0_seed0.png"))

    from_folder = sample("--base", str(pipeline))
    assert not np.array_equal(sample("--base", str(configs)), from_folder)  # clip skip 2 changes the image
    assert np.array_equal(sample("--base", str(path), "--base-config", str(configs)), from_folder)
    assert DemoEngine(str(path), tmp_path / "adapters", base_config=str(configs)).base_metadata["finetune.clip_skip"] == "2"


def test_a_lora_given_as_the_base_is_named_as_one(make_recipe, capsys):
    from finetune.training.trainer import train

    # Any LoRA the trainer saves: the check reads the file's names, never the base it was trained on.
    lora = train(make_recipe(train__max_steps=1, train__batch_size=1)).output_dir / "pytorch_lora_weights.safetensors"
    assert main(["sample", "--base", str(lora), "--prompt", "a star"]) == 2
    assert f"{lora} is a LoRA, not a base model: pass it as --lora, with --base the model it was trained on" in capsys.readouterr().err
    # A recipe and the demo have no --lora: each is told what it takes instead.
    with pytest.raises(FinetuneError, match=r"set model.pretrained to the model it was trained on \(lora.init_from starts a run from this LoRA\)$"):
        load_base_model(ModelConfig(pretrained=str(lora)))
    with pytest.raises(FinetuneError, match=r"the demo lists the LoRAs under --adapters\)$"):
        DemoEngine(str(lora), lora.parent)


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

    from finetune.models.model_source import download_patterns

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


def test_the_model_card_of_a_lora_trained_on_a_single_file_loads_it_with_from_single_file(single_file, image_folder, tmp_path, monkeypatch):
    """The card's diffusers code was from_pretrained("model.safetensors"), which reads folders and hub ids only (and the
    comment above it called the file a folder): pasted where the base is, it raised. Now from_single_file, with the
    configs the run named, both by name as the card names them."""
    from finetune.training.trainer import train

    path, configs, _ = single_file
    run = tmp_path / "run"
    train(build_recipe(path, image_folder, run, model__single_file_config=str(configs), train__max_steps=1, train__batch_size=1))
    assert main(["export", str(run), str(tmp_path / "webui"), "--to", "kohya"]) == 0
    card = (tmp_path / "webui" / "run.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert f'from_single_file("{path.name}", config="{configs.name}", torch_dtype=dtype)' in code, code
    assert f'# "{path.name}": the base it was trained on, a local file (its configs "{configs.name}" too) named by its name only' in code
    for named in (path, configs):  # pasted in the card's folder (it loads the LoRA from "."), the base and its configs beside it
        (tmp_path / "webui" / named.name).symlink_to(named)
    monkeypatch.chdir(tmp_path / "webui")
    namespace: dict = {}
    exec(code, namespace)  # from_pretrained raised here: "model.safetensors" is no folder
    assert namespace["pipeline"].get_active_adapters() == ["lora"]
