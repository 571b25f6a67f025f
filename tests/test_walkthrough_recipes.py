"""What a user walking through recipes/ and the docs that describe their knobs ran into."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SHIPPED = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", SHIPPED)
def test_every_shipped_recipe_is_named_in_the_readme(recipe):
    # recipes/toyworld/dreambooth_star.yaml was named only in docs/results.md: a README reader never met it.
    assert re.search(rf"(?<![\w/.]){re.escape(recipe)}(?!\w)", (ROOT / "README.md").read_text()), f"README.md does not name {recipe}"


def recipe_keys(section, prefix: str = "") -> set[str]:
    """Every dotted key under a config class, with list entries' keys (data.folders.path) and nested sections."""
    from finetune.config.recipe_keys import section_type

    keys = set()
    for name, field in section.model_fields.items():
        keys.add(prefix + name)
        if (nested := section_type(field.annotation)) is not None:
            keys |= recipe_keys(nested, f"{prefix}{name}.")
    return keys


def test_every_key_the_docs_name_in_backticks_is_a_recipe_key():
    # A guard while keys change in parallel (optimizer.betas, the data keys): a renamed key left in the README
    # sends users to an "unknown key" error.
    from finetune.config import Recipe
    from finetune.config.recipe_keys import section_type

    keys = recipe_keys(Recipe)
    sections = "|".join(name for name, field in Recipe.model_fields.items() if section_type(field.annotation) is not None)
    # `lora.rank`, `lora.rank: 8`, `train.max_epochs=10`; not file names (`dreambooth.yaml`, `data.py`).
    named = re.compile(rf"`((?:{sections})(?:\.[a-z_0-9]+)+)(?<!\.yaml)(?<!\.py)(?:[:=][^`]*)?`")
    unknown = [f"{doc.name}: {key}" for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
               for key in named.findall(doc.read_text()) if re.sub(r"\.\d+", "", key) not in keys]  # fmt: skip
    assert not unknown, unknown


@pytest.mark.parametrize("recipe,dataset", [("controlnet.yaml", "fusing/fill50k"), ("lora.yaml", "my/dataset")])
def test_a_dataset_given_to_a_recipe_that_names_a_folder_says_to_null_the_folder(recipe, dataset):
    # The recipes' comments offer a dataset (controlnet.yaml: "e.g. fusing/fill50k"); given one, the error said
    # "set exactly one of data.image_dir or data.dataset" without saying the recipe's folder was the other.
    from finetune.config.recipe_loading import load_recipe
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match=rf"data.image_dir \(my_\w+\) and data.dataset \({dataset}\) are both set: keep one "
                                            r"\(data.image_dir=null to train on the dataset\)$"):  # fmt: skip
        load_recipe(ROOT / "recipes" / recipe, [f"data.dataset={dataset}"])
    assert load_recipe(ROOT / "recipes" / recipe, [f"data.dataset={dataset}", "data.image_dir=null"]).data.dataset == dataset


# What each reference recipe needs to train on the tiny model: its data, a 64 px size, and no GPU precision.
QUICK = ["train.mixed_precision=no", "train.max_steps=1", "optimizer.warmup_steps=0", "data.resolution=64", "data.num_workers=0",
         "validation.prompts=[]", "validation.every_n_steps=0", "logging.tensorboard=false"]  # fmt: skip
OUTPUTS = {"lora.yaml": "pytorch_lora_weights.safetensors", "dreambooth_lora.yaml": "pytorch_lora_weights.safetensors",
           "dreambooth.yaml": "pipeline", "controlnet.yaml": "controlnet"}  # fmt: skip


@pytest.mark.parametrize("name", list(OUTPUTS))  # about a second each
def test_each_reference_recipe_trains_a_step_without_a_warning(name, tiny_model, image_folder, pairs_folder, tmp_path, capsys):
    from finetune.config.recipe_loading import load_recipe
    from finetune.training.trainer import train

    data = {"controlnet.yaml": [f"data.image_dir={pairs_folder}"], "lora.yaml": [f"data.image_dir={image_folder}"]}.get(name, [
        f"dreambooth.concepts.0.instance_dir={image_folder}", "dreambooth.num_class_images=2", "dreambooth.class_generation.num_inference_steps=2"])
    recipe = load_recipe(ROOT / "recipes" / name, [f"model.pretrained={tiny_model}", f"output_dir={tmp_path / 'run'}", *QUICK, *data])
    train(recipe)
    assert (tmp_path / "run" / OUTPUTS[name]).exists()
    out, err = capsys.readouterr()
    assert "warning" not in (out + err).lower(), out + err  # a recipe's warnings go to stderr, a run's (its data, its settings) to stdout


@pytest.mark.parametrize("betas", ["[0.9]", "[0.9, 0.99, 0.999]"])
def test_a_wrong_number_of_betas_says_to_give_two(betas):
    # [0.9] said "missing required key 'optimizer.betas.1'", as if a key of a section were missing.
    from finetune.config.recipe_loading import load_recipe
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match=r"key 'optimizer.betas': give two betas, the first and second moments' decay, e.g. \[0.9, 0.999\] "):
        load_recipe(ROOT / "recipes" / "lora.yaml", [f"optimizer.betas={betas}"])
    assert load_recipe(ROOT / "recipes" / "lora.yaml", ["optimizer.betas=[0.9, 0.99]"]).optimizer.betas == (0.9, 0.99)
