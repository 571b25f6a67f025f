"""What DreamBooth says of class images and class prompts it leaves unused: prompts the user's own class images leave
no generated image to make, and files named as generated class images that are no PNG."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image
from test_walkthrough_dreambooth import dreambooth_recipe, star_folder  # noqa: F401 (a fixture)

from finetune.methods.dreambooth import DreamBoothMethod

PROMPTS = ["a shape", "a shape, small", "a shape, large"]


def start_warnings(recipe) -> list[str]:
    method = DreamBoothMethod(recipe)
    method.check_data()
    return [line for line in method.start_lines if "class prompts" in line]


def start_and_check_data(recipe, tmp_path, capsys) -> tuple[list[str], str]:
    """What a run of `recipe` says as it starts (its start lines), and `finetune check-data`'s output for it."""
    import yaml

    from finetune.cli.main import main

    method = DreamBoothMethod(recipe)
    method.check_data()
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    capsys.readouterr()
    assert main(["check-data", str(path)]) == 0
    return method.start_lines, capsys.readouterr().out


def concept(tmp_path, star_folder):  # noqa: F811
    return {"instance_dir": str(star_folder), "instance_prompt": "a sks shape", "class_prompt": PROMPTS, "class_dir": str(tmp_path / "class")}


def test_class_prompts_the_users_own_class_images_leave_unused_are_said(make_recipe, star_folder, tmp_path):  # noqa: F811
    """2 own images of num_class_images 4 leave 2 to generate, from the first 2 of 3 prompts: the third made none, unsaid."""
    (tmp_path / "class").mkdir()
    for name in ("mine-a.png", "mine-b.png"):
        Image.new("RGB", (64, 64), "red").save(tmp_path / "class" / name)
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"concepts": [concept(tmp_path, star_folder)], "num_class_images": 4})
    assert start_warnings(recipe) == [
        f"warning: dreambooth.concepts[0] lists 3 class prompts and dreambooth.num_class_images is 4, 2 of them your own images in {tmp_path / 'class'}: "
        "the last prompt makes no class image; raise num_class_images to at least 5"
    ]
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"concepts": [concept(tmp_path, star_folder)], "num_class_images": 5})
    assert start_warnings(recipe) == []
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"concepts": [concept(tmp_path, star_folder)], "num_class_images": 2})
    assert start_warnings(recipe)[0].endswith("2 of them your own images in " f"{tmp_path / 'class'}: the last 2 prompts make no class image; raise num_class_images to at least 5")  # fmt: skip


def test_class_prompts_without_own_class_images_are_said_as_before(make_recipe, star_folder, tmp_path):  # noqa: F811
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"concepts": [concept(tmp_path, star_folder)], "num_class_images": 2})
    assert start_warnings(recipe) == ["warning: dreambooth.concepts[0] lists 3 class prompts and dreambooth.num_class_images is 2: the last prompt makes "
                                      "no class image; raise num_class_images to at least 3"]  # fmt: skip


def test_files_named_as_generated_class_images_but_no_png_are_said_to_be_ignored(make_recipe, star_folder, tmp_path, capsys):  # noqa: F811
    """`<key>-00001.jpg` (generated images converted to JPEG) was neither the user's own nor a generated image: left
    out without a word, and made again, when its key was this run's."""
    from finetune.dreambooth.class_image_plans import class_image_plans

    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path)
    (_, key, _, missing), = class_image_plans(recipe)
    (tmp_path / "class").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "class" / f"{key}-00001.jpg")
    capsys.readouterr()
    (_, _, paths, missing), = class_image_plans(recipe)
    assert missing == [0, 1, 2] and all(p.suffix == ".png" for p in paths)
    assert capsys.readouterr().out == (f"warning: {tmp_path / 'class'}: ignoring 1 file named as generated class images are but not .png "
                                       f"(e.g. {key}-00001.jpg): generation reuses only the .png it writes; give your own class images another name to train them\n")  # fmt: skip


def test_check_data_says_the_unused_class_prompts_in_trainings_words(make_recipe, star_folder, tmp_path, capsys):  # noqa: F811
    """Said only once training had started (the model loaded); check-data, there to find such things first, said nothing."""
    import yaml

    from finetune.cli.main import main

    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"concepts": [concept(tmp_path, star_folder)], "num_class_images": 2})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    [line] = start_warnings(recipe)
    capsys.readouterr()
    assert main(["check-data", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert line in out and re.fullmatch(r"result: ready to train \(\d+ warnings?\)", out[-1])


def test_the_shared_warning_loads_no_torch():
    """check-data reads it; its module must stay free of torch (see test_cli_startup)."""
    loaded = subprocess.run([sys.executable, "-c", "import sys, finetune.dreambooth.class_image_names; print('torch' in sys.modules)"],
                            capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent).stdout
    assert loaded.strip() == "False"


def test_an_image_of_a_kind_training_does_not_read_in_a_class_folder_is_said_as_in_an_instance_folder(make_recipe, star_folder, tmp_path, capsys):  # noqa: F811
    """A .gif in class_dir was left out without a word, where the data check says one in instance_dir. Said once for a
    folder two concepts share, at a run's start and by check-data."""
    instances = shutil.copytree(star_folder, tmp_path / "instances")
    (tmp_path / "class").mkdir()
    for folder in (instances, tmp_path / "class"):
        Image.new("RGB", (64, 64), "red").save(folder / "photo.gif")
    concepts = [{**concept(tmp_path, instances), "instance_prompt": prompt} for prompt in ("a sks shape", "a zwx shape")]
    recipe = dreambooth_recipe(make_recipe, instances, tmp_path, dreambooth={"concepts": concepts})
    said = "has 1 image training does not read (.gif, e.g. photo.gif): convert it to PNG or JPEG"
    start_lines, out = start_and_check_data(recipe, tmp_path, capsys)
    assert [line for line in start_lines if said in line] == [f"warning: class folder {tmp_path / 'class'} {said}"]
    assert out.count(f"warning: class folder {tmp_path / 'class'} {said}\n") == 1
    assert f"data folder {instances} {said}" in out


def test_a_subfolder_with_images_in_a_class_folder_is_said_as_in_an_instance_folder(make_recipe, star_folder, tmp_path, capsys):  # noqa: F811
    """Only a class folder's own images are class images: one in a subfolder of class_dir was left out without a word,
    where the data check says a subfolder of instance_dir. Said once for a folder two concepts share, at a run's start and
    by check-data."""
    from finetune.dreambooth.class_image_plans import unread_class_images_lines

    instances = shutil.copytree(star_folder, tmp_path / "instances")
    for folder in (instances / "more", tmp_path / "class" / "more"):
        folder.mkdir(parents=True)
        Image.new("RGB", (64, 64), "red").save(folder / "photo.png")
    concepts = [{**concept(tmp_path, instances), "instance_prompt": prompt} for prompt in ("a sks shape", "a zwx shape")]
    recipe = dreambooth_recipe(make_recipe, instances, tmp_path, dreambooth={"concepts": concepts})
    said = f"class folder {tmp_path / 'class'} has subfolders with images (more), which are not read: move their images into it to train them as class images"
    start_lines, out = start_and_check_data(recipe, tmp_path, capsys)
    assert [line for line in start_lines if "subfolders" in line] == [f"warning: {said}"]
    assert out.count(f"warning: {said}\n") == 1
    assert f"data folder {instances} has subfolders with images (more), which are not read: add each as a concept of its own to train it" in out
    # a subfolder that is another concept's class folder is read
    assert unread_class_images_lines([tmp_path / "class", tmp_path / "class" / "more"], recipe) == []


def test_an_instance_folder_inside_a_class_folder_is_not_said_to_be_left_out(make_recipe, star_folder, tmp_path):  # noqa: F811
    """A concept's instance_dir kept inside its class_dir (photos/ of the class, photos/sks/ of the subject) was said to be
    a subfolder of class images not read, with the advice to move its images into the class folder: the subject's photos
    would then train as its class. Another subfolder there is still said."""
    from finetune.dreambooth.class_image_plans import unread_class_images_lines

    subject = shutil.copytree(star_folder, tmp_path / "class" / "sks")
    (tmp_path / "class" / "more").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "class" / "more" / "photo.png")
    recipe = dreambooth_recipe(make_recipe, subject, tmp_path)
    assert unread_class_images_lines([tmp_path / "class"], recipe) == [
        f"warning: class folder {tmp_path / 'class'} has subfolders with images (more), which are not read: move their images into it to train them as class images"]


def test_own_class_images_past_num_class_images_are_said_to_be_left_out(make_recipe, star_folder, tmp_path, capsys):  # noqa: F811
    """A class folder of 5 own images with num_class_images 3 trained the first 3 by name, and training and check-data both
    counted the folder as "3 images, 3 used": the other 2 were left out without a word. Said once for a folder two
    concepts share, at a run's start and by check-data; not said where every own image trains."""
    instances = shutil.copytree(star_folder, tmp_path / "instances")
    (tmp_path / "class").mkdir()
    for k in range(5):
        Image.new("RGB", (64, 64), "red").save(tmp_path / "class" / f"mine-{k}.png")
    concepts = [{**concept(tmp_path, instances), "class_prompt": "a shape", "instance_prompt": prompt} for prompt in ("a sks shape", "a zwx shape")]
    recipe = dreambooth_recipe(make_recipe, instances, tmp_path, dreambooth={"concepts": concepts, "num_class_images": 3})
    said = (f"warning: class folder {tmp_path / 'class'} holds 5 of your images and dreambooth.num_class_images is 3: the first 3 by name train "
            "and the other 2 (from mine-3.png on) do not; raise num_class_images to 5 to train them all")  # fmt: skip
    start_lines, out = start_and_check_data(recipe, tmp_path, capsys)
    assert [line for line in start_lines if "of your images" in line] == [said]
    assert out.count(said + "\n") == 1
    recipe = dreambooth_recipe(make_recipe, instances, tmp_path, dreambooth={"concepts": concepts, "num_class_images": 5})
    start_lines, out = start_and_check_data(recipe, tmp_path, capsys)
    assert not [line for line in start_lines if "of your images" in line] and "of your images" not in out


def test_captions_beside_own_class_images_are_said_to_be_unread(make_recipe, star_folder, tmp_path, capsys):  # noqa: F811
    """An sd-scripts regularisation folder (1_dog, each image with its .txt) given as class_dir: sd-scripts trains those images
    with their captions, here they train with the first class prompt, and nothing said the captions went unread. Said once,
    at a run's start and by check-data; not for a class folder without captions."""
    (tmp_path / "class").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64), "red").save(tmp_path / "class" / f"{name}.png")
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"concepts": [concept(tmp_path, star_folder)], "num_class_images": 2})
    start_lines, out = start_and_check_data(recipe, tmp_path, capsys)
    assert not [line for line in start_lines if "has captions (" in line] and "has captions (" not in out, start_lines
    for name in ("a", "b"):
        (tmp_path / "class" / f"{name}.txt").write_text("dog, grass")
    said = (f"warning: class folder {tmp_path / 'class'} has captions (2 caption files, e.g. a.txt), which are not read: its images train "
            "with the class prompt 'a shape' (sd-scripts trains a regularisation folder's images with their captions)")  # fmt: skip
    start_lines, out = start_and_check_data(recipe, tmp_path, capsys)
    assert [line for line in start_lines if "has captions (" in line] == [said]
    assert out.count(said + "\n") == 1


def test_a_text_file_of_no_class_image_is_not_said_to_be_a_caption(make_recipe, star_folder, tmp_path, capsys):  # noqa: F811
    """A notes.txt beside a user's class images names none of them: it was said as a caption the images train without
    ("has captions (1 caption file, e.g. notes.txt)"). Only the caption files of the folder's images are."""
    (tmp_path / "class").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64), "red").save(tmp_path / "class" / f"{name}.png")
    (tmp_path / "class" / "notes.txt").write_text("downloaded from my drive")
    recipe = dreambooth_recipe(make_recipe, star_folder, tmp_path, dreambooth={"concepts": [concept(tmp_path, star_folder)], "num_class_images": 2})
    start_lines, out = start_and_check_data(recipe, tmp_path, capsys)
    assert not [line for line in start_lines if "has captions (" in line] and "has captions (" not in out, start_lines
    (tmp_path / "class" / "B.TXT").write_text("dog, grass")  # b.png's, as a case-insensitive file system finds it
    start_lines, out = start_and_check_data(recipe, tmp_path, capsys)
    assert [line for line in start_lines if "has captions (" in line] == [
        f"warning: class folder {tmp_path / 'class'} has captions (1 caption file, e.g. B.TXT), which are not read: its images train with the "
        "class prompt 'a shape' (sd-scripts trains a regularisation folder's images with their captions)"]
