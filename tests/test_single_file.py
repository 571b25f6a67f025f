"""Writing a pipeline as one original-layout (LDM/webui) .safetensors file (`finetune export-checkpoint`), loaded back
offline through diffusers' single-file loader, and what the layout cannot hold refused or noted. Sampling, merging and
training on such a file as the base: test_single_file_as_base.py.

The file is written from an SD1.5-shaped pipeline with tiny widths (4 UNet blocks of 2 layers, 4 VAE
blocks of 2 layers) and loaded with `model.single_file_config` pointing at the matching diffusers configs:
diffusers' own single-file loader must give back every weight.
"""

import json
import shutil

import pytest
import torch
from conftest import REPO, SHIPPED_BASE, build_recipe
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from finetune.cli.main import main
from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.formats.single_file_export import export_checkpoint
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


def exported_single_file(tmp_path):
    """(the .safetensors file, a diffusers folder with its configs, the pipeline it was written from), in `tmp_path`."""
    pipeline = sd15_shaped_pipeline(tmp_path)
    configs = tmp_path / "configs"
    pipeline.save_pretrained(configs)
    path, _ = export_checkpoint(configs, tmp_path / "model.safetensors")
    return path, configs, pipeline


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """exported_single_file, made once for the module (about half a second a test); the tests read it, and write in their
    own tmp_path."""
    return exported_single_file(tmp_path_factory.mktemp("single-file"))


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


def test_a_disk_that_fills_while_the_file_is_written_is_one_line_and_leaves_no_partial_copy(single_file, tmp_path, monkeypatch):
    """The file is written under a hidden name and renamed once whole: a full disk mid-write removes what was written."""
    import errno

    import finetune.outputs.atomic_files

    written = finetune.outputs.atomic_files.save_file

    def fills_the_disk(tensors, filename, metadata=None):
        written(tensors, filename, metadata)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(finetune.outputs.atomic_files, "save_file", fills_the_disk)
    out = tmp_path / "webui" / "model.safetensors"
    with pytest.raises(FinetuneError, match=rf"^export-checkpoint could not write {out} \(OSError: No space left on device\): free space or pick another folder$"):
        export_checkpoint(single_file[1], out)
    assert list(out.parent.iterdir()) == []


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
