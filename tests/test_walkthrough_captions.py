"""From a walkthrough of how images and captions become batches, as a user of sd-scripts or SimpleTuner."""

from __future__ import annotations

import pytest

from finetune.errors import FinetuneError
from finetune.recipe_loading import load_recipe


def _unknown_key_message(tmp_path, override: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text("data: {image_dir: x}\n")
    with pytest.raises(FinetuneError) as raised:
        load_recipe(path, [override])
    return str(raised.value)


def test_other_trainers_data_settings_point_to_ours_not_to_a_lookalike(tmp_path):
    # The closest spelling was suggested, which for these names is another setting: flip_aug was
    # 'did you mean data.shuffle_tags', caption_prefix 'data.caption' (which replaces every caption).
    cases = {
        "data.flip_aug=true": "data.random_flip",
        "data.random_crop=true": "data.crop: random",
        "data.caption_dropout_rate=0.1": "data.caption_dropout",
        "data.caption_prefix=sks": 'data.folders: [{path: ., template: "sks, {caption}"}]',
        "data.num_repeats=10": "data.folders: [{path: ., repeats: 10}]",
        "data.bucket_no_upscale=true": "data.bucketing.no_upscale",
        "data.min_bucket_reso=256": "data.bucketing.min_side",
        "data.bucket_reso_steps=64": "data.bucketing.step",
        "resolution=512": "data.resolution",
        "data.max_token_length=150": "model.max_token_length",
    }
    for override, ours in cases.items():
        key = override.split("=")[0]
        assert _unknown_key_message(tmp_path, override) == f"override '{override}': unknown key '{key}' (here it is '{ours}')"
