"""A file's suffix in capitals (a Windows user's LoRA.SafeTensors, MODEL.SAFETENSORS, old.CKPT) is the suffix it is, wherever
a base, LoRA or ControlNet path is told apart by it: a LoRA .SafeTensors was refused as "not a .safetensors file: pickle
checkpoints are not loaded", a base's fit to a LoRA went unchecked, and the demo did not list such files. A single-file base in
capitals, told to be renamed (diffusers reads a single file by its lowercase suffix), loads as it is."""

from __future__ import annotations

import numpy as np
from conftest import SHIPPED_BASE
from safetensors.numpy import save_file
from test_fast_errors import said_without_the_training_stack
from test_lora_base_fit import CROSS_KEY, lora_file

from finetune.checkpoints.run_files import resolve_lora_file
from finetune.formats.lora_base_fit import lora_base_problem
from finetune.models.single_file_configs import CROSS_ATTENTION_KEY


def test_a_lora_whose_suffix_is_in_capitals_is_read_as_safetensors(tmp_path):
    """Its fit to the base is said before torch loads, as of any LoRA file (it was "not a .safetensors file: pickle ..."), and
    a folder holding it alone names it."""
    narrow = lora_file(tmp_path / "Narrow.SafeTensors", {CROSS_KEY: (32, 32)})  # trained on a base reading 32-wide text
    (tmp_path / "export").mkdir()
    alone = lora_file(tmp_path / "export" / "STYLE.SAFETENSORS", {CROSS_KEY: (32, 32)})
    said = said_without_the_training_stack([
        ["merge", "--base", str(SHIPPED_BASE), "--lora", narrow, str(tmp_path / "merged")],
        ["sample", "--base", str(SHIPPED_BASE), "--lora", str(tmp_path / "export"), "--prompt", "a star", "--out", str(tmp_path / "out")],
    ])  # fmt: skip
    assert said[0].startswith(f"LoRA {narrow} does not fit base model {SHIPPED_BASE}: its layer {CROSS_KEY}.lora_A reads text 32 wide"), said[0]
    assert said[1].startswith(f"LoRA {alone} does not fit base model {SHIPPED_BASE}"), said[1]
    assert resolve_lora_file(str(tmp_path / "export")) == tmp_path / "export" / "STYLE.SAFETENSORS"


def test_a_lora_whose_suffix_is_in_capitals_loads(tmp_path):
    from finetune.formats.kohya import load_lora

    lora = load_lora(lora_file(tmp_path / "ours.SafeTensors", {CROSS_KEY: (32, 64)}))
    assert list(lora.layers) == [CROSS_KEY]


def test_a_single_file_base_whose_suffix_is_in_capitals_is_read_by_its_tensors(tmp_path):
    """lora_base_fit took MODEL.SAFETENSORS for a folder or hub id, whose configs are not there: no fit was checked."""
    for name in ("SD15.SAFETENSORS", "sd15.SafeTensors"):
        save_file({CROSS_ATTENTION_KEY: np.zeros((320, 768), np.float16)}, str(tmp_path / name))
        sd2 = lora_file(tmp_path / "sd2-lora.safetensors", {CROSS_KEY: (1024, 320)})
        assert f"does not fit base model {tmp_path / name}: its layer {CROSS_KEY}.lora_A reads text 1024 wide, the base's {name} has" in (
            lora_base_problem(sd2, str(tmp_path / name)) or ""), name


def test_a_controlnet_file_whose_suffix_is_in_capitals_is_said_to_be_what_it_is(tmp_path):
    """A single-file ControlNet in the original layout, as model sites share it: said to be one, and how to convert it (it was
    "not a .safetensors file: pickle checkpoints are not loaded")."""
    import pytest

    from finetune.controlnet.folder import CONVERT_ORIGINAL_CONTROLNET, refuse_a_controlnet_file
    from finetune.errors import FinetuneError

    path = tmp_path / "control_canny.SafeTensors"
    save_file({"control_model.input_blocks.0.0.weight": np.zeros((4, 4), np.float32)}, str(path))
    with pytest.raises(FinetuneError) as refused:
        refuse_a_controlnet_file(path, f"--controlnet {path}")
    assert str(refused.value) == (f"--controlnet {path} is a single-file ControlNet in the original layout (control_model. keys, as model "
                                  f"sites share it): {CONVERT_ORIGINAL_CONTROLNET} and pass that folder")  # fmt: skip


def test_the_demo_lists_loras_and_pickles_whose_suffix_is_in_capitals(tmp_path):
    from finetune.demo.adapter_scan import scan_adapters

    lora_file(tmp_path / "Style.SafeTensors", {CROSS_KEY: (32, 32)})
    (tmp_path / "old.CKPT").write_bytes(b"pickle")
    found = {adapter.path.name: adapter for adapter in scan_adapters(tmp_path).values()}
    assert sorted(found) == ["Style.SafeTensors", "old.CKPT"], found
    assert found["Style.SafeTensors"].refused is None and found["old.CKPT"].refused.startswith("pickle checkpoint"), found


def test_export_to_a_file_name_whose_suffix_is_in_capitals_writes_that_file(tmp_path):
    """It made a folder of that name, holding the LoRA as lora.safetensors."""
    from finetune.cli.main import main

    lora = lora_file(tmp_path / "lora.safetensors", {CROSS_KEY: (32, 32)})
    assert main(["export", lora, str(tmp_path / "webui" / "Style.SafeTensors"), "--to", "kohya"]) == 0
    assert (tmp_path / "webui" / "Style.SafeTensors").is_file()


def test_a_lora_whose_suffix_is_in_capitals_is_named_with_its_webui_hash(tmp_path):
    """A sampled image's settings name the LoRA the webui way, with its hash where the file sampled with is the file of that
    name: Style.SafeTensors is (the webui lists it as Style), and got no hash."""
    from finetune.sampling.sample_files import webui_lora, webui_lora_hash

    lora = lora_file(tmp_path / "Style.SafeTensors", {CROSS_KEY: (32, 32)})
    assert webui_lora(lora) == ("Style", webui_lora_hash(tmp_path / "Style.SafeTensors"))


def test_export_checkpoint_to_a_suffix_in_capitals_is_told_the_lowercase_name(tmp_path):
    """A whole model written as Model.SafeTensors is a base finetune (and diffusers) would not read: said so, not 'not a
    .safetensors file name'."""
    import pytest

    from finetune.errors import FinetuneError
    from finetune.outputs.folders import check_export_checkpoint_output

    with pytest.raises(FinetuneError) as refused:
        check_export_checkpoint_output(SHIPPED_BASE, tmp_path / "Model.SafeTensors", overwrite=False)
    assert str(refused.value) == (f"export-checkpoint output {tmp_path / 'Model.SafeTensors'} ends in .SafeTensors: give it as Model.safetensors "
                                  "(diffusers knows a single-file model by its suffix, in lowercase)")  # fmt: skip


def test_a_base_folder_whose_weights_end_in_capitals_is_told_to_rename_them(tmp_path):
    """A pipeline folder copied from Windows (unet/diffusion_pytorch_model.SafeTensors) was said to have "no weights in unet:
    copy the whole pipeline folder again", of weights that are there: finetune looked for them by a lowercase pattern alone.
    Found in any case now; where the disk tells case apart, diffusers, which opens the lowercase name, would not find them:
    said before torch loads, with the rename that fixes it."""
    import shutil

    base = tmp_path / "copied"
    shutil.copytree(SHIPPED_BASE, base)
    for weights in (base / "unet").glob("*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".SafeTensors")))
    said = said_without_the_training_stack([["sample", "--base", str(base), "--prompt", "a star", "--out", str(tmp_path / "out")]])
    assert said == [f"base model folder {base}: unet/diffusion_pytorch_model.SafeTensors ends in .SafeTensors, and diffusers opens "
                    "unet/diffusion_pytorch_model.safetensors by that name, in lowercase (a folder copied from Windows?): rename its "
                    "weights files to end in .safetensors"]  # fmt: skip


def test_a_single_file_base_whose_suffix_is_in_capitals_loads_as_it_is(tmp_path):
    """It was told to rename the file (diffusers would read Model.SafeTensors as a pickle): loading gives diffusers a
    lowercase name for it, the file itself where the disk ignores case, else a link in a temporary folder."""
    from test_single_file import assert_loads_back, sd15_shaped_pipeline

    from finetune.formats.single_file_export import export_checkpoint

    pipeline = sd15_shaped_pipeline(tmp_path)
    pipeline.save_pretrained(tmp_path / "configs")
    export_checkpoint(tmp_path / "configs", tmp_path / "exported.safetensors")
    copied = (tmp_path / "exported.safetensors").rename(tmp_path / "Model.SafeTensors")
    assert_loads_back(copied, tmp_path / "configs", pipeline)
    assert [p.name for p in tmp_path.iterdir() if p.suffix.lower() == ".safetensors"] == ["Model.SafeTensors"]  # no other name for it left


def test_a_controlnet_folder_whose_weights_end_in_capitals_is_told_to_rename_them(tmp_path):
    """A ControlNet folder copied from Windows (diffusion_pytorch_model.SafeTensors), and the UNet a run with
    controlnet.unlock_unet_decoder saved beside it, loaded with diffusers' error naming a .bin, after torch: where the disk
    tells case apart diffusers opens the lowercase name alone. Said before torch loads, with the rename, as of a base folder."""
    import json
    import shutil

    from finetune.checkpoints.run_files import CONTROLNET_DIR, METADATA_FILE, UNET_DIR

    shipped = SHIPPED_BASE.parent / "toyworld-controlnet-mask"
    run = tmp_path / "run"
    shutil.copytree(shipped, run / CONTROLNET_DIR)
    shutil.copytree(SHIPPED_BASE / "unet", run / UNET_DIR)  # as a run with controlnet.unlock_unet_decoder saves it
    for folder in (run / CONTROLNET_DIR, run / UNET_DIR):
        (folder / METADATA_FILE).write_text(json.dumps({"finetune.method": "controlnet", "finetune.steps": "5"}))
    condition = SHIPPED_BASE.parents[2] / "datasets" / "star" / "0000.png"
    sample = ["sample", "--base", str(SHIPPED_BASE), "--controlnet", str(run), "--condition", str(condition), "--prompt", "a star", "--out", str(tmp_path / "out")]
    rename = ("diffusion_pytorch_model.SafeTensors ends in .SafeTensors, and diffusers opens diffusion_pytorch_model.safetensors by that "
              "name, in lowercase (a folder copied from Windows?): rename its weights files to end in .safetensors")  # fmt: skip
    (run / UNET_DIR / "diffusion_pytorch_model.safetensors").rename(run / UNET_DIR / "diffusion_pytorch_model.SafeTensors")
    assert said_without_the_training_stack([sample]) == [f"the UNet {run / UNET_DIR} its ControlNet was trained with: {rename}"]
    (run / CONTROLNET_DIR / "diffusion_pytorch_model.safetensors").rename(run / CONTROLNET_DIR / "diffusion_pytorch_model.SafeTensors")
    assert said_without_the_training_stack([sample]) == [f"--controlnet {run}: {rename}"]


def test_the_demo_is_told_to_rename_the_weights_of_a_controlnets_unet_that_end_in_capitals(tmp_path):
    """The demo loads a ControlNet's UNet (controlnet.unlock_unet_decoder) with load_unlocked_decoder, which said diffusers'
    'no file named diffusion_pytorch_model.safetensors' of the weights that are there in another letter case."""
    import shutil

    import pytest

    from finetune.errors import FinetuneError
    from finetune.sampling.inference import load_unlocked_decoder

    shutil.copytree(SHIPPED_BASE / "unet", tmp_path / "unet")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "unet" / "diffusion_pytorch_model.SafeTensors")
    with pytest.raises(FinetuneError) as refused:
        load_unlocked_decoder(tmp_path / "unet", safetensors_only=True)
    assert str(refused.value).startswith(f"the UNet {tmp_path / 'unet'} its ControlNet was trained with: diffusion_pytorch_model.SafeTensors "
                                         "ends in .SafeTensors, and diffusers opens diffusion_pytorch_model.safetensors"), refused.value  # fmt: skip


def test_a_controlnets_weights_variant_in_capitals_is_its_variant(tmp_path):
    """A ControlNet holding only diffusion_pytorch_model.fp16.SafeTensors: on a disk that ignores case diffusers opens it as
    .fp16.safetensors when told the variant, which weights_variant found by a lowercase pattern alone (it said none, and
    diffusers looked for the plain file)."""
    from finetune.controlnet.folder import weights_variant

    (tmp_path / "diffusion_pytorch_model.fp16.SafeTensors").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    assert weights_variant(tmp_path) == {"variant": "fp16"}


def test_the_demo_lists_a_pipeline_and_a_controlnet_whose_weights_end_in_capitals_with_the_rename(tmp_path):
    """A pipeline copied from Windows (unet/diffusion_pytorch_model.SafeTensors) was listed as refused with 'no unet weights (a
    copy cut short?): copy the pipeline folder again', a ControlNet as 'no diffusion_pytorch_model.safetensors': the weights
    are there; where the disk tells case apart diffusers does not open them by that name, said with the rename."""
    import shutil

    from finetune.demo.adapter_scan import scan_adapters

    shutil.copytree(SHIPPED_BASE, tmp_path / "copied")
    shutil.copytree(SHIPPED_BASE.parent / "toyworld-controlnet-mask", tmp_path / "edges")
    for weights in (tmp_path / "copied" / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "edges" / "diffusion_pytorch_model.safetensors"):
        weights.rename(weights.with_name("diffusion_pytorch_model.SafeTensors"))
    rename = ("diffusion_pytorch_model.SafeTensors ends in .SafeTensors, and diffusers opens {0}diffusion_pytorch_model.safetensors by that "
              "name, in lowercase (a folder copied from Windows?): rename its weights files to end in .safetensors")  # fmt: skip
    adapters = scan_adapters(tmp_path)
    assert (adapters["copied"].kind, adapters["copied"].refused) == ("pipeline", "unet/" + rename.format("unet/"))
    assert (adapters["edges"].kind, adapters["edges"].refused) == ("controlnet", rename.format(""))


def test_a_base_folders_weights_variant_in_capitals_is_its_variant(tmp_path):
    """A pipeline saved with only fp16 weights, copied from Windows (unet/diffusion_pytorch_model.fp16.SafeTensors): on a disk
    that ignores case it loads by the variant, which saved_variant found by a lowercase pattern alone (it said none, and
    diffusers stopped on the plain file's absence, naming a .bin)."""
    from finetune.models.loading import saved_variant

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.fp16.SafeTensors").write_bytes(b"")
    assert saved_variant(tmp_path) == {"variant": "fp16"}
    (tmp_path / "unet" / "diffusion_pytorch_model.SafeTensors").write_bytes(b"")  # the plain file too: no variant to name
    assert saved_variant(tmp_path) == {}
