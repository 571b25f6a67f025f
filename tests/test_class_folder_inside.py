"""A DreamBooth class_dir inside its instance_dir was told "add each as a concept of its own" (a subfolder of images), and
an instance_dir holding nothing but it was told to point instance_dir at the class folder: advice that trains the class
images as the subject. Each now says the class folder must move out, naming both folders."""

import pytest
import yaml
from conftest import SHIPPED_BASE
from PIL import Image

from finetune.cli.main import main
from finetune.config.recipe_loading import load_recipe
from finetune.data_check.train_inputs import check_inputs_exist
from finetune.errors import FinetuneError


def class_inside_recipe(tmp_path, subject_images=("a", "b")):
    subject = tmp_path / "subject"
    (subject / "class").mkdir(parents=True)
    for shade, name in enumerate([*subject_images, "class/c1", "class/c2"]):  # no two alike: no copies to warn of
        Image.new("RGB", (64, 64), (40 * shade, 0, 0)).save(subject / f"{name}.png")
    concept = {"instance_dir": str(subject), "instance_prompt": "a sks dog", "class_prompt": "a dog", "class_dir": str(subject / "class")}
    recipe = {"method": "dreambooth", "model": {"pretrained": str(SHIPPED_BASE)}, "data": {"image_dir": None, "resolution": 64},
              "output_dir": str(tmp_path / "run"), "dreambooth": {"num_class_images": 2, "concepts": [concept]}}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "recipe.yaml", subject


def test_a_class_folder_inside_the_instance_folder_is_told_to_move_out_not_to_be_a_concept(tmp_path, capsys):
    recipe, subject = class_inside_recipe(tmp_path)
    assert main(["check-data", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "add each as a concept" not in out, out
    assert (f"warning: dreambooth.concepts.0.class_dir {subject / 'class'} lies inside dreambooth.concepts.0.instance_dir {subject}: "
            "move the class folder out of the instance folder") in out, out  # fmt: skip
    assert out.splitlines()[-1] == "result: ready to train (1 warning)"


def test_an_instance_folder_of_nothing_but_its_class_folder_is_not_told_to_train_the_class_folder(tmp_path):
    recipe, subject = class_inside_recipe(tmp_path, subject_images=())
    with pytest.raises(FinetuneError) as err:
        check_inputs_exist(load_recipe(str(recipe)))
    assert "instance_dir=" not in str(err.value)  # "a concept trains one folder, e.g. ...instance_dir=subject/class"
    assert str(err.value).startswith(f"data folder {subject} has no images of the subject (put them directly in it); "
                                     f"dreambooth.concepts.0.class_dir {subject / 'class'} lies inside")  # fmt: skip


def test_the_runs_own_class_folder_inside_the_instance_folder_is_told_to_move_output_dir_not_to_set_class_dir_null(tmp_path, monkeypatch, capsys):
    """A user training in their photos' folder (instance_dir: ., output_dir: outputs/db) with class_dir null: the run's class
    folder, outputs/db/class_images/concept-0, lies inside it; it was named "dreambooth.concepts.0.class_dir", a key the recipe
    does not set, and told "class_dir: null for the run's own", which is what made it."""
    monkeypatch.chdir(tmp_path)
    for shade, name in enumerate(["a", "b", "outputs/db/class_images/concept-0/c1"]):  # a first run's class image, generated
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (60 * shade, 0, 0)).save(tmp_path / f"{name}.png")
    concept = {"instance_dir": ".", "instance_prompt": "a sks dog", "class_prompt": "a dog"}
    recipe = {"method": "dreambooth", "model": {"pretrained": str(SHIPPED_BASE)}, "data": {"image_dir": None, "resolution": 64},
              "output_dir": "outputs/db", "dreambooth": {"num_class_images": 2, "concepts": [concept]}}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["check-data", "recipe.yaml"]) == 0
    out = capsys.readouterr().out
    assert "class_dir: null for the run's own" not in out and "dreambooth.concepts.0.class_dir" not in out, out
    assert ("warning: the run's class folder outputs/db/class_images/concept-0 (class_dir: null: under output_dir) lies inside "
            "dreambooth.concepts.0.instance_dir .: set output_dir outside the instance folder, or class_dir to a folder outside it") in out, out
