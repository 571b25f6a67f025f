"""The eval suites scored on the toy world's own renders in place of a model's images: the ceiling each suite can
reach, which tells the scorers work (adherence ~1.0 is the classifier reading what the caption says) and gives
docs/results.md its "real renders of the scenes" row. Only the tests and that row use it, so it lives here, not in
finetune.evaluation.evaluate, whose public scoring (`score_suites`, `checked_suites`, `render_scenes`) it shares with `finetune eval`."""

from __future__ import annotations

from finetune.errors import FinetuneError
from finetune.evaluation.evaluate import DEFAULT_SUITES, checked_suites, render_scenes, score_suites


def evaluate_real_images(
    num_prompts: int = 64, seed: int = 0, suites=DEFAULT_SUITES, images_per_prompt: int = 1, subject: str = "star"
) -> dict:
    """The same suites with the world's own renders in place of a model: the ceiling.

    Each prompt's scene is rendered with a jitter (salted by ``seed``) different from the
    FID reference, so ``fid`` is the floor a perfect generator would reach at this size
    and adherence is ~1.0 (anything lower is classifier error). For ``control`` the renders
    are the right scenes at another jitter than their masks: the IoU of a generator that
    draws exactly what the caption says but reads nothing from the control (the ceiling of
    the base model without a ControlNet).
    """
    if seed < 0:  # -1 salted by 0 drew the FID reference and the masks' own jitter (fid 0, control_iou 1.0)
        raise FinetuneError(f"the seed of the real renders is a number from 0 up, got {seed}")
    options = dict(n=num_prompts, images_per_prompt=images_per_prompt, identifier="sks", subject=subject, class_word="shape", resolution=64)
    suites = checked_suites(suites, options)
    result = score_suites(lambda name, ps: render_scenes(ps, images_per_prompt, salt=(seed + 1,)), suites, options)
    result["settings"] = dict(base="real toy-world images", lora=None, suites=suites,
                              num_prompts=num_prompts, images_per_prompt=images_per_prompt, seed=seed)  # fmt: skip
    return result
