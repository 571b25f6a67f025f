"""The sampler choice (finetune/sampling/samplers.py): validation.sampler, `finetune sample --sampler` and the demo's list draw with
the webui's samplers on the run's noise schedule; DDIM, the default, draws what it drew before there was a choice."""

import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from finetune.cli.main import main
from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.models.loading import load_base_model
from finetune.sampling.adapters_as_trained import follow_adapters_schedule
from finetune.sampling.pipelines import build_pipeline, generate
from finetune.sampling.samplers import DEFAULT_SAMPLER, SAMPLER_NAMES, sampler_named, sampler_of
from test_walkthrough_commands import trained_lora


def pixels(pipeline) -> np.ndarray:
    return np.asarray(generate(pipeline, ["a red circle"], 1, 3, 2, 7.5, 64)[0][0], dtype=np.int16)


@pytest.fixture(scope="module")
def base(tiny_model):
    return load_base_model(ModelConfig(pretrained=str(tiny_model)))


def test_each_sampler_builds_and_samples_two_steps_and_draws_its_own_image(base):
    drawn = {}
    for name in SAMPLER_NAMES:
        pipeline = build_pipeline(base, sampler=name)
        assert sampler_of(pipeline.scheduler) == name
        drawn[name] = pixels(pipeline)
        assert drawn[name].shape == (64, 64, 3)
    for name in SAMPLER_NAMES:  # another sampler takes other steps: a choice that built DDIM each time would fail here
        if name != DEFAULT_SAMPLER:
            assert np.abs(drawn[name] - drawn[DEFAULT_SAMPLER]).max() > 0, name


def test_the_default_draws_as_ddim_on_the_runs_schedule_did_before_the_choice(base):
    assert DEFAULT_SAMPLER == "ddim" and sampler_of(build_pipeline(base).scheduler) == "ddim"
    before = build_pipeline(base)
    before.scheduler = DDIMScheduler.from_config(base.noise_scheduler.config)  # what build_pipeline built before samplers.py
    assert np.array_equal(pixels(build_pipeline(base)), pixels(before))


def steps_through(scheduler, steps: int) -> torch.Tensor:
    """The scheduler's `steps` denoising steps on noise, with a model that predicts zeros: what sampling asks of it."""
    scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        latents = scheduler.step(torch.zeros_like(latents), timestep, scheduler.scale_model_input(latents, timestep)).prev_sample
    return latents


def test_every_sampler_keeps_the_prediction_type_zero_terminal_snr_and_betas(tiny_model):
    model = load_base_model(ModelConfig(pretrained=str(tiny_model), prediction_type="v_prediction", zero_terminal_snr=True))
    for name in SAMPLER_NAMES:
        if name == "dpmpp_2m_karras":  # its Karras sigmas crowd the last timestep: 25 steps ran past its end (IndexError)
            with pytest.raises(FinetuneError, match="dpmpp_2m_karras sampler cannot draw on the zero-terminal-SNR schedule"):
                build_pipeline(model, sampler=name)
            continue
        scheduler = build_pipeline(model, sampler=name).scheduler
        config = scheduler.config
        assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == ("v_prediction", True, "trailing"), name
        assert torch.allclose(scheduler.betas, model.noise_scheduler.betas), name  # the base's betas, rescaled as training's
        scheduler.set_timesteps(2)
        assert int(scheduler.timesteps[0]) == 999, name  # trailing: the first step starts from the last timestep, pure noise
        assert torch.isfinite(steps_through(scheduler, 25)).all(), name
    # The base's own schedule for the untrained step 0 (as_pretrained), in the sampler asked for.
    scheduler = build_pipeline(model, as_pretrained=True, sampler="euler_a").scheduler
    assert sampler_of(scheduler) == "euler_a" and scheduler.config.prediction_type == "epsilon" and not scheduler.config.rescale_betas_zero_snr


def test_a_pipeline_following_its_adapters_schedule_stays_the_sampler_asked_for(base):
    zero_terminal_snr = {"run": {"finetune.method": "lora", "finetune.prediction_type": "v_prediction", "finetune.zero_terminal_snr": "true"}}
    pipeline = build_pipeline(base, sampler="dpmpp_2m")
    follow_adapters_schedule(pipeline, zero_terminal_snr)
    config = pipeline.scheduler.config
    assert sampler_of(pipeline.scheduler) == "dpmpp_2m"
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == ("v_prediction", True, "trailing")
    pipeline = build_pipeline(base, sampler="dpmpp_2m_karras")
    follow_adapters_schedule(pipeline, {"run": {"finetune.method": "lora", "finetune.prediction_type": "v_prediction"}})
    assert sampler_of(pipeline.scheduler) == "dpmpp_2m_karras" and pipeline.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(FinetuneError, match="dpmpp_2m_karras sampler cannot draw on the zero-terminal-SNR schedule"):  # sample, the demo
        follow_adapters_schedule(pipeline, zero_terminal_snr)


def test_dpmpp_2m_karras_with_zero_terminal_snr_is_refused_where_the_recipe_loads(make_recipe):
    with pytest.raises(FinetuneError, match="validation.sampler with model.zero_terminal_snr: the dpmpp_2m_karras sampler cannot"):
        make_recipe(validation__sampler="dpmpp_2m_karras", model__zero_terminal_snr=True, model__prediction_type="v_prediction")
    assert make_recipe(validation__sampler="dpmpp_2m", model__zero_terminal_snr=True, model__prediction_type="v_prediction")


def test_validation_draws_with_the_recipes_sampler(make_recipe):
    from finetune.methods import METHODS

    for recipe, expected in ((make_recipe(), "ddim"), (make_recipe(validation__sampler="euler_a"), "euler_a")):
        method = METHODS[recipe.method](recipe)
        method.setup(load_base_model(recipe.model))
        assert sampler_of(method.pipeline(method.trained_modules()).scheduler) == expected


def test_an_unknown_sampler_is_one_line_listing_the_choices(make_recipe, tiny_model, capsys):
    from finetune.config.recipe_loading import recipe_from_dict

    with pytest.raises(Exception) as refused:
        recipe_from_dict({**make_recipe().model_dump(mode="json"), "validation": {"sampler": "heun"}})
    assert "validation.sampler" in str(refused.value) and all(name in str(refused.value) for name in SAMPLER_NAMES)
    with pytest.raises(SystemExit):
        main(["sample", "--base", str(tiny_model), "--prompt", "p", "--sampler", "heun"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--sampler" in error and "'heun'" in error and all(name in error for name in [*SAMPLER_NAMES, '"Euler a"', '"DPM++ 2M Karras"'])


def test_the_webuis_sampler_names_pick_its_samplers(make_recipe, tiny_model, monkeypatch, tmp_path):
    """`sample --sampler "Euler a"`, the webui's name, was an argparse error, as was `validation.sampler: Euler a`; a prompt's
    --ss took sd-scripts' names only. Each takes the webui's names now, in any case; its "DPM++ 2M" alone is on Karras
    sigmas since webui 1.9."""
    import finetune.sampling.inference
    from finetune.config.recipe_loading import recipe_from_dict
    from finetune.sampling.prompt_options import PromptSettings, with_options

    webui = {"DDIM": "ddim", "Euler": "euler", "Euler a": "euler_a", "DPM++ 2M Karras": "dpmpp_2m_karras", "DPM++ 2M": "dpmpp_2m_karras",
             "UniPC": "unipc", "euler A": "euler_a"}
    asked = []
    monkeypatch.setattr(finetune.sampling.inference, "sample_to_folder", lambda request: asked.append(request.sampler) or [tmp_path / "grid.png"])
    for name, ours in webui.items():
        assert main(["sample", "--base", str(tiny_model), "--prompt", "p", "--out", str(tmp_path), "--sampler", name]) == 0
        assert with_options(f"p --ss {name}", PromptSettings("", None, 0, 1.0, 1)).sampler == ours
        recipe = recipe_from_dict({**make_recipe().model_dump(mode="json"), "validation": {"sampler": name}})
        assert recipe.validation.sampler == ours
    assert asked == list(webui.values())


def test_sample_passes_its_sampler_on(tiny_model, monkeypatch, tmp_path):
    import finetune.sampling.inference

    asked = []
    monkeypatch.setattr(finetune.sampling.inference, "sample_to_folder", lambda request: asked.append(request.sampler) or [tmp_path / "grid.png"])
    assert main(["sample", "--base", str(tiny_model), "--prompt", "p", "--out", str(tmp_path)]) == 0
    assert main(["sample", "--base", str(tiny_model), "--prompt", "p", "--out", str(tmp_path), "--sampler", "unipc"]) == 0
    assert asked == ["ddim", "unipc"]
    pipeline = finetune.sampling.inference.load_sampling_pipeline(str(tiny_model), sampler="euler")
    assert sampler_of(pipeline.scheduler) == "euler"


def test_the_demo_draws_with_the_sampler_picked(tiny_model, tmp_path):
    from finetune.demo.engine import DemoEngine, Request
    from finetune.errors import FinetuneError

    engine = DemoEngine(str(tiny_model), tmp_path)
    drawn = {name: np.asarray(engine.render(Request("a red circle", steps=2, sampler=name))[0][0][0]) for name in ("ddim", "euler_a", "Euler a")}
    assert not np.array_equal(drawn["ddim"], drawn["euler_a"])
    assert np.array_equal(drawn["euler_a"], drawn["Euler a"])  # the webui's name for it, as an API caller may send it
    with pytest.raises(FinetuneError, match="sampler: no sampler here is named 'heun': choose ddim, euler"):
        engine.render(Request("a red circle", steps=2, sampler="heun"))
    from finetune.demo.page import build_app

    [listed] = [block for block in build_app(engine).blocks.values() if getattr(block, "elem_id", None) == "sampler"]
    assert [tuple(choice) for choice in listed.choices] == [("DDIM", "ddim"), ("Euler", "euler"), ("Euler a", "euler_a"), ("DPM++ 2M Uniform", "dpmpp_2m"),
                                                            ("DPM++ 2M Karras", "dpmpp_2m_karras"), ("UniPC", "unipc")]  # the webui's names on the page
    assert all(sampler_named(label) == name for label, name in listed.choices)  # and each read back as the sampler it names


def test_a_prompts_ss_draws_it_with_that_sampler_and_the_others_as_before(base, monkeypatch):
    """sd-scripts' per-prompt --ss was accepted and ignored: a prompt asking for euler_a was drawn with the run's DDIM."""
    import finetune.sampling.pipelines as sampling
    from finetune.sampling.prompt_options import PromptSettings, with_options

    defaults = PromptSettings("", None, 3, 7.5, 2)
    settings = [with_options(text, defaults) for text in ("a red circle", "a red circle --ss k_euler_a", "a red circle --ss DDIM")]
    assert [prompt.sampler for prompt in settings] == [None, "euler_a", "ddim"]  # sd-scripts' name, any case: ours
    calls, real = [], sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda pipeline, prompts, *args, **kwargs: calls.append((prompts, type(pipeline.scheduler).__name__)) or real(pipeline, prompts, *args, **kwargs))
    pipeline = build_pipeline(base)
    rows = sampling.generate_with_settings(pipeline, settings, 1, 64)
    # The pipeline's own sampler asked for by name draws in the batch of the prompts without --ss; euler_a in its own.
    assert calls == [(["a red circle", "a red circle"], "DDIMScheduler"), (["a red circle"], "EulerAncestralDiscreteScheduler")]
    assert sampler_of(pipeline.scheduler) == "ddim"  # given back after the euler_a prompt
    alone = {name: sampling.generate(build_pipeline(base, sampler=name), ["a red circle"], 1, 3, 2, 7.5, 64)[0][0] for name in ("ddim", "euler_a")}
    as_drawn = [np.asarray(row[0], dtype=np.int16) for row in rows]
    assert np.abs(as_drawn[0] - np.asarray(alone["ddim"], dtype=np.int16)).max() <= 1  # a batch of 2: up to float rounding
    assert np.array_equal(as_drawn[1], np.asarray(alone["euler_a"])) and not np.array_equal(as_drawn[1], as_drawn[0])


def test_a_ss_with_no_sampler_here_is_one_line_naming_the_prompts_file_and_line(make_recipe, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --ss euler\n# sd-scripts' heun:\na blue square --ss heun --d 3\n", encoding="utf-8")
    with pytest.raises(FinetuneError, match=rf"validation.prompts_file {prompts} line 3: 'a blue square --ss heun --d 3': --ss needs a sampler \(ddim, euler or k_euler, .*unipc\), got 'heun'"):
        make_recipe(validation__prompts_file=str(prompts))


def test_a_prompts_dpmpp_2m_karras_with_zero_terminal_snr_is_refused_where_the_recipe_loads(make_recipe):
    with pytest.raises(FinetuneError, match="validation prompt 'a dog --ss dpmpp_2m_karras' .its --ss. with model.zero_terminal_snr: the dpmpp_2m_karras sampler cannot"):
        make_recipe(validation__prompts=["a cat", "a dog --ss dpmpp_2m_karras"], model__zero_terminal_snr=True, model__prediction_type="v_prediction")


def test_dpmpp_2m_and_unipc_are_held_to_the_steps_they_can_draw_on_sds_leading_spacing(base):
    """At 999 steps diffusers' DPM++ and UniPC start at timestep 1000, past the 1000 trained: the shipped toy-world base
    drew NaN images (a minute of CPU later). The others draw 999; these 998, all within the trained timesteps."""
    from finetune.sampling.samplers import MOST_STEPS, steps_problem

    assert base.noise_scheduler.config.timestep_spacing == "leading"  # SD1.x's and SD2.x's own, and the tiny model's
    for name in SAMPLER_NAMES:
        scheduler = build_pipeline(base, sampler=name).scheduler
        most = MOST_STEPS.get(name, 999)
        scheduler.set_timesteps(most)
        assert 0 <= int(scheduler.timesteps.min()) and int(scheduler.timesteps.max()) <= 999, name
        if name in MOST_STEPS:
            scheduler.set_timesteps(most + 1)
            assert int(scheduler.timesteps.max()) == 1000, name  # the cause: fixed in diffusers, MOST_STEPS can go
            assert steps_problem(name, most + 1) and not steps_problem(name, most)
        else:
            assert steps_problem(name, 999) is None


def test_steps_a_sampler_cannot_draw_are_refused_before_anything_loads(make_recipe, tiny_model, capsys):
    said = "the unipc sampler draws at most 998 steps, got 999"
    with pytest.raises(FinetuneError, match=f"validation.num_inference_steps with validation.sampler: {said}"):
        make_recipe(validation__sampler="unipc", validation__num_inference_steps=999, validation__prompts=["a cat"])
    with pytest.raises(FinetuneError, match=f"validation prompt 'a dog --ss unipc --s 999': {said}"):
        make_recipe(validation__prompts=["a cat", "a dog --ss unipc --s 999"])
    assert make_recipe(validation__sampler="unipc", validation__num_inference_steps=998, validation__prompts=["a cat"])
    assert make_recipe(validation__num_inference_steps=999, validation__prompts=["a cat --ss euler"])
    for options, where in ((["--sampler", "unipc", "--steps", "999"], "--steps with --sampler"), (["--steps", "999", "--prompt", "p --ss unipc"], "--prompt 'p --ss unipc'")):
        assert main(["sample", "--base", str(tiny_model), "--prompt", "a cat", *options]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"{where}: {said} (at 999, diffusers' DPM++ and UniPC start past the model's "
                                                                           "last timestep and every image is NaN): ask 998 or fewer, or another sampler")


TRAILING_61 = "61 steps on trailing timestep spacing .the zero-terminal-SNR schedule's. are 62 in diffusers, the last at timestep -1"


@pytest.fixture
def trailing_base(tiny_model, tmp_path):
    """The tiny model with its own schedule spaced "trailing" (as a zero-terminal-SNR base ships)."""
    import json
    import shutil

    trailing = tmp_path / "trailing-base"
    shutil.copytree(tiny_model, trailing)
    config = json.loads((trailing / "scheduler" / "scheduler_config.json").read_text())
    (trailing / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "timestep_spacing": "trailing"}))
    return trailing


def test_step_counts_trailing_spacing_takes_one_more_of_are_refused(make_recipe, trailing_base, tmp_path, capsys):
    """On the zero-terminal-SNR schedule (trailing spacing) diffusers took 61 steps as 62, the last at timestep -1: unipc
    at 998 drew NaN images of the toy-world base, and every sampler took a last step at the wrong noise level."""
    from diffusers import DDIMScheduler

    from finetune.sampling.samplers import trailing_steps_problem

    scheduler = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    for steps in (60, 61, 998):
        scheduler.set_timesteps(steps)
        assert (len(scheduler.timesteps) == steps + 1 and int(scheduler.timesteps[-1]) == -1) == bool(trailing_steps_problem(steps)), steps
    said = TRAILING_61
    ztsnr = dict(model__zero_terminal_snr=True, model__prediction_type="v_prediction")
    with pytest.raises(FinetuneError, match=f"validation.num_inference_steps: {said}.*: ask 60"):
        make_recipe(validation__num_inference_steps=61, validation__prompts=["a cat"], **ztsnr)
    with pytest.raises(FinetuneError, match=f"validation prompt 'a dog --s 61': {said}"):
        make_recipe(validation__prompts=["a cat", "a dog --s 61"], **ztsnr)
    assert make_recipe(validation__num_inference_steps=61, validation__prompts=["a cat"])  # leading spacing: 61 steps are 61
    assert make_recipe(validation__num_inference_steps=60, validation__prompts=["a cat"], **ztsnr)
    assert main(["sample", "--base", str(trailing_base), "--prompt", "a cat", "--steps", "61", "--out", str(tmp_path / "out")]) == 2
    assert re.search(f"--steps: {said}", capsys.readouterr().err) and not (tmp_path / "out").exists()


def test_the_demo_says_steps_its_columns_schedule_cannot_draw_before_any_column_renders(tiny_model, tmp_path):
    """A LoRA trained with model.zero_terminal_snr draws on trailing spacing: the demo's steps slider at 61 drew its
    column's last step at timestep -1 without a word (the base's column, on leading spacing, draws 61 as asked)."""
    from finetune.demo.engine import DemoEngine, Request

    adapters = tmp_path / "adapters"
    adapters.mkdir()
    unet = load_base_model(ModelConfig(pretrained=str(tiny_model))).unet
    record = {"finetune.method": "lora", "finetune.zero_terminal_snr": "true", "finetune.prediction_type": "v_prediction"}
    trained_lora(unet, adapters / "zsnr.safetensors", record)
    engine = DemoEngine(str(tiny_model), adapters)
    [name] = engine.names("lora")
    progress = []
    request = Request("a cat", steps=61, loras=[(name, 1.0)])
    with pytest.raises(FinetuneError, match=f"^steps, in column {name}.*: {TRAILING_61} .*: ask 60$"):
        engine.render(request, lambda done, total: progress.append(done))
    assert progress == []  # refused before the base's column drew
    assert engine.render(Request("a cat", steps=61))[0]  # the base alone: leading spacing, 61 steps are 61
    assert engine.render(Request("a cat", steps=60, loras=[(name, 1.0)]))[0]


def test_eval_refuses_steps_its_schedule_cannot_draw_before_drawing(trailing_base, tmp_path, capsys, monkeypatch):
    import finetune.evaluation.evaluate

    monkeypatch.setattr(finetune.evaluation.evaluate, "score_suites", lambda *args: pytest.fail("drew: --steps 61 on trailing spacing should be refused"))
    out = tmp_path / "eval.json"
    assert main(["eval", "--base", str(trailing_base), "--steps", "61", "--suite", "adherence", "--num-prompts", "1", "--out", str(out)]) == 2
    assert re.search(f"^error: --steps: {TRAILING_61} .*: ask 60$", capsys.readouterr().err.strip()) and not out.exists()


def test_validation_steps_a_bases_own_trailing_spacing_cannot_draw_are_refused_before_training(trailing_base, image_folder, tmp_path):
    """The recipe refuses them under model.zero_terminal_snr as it loads; a base whose scheduler config spaces its steps
    "trailing" itself drew every validation's last step at timestep -1 without a word."""
    from conftest import build_recipe
    from finetune.training.trainer import train

    with pytest.raises(FinetuneError, match=f"^validation.num_inference_steps: {TRAILING_61} .*: ask 60$"):
        train(build_recipe(trailing_base, image_folder, tmp_path / "run", train__max_steps=1, validation__num_inference_steps=61,
                           validation__prompts=["a cat"]))  # fmt: skip
    with pytest.raises(FinetuneError, match=f"^validation prompt 'a dog --s 61': {TRAILING_61}"):
        train(build_recipe(trailing_base, image_folder, tmp_path / "run2", train__max_steps=1, validation__prompts=["a cat", "a dog --s 61"]))


def test_class_images_steps_the_bases_trailing_spacing_cannot_draw_are_refused_before_any_is_made(trailing_base, tmp_path):
    """DreamBooth's class images are drawn on the base's own schedule: spaced "trailing", 61 steps ended at timestep -1."""
    from finetune.config import ClassImageGeneration
    from finetune.dreambooth.class_images import generate_class_images
    from finetune.sampling.inference import load_sampling_pipeline

    pipeline = load_sampling_pipeline(str(trailing_base))
    folder = tmp_path / "class"
    with pytest.raises(FinetuneError, match=f"^dreambooth.class_generation.num_inference_steps: {TRAILING_61} .*: ask 60$"):
        generate_class_images(pipeline, ["a shape"], folder, "key", [0], ClassImageGeneration(num_inference_steps=61), 64)
    assert not folder.exists()
    assert generate_class_images(pipeline, ["a shape"], folder, "key", [0], ClassImageGeneration(num_inference_steps=2), 64) == 1


def test_the_count_a_trailing_refusal_advises_draws_on_any_schedule_length():
    """The nearest count that draws was looked for 2 steps either side: on a schedule of 999 timesteps (a base's
    num_train_timesteps), 968 to 973 steps all take one more, and 970 raised StopIteration, a traceback for a refusal."""
    import numpy as np

    from finetune.sampling.samplers import trailing_steps_problem

    for steps in range(968, 974):
        advised = int(trailing_steps_problem(steps, 999).rsplit("ask ", 1)[1])
        assert len(np.arange(999, 0, -999 / advised)) == advised and abs(advised - steps) <= 4, (steps, advised)
