"""An export to the kohya layout wrote the base model's path as given (/home/alice/models/...) into ss_sd_model_name, the
name the webui shows and every shared copy of the file carries; sd-scripts writes the file or folder name there. Also
what else of a file's sd-scripts metadata an export must not carry (its own hashes)."""

import pytest
import torch
from safetensors import safe_open

from finetune.formats.kohya import LoRA, LoRALayer, load_lora, save_lora_file
from finetune.outputs.base_names import shared_base_name
from finetune.sampling.adapter_records import adapter_base, recorded_base


@pytest.mark.parametrize(("given", "written"), [("/home/alice/models/sd15", "sd15"), ("/home/alice/models/sd15/", "sd15"),
                                                ("/home/alice/sd15.safetensors", "sd15.safetensors"), ("./base", "base"),
                                                ("models/sd/base", "base"), ("C:\\Users\\alice\\sd15.ckpt", "sd15.ckpt"),
                                                ("sd15.safetensors", "sd15.safetensors"),
                                                ("runwayml/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")])  # fmt: skip
def test_the_kohya_model_name_is_a_local_bases_name_and_a_hub_id_whole(given, written):
    assert shared_base_name(given) == written  # what the kohya export writes as ss_sd_model_name


def test_an_export_names_the_base_without_its_folders_and_its_run_keeps_the_path_that_finds_it(adapters_dir, tiny_model):
    """finetune.base_model is the name too (tests/test_shared_base_names.py): the run's own record (base_paths.json) keeps
    the path sample, eval and merge load the base of its LoRA from."""
    exported = adapters_dir / "webui" / "trained.safetensors"
    with safe_open(str(exported), "pt") as f:
        metadata = f.metadata()
    assert tiny_model.is_absolute() and metadata["ss_sd_model_name"] == tiny_model.name, metadata["ss_sd_model_name"]
    assert metadata["finetune.base_model"] == adapter_base(str(exported), None) == tiny_model.name
    assert recorded_base(str(adapters_dir / "trained"), None) == str(tiny_model)  # what `finetune sample --lora` loads without --base


def test_the_webuis_name_of_the_base_is_the_one_finetune_base_model_shares(adapters_dir, tmp_path):
    """ss_sd_model_name was named by a copy of base_names' rule without its hub cache case: an older LoRA recording a hub
    cache folder here was exported naming the base runwayml/stable-diffusion-v1-5 in finetune.base_model and 1d0c4eb,
    the revision's folder, in what the webui shows."""
    from safetensors.numpy import load_file, save_file

    from finetune.cli.main import main

    snapshot = tmp_path / "hub" / "models--runwayml--stable-diffusion-v1-5" / "snapshots" / "1d0c4eb"
    snapshot.mkdir(parents=True)
    trained = adapters_dir / "trained" / "pytorch_lora_weights.safetensors"
    with safe_open(str(trained), "np") as f:
        metadata = f.metadata()
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(trained)), str(old), {**metadata, "finetune.base_model": str(snapshot)})
    assert main(["export", str(old), str(tmp_path / "webui"), "--to", "kohya"]) == 0
    with safe_open(str(tmp_path / "webui" / "old.safetensors"), "np") as f:
        exported = f.metadata()
    assert exported["ss_sd_model_name"] == exported["finetune.base_model"] == "runwayml/stable-diffusion-v1-5"


def test_an_export_of_an_sd_scripts_file_does_not_carry_its_hashes(tmp_path):
    """sd-scripts records its file's own hashes (sshs_model_hash, sshs_legacy_hash), which the webui keys a LoRA by rather
    than hashing it: an fp16 export of such a file carried them, and the webui took the new file for the old one."""
    layer = LoRALayer(torch.randn(4, 8), torch.randn(8, 4), 4.0)
    lora = LoRA({"unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k": layer}, {"sshs_model_hash": "a" * 64, "sshs_legacy_hash": "b" * 8})
    source = save_lora_file(lora, tmp_path / "theirs.safetensors", "kohya")
    with safe_open(str(source), "pt") as opened:
        assert opened.metadata()["sshs_model_hash"] == "a" * 64  # as sd-scripts' file has it
    for layout in ("kohya", "diffusers"):
        exported = save_lora_file(load_lora(source), tmp_path / f"{layout}.safetensors", layout, "fp16")
        with safe_open(str(exported), "pt") as opened:
            assert not [key for key in opened.metadata() if key.startswith("sshs_")], opened.metadata()
