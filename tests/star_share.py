"""Share of stars the shipped base (plus a LoRA) draws for held-in captions with the shape replaced by "star"."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from conftest import SHIPPED_BASE
from finetune.evaluation.evaluate import generate_per_prompt
from finetune.sampling.inference import load_sampling_pipeline
from finetune.toyworld.metrics import attribute_share
from finetune.toyworld.world import caption, sample_scenes

STAR_PROMPTS = [caption(replace(scene, shape="star")) for scene in sample_scenes(32, 2_000_005, "no")]


def star_share(lora: Path | None) -> float:
    pipeline = load_sampling_pipeline(str(SHIPPED_BASE), None if lora is None else str(lora), 1.0)
    rows = generate_per_prompt(pipeline, STAR_PROMPTS, 1, 0, 20, 5.0, 64)
    return attribute_share([image for row in rows for image in row], "shape", "star")
