"""An adapter trained with model.prediction_type=v_prediction on an epsilon base predicts v: its files
say so, and sample, merge, export and the demo sample it as v (read as epsilon it gives noise)."""

import json

import pytest
from safetensors import safe_open

from kohya_helpers import sd_scripts_round_trip
from test_quickstart import pasted_in_its_folder

from finetune.checkpoints.run_files import CONTROLNET_DIR, LORA_WEIGHTS_NAME
from finetune.checkpoints.run_files import METADATA_FILE
from finetune.cli.main import main
from finetune.config.recipe_loading import recipe_from_dict
from finetune.demo import engine as demo_engine
from finetune.demo.engine import DemoEngine, Request
from finetune.errors import FinetuneError
from finetune.sampling.inference import load_sampling_pipeline
from finetune.training.trainer import train


def one_step(method: str, output_dir, base, data, prediction_type: str | None):
    train(recipe_from_dict({
        "method": method, "seed": 0, "output_dir": str(output_dir), "model": {"pretrained": str(base), "prediction_type": prediction_type},
        "data": {"image_dir": str(data), "resolution": 64}, "train": {"batch_size": 2, "max_steps": 1},
        "validation": {"prompts": []}, "checkpoint": {"every_n_steps": 0}, "logging": {"tensorboard": False},
    }))  # fmt: skip
    return output_dir


@pytest.fixture(scope="module")
def adapters(tiny_model, image_folder, pairs_folder, tmp_path_factory):
    """Training output folders on the epsilon tiny model: LoRAs trained for v and for epsilon, a v ControlNet."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "v": one_step("lora", root / "v", tiny_model, image_folder, "v_prediction"),
        "epsilon": one_step("lora", root / "epsilon", tiny_model, image_folder, None),
        "controlnet-v": one_step("controlnet", root / "controlnet-v", tiny_model, pairs_folder, "v_prediction"),
    }


def recorded(lora_file) -> str | None:
    with safe_open(str(lora_file), "pt") as f:
        return (f.metadata() or {}).get("finetune.prediction_type")


def test_outputs_record_the_prediction_type_they_trained_for(adapters):
    assert recorded(adapters["v"] / LORA_WEIGHTS_NAME) == "v_prediction"
    assert recorded(adapters["epsilon"] / LORA_WEIGHTS_NAME) == "epsilon"  # the base's own, recorded too
    metadata = json.loads((adapters["controlnet-v"] / CONTROLNET_DIR / METADATA_FILE).read_text())
    assert metadata["finetune.prediction_type"] == "v_prediction"


def test_sample_merge_and_export_follow_a_v_prediction_adapter(adapters, tiny_model, tmp_path, monkeypatch):
    prediction_type = lambda pipeline: pipeline.scheduler.config.prediction_type  # noqa: E731
    assert prediction_type(load_sampling_pipeline(str(tiny_model))) == "epsilon"
    assert prediction_type(load_sampling_pipeline(str(tiny_model), lora=str(adapters["epsilon"]))) == "epsilon"
    assert prediction_type(load_sampling_pipeline(str(tiny_model), lora=str(adapters["v"]))) == "v_prediction"
    assert prediction_type(load_sampling_pipeline(str(tiny_model), controlnet=str(adapters["controlnet-v"]))) == "v_prediction"
    with pytest.raises(FinetuneError, match=r"^adapters trained for different prediction types cannot be combined: .*\(v_prediction\), .*\(epsilon\)$"):
        load_sampling_pipeline(str(tiny_model), lora=str(adapters["epsilon"]), controlnet=str(adapters["controlnet-v"]))

    # Merged, the UNet predicts v: the pipeline's scheduler says so.
    assert main(["merge", "--base", str(tiny_model), "--lora", str(adapters["v"]), str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"

    # In sd-scripts' layout it is their ss_v_parameterization flag, and it reads back.
    metadata, theirs = sd_scripts_round_trip(adapters["v"], tmp_path / "kohya")  # a file from sd-scripts itself has only its ss_ keys
    assert metadata["ss_v_parameterization"] == "True" and theirs.metadata["finetune.prediction_type"] == "v_prediction"
    # The export's model card: its diffusers code, pasted, samples as v.
    namespace: dict = {}
    [card] = (tmp_path / "kohya").glob("*.md")
    exec(pasted_in_its_folder(card, tiny_model, monkeypatch), namespace)
    assert namespace["pipeline"].scheduler.config.prediction_type == "v_prediction"


def test_the_demo_samples_each_column_with_its_adapters_prediction_type(adapters, tiny_model, monkeypatch):
    engine = DemoEngine(str(tiny_model), adapters["v"].parent)
    used = []  # the scheduler's prediction type of every image rendered, column by column
    real_generate = demo_engine.generate
    monkeypatch.setattr(demo_engine, "generate", lambda pipeline, *a, **k: used.append(pipeline.scheduler.config.prediction_type) or real_generate(pipeline, *a, **k))

    engine.render(Request(prompt="a red circle", steps=1, loras=[("v", 1.0)]))
    assert used == ["epsilon", "v_prediction"]  # the base alone, then with the LoRA
    used.clear()
    engine.render(Request(prompt="a red circle", steps=1, loras=[("epsilon", 1.0)]))
    assert used == ["epsilon", "epsilon"]
    with pytest.raises(FinetuneError, match=r"^adapters trained for different prediction types cannot be combined: v \(v_prediction\), epsilon \(epsilon\)$"):
        engine.render(Request(prompt="a red circle", steps=1, loras=[("v", 1.0), ("epsilon", 1.0)]))


def test_validation_samples_the_untrained_step_0_as_the_base_predicts_and_later_steps_as_trained(tiny_model, image_folder, tmp_path, monkeypatch):
    """Training v on an epsilon base: the "before" grid is the base itself, read as epsilon; afterwards
    the model predicts v. (Step 0 read as v was noise.)"""
    import finetune.sampling.pipelines as sampling

    used, real_generate = [], sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda pipeline, *a, **k: used.append(pipeline.scheduler.config.prediction_type) or real_generate(pipeline, *a, **k))
    train(recipe_from_dict({
        "method": "lora", "seed": 0, "output_dir": str(tmp_path / "run"), "model": {"pretrained": str(tiny_model), "prediction_type": "v_prediction"},
        "data": {"image_dir": str(image_folder), "resolution": 64}, "train": {"batch_size": 2, "max_steps": 1},
        "validation": {"prompts": ["a red circle"], "num_inference_steps": 1, "images_per_prompt": 1},
        "checkpoint": {"every_n_steps": 0}, "logging": {"tensorboard": False},
    }))  # fmt: skip
    assert used == ["epsilon", "v_prediction"]


def test_a_run_from_a_pretrained_controlnet_samples_step_0_as_trained_and_one_trained_for_another_target_is_refused(
        make_recipe, pairs_folder, tiny_model, tmp_path, monkeypatch):  # fmt: skip
    """Its step 0 is not the base: it was read as the base's epsilon (as a run without lora.init_from is), noise for
    a ControlNet trained for v. A ControlNet whose run trained another target is refused, as such a lora.init_from is."""
    import finetune.sampling.pipelines as sampling
    from controlnet_helpers import controlnet_recipe, set_up, write_controlnet_run

    run = write_controlnet_run(tiny_model, tmp_path / "v-edges", trained=True)
    (run / CONTROLNET_DIR / METADATA_FILE).write_text(json.dumps({"finetune.method": "controlnet", "finetune.prediction_type": "v_prediction"}))
    used, real_generate = [], sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda pipeline, *a, **k: used.append(pipeline.scheduler.config.prediction_type) or real_generate(pipeline, *a, **k))
    train(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(run), model__prediction_type="v_prediction", train__max_steps=1,
                            validation={"prompts": ["a red circle"], "num_inference_steps": 1, "images_per_prompt": 1}))  # fmt: skip
    assert used == ["v_prediction", "v_prediction"]
    with pytest.raises(FinetuneError, match=rf"^controlnet.pretrained {run} was trained for v_prediction, this run trains for epsilon: set model.prediction_type: v_prediction$"):
        set_up(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(run)))


def test_zero_terminal_snr_trains_on_the_rescaled_schedule_and_everything_samples_on_it(tiny_model, image_folder, tmp_path, monkeypatch):
    from finetune.config import ModelConfig
    from finetune.models.loading import load_base_model
    from finetune.sampling.adapters_as_trained import adapters_zero_terminal_snr
    import finetune.sampling.pipelines as sampling

    def recipe(output_dir, **model):
        return recipe_from_dict({
            "method": "lora", "seed": 0, "output_dir": str(output_dir), "model": {"pretrained": str(tiny_model), **model},
            "data": {"image_dir": str(image_folder), "resolution": 64}, "train": {"batch_size": 2, "max_steps": 1},
            "validation": {"prompts": ["a red circle"], "num_inference_steps": 1, "images_per_prompt": 1},
            "checkpoint": {"every_n_steps": 0}, "logging": {"tensorboard": False},
        })  # fmt: skip

    with pytest.raises(FinetuneError, match=r"^model.zero_terminal_snr needs v-prediction .*: set model.prediction_type: v_prediction$"):
        train(recipe(tmp_path / "epsilon", zero_terminal_snr=True))
    schedule = load_base_model(ModelConfig(pretrained=str(tiny_model), prediction_type="v_prediction", zero_terminal_snr=True)).noise_scheduler
    assert schedule.alphas_cumprod[-1] < 1e-9 < 1e-3 < load_base_model(ModelConfig(pretrained=str(tiny_model))).noise_scheduler.alphas_cumprod[-1]

    used, real_generate = [], sampling.generate
    remember = lambda pipeline: used.append((pipeline.scheduler.config.prediction_type, pipeline.scheduler.config.rescale_betas_zero_snr))
    monkeypatch.setattr(sampling, "generate", lambda pipeline, *a, **k: remember(pipeline) or real_generate(pipeline, *a, **k))
    run = train(recipe(tmp_path / "zsnr", prediction_type="v_prediction", zero_terminal_snr=True)).output_dir
    assert used == [("epsilon", False), ("v_prediction", True)]  # step 0: the base as it was trained
    assert recorded(run / LORA_WEIGHTS_NAME) == "v_prediction"
    # sample and merge follow it; sd-scripts' layout keeps it both ways (ss_zero_terminal_snr).
    scheduler = load_sampling_pipeline(str(tiny_model), str(run)).scheduler.config
    assert (scheduler.prediction_type, scheduler.rescale_betas_zero_snr, scheduler.timestep_spacing) == ("v_prediction", True, "trailing")
    assert main(["merge", "--lora", str(run), str(tmp_path / "merged")]) == 0
    assert load_sampling_pipeline(str(tmp_path / "merged")).scheduler.config.rescale_betas_zero_snr is True
    metadata, theirs = sd_scripts_round_trip(run, tmp_path / "kohya")
    assert metadata["ss_zero_terminal_snr"] == "True" and theirs.metadata["finetune.zero_terminal_snr"] == "true"
    namespace: dict = {}  # the export's model card: its diffusers code, pasted, samples on that schedule
    exec(pasted_in_its_folder(next((tmp_path / "kohya").glob("*.md")), tiny_model, monkeypatch), namespace)
    assert namespace["pipeline"].scheduler.config.rescale_betas_zero_snr is True
    with pytest.raises(FinetuneError, match=r"adapters trained on different noise schedules cannot be combined"):
        adapters_zero_terminal_snr({"zsnr": theirs.metadata, "plain": {"finetune.method": "lora"}})


def test_zero_terminal_snr_without_v_prediction_is_refused_before_the_data_check(tiny_model, tiny_vpred_model, image_folder, tmp_path, capsys):
    """It was refused once the base had loaded, after the data check (and its minutes of decoding)."""
    import shutil

    from finetune.config import ModelConfig
    from finetune.models.model_source import locate_base

    with pytest.raises(FinetuneError, match=r"^recipe: key 'model': model.zero_terminal_snr needs v-prediction .*, and model.prediction_type is epsilon: set it to v_prediction$"):
        recipe_from_dict({"data": {"image_dir": "x"}, "model": {"zero_terminal_snr": True, "prediction_type": "epsilon"}})
    data = shutil.copytree(image_folder, tmp_path / "data")
    (data / "0000.png").write_bytes(b"cut short")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": {"pretrained": str(tiny_model), "zero_terminal_snr": True}, "data": {"image_dir": str(data), "resolution": 64},
                                  "output_dir": str(tmp_path / "run"), "validation": {"prompts": []}}))  # fmt: skip
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: model.zero_terminal_snr needs v-prediction (at the last timestep the input is pure noise), "
                                                            f"and base model {tiny_model} predicts epsilon: set model.prediction_type: v_prediction"]  # fmt: skip
    for config in (ModelConfig(pretrained=str(tiny_vpred_model), zero_terminal_snr=True),  # the base's own v, or v trained on an epsilon base
                   ModelConfig(pretrained=str(tiny_model), zero_terminal_snr=True, prediction_type="v_prediction")):  # fmt: skip
        assert locate_base(config).folder is not None
