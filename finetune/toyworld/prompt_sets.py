"""The fixed prompt sets `finetune eval` scores (``finetune.evaluation.evaluate``), with the scenes they describe.

Prompt sets come from their own fixed seeds, not from the generation ``seed``, so every
run, method and checkpoint is scored on the same prompts (the eval's ``seed`` only picks the
noise, see ``finetune.evaluation.evaluate.generate_per_prompt``):

- ``held_in_set``: captions of ``sample_scenes(n, 2_000_001, "no")``, the world the
  base model was pretrained on ("a small red circle on a blue background, top left").
- ``style_set``: captions of ``sample_scenes(n, 2_000_002, "only_style")``: held-in
  shapes captioned "striped" (a style LoRA should raise ``style_share`` towards 1).
- ``subject_set`` / ``class_set``: ``"a {identifier} {class_word}"`` /
  ``"a {class_word}"`` plus a suffix cycling over (none, " on a <bg> background",
  ", <position>", both), with background and position from
  ``sample_scenes(n, 2_000_003, "no")``. Prompt i of both sets has the same suffix, so
  fidelity and drift are measured on paired prompts. The class word defaults to
  "shape": drift is the subject leaking into its class, which only shows when the class
  prompt does not itself name the subject ("a star" drawn as a star is not drift).
  Use the identifier and class word of the DreamBooth run's instance prompt.
- ``control_set``: ``datasets.generate(n, 2_000_004)``, held-in scenes jittered with the seed
  ``(2_000_004, i)``: prompt i is scene i's caption and its conditioning image is scene i's
  shape mask at the model's resolution, white on black RGB, exactly what
  ``write_folder(..., conditioning=True)`` writes for a ControlNet training folder.
- ``placement_set``: the same scenes and masks with prompts that name only colour, shape and
  background ("a red circle on a blue background"). The full captions of ``control_set`` already
  say where and how large the shape is, so a base model with no ControlNet scores well there too;
  here only the mask says it, and a model that ignores the mask scores near chance.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from PIL import Image

from finetune.toyworld.datasets import generate as world_samples
from finetune.toyworld.world import Scene, caption, mask_image, sample_scenes

HELD_IN_SEED, STYLE_SEED, SUBJECT_SEED, CONTROL_SEED = 2_000_001, 2_000_002, 2_000_003, 2_000_004


@dataclass(frozen=True)
class PromptSet:
    """Prompts plus the scene each one describes (rendered for FID references and the ceiling),
    and for ControlNet suites one conditioning image per prompt."""

    prompts: list[str]
    scenes: list[Scene]
    seed: int
    conditions: list[Image.Image] = field(default_factory=list)


def held_in_set(n: int = 64, seed: int = HELD_IN_SEED) -> PromptSet:
    """Canonical captions of ``n`` held-in scenes (no star, no stripes)."""
    scenes = sample_scenes(n, seed, "no")
    return PromptSet([caption(s) for s in scenes], scenes, seed)


def style_set(n: int = 64, seed: int = STYLE_SEED) -> PromptSet:
    """Captions of ``n`` held-in shapes drawn in the held-out striped style."""
    scenes = sample_scenes(n, seed, "only_style")
    return PromptSet([caption(s) for s in scenes], scenes, seed)


def _suffix(scene: Scene, i: int) -> str:
    background = f" on a {scene.background} background" if i % 4 in (1, 3) else ""
    position = f", {scene.position}" if i % 4 in (2, 3) else ""
    return background + position


def subject_set(n: int = 64, identifier: str = "sks", class_word: str = "shape", subject: str = "star", seed: int = SUBJECT_SEED) -> PromptSet:
    """DreamBooth subject prompts: ``"a sks shape"``, ``"a sks shape on a blue background"``, ..."""
    scenes = [replace(s, shape=subject) for s in sample_scenes(n, seed, "no")]
    head = " ".join(w for w in ("a", identifier, class_word) if w)
    return PromptSet([head + _suffix(s, i) for i, s in enumerate(scenes)], scenes, seed)


def class_set(n: int = 64, class_word: str = "shape", seed: int = SUBJECT_SEED) -> PromptSet:
    """Prior-drift prompts: :func:`subject_set` without the identifier."""
    # Real class images are the held-in scenes themselves: their drift is 0 unless the
    # subject is a held-in shape.
    scenes = sample_scenes(n, seed, "no")
    return PromptSet([f"a {class_word}" + _suffix(s, i) for i, s in enumerate(scenes)], scenes, seed)


def control_set(n: int = 64, resolution: int = 64, seed: int = CONTROL_SEED) -> PromptSet:
    """Captions of ``n`` held-in scenes and their shape masks at ``resolution`` as conditioning images."""
    samples = world_samples(n, seed, "no", size=resolution)
    return PromptSet([text for _, text, _, _ in samples], [scene for _, _, scene, _ in samples], seed,
                     [mask_image(mask) for _, _, _, mask in samples])  # fmt: skip


def placement_set(n: int = 64, resolution: int = 64, seed: int = CONTROL_SEED) -> PromptSet:
    """:func:`control_set` with prompts that leave size and position to the mask."""
    ps = control_set(n, resolution, seed)
    prompts = [f"a {s.colour} {s.shape} on a {s.background} background" for s in ps.scenes]
    return replace(ps, prompts=prompts)


#: prompt set name -> builder(options: n, identifier, class_word, subject, resolution)
PROMPT_SETS = {
    "held_in": lambda o: held_in_set(o["n"]),
    "style": lambda o: style_set(o["n"]),
    "subject": lambda o: subject_set(o["n"], o["identifier"], o["class_word"], o["subject"]),
    "class": lambda o: class_set(o["n"], o["class_word"]),
    "control": lambda o: control_set(o["n"], o["resolution"]),
    "placement": lambda o: placement_set(o["n"], o["resolution"]),
}
