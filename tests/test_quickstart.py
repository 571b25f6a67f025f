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

from finetune.cli import main


def test_quickstart_lora_learns_the_star(quickstart_lora):
    assert (quickstart_lora / "pytorch_lora_weights.safetensors").is_file()
    before, after = star_share(None), star_share(quickstart_lora)
    # Measured on the shipped base: 0.0 before, 0.47 after (docs/toyworld.md).
    assert before <= 0.05 and after >= 0.25, (before, after)


def python_block(card: Path) -> str:
    text = card.read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_model_cards_diffusers_code_runs_on_the_shipped_base(quickstart_lora, tmp_path, capsys):
    """What `finetune export` and `finetune merge` tell a user to paste, pasted: the shipped base keeps
    an fp16 text encoder beside fp32 parts, which mixed dtypes in a plain from_pretrained."""
    assert main(["export", str(quickstart_lora), str(tmp_path / "webui"), "--to", "kohya"]) == 0
    assert main(["merge", "--base", str(SHIPPED_BASE), "--lora", str(tmp_path / "webui"), str(tmp_path / "merged")]) == 0
    for card in (tmp_path / "webui" / "README.md", tmp_path / "merged" / "README.md"):
        namespace: dict = {}
        exec(python_block(card), namespace)
        image = namespace["pipeline"]("a star", num_inference_steps=1, output_type="np").images[0]
        assert image.shape == (64, 64, 3) and np.isfinite(image).all(), card
