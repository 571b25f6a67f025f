"""What a new user meets running the README's and docs' commands as written."""

from __future__ import annotations

from finetune.evaluate import print_table


def test_eval_table_names_the_models_scored_in_whole_paths(capsys):
    # The title was the rich table's, wrapped to the width of a three-column table: the paths of the base
    # and the LoRA came out split mid-word, neither readable nor copyable.
    result = {
        "settings": {"base": "finetune/assets/toyworld-base", "lora": "outputs/quickstart"},
        "metrics": {"style_share": 0.25},
        "n": {"style_share": 4},
    }
    print_table(result)
    out = capsys.readouterr().out
    assert "eval of finetune/assets/toyworld-base + outputs/quickstart" in out
    assert "style_share" in out and "0.250" in out


def test_demo_calls_only_dreambooth_pipelines_dreambooth_pipelines():
    # Every folder with a model_index.json was listed as a "DreamBooth pipeline": a full fine-tune, a VAE
    # pretraining run and a `finetune merge` output too, beside a method column saying otherwise.
    from types import SimpleNamespace

    from finetune.demo import table_row

    def kind(method: str) -> str:
        metadata = {"finetune.method": method, "finetune.base_model": "finetune/assets/toyworld-base", "finetune.steps": "6"}
        return table_row(SimpleNamespace(name="run", kind="pipeline", layout=None, metadata=metadata, refused=None))[1]

    assert kind("dreambooth") == "DreamBooth pipeline"
    assert kind("full") == kind("vae") == kind("lora merged at 0.8") == "pipeline"


def test_init_from_says_which_of_the_recipes_layers_the_lora_has_nothing_for(make_recipe, tmp_path):
    # README: lora.init_from needs "same rank and target layers, or one line saying which differs". A file of
    # fewer layers than the recipe's targets (the quickstart's ff and conv layers on an attention-only LoRA)
    # started without a word, its extra layers fresh, the start line counting only the file's layers.
    from finetune.methods.lora import LoRAMethod
    from finetune.models import load_base_model
    from finetune.trainer import train

    first = train(make_recipe(output_dir=str(tmp_path / "first"), train__max_steps=1))

    def start_lines(**overrides) -> list[str]:
        recipe = make_recipe(lora__init_from=str(first.output_dir), **overrides)
        method = LoRAMethod(recipe)
        method.setup(load_base_model(recipe.model))
        return method.start_lines

    assert not [line for line in start_lines() if line.startswith("warning:")]
    warnings = [line for line in start_lines(lora__target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"]) if line.startswith("warning:")]
    assert len(warnings) == 1 and f"lora.init_from {first.output_dir} has no weights for" in warnings[0], warnings
    assert "(proj_in; e.g. unet." in warnings[0] and warnings[0].endswith("they start fresh, as in a new LoRA")


def test_eval_reports_of_other_subject_prompts_do_not_replace_each_other(tiny_model, tmp_path, monkeypatch):
    # docs/toyworld.md scores the base on "a star ..." (--identifier "" --class-word star) beside "a sks shape
    # ..." (the defaults): both went to eval-subject.json, the second replacing the first without a word.
    import json

    from finetune.cli import main

    monkeypatch.chdir(tmp_path)
    common = ["eval", "--base", str(tiny_model), "--suite", "subject", "--num-prompts", "1", "--steps", "1"]
    assert main(common) == 0
    assert main([*common, "--identifier", "", "--class-word", "star"]) == 0
    reports = tmp_path / "outputs" / "eval" / tiny_model.name
    assert json.loads((reports / "eval-subject.json").read_text())["settings"]["class_word"] == "shape"
    assert json.loads((reports / "eval-subject-id-none-class-star.json").read_text())["settings"]["class_word"] == "star"


def test_check_data_says_what_an_empty_class_folder_will_need(tiny_model, image_folder, tmp_path, capsys):
    # A class folder holding some images said "(N more to generate)"; one holding none said nothing at all,
    # so check-data before a DreamBooth run hid the generation that training starts with.
    import yaml

    from finetune.cli import main

    recipe = tmp_path / "dreambooth.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "dreambooth", "output_dir": str(tmp_path / "run"), "model": {"pretrained": str(tiny_model)},
        "data": {"resolution": 64},
        "dreambooth": {"concepts": [{"instance_dir": str(image_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape"}],
                       "num_class_images": 3},
    }))  # fmt: skip
    assert main(["check-data", str(recipe)]) == 0
    folder = tmp_path / "run" / "class_images" / "concept-0"
    assert f"class images {folder}: none yet, 3 to generate (training makes them first, with the base model)" in capsys.readouterr().out


def test_an_eval_report_records_the_training_steps_it_scored(make_recipe, tmp_path, capsys):
    # The report goes into the run's folder, where it stays when the run trains on (--resume latest): nothing
    # in it said which weights it scored, so it read as the newer adapter's score.
    import json

    from finetune.cli import main
    from finetune.trainer import train

    run = train(make_recipe(output_dir=str(tmp_path / "run"), train__max_steps=2))
    capsys.readouterr()
    assert main(["eval", "--lora", str(run.output_dir), "--suite", "style", "--num-prompts", "1", "--steps", "1"]) == 0
    assert f"+ {run.output_dir} (trained 2 steps)" in capsys.readouterr().out
    assert json.loads((run.output_dir / "eval-style.json").read_text())["settings"]["adapter_steps"] == "2"
