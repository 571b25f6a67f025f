"""sd-scripts' metadata (`ss_*`) and ours (`finetune.*`): which keys say the same thing, and reading sd-scripts' into ours.

`finetune.formats.kohya` writes ours under sd-scripts' names on export and reads them back on import, so a LoRA keeps its
record (base, steps, clip skip, the training data's tags) through either layout.
"""

from __future__ import annotations

import contextlib
import json
import re

# sd-scripts' `sshs_model_hash` and `sshs_legacy_hash` are hashes of the very file they are in, which the webui keys a LoRA by
# in preference to hashing it: carried into an export (fp16, or the other layout) they named the source file's bytes, and
# the webui took the new file for the old one. Not read, so never written again.
KOHYA_ONLY_METADATA = ("ss_", "sshs_")
# LoRA+ ratios: sd-scripts takes them as network_args and records those as JSON in ss_network_args.
LORAPLUS_KEYS = ("loraplus_lr_ratio", "loraplus_text_encoder_lr_ratio")
# Our metadata keys and sd-scripts' keys for the same thing, copied across on import and export.
KOHYA_KEYS = (
    ("finetune.base_model", "ss_sd_model_name"),
    ("finetune.steps", "ss_steps"),  # the step it was saved at
    ("finetune.epoch", "ss_epoch"),  # the epochs completed by then
    ("finetune.max_steps", "ss_max_train_steps"),  # the run's length
    ("finetune.clip_skip", "ss_clip_skip"),
    ("finetune.max_token_length", "ss_max_token_length"),
    ("finetune.max_norm", "ss_scale_weight_norms"),
)
# The training data: images per epoch, and per folder its images and repeats and its captions' tag counts
# (JSON), which the webui's LoRA metadata editor and LoRA managers offer as trigger words.
DATASET_KOHYA_KEYS = (
    ("finetune.num_train_images", "ss_num_train_images"),
    ("finetune.dataset_dirs", "ss_dataset_dirs"),
    ("finetune.tag_frequency", "ss_tag_frequency"),
)
KOHYA_KEYS += DATASET_KOHYA_KEYS


def finetune_metadata_from_kohya(metadata: dict[str, str]) -> dict[str, str]:
    """Keep our keys; for files from sd-scripts, take base model, steps, clip skip, max token length, v-prediction and
    zero terminal SNR from its `ss_` keys."""
    kept = {k: v for k, v in metadata.items() if not k.startswith(KOHYA_ONLY_METADATA)}
    for ours, theirs in KOHYA_KEYS:
        if ours not in kept and metadata.get(theirs) not in (None, "", "None"):  # sd-scripts writes "None" for unset
            kept[ours] = metadata[theirs]
    if "finetune.steps" not in kept and metadata.get("ss_max_train_steps") not in (None, "", "None"):  # sd-scripts files without ss_steps
        kept["finetune.steps"] = metadata["ss_max_train_steps"]
    if "finetune.prediction_type" not in kept and metadata.get("ss_v_parameterization") in ("True", "False"):
        kept["finetune.prediction_type"] = "v_prediction" if metadata["ss_v_parameterization"] == "True" else "epsilon"
    square = re.fullmatch(r"\((\d+), ?(\d+)\)", metadata.get("ss_resolution") or "")
    if "finetune.resolution" not in kept and square and square.group(1) == square.group(2):  # sd-scripts' "(512, 512)"
        kept["finetune.resolution"] = square.group(1)
    if "finetune.zero_terminal_snr" not in kept and metadata.get("ss_zero_terminal_snr") == "True":
        kept["finetune.zero_terminal_snr"] = "true"
    with contextlib.suppress(ValueError, TypeError, AttributeError):  # other trainers' network_args may be anything
        network_args = json.loads(metadata.get("ss_network_args") or "{}")
        kept.update({f"finetune.{key}": str(network_args[key]) for key in LORAPLUS_KEYS if key in network_args and f"finetune.{key}" not in kept})
    return kept
