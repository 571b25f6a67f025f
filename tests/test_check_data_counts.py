"""check-data's result line counts as every other message does (finetune/counts.py): it said
'1 fatal problem(s); fix them' and 'ready to train (1 warnings)'."""

from PIL import Image

from finetune.cli.main import main


def test_the_result_line_says_one_problem_or_warning_in_the_singular(tmp_path, capsys):
    for name in ("a", "b"):  # the same pixels twice: one warning
        Image.new("RGB", (64, 64), "red").save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text("a red square")
    assert main(["check-data", "--image-dir", str(tmp_path), "--resolution", "64"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "result: ready to train (1 warning)"

    (tmp_path / "c.png").write_bytes(b"not an image")
    (tmp_path / "c.txt").write_text("a red square")
    assert main(["check-data", "--image-dir", str(tmp_path), "--resolution", "64"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("result: training would stop: 1 fatal problem; fix it, or set data.skip_bad_images")
    (tmp_path / "d.png").write_bytes(b"nor this")
    (tmp_path / "d.txt").write_text("a red square")
    assert main(["check-data", "--image-dir", str(tmp_path), "--resolution", "64"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("result: training would stop: 2 fatal problems; fix them")


def shared_instance_folder(tmp_path):
    """An instance folder two DreamBooth concepts share, holding a .gif and a subfolder of images (two warnings)."""
    folder = tmp_path / "subject"
    (folder / "more").mkdir(parents=True)
    for name, colour in (("a", "red"), ("b", "blue"), ("more/c", "green")):
        Image.new("RGB", (64, 64), colour).save(folder / f"{name}.png")
    Image.new("RGB", (64, 64), "red").save(folder / "photo.gif")
    return folder, [{"instance_dir": str(folder), "instance_prompt": prompt} for prompt in ("a sks shape", "a zwx shape")]


def test_a_folder_two_dreambooth_concepts_share_is_said_and_counted_once(tmp_path, capsys):
    """Two concepts of one instance_dir (two prompts for one subject) read it twice, each with its own report: its
    findings were said twice and counted twice ('2 fatal problems' for one bad file). Each is now said once."""
    import yaml

    from conftest import SHIPPED_BASE

    folder, concepts = shared_instance_folder(tmp_path)
    recipe = {"method": "dreambooth", "model": {"pretrained": str(SHIPPED_BASE)}, "data": {"image_dir": None, "resolution": 64},
              "output_dir": str(tmp_path / "run"), "dreambooth": {"prior_preservation": False, "concepts": concepts}}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["check-data", str(tmp_path / "recipe.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.count(f"warning: data folder {folder} has 1 image training does not read (.gif") == 1
    assert out.count(f"warning: data folder {folder} has subfolders with images (more)") == 1
    assert out.splitlines()[-1] == "result: ready to train (2 warnings)"
    (folder / "b.png").write_bytes(b"not an image")
    assert main(["check-data", str(tmp_path / "recipe.yaml")]) == 1
    out = capsys.readouterr().out
    assert out.count(f"fatal: image {folder / 'b.png'} cannot be read") == 1
    assert out.splitlines()[-1].startswith("result: training would stop: 1 fatal problem; fix it")


def test_training_says_a_folder_two_dreambooth_concepts_share_once_as_check_data_does(tmp_path, make_recipe):
    """Training's start summary printed each concept's report whole: the shared folder's .gif and subfolder twice, where
    check-data says them once."""
    from finetune.methods.dreambooth import DreamBoothMethod

    folder, concepts = shared_instance_folder(tmp_path)
    method = DreamBoothMethod(make_recipe(method="dreambooth", data__image_dir=None, data__resolution=64,
                                          dreambooth__prior_preservation=False, dreambooth__concepts=concepts))  # fmt: skip
    method.check_data()
    lines = [line for report in method.data_reports for line in report.lines(limit=10)]
    assert sum(line.startswith(f"warning: data folder {folder} has 1 image training does not read (.gif") for line in lines) == 1
    assert sum(line.startswith(f"warning: data folder {folder} has subfolders with images (more)") for line in lines) == 1
    assert sum(line.endswith("2 images, 2 used, 0 skipped; 2 uses per epoch") for line in lines) == 2  # each concept's count stays


def test_each_concept_of_a_shared_folder_counts_the_images_it_skips(tmp_path, capsys, make_recipe):
    """With data.skip_bad_images, the second concept of a shared instance_dir said '0 skipped' of the bad file it skipped
    too: its skipped finding, said by the first concept's report, was left out of its own, and the count with it."""
    import yaml

    from conftest import SHIPPED_BASE
    from finetune.methods.dreambooth import DreamBoothMethod

    folder, concepts = shared_instance_folder(tmp_path)
    (folder / "b.png").write_bytes(b"not an image")
    recipe = {"method": "dreambooth", "model": {"pretrained": str(SHIPPED_BASE)}, "data": {"image_dir": None, "resolution": 64, "skip_bad_images": True},
              "output_dir": str(tmp_path / "run"), "dreambooth": {"prior_preservation": False, "concepts": concepts}}  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["check-data", str(tmp_path / "recipe.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.count(f"data folder {folder}: 2 images, 1 used, 1 skipped; 1 use per epoch") == 2, out
    assert out.count(f"skipped: image {folder / 'b.png'} cannot be read") == 1  # listed once

    method = DreamBoothMethod(make_recipe(method="dreambooth", data__image_dir=None, data__resolution=64, data__skip_bad_images=True,
                                          dreambooth__prior_preservation=False, dreambooth__concepts=concepts))  # fmt: skip
    method.check_data()
    lines = [line for report in method.data_reports for line in report.lines(limit=10)]
    assert sum(line.endswith("2 images, 1 used, 1 skipped; 1 use per epoch") for line in lines) == 2, lines


def test_the_result_line_counts_the_warnings_said_as_the_recipe_loads(tmp_path, capsys):
    """A warning said outside the data report (the recipe's, on stderr) was left out of the count: 'ready to train' under it."""
    from conftest import SHIPPED_BASE

    images = tmp_path / "images"
    images.mkdir()
    for name, colour in (("a", "red"), ("b", "blue")):
        Image.new("RGB", (64, 64), colour).save(images / f"{name}.png")
        (images / f"{name}.txt").write_text(f"a {colour} square")
    (tmp_path / "recipe.yaml").write_text("# nothing set here\n")
    assert main(["check-data", str(tmp_path / "recipe.yaml"), f"model.pretrained={SHIPPED_BASE}", f"data.image_dir={images}", "data.resolution=64"]) == 0
    said = capsys.readouterr()
    assert f"warning: recipe {tmp_path / 'recipe.yaml'} is empty" in said.err
    assert said.out.splitlines()[-1] == "result: ready to train (1 warning)"
