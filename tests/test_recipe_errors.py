"""Recipe values that name no file or folder: one line naming the key, before anything runs."""

from pathlib import Path

import pytest

from finetune.config import ModelConfig
from finetune.config.recipe_loading import load_recipe, recipe_from_dict
from finetune.errors import FinetuneError


def recipe_with(dotted: str, value) -> dict:
    raw = {"data": {"image_dir": "images"}, "train": {"cache_latents": True}}
    node = raw
    *sections, key = dotted.split(".")
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = value
    return raw


# "" is the current folder to every file call: model.pretrained "" was "base model folder  is not a diffusers
# pipeline"; output_dir "" wrote the run (and --overwrite deleted checkpoints/, samples/, logs/) in the current folder.
@pytest.mark.parametrize("key", ["model.pretrained", "model.single_file_config", "output_dir", "train.cache_dir", "lora.init_from"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_path_is_refused_with_its_key(key, value):
    with pytest.raises(FinetuneError, match=rf"^recipe: key '{key}': is empty: give a file or folder path, or remove the key"):
        recipe_from_dict(recipe_with(key, value))


def test_a_path_still_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # "~/runs/x" itself ends in /runs/x: only the whole path tells it was expanded
    assert recipe_from_dict(recipe_with("output_dir", "~/runs/x")).output_dir == str(tmp_path / "runs" / "x")


def test_a_windows_path_whose_backslashes_yaml_read_as_escapes_is_one_line():
    """"C:\\new\\train" in double quotes is C: newline ew tab rain to YAML: no such folder, said over two lines."""
    with pytest.raises(FinetuneError, match=r"key 'output_dir': holds a line break or a tab: a Windows path in double quotes\? there a backslash "
                                            r"starts an escape \(\\n, \\t\): write it in single quotes, or with forward slashes"):  # fmt: skip
        recipe_from_dict(recipe_with("output_dir", "C:\new\train"))


def test_an_empty_base_config_option_is_one_line():
    with pytest.raises(FinetuneError, match=r"^--base-config is empty: give the diffusers folder or hub id whose configs describe the --base file"):
        ModelConfig.from_option("model.safetensors", "")


@pytest.mark.parametrize(
    "text,said",
    [
        # PyYAML's first line alone: 'while scanning for the next token', no line, no tab.
        ("model:\n\tpretrained: x\n", "a tab on line 2, column 1: use spaces there (YAML takes no tabs in indentation or between tokens)"),
        ("method: [lora\n", "expected ',' or ']', but got '<stream end>' on line 2, column 1 (while parsing a flow sequence from line 1)"),
        ("data:\n  caption: a photo: sks\n", "mapping values are not allowed here on line 2, column 19; a value with ': ' in it? quote it (or an indent is off)"),
        ("method: lora\nmethod: full\n", "key 'method' is given twice in one section (again on line 2): keep one"),
        # A Windows path in double quotes: \U starts an escape.
        ('data:\n  image_dir: "C:\\Users\\me"\n', "expected escape sequence of 8 hexadecimal numbers, but found 's' on line 2, column 19 (while "
                                                  "scanning a double-quoted scalar from line 2); a Windows path? in double quotes a backslash starts "
                                                  "an escape: write it in single quotes ('C:\\data'), or with forward slashes"),  # fmt: skip
    ],
)
def test_a_yaml_error_names_its_line_and_problem(text, said, tmp_path):
    from finetune.config.recipe_loading import load_recipe

    (tmp_path / "recipe.yaml").write_text(text)
    with pytest.raises(FinetuneError) as raised:
        load_recipe(tmp_path / "recipe.yaml")
    assert str(raised.value) == f"recipe {tmp_path / 'recipe.yaml'} is not valid YAML: {said}"


def test_a_recipe_in_another_encoding_is_told_to_be_saved_as_utf8(tmp_path):
    from finetune.config.recipe_loading import load_recipe

    text = "# café\ndata:\n  caption: a photo of sks\n"
    said = {
        "utf16.yaml": (text.encode("utf-16"), "is UTF-16 text (as Windows PowerShell's > writes): save it as UTF-8"),  # it was 'not a text file'
        "latin1.yaml": (text.encode("latin-1"), "is not UTF-8 text (byte 0xe9 on line 1; saved as Latin-1 or Windows-1252?): save it as UTF-8"),
        "image.yaml": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff", "is not a text file: pass the path of a YAML file such as recipes/lora.yaml"),
    }
    for name, (content, message) in said.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(FinetuneError) as raised:
            load_recipe(tmp_path / name)
        assert str(raised.value) == f"recipe {tmp_path / name} {message}"


@pytest.mark.parametrize(
    "override,said",
    [  # `output_dir=$OUT` with OUT unset, or `output_dir:` with nothing after it: pydantic's "Input should be a valid string (got None)"
        ("output_dir=", "key 'output_dir' has no value (null, or nothing after its : or =): give it one, or leave the key out for its default (outputs/run)"),
        ("train.gradient_checkpointing=null", "key 'train.gradient_checkpointing' has no value (null, or nothing after its : or =): give it one, "
                                              "or leave the key out for its default (false)"),  # fmt: skip
        ("dreambooth.concepts.0.instance_dir=~", "key 'dreambooth.concepts.0.instance_dir' has no value (null, or nothing after its : or =): give it one"),
    ],
)
def test_a_key_without_a_value_is_said_to_have_none(override, said):
    recipe = Path(__file__).parent.parent / "recipes" / "dreambooth.yaml"
    with pytest.raises(FinetuneError) as raised:
        load_recipe(recipe, [override])
    assert str(raised.value) == f"override '{override}': {said}"


@pytest.mark.parametrize("source, said", [
    ({"image_dir": "photos"}, "method dreambooth reads each concept's images from its instance_dir, not data.image_dir: remove data.image_dir "
                              "and set dreambooth.concepts.0.instance_dir=photos"),
    ({"dataset": "user/photos"}, "method dreambooth reads each concept's images from a folder, its instance_dir, not a datasets dataset: remove "
                                 "data.dataset and give the subject's images as a folder in dreambooth.concepts.0.instance_dir"),
])  # fmt: skip
def test_a_dreambooth_recipe_given_data_images_names_the_key_to_set_instead(source, said):
    """data.image_dir=photos, as the LoRA recipe takes its images, on a DreamBooth recipe said only "remove data.image_dir"."""
    concept = {"instance_dir": "subject", "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog"}
    with pytest.raises(FinetuneError) as refused:
        recipe_from_dict({"method": "dreambooth", "data": source, "dreambooth": {"concepts": [concept]}})
    assert str(refused.value).endswith(said) and "\n" not in str(refused.value)
