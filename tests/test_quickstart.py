"""The quickstart teaches the shipped base the star it never saw (recipes/quickstart.yaml, as run by `make quickstart`).

Prompts are held-in captions with the shape replaced by "star" ("a large red star on a blue background,
center"). The base draws none (it never saw one); after the LoRA the evaluator reads stars. A trainer
that does not train, an adapter that is not saved or not loaded, or captions that do not reach the
UNet all leave the share at zero.
"""

from __future__ import annotations

from star_share import star_share


def test_quickstart_lora_learns_the_star(quickstart_lora):
    assert (quickstart_lora / "pytorch_lora_weights.safetensors").is_file()
    before, after = star_share(None), star_share(quickstart_lora)
    # Measured on the shipped base: 0.0 before, 0.47 after (docs/toyworld.md).
    assert before <= 0.05 and after >= 0.25, (before, after)
