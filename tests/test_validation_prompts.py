"""validation.prompts_file (finetune/sampling/validation_prompts.py): a text file of validation prompts, one a line with sd-scripts'
per-prompt options, blank lines and # comments skipped; a missing or empty one refused where the recipe loads."""

import pytest
import yaml
from conftest import SHIPPED_BASE

from finetune.cli.main import main
import finetune.cli.train_command
import finetune.data_check.train_inputs
from finetune.errors import FinetuneError
import finetune.methods.base

FILE = """# validation prompts of my LoRA
a red circle --d 7 --s 3

   a blue square, center --n blurry --l 4
# a green triangle (commented out)
"""


def test_the_files_prompts_are_the_ones_sampled_after_the_recipes(make_recipe, tmp_path, monkeypatch):
    from finetune.methods import METHODS
    from finetune.models.loading import load_base_model

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(FILE)
    recipe = make_recipe(validation__prompts=["a star"], validation__prompts_file=str(prompts), validation__num_inference_steps=5)
    assert recipe.validation.all_prompts == ["a star", "a red circle --d 7 --s 3", "a blue square, center --n blurry --l 4"]
    method = METHODS[recipe.method](recipe)
    method.setup(load_base_model(recipe.model))
    sampled = []
    monkeypatch.setattr(finetune.methods.base, "generate_with_settings", lambda pipeline, settings, *a, **k: sampled.extend(settings) or [[] for _ in settings])
    rows, labels = method.validation_images(method.trained_modules())
    assert [(s.prompt, s.seed, s.num_inference_steps, s.negative_prompt, s.guidance_scale) for s in sampled] == [
        ("a star", 0, 5, None, 7.5), ("a red circle", 7, 3, None, 7.5), ("a blue square, center", 0, 5, "blurry", 4.0)]
    assert labels == recipe.validation.all_prompts and len(rows) == 3
    # The file alone, with no validation.prompts, samples too (and its prompts make the grid's rows).
    assert make_recipe(validation__prompts_file=str(prompts)).validation.all_prompts == ["a red circle --d 7 --s 3", "a blue square, center --n blurry --l 4"]


@pytest.fixture
def refused_at_load(monkeypatch, capsys, image_folder, tmp_path):
    """`finetune train` of a recipe whose validation.prompts_file is `path`: its one line of error, said before the data check."""
    monkeypatch.setattr(finetune.data_check.train_inputs, "check_data_first", lambda recipe, resume_from=None: pytest.fail("the data was checked before the refusal"))
    monkeypatch.setattr(finetune.cli.train_command, "_run_training", lambda *args: pytest.fail("the training stack was loaded before the refusal"))

    def run(path) -> str:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"model": {"pretrained": str(SHIPPED_BASE)}, "output_dir": str(tmp_path / "run"),
                                          "data": {"image_dir": str(image_folder), "resolution": 64}, "validation": {"prompts_file": str(path)}}))  # fmt: skip
        assert main(["train", str(recipe)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    return run


def test_a_missing_empty_or_bad_prompts_file_is_one_line_naming_it_before_the_data_check(refused_at_load, tmp_path):
    missing = tmp_path / "nowhere.txt"
    assert f"validation.prompts_file {missing} not found" in refused_at_load(missing)
    only_comments = tmp_path / "comments.txt"
    only_comments.write_text("# nothing yet\n\n   \n")
    assert f"validation.prompts_file {only_comments} holds no prompts" in refused_at_load(only_comments)
    typo = tmp_path / "typo.txt"
    typo.write_text("a red circle\na blue square --x 3\n")
    line = refused_at_load(typo)
    assert f"validation.prompts_file {typo} line 2:" in line and "unknown option --x" in line
    assert f"validation.prompts_file {tmp_path} is a folder" in refused_at_load(tmp_path)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert f"validation.prompts_file {latin} is not UTF-8 text" in refused_at_load(latin)


def test_a_prompts_file_counts_in_the_grid_bound_and_the_vae_refuses_it(make_recipe, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(400)))
    with pytest.raises(FinetuneError, match="validation grid"):  # 400 rows of 64 images of 1024 px: past PIL's bound
        make_recipe(validation__prompts_file=str(prompts), validation__images_per_prompt=64, data__resolution=1024)
    with pytest.raises(FinetuneError, match="validation.prompts_file would do nothing"):
        make_recipe(method="vae", validation__prompts_file=str(prompts))


def test_a_controlnet_pairs_its_conditioning_images_with_the_files_prompts(make_recipe, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    with pytest.raises(FinetuneError, match="controlnet.validation_conditions has 2 images for 3 validation.prompts"):
        make_recipe(method="controlnet", validation__prompts_file=str(prompts), controlnet__validation_conditions=["a.png", "b.png"])
    assert make_recipe(method="controlnet", validation__prompts_file=str(prompts), controlnet__validation_conditions=["a.png"]).validation.all_prompts
