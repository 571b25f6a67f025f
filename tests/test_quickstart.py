"""The quickstart teaches the shipped base the star it never saw (recipes/quickstart.yaml, as run by `make quickstart`).

Prompts are held-in captions with the shape replaced by "star" ("a large red star on a blue background,
center"). The base draws none (it never saw one); after the LoRA the evaluator reads stars. A trainer
that does not train, an adapter that is not saved or not loaded, or captions that do not reach the
UNet all leave the share at zero.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import SHIPPED_BASE
from star_share import star_share

from finetune.cli.main import main


def test_quickstart_lora_learns_the_star(quickstart_lora, base_star_share):
    assert (quickstart_lora / "pytorch_lora_weights.safetensors").is_file()
    before, after = base_star_share, star_share(quickstart_lora)
    # Measured on the shipped base: 0.0 before, 0.47 after (docs/toyworld.md).
    assert before <= 0.05 and after >= 0.25, (before, after)


def python_block(card: Path) -> str:
    text = card.read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def pasted_in_its_folder(card: Path, base: Path, monkeypatch) -> str:
    """A LoRA card's diffusers code as a reader runs it: in the card's folder (its code loads the LoRA from "."), with the
    base it names by name only beside it."""
    (card.parent / base.name).symlink_to(base)
    monkeypatch.chdir(card.parent)
    return python_block(card)


def test_the_model_cards_diffusers_code_runs_on_the_shipped_base(quickstart_lora, tmp_path, capsys, monkeypatch):
    """What `finetune export` and `finetune merge` tell a user to paste, pasted: the shipped base keeps
    an fp16 text encoder beside fp32 parts, which mixed dtypes in a plain from_pretrained. The LoRA's card names its
    local base by name only (a shared file names no folders of this machine): pasted in its folder, the base beside it."""
    assert main(["export", str(quickstart_lora), str(tmp_path / "webui"), "--to", "kohya"]) == 0
    assert main(["merge", "--base", str(SHIPPED_BASE), "--lora", str(tmp_path / "webui"), str(tmp_path / "merged")]) == 0
    exported = [path.with_suffix(".md") for path in (tmp_path / "webui").glob("*.safetensors")]
    assert len(exported) == 1 and exported[0].is_file(), sorted(path.name for path in (tmp_path / "webui").iterdir())  # its card, beside it
    assert f'# "{SHIPPED_BASE.name}": the base it was trained on' in exported[0].read_text()
    for card, code in ((exported[0], pasted_in_its_folder(exported[0], SHIPPED_BASE, monkeypatch)), (tmp_path / "merged" / "README.md", None)):
        namespace: dict = {}
        exec(code or python_block(card), namespace)
        image = namespace["pipeline"]("a star", num_inference_steps=1, output_type="np").images[0]
        assert image.shape == (64, 64, 3) and np.isfinite(image).all(), card


def test_the_shipped_base_samples_in_plain_diffusers_and_export_base_keeps_it_so(tmp_path, capsys):
    """Files in fp16 (half the bytes), every part fp32 when loaded with no dtype given: a text encoder
    loaded as fp16 beside an fp32 UNet failed at the first matmul."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    for folder in (SHIPPED_BASE, tmp_path / "copy"):
        if folder != SHIPPED_BASE:
            assert main(["export-base", str(SHIPPED_BASE), str(folder)]) == 0
        with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as f:
            assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F16"
        pipeline = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
        assert {pipeline.unet.dtype, pipeline.vae.dtype, pipeline.text_encoder.dtype} == {torch.float32}
        assert pipeline("a red star", num_inference_steps=1, output_type="np").images[0].shape == (64, 64, 3)
    assert main(["export-base", str(SHIPPED_BASE), str(tmp_path / "copy")]) == 2  # not over an existing folder, unasked
    assert f"export-base destination {tmp_path / 'copy'} is not empty: pick a new folder, or pass --overwrite" in capsys.readouterr().err
    assert main(["export-base", str(SHIPPED_BASE), str(tmp_path / "copy"), "--overwrite"]) == 0


def test_the_readmes_quickstart_sampling_lines_are_those_printed(quickstart_lora, tmp_path, monkeypatch, capsys):
    # `make quickstart`'s last command, as the Makefile runs it (fewer steps), says what README's "Start here" quotes.
    import re
    import shlex

    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    command = shlex.split(re.search(r"\$\(BIN\)/finetune (sample .*?--out \S+)", makefile.replace("\\\n", " "), re.S)[1])
    command[command.index("--steps") + 1] = "1"
    command[command.index("--lora") + 1] = str(quickstart_lora)
    command[command.index("--base") + 1] = str(SHIPPED_BASE)
    monkeypatch.chdir(tmp_path)
    assert main(command) == 0
    printed = capsys.readouterr().out.splitlines()
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    quoted = re.search(r"```\n(samples: .*?)\n```", readme, re.S)[1].splitlines()
    assert printed[-2] == "sampling on cpu in fp32" == quoted[-2]
    assert printed[-1].startswith(quoted[-1].removesuffix("...)")), (printed[-1], quoted[-1])
