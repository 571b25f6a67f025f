"""What the run that trained a starting file recorded (lora.init_from: its clip skip and prediction type;
controlnet.pretrained: its prediction type) against what this run trains with, from the file's header or config alone,
without torch: `finetune train` says one trained otherwise before its data check decodes every image; the methods say it
again as they start from the file (finetune/methods/lora_init.py, finetune/methods/controlnet.py)."""

from __future__ import annotations

from finetune.errors import FinetuneError


def text_encoder_switch(recipe) -> tuple[bool, str]:
    """Whether the run trains a text-encoder LoRA, and the key that turns it on (DreamBooth has its own), as the file's
    text-encoder layers are checked against it."""
    if recipe.method == "dreambooth":
        return recipe.dreambooth.train_text_encoder, "dreambooth.train_text_encoder"
    return recipe.lora.train_text_encoder, "lora.train_text_encoder"


def recorded_clip_skip(metadata: dict[str, str]) -> int | None:
    """The clip skip an adapter's metadata records (ours, or sd-scripts' read into ours); None if none."""
    value = str(metadata.get("finetune.clip_skip", ""))
    return int(value) if value.isdigit() else None


def check_recorded_alike(metadata: dict[str, str], source: str, clip_skip: int, prediction_type: str | None) -> None:
    """A LoRA continued with another prompt encoding (model.clip_skip) or another target (model.prediction_type) would
    start from what it did not learn. `metadata`: its header's record, as ours (sd-scripts' read into ours);
    `prediction_type` None: not known before the base loads (then only the clip skip is compared)."""
    recorded_skip, recorded_type = recorded_clip_skip(metadata), metadata.get("finetune.prediction_type")
    if recorded_skip is not None and recorded_skip != clip_skip:
        raise FinetuneError(f"lora.init_from {source} was trained with clip skip {recorded_skip}, this recipe's model.clip_skip is {clip_skip}: set it to {recorded_skip}")
    check_same_target("lora.init_from", source, recorded_type, prediction_type)


def check_same_target(key: str, source: str, recorded: str | None, trained: str | None) -> None:
    """A starting file (`key`: lora.init_from, controlnet.pretrained) whose run recorded another prediction type than this
    run trains for; None for either: not known (not recorded, or not before the base loads)."""
    if recorded and trained is not None and recorded != trained:
        raise FinetuneError(f"{key} {source} was trained for {recorded}, this run trains for {trained}: set model.prediction_type: {recorded}")
