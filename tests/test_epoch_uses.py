"""Repeats that would make an epoch too long to list (it is shuffled whole in memory) refused in one line:
repeats of 10**12 were listed (8 TB) until memory ran out, without a word."""

import pytest
from PIL import Image

from finetune.cli.main import main
from finetune.config import DataConfig
from finetune.config.base import MAX_USES_PER_EPOCH
from finetune.config.recipe_loading import load_recipe, recipe_from_dict
from finetune.data_check.check import checked_examples
from finetune.errors import FinetuneError

BOUND = f"must be at most {MAX_USES_PER_EPOCH:,} (an epoch is listed and shuffled in memory, each image its repeats times): lower it"


def test_repeats_past_the_epoch_bound_are_refused_where_the_recipe_loads():
    folder = {"data": {"image_dir": "x", "folders": [{"path": ".", "repeats": 10**12}]}}
    concept = {"method": "dreambooth", "dreambooth": {"prior_preservation": False, "concepts": [{"instance_dir": "x", "instance_prompt": "sks", "repeats": 10**12}]}}
    for raw, key in ((folder, "data.folders.0.repeats"), (concept, "dreambooth.concepts.0.repeats")):
        with pytest.raises(FinetuneError) as raised:
            recipe_from_dict(raw)
        assert str(raised.value) == f"recipe: key '{key}': {BOUND} (got {10**12})"
    folder["data"]["folders"][0]["repeats"] = MAX_USES_PER_EPOCH
    assert recipe_from_dict(folder).data.folders[0].repeats == MAX_USES_PER_EPOCH


def test_an_epoch_of_too_many_uses_is_refused_before_it_is_listed(tmp_path, capsys):
    """Each folder's repeats within the bound, the images times their repeats past it."""
    for name, colour in (("a", "red"), ("b", "blue")):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"a {colour} square")
    repeats = MAX_USES_PER_EPOCH // 2 + 1
    config = DataConfig(image_dir=str(tmp_path), resolution=64, folders=[{"path": ".", "repeats": repeats}])
    said = (f"an epoch would use 2 images {2 * repeats:,} times in all (each its repeats times), more than the {MAX_USES_PER_EPOCH:,} "
            "an epoch may have (it is listed and shuffled in memory): lower the repeats")  # fmt: skip
    with pytest.raises(FinetuneError) as raised:
        checked_examples(config)  # what training lists, before any model loads
    assert str(raised.value) == said
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data:\n  image_dir: {tmp_path}\n  resolution: 64\n  folders:\n    - {{path: ., repeats: {repeats}}}\n")
    assert main(["check-data", str(recipe)]) != 0
    assert capsys.readouterr().err.strip() == f"error: {said}"


def test_dreambooth_concepts_are_one_epoch_bounded_together(tmp_path, capsys):
    """Each concept within the bound, together past it: their instances are one list, shuffled whole each epoch. Training
    checked each concept alone (two of 6,000,000 uses listed 12,000,000) and check-data said 'ready to train'."""
    from finetune.methods.dreambooth import DreamBoothMethod

    concepts = []
    for name, colour in (("a", "red"), ("b", "blue")):
        (tmp_path / name).mkdir()
        Image.new("RGB", (64, 64), colour).save(tmp_path / name / "0.png")
        concepts.append(f"    - {{instance_dir: {tmp_path / name}, instance_prompt: sks {colour}, repeats: {MAX_USES_PER_EPOCH // 2 + 1}}}\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: dreambooth\ndata: {resolution: 64}\ndreambooth:\n  prior_preservation: false\n  concepts:\n" + "".join(concepts))
    said = (f"an epoch would use 2 images {2 * (MAX_USES_PER_EPOCH // 2 + 1):,} times in all (each its repeats times), more than the "
            f"{MAX_USES_PER_EPOCH:,} an epoch may have (it is listed and shuffled in memory): lower the repeats")  # fmt: skip
    with pytest.raises(FinetuneError) as raised:
        DreamBoothMethod(load_recipe(recipe)).check_data()  # what training lists, before any model loads
    assert str(raised.value) == said
    assert main(["check-data", str(recipe)]) != 0
    assert capsys.readouterr().err.strip() == f"error: {said}"
