"""`finetune merge` refuses, in one line and before any model loads, an output it could not write without losing what
the user has."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from finetune.errors import FinetuneError
from finetune.formats.merge import merge_lora

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture
def lora_file(tmp_path):
    path = tmp_path / "loras" / "style.safetensors"
    path.parent.mkdir()
    save_file({f"{Q}.lora_down.weight": torch.randn(4, 32), f"{Q}.lora_up.weight": torch.randn(32, 4)}, str(path))
    return path


@pytest.mark.parametrize("output", [".", ".."])
@pytest.mark.parametrize("overwrite", [False, True])
def test_merge_output_is_never_the_current_folder(tmp_path, lora_file, monkeypatch, output, overwrite):
    """`finetune merge --lora x .` was a StopIteration traceback (`.` has no parents to look in); with --overwrite a folder
    above would have been replaced whole, the user's files in it with the pipeline."""
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    with pytest.raises(FinetuneError, match=rf"^merge output {re.escape(output)} is the current folder or one above it, which writing the pipeline "
                                            rf"would replace: give a new folder, e.g. {re.escape(str(Path(output) / 'merged'))}$"):  # fmt: skip
        merge_lora("base", str(lora_file), 1.0, Path(output), overwrite=overwrite)
    assert (work / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("output, option, where", [("mine", "--base", "is"), ("mine/unet", "--base", "is inside"), ("models", "--base", "holds"),
                                                   ("configs", "--base-config", "is")])  # fmt: skip
def test_merge_output_is_never_the_model_it_reads(tmp_path, lora_file, monkeypatch, output, option, where):
    """`merge --base models/mine models/mine/unet --overwrite` replaced the base's unet/ with a whole pipeline (the base no longer
    loaded), and `--base models/mine models/mine --overwrite` the base itself: what it was before the LoRA was lost."""
    work = tmp_path / "work"
    for folder in ("models/mine/unet", "configs/unet"):
        (work / folder).mkdir(parents=True)
        (work / folder / "config.json").write_text("{}")
    (work / "models" / "mine" / "model_index.json").write_text("{}")
    monkeypatch.chdir(work)
    output = output.replace("mine", "models/mine")
    source = {"--base": "models/mine", "--base-config": "configs"}[option]
    with pytest.raises(FinetuneError, match=rf"^merge output {re.escape(output)} {where} the model it reads \({option} {source}\), which writing it would replace: pick another folder$"):
        merge_lora("models/mine", str(lora_file), 1.0, Path(output), base_config="configs", overwrite=True)
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()) == [
        "configs/unet/config.json", "models/mine/model_index.json", "models/mine/unet/config.json"]


@pytest.mark.parametrize("precision, strength", [("fp16", 1e4), ("fp32", 1e38)])
def test_a_merge_past_what_its_precision_holds_is_one_line_and_writes_nothing(tiny_model, tmp_path, lora_file, precision, strength):
    """The merged weights were saved as infinity (a pipeline drawing black), the strength and precision unsaid."""
    out = tmp_path / "merged"
    fix = "use a smaller --strength" + ("" if precision == "fp32" else ", or --precision fp32")
    with pytest.raises(FinetuneError, match=rf"^merging {re.escape(str(lora_file))} at --strength {re.escape(f'{strength:g}')} takes its layer unet\.\S+ to "
                                            rf"\S+, beyond what {precision} holds: {re.escape(fix)}$"):
        merge_lora(str(tiny_model), str(lora_file), strength, out, precision=precision)
    assert not out.exists()
