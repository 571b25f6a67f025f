"""A base model given as one original-layout (LDM/webui) .safetensors file, offline with the diffusers configs it names:
sample, merge, the demo, training and a LoRA's model card take it; a LoRA given as the base is named as one; and which
files of a hub repo a hub id downloads (not the single-file checkpoints beside its folders).

The file is test_single_file.py's: an SD1.5-shaped pipeline with tiny widths, exported (`exported_single_file`).
"""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import build_recipe
from diffusers import UNet2DConditionModel
from test_single_file import exported_single_file

from finetune.cli.main import main
from finetune.config import LoRAConfig, ModelConfig
from finetune.demo.engine import DemoEngine
from finetune.errors import FinetuneError
from finetune.formats.single_file_export import export_checkpoint
from finetune.methods.lora import add_lora, save_lora
from finetune.models.loading import load_base_model


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """test_single_file.py's exported file, its configs and pipeline: made once for the module; the tests only read them."""
    return exported_single_file(tmp_path_factory.mktemp("single-file"))


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

    from_folder = sample("--base", str(pipeline)).astype(int)
    # Weights mmap'd at other offsets than the folder's: MKL's SSE4.2 path rounds by alignment (UNet output 9e-7 apart), a
    # pixel on a rounding edge then moves one level, never two; clip skip 2 moves pixels by more.
    assert np.abs(sample("--base", str(configs)) - from_folder).max() > 1  # clip skip 2 changes the image
    assert np.abs(sample("--base", str(path), "--base-config", str(configs)) - from_folder).max() <= 1
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
