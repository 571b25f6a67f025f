"""Recipe values of the wrong kind refused in one line naming the key: a YAML boolean where a number is
wanted (pydantic's lax mode read true as 1 and false as 0), a number where a switch is wanted."""

import re

import pytest
from pydantic import ValidationError

from finetune.cli.main import main
from finetune.config import Concept, DreamBoothConfig, FolderConfig, Recipe, Section
from finetune.config.recipe_loading import load_recipe, recipe_from_dict
from finetune.errors import FinetuneError

NUMBER_MESSAGE = "takes a number; YAML reads an unquoted yes/no/on/off/true/false as a boolean: write a number"


def sections() -> list[Section]:
    """One instance of every recipe section (those with required keys given the fewest)."""
    made = {FolderConfig: FolderConfig(path="."), Concept: Concept(instance_dir="x", instance_prompt="y"), Recipe: Recipe(data={"image_dir": "x"})}
    made[DreamBoothConfig] = DreamBoothConfig(concepts=[made[Concept]])
    todo, found = list(Section.__subclasses__()), []
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        found.append(made.get(cls) or cls())
    return found


def number_fields(section: Section) -> list[str]:
    """The keys whose JSON schema is a number (or numbers, or null): pydantic's own account of the types."""
    def numeric(schema: dict) -> bool:
        kinds = [option.get("type") for option in schema.get("anyOf", [schema])]
        items = schema.get("prefixItems") or ([schema["items"]] if isinstance(schema.get("items"), dict) else [])
        return any(kind in ("integer", "number") for kind in kinds) or (bool(items) and all(numeric(item) for item in items))

    properties = type(section).model_json_schema()["properties"]
    return [key for key, schema in properties.items() if numeric(schema) or any(numeric(option) for option in schema.get("anyOf", []))]


@pytest.mark.parametrize("value", [True, False])
def test_every_number_setting_refuses_a_boolean(value):
    checked = 0
    for section in sections():
        for key in number_fields(section):
            wrong = [value, 0.9] if isinstance(getattr(section, key), (list, tuple)) or key == "betas" else value
            with pytest.raises(ValidationError, match=NUMBER_MESSAGE):
                setattr(section, key, wrong)
            checked += 1
    assert checked > 50  # every int and float of every section (train.max_steps, lora.rank, data.caption_dropout, ...)


def test_a_yaml_no_for_a_number_is_one_line_naming_the_key(tmp_path):
    """`checkpoint.keep_last: no` kept every checkpoint; `train.max_steps: true` trained one step."""
    path = tmp_path / "recipe.yaml"
    path.write_text("data:\n  image_dir: images\ncheckpoint:\n  keep_last: no\n")
    with pytest.raises(FinetuneError) as raised:
        load_recipe(path)
    assert str(raised.value) == f"{path}: key 'checkpoint.keep_last': {NUMBER_MESSAGE} (got False)"
    path.write_text("data:\n  image_dir: images\n  folders:\n    - {path: ., repeats: yes}\n")
    with pytest.raises(FinetuneError, match=rf"^{re.escape(str(path))}: key 'data.folders.0.repeats': {NUMBER_MESSAGE} \(got True\)$"):
        load_recipe(path)


@pytest.mark.parametrize("override", ["train.max_steps=true", "checkpoint.keep_last=off", "optimizer.betas=[0.9, yes]", "lora.conv_rank=no"])
def test_a_boolean_override_for_a_number_names_the_override(override, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("data:\n  image_dir: images\n")
    with pytest.raises(FinetuneError, match=rf"^override '{re.escape(override)}': key '[a-z_.]+': {NUMBER_MESSAGE} \(got .*\)$"):
        load_recipe(path, [override])
    assert main(["train", str(path), override]) != 0  # the command line: refused before anything loads
    err = capsys.readouterr().err.strip()
    assert NUMBER_MESSAGE in err and len(err.splitlines()) == 1, err


def test_numbers_still_load():
    recipe = Recipe(data={"image_dir": "x"}, train={"max_steps": 5}, checkpoint={"keep_last": 0}, optimizer={"lr": 1, "betas": [0.9, 0.99]})
    assert (recipe.train.max_steps, recipe.checkpoint.keep_last, recipe.optimizer.lr, recipe.optimizer.betas) == (5, 0, 1.0, (0.9, 0.99))


@pytest.mark.parametrize("value,given", [(2, "2"), (0.5, "0.5"), ("maybe", "'maybe'"), ([True], "[True]")])
def test_a_switch_given_another_value_says_true_or_false(value, given):
    """Pydantic's lax mode takes 0 and 1 (and yes/no, on/off) for a switch; anything else said 'Input should be a
    valid boolean, unable to interpret input'."""
    with pytest.raises(FinetuneError) as raised:
        recipe_from_dict({"data": {"image_dir": "x", "random_flip": value}})
    assert str(raised.value) == f"recipe: key 'data.random_flip': is a switch: write true or false (got {given})"
    assert recipe_from_dict({"data": {"image_dir": "x", "random_flip": 1}}).data.random_flip is True


def test_a_switch_override_given_a_number_names_the_override(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("data:\n  image_dir: images\n")
    with pytest.raises(FinetuneError) as raised:
        load_recipe(path, ["checkpoint.save_outputs=2"])
    assert str(raised.value) == "override 'checkpoint.save_outputs=2': key 'checkpoint.save_outputs': is a switch: write true or false (got 2)"
