"""Settings that could not work (or trained the wrong way) refused in one line, before anything loads, trains or is written."""

from pathlib import Path

import pytest

from finetune.cli.main import main
from finetune.config.recipe_loading import load_recipe
from finetune.errors import FinetuneError


@pytest.mark.parametrize("command", [["sample", "--prompt", "x"], ["eval"]])
def test_sampling_steps_past_the_schedulers_timesteps_are_refused(command, capsys):
    """--steps 2000 loaded the model, then was diffusers' ValueError traceback (a prompt's --s was already capped)."""
    with pytest.raises(SystemExit):
        main([*command, "--steps", "2000"])
    assert "argument --steps: must be at most 999 (the scheduler has 1000 training timesteps), got 2000" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["validation.num_inference_steps", "dreambooth.class_generation.num_inference_steps"])
def test_recipe_sampling_steps_past_the_schedulers_timesteps_are_refused(key):
    """validation.num_inference_steps: 1001 trained up to the first validation grid, then stopped with diffusers'
    traceback and nothing saved; the class images' steps likewise after loading the base."""
    recipe = "recipes/dreambooth.yaml" if key.startswith("dreambooth") else "recipes/quickstart.yaml"
    with pytest.raises(FinetuneError, match=rf"{key}.*less than or equal to 999"):
        load_recipe(recipe, [f"{key}=1000"])
    assert load_recipe(recipe, [f"{key}=999"])


@pytest.mark.parametrize("option, value, message", [
    ("--port", "70000", "must be a port from 1 to 65535, got 70000"),  # was bind()'s OverflowError traceback, after loading the base
    ("--port", "-1", "must be a port from 1 to 65535, got -1"),
    ("--queue-size", "0", "must be at least 1, got 0"),  # every Generate was turned away as 'queue is full'
    ("--max-upload-mb", "0", "must be above 0, got 0"),  # every upload was refused
])
def test_demo_options_that_cannot_serve_are_refused_before_loading(option, value, message, capsys):
    with pytest.raises(SystemExit):
        main(["demo", option, value])
    assert f"argument {option}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("options, said", [
    (["--kind", "canny", "--high", "inf"], "canny --high inf is past the colour levels 0-255 (a black-to-white edge is 255): almost no edge would be found, "
                                           "every conditioning image black; give 255 or less"),
    (["--kind", "canny", "--low", "300", "--high", "400"], "canny --high 400.0 is past the colour levels 0-255"),
    (["--kind", "mask", "--threshold", "442"], "mask --threshold 442.0 is at or past the largest RGB distance (441.7, black to white): "
                                               "no pixel would be shape, every mask black; give less"),
])  # fmt: skip
def test_make_conditions_refuses_thresholds_no_image_reaches(options, said, tmp_path, capsys):
    """They wrote every conditioning image black and said 'wrote 6 canny conditioning images'."""
    star = Path(__file__).parent.parent / "datasets" / "star"
    assert main(["make-conditions", str(star), str(tmp_path / "out"), *options]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {said}")
    assert not (tmp_path / "out").exists()
    assert main(["make-conditions", str(star), str(tmp_path / "edges"), "--kind", "canny", "--high", "255"]) == 0  # the range's top still works


def test_a_sample_resolution_off_the_8_pixel_grid_is_refused_before_the_base_loads(tmp_path, capsys):
    """--resolution 30 was refused only after the base model loaded (after a hub base's download)."""
    with pytest.raises(SystemExit):
        main(["sample", "--base", str(tmp_path / "not-loaded"), "--prompt", "a", "--resolution", "30"])
    assert "argument --resolution: must be a multiple of 8 (the VAE downsamples by 8), got 30" in capsys.readouterr().err


def test_make_tiny_model_replaces_a_folder_with_contents_only_when_asked(tmp_path, capsys):
    """It wrote random weights into any folder: a mistyped path to a trained pipeline lost that pipeline's weights."""
    trained = tmp_path / "trained"
    assert main(["make-tiny-model", str(trained), "--seed", "1"]) == 0
    weights = (trained / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(["make-tiny-model", str(trained)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"error: make-tiny-model output {trained} is not empty: pick a new folder, "
                                                    "or pass --overwrite to replace what is in it")  # fmt: skip
    assert (trained / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    (trained / "notes.txt").write_text("mine")
    assert main(["make-tiny-model", str(trained), "--overwrite"]) == 0  # everything in it replaced, as export-base replaces what its own holds
    assert (trained / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != weights and not (trained / "notes.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["trained"]  # no partial folder left beside it


def test_export_base_never_writes_over_the_pipeline_it_reads_nor_the_run_around_it(tmp_path, capsys):
    """'export-base run run --overwrite' (a full run's folder, whose pipeline/ it reads) replaced the whole run, its
    checkpoints and samples with it, by the fp16 copy; a destination inside the pipeline broke it. Refused, even with
    --overwrite, before anything loads."""
    run = tmp_path / "run"
    assert main(["make-tiny-model", str(run / "pipeline")]) == 0
    (run / "samples").mkdir()
    (run / "samples" / "step-000005.png").write_bytes(b"mine")
    for source, destination, where in ((run, run, "is"), (run / "pipeline", run, "holds"), (run, run / "pipeline" / "unet", "is inside")):
        assert main(["export-base", str(source), str(destination), "--overwrite"]) == 2
        assert capsys.readouterr().err.strip().endswith(f"error: export-base destination {destination} {where} the model it reads (source {source}), "
                                                        "which writing it would replace: pick another folder")  # fmt: skip
    assert (run / "samples" / "step-000005.png").read_bytes() == b"mine" and (run / "pipeline" / "unet" / "config.json").is_file()


def test_export_base_stopped_while_writing_leaves_no_half_copy(tmp_path, monkeypatch):
    """Ctrl-C (or a full disk) while export-base wrote left .DESTINATION.partial, a hidden half pipeline (gigabytes for SD1.5)."""
    from diffusers import StableDiffusionPipeline

    assert main(["make-tiny-model", str(tmp_path / "pipe")]) == 0
    real_save = StableDiffusionPipeline.save_pretrained

    def stopped(self, folder, **kwargs):
        real_save(self, folder, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", stopped)
    assert main(["export-base", str(tmp_path / "pipe"), str(tmp_path / "fp16")]) == 130
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pipe"]


@pytest.mark.parametrize("spacing", [{}, {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True}])  # as shipped; zero terminal SNR's
def test_the_most_sampling_steps_taken_stay_within_the_schedulers_timesteps(spacing):
    """At 1000 steps DDIM with SD's steps_offset 1 reached timestep 1000 of 0-999: `sample --steps 1000` (or a
    prompt's --s 1000) was an IndexError after loading the model."""
    from diffusers import DDIMScheduler

    from finetune.sampling.prompt_options import MAX_STEPS

    config = DDIMScheduler.load_config(Path(__file__).parent.parent / "finetune" / "assets" / "toyworld-base" / "scheduler")
    scheduler = DDIMScheduler.from_config(config, **spacing)
    scheduler.set_timesteps(MAX_STEPS)
    assert int(scheduler.timesteps.max()) < scheduler.config.num_train_timesteps


@pytest.mark.parametrize(
    "recipe,overrides,said",
    [  # they were left unread without a word (data.caption_column also names a folder's metadata column: not among them)
        ("lora.yaml", ["data.dataset_split=test"], "data.dataset_split picks what a dataset (data.dataset) gives, and this recipe reads data.image_dir: remove it"),
        ("lora.yaml", ["data.image_column=img", "data.dataset_config=x"], "data.dataset_config, data.image_column pick what a dataset (data.dataset) gives, "
                                                                           "and this recipe reads data.image_dir: remove them"),  # fmt: skip
        ("dreambooth.yaml", ["data.dataset_config=x"], "data.dataset_config picks what a dataset (data.dataset) gives, and this recipe reads each concept's "
                                                       "instance_dir: remove it"),  # fmt: skip
    ],
)
def test_a_datasets_settings_without_a_dataset_are_refused(recipe, overrides, said):
    path = Path(__file__).parent.parent / "recipes" / recipe
    with pytest.raises(FinetuneError) as refused:
        load_recipe(path, overrides)
    named = " and ".join(f"'{override}'" for override in overrides)  # each of them refused: all named
    assert str(refused.value) == f"override{'s' if len(overrides) > 1 else ''} {named}: {said}"
    assert load_recipe(path, ["data.image_dir=null", "data.dataset=some/dataset", *overrides]) if recipe == "lora.yaml" else True


@pytest.mark.parametrize("override", ["model.prediction_type=v_prediction", "model.clip_skip=2", "model.max_token_length=150"])
def test_the_denoisers_model_settings_are_refused_with_method_vae(override):
    # Accepted without a word; model.prediction_type (and zero_terminal_snr) also went into the saved pipeline's scheduler, of a UNet never trained for it.
    key = override.split("=")[0]
    with pytest.raises(FinetuneError) as refused:
        load_recipe(Path(__file__).parent.parent / "recipes" / "pretrain_vae.yaml", [override])
    assert str(refused.value) == f"override '{override}': method vae trains the autoencoder on reconstructions, so {key} would do nothing: remove it"


@pytest.mark.parametrize(("overrides", "keys"), [(["data.caption=a shape"], "data.caption"), (["data.caption_dropout=0.1"], "data.caption_dropout"),
                                                 (["data.shuffle_tags=true", "data.keep_tokens=1"], "data.shuffle_tags, data.keep_tokens"),
                                                 (["data.tag_dropout=0.2"], "data.tag_dropout")])  # fmt: skip
def test_caption_settings_are_refused_with_method_vae(overrides, keys):
    # Accepted without a word: the VAE reads no captions.
    with pytest.raises(FinetuneError) as refused:
        load_recipe(Path(__file__).parent.parent / "recipes" / "pretrain_vae.yaml", overrides)
    remove = "them" if "," in keys else "it"
    assert str(refused.value).endswith(f"method vae trains the autoencoder on reconstructions, so {keys} would do nothing: remove {remove}")
