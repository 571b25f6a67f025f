"""ControlNet training as a user sets it up: a `datasets` dataset with a conditioning column, and
conditioning images in other modes than their targets."""

import pytest

from finetune.errors import FinetuneError
from finetune.methods.controlnet import ControlNetMethod
from finetune.toyworld.datasets import generate
from finetune.toyworld.world import mask_image


def test_a_conditioning_column_of_file_paths_is_one_line_naming_it(make_recipe, tmp_path):
    import datasets

    samples = generate(2, seed=3)
    paths = []
    for i, (_, _, _, mask) in enumerate(samples):
        mask_image(mask).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    data = datasets.Dataset.from_dict({"image": [s[0] for s in samples], "guide": paths, "text": [s[1] for s in samples]})
    data.save_to_disk(tmp_path / "saved")
    recipe = make_recipe(method="controlnet", data__image_dir=None, data__dataset=str(tmp_path / "saved"), controlnet__conditioning_column="guide")
    with pytest.raises(FinetuneError, match=r"column 'guide' \(controlnet.conditioning_column\) holds .*string.*not decoded images: "
                                            r"cast it with dataset.cast_column\('guide', datasets.Image\(\)\)"):  # fmt: skip
        ControlNetMethod(recipe).check_data()
