"""A creator's first day: the commands of the README typed as a user coming from sd-scripts and diffusers' scripts types
them, with the mistakes such a user makes, each answered with what to do."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from finetune.cli.main import main
from odd_images import captioned, noise

REPOSITORY = Path(__file__).resolve().parents[1]


def test_check_data_run_from_another_folder_says_the_base_model_is_not_there(tmp_path, monkeypatch, capsys):
    """The quickstart's base is a path from the repository's root: from another folder training stops on it at once,
    and check-data said "result: ready to train"."""
    for seed in range(4):  # a batch of the recipe's 4
        captioned(tmp_path / "photos", f"dog{seed}.png", noise(64, 64, seed=seed))
    monkeypatch.chdir(tmp_path)
    recipe = str(REPOSITORY / "recipes" / "quickstart.yaml")
    assert main(["check-data", recipe, "data.image_dir=photos"]) == 1
    out = capsys.readouterr().out
    assert f"fatal: base model finetune/assets/toyworld-base not found: no such folder or file (check model.pretrained) (relative paths are read from the current folder, {tmp_path})" in out
    assert out.rstrip().endswith("result: training would stop: 1 fatal problem; fix it")
    monkeypatch.chdir(REPOSITORY)  # from the repository's root the same command is ready
    assert main(["check-data", recipe, f"data.image_dir={tmp_path / 'photos'}"]) == 0
    assert "fatal" not in capsys.readouterr().out


def test_a_command_copied_from_sd_scripts_gets_every_override_at_once_quoted_for_the_shell(capsys):
    """Only the first option got its override (the next try named the next); a folder with spaces was given unquoted, so
    pasting it split the path; sd-scripts' `--resolution 512,512` became data.resolution=512,512, an error of its own."""
    from finetune.cli.arguments import parse_arguments

    argv = ["train", "recipes/lora.yaml", "--train_data_dir", "my dog pics", "--max_train_steps=20", "--resolution", "512,512", "--network_dim", "8",
            "--foo", "3"]  # fmt: skip
    with pytest.raises(SystemExit):
        parse_arguments(argv)
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        ": recipe keys are given as key=value after the recipe: 'data.image_dir=my dog pics' train.max_steps=20 data.resolution=512 lora.rank=8; "
        "--foo names no key: -h lists the command's options"
    )


def test_a_resolution_written_as_width_and_height_says_the_one_number_it_takes(tmp_path, capsys):
    """sd-scripts writes --resolution 512,512 (or 768,512): it was pydantic's "unable to parse string as an integer"."""
    assert main(["check-data", "recipes/lora.yaml", f"data.image_dir={tmp_path}", "data.resolution=512,512"]) == 2
    assert capsys.readouterr().err.strip() == ("error: override 'data.resolution=512,512': key 'data.resolution': is one number, the side of the "
                                               "square images train at: write 512 (got '512,512')")  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data:\n  image_dir: {tmp_path}\n  resolution: 768x512\n")
    assert main(["check-data", str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {recipe}: key 'data.resolution': is one number, the side of the square images train at: "
                                               "images of other shapes train near their own shape with data.bucketing.enabled: true, in as many "
                                               "pixels as that square (for 768x512's, a side of about 640) (got '768x512')")  # fmt: skip


def test_a_short_run_of_the_lora_recipe_is_told_the_warmup_that_fits_it(capsys):
    """`finetune train recipes/lora.yaml ... train.max_steps=20`, the first short try, stopped on the recipe's 100 warm-up
    steps without saying what to set."""
    assert main(["train", "recipes/lora.yaml", "data.image_dir=datasets/star", "train.max_steps=20"]) == 2
    assert capsys.readouterr().err.strip() == ("error: override 'train.max_steps=20': optimizer.warmup_steps (100) must be below train.max_steps "
                                               "(20): the learning rate would never reach optimizer.lr; lower it with the run's length "
                                               "(optimizer.warmup_steps=2, a tenth of it)")  # fmt: skip


def test_a_kohya_training_folder_given_as_a_concept_gets_the_overrides_that_train_its_subfolder(tmp_path, capsys):
    """sd-scripts' train_data_dir holds `10_sks dog`: given as instance_dir it was "give each its own concept (instance_dir)",
    with neither the path nor its 10 repeats."""
    for seed in range(4):
        captioned(tmp_path / "train" / "10_sks dog", f"{seed}.png", noise(64, 64, seed=seed))
    assert main(["check-data", "recipes/dreambooth_lora.yaml", f"dreambooth.concepts.0.instance_dir={tmp_path / 'train'}"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: data folder {tmp_path / 'train'} has no images of its own, only subfolders with images "
                                               f"(10_sks dog): a concept trains one folder, e.g. 'dreambooth.concepts.0.instance_dir="
                                               f"{tmp_path / 'train' / '10_sks dog'}' dreambooth.concepts.0.repeats=10")  # fmt: skip


def test_check_data_resolution_option_says_what_width_and_height_mean(tmp_path, capsys):
    """`check-data --image-dir x --resolution 512,512` was argparse's "invalid int value: '512,512'"."""
    assert main(["check-data", "--image-dir", str(tmp_path), "--resolution", "512,512"]) == 2
    assert capsys.readouterr().err.strip() == "error: check-data: --resolution: is one number, the side of the square images train at: write 512 (got '512,512')"


@pytest.mark.parametrize("command", [["train", "--resume", "latest"], ["check-data"]])
def test_a_run_folder_given_as_the_recipe_is_told_the_recipe_it_ran_with(tmp_path, capsys, command):
    """`finetune train outputs/lora --resume latest` was told to pass "a YAML file in it, such as recipes/lora.yaml". The
    command that continues the run is said whole: check-data, told "with --resume latest", takes no such option."""
    run = tmp_path / "my run"
    run.mkdir()
    (run / "recipe_as_run.yaml").write_text("method: lora\n")
    assert main([command[0], str(run), *command[1:]]) == 2
    assert capsys.readouterr().err.strip() == (f"error: recipe {run} is a training run's folder: pass the recipe it ran with, "
                                               f"{run / 'recipe_as_run.yaml'} (to continue that run: finetune train "
                                               f"'{run / 'recipe_as_run.yaml'}' --resume latest)")  # fmt: skip


def test_an_override_typed_with_spaces_around_its_equals_sign_is_told_how_to_write_it(capsys):
    """`data.image_dir = my photos` reached finetune as four items: "override 'data.image_dir' must look like key=value"."""
    from finetune.cli.arguments import parse_arguments

    for typed in (["data.image_dir", "=", "my photos"], ["data.image_dir=", "my photos"], ["data.image_dir", "=my photos"]):
        with pytest.raises(SystemExit):
            parse_arguments(["train", "recipes/lora.yaml", "train.max_steps=50", *typed])
        assert capsys.readouterr().err.splitlines()[-1] == (f"finetune train: error: override '{' '.join(typed)}' has a space beside its '=', "
                                                            "so the shell splits it: write 'data.image_dir=my photos'")  # fmt: skip
    args = parse_arguments(["train", "recipes/lora.yaml", "data.caption=", "train.max_steps=50"])  # an empty value, then an override
    assert args.overrides == ["data.caption=", "train.max_steps=50"]


def test_a_resolution_far_from_the_base_models_own_is_warned_of(tmp_path, capsys):
    """The quickstart's 64 px given to SD1.5, or a photo set's 512 px to the 64 px toy-world base: it trained without a word."""
    for seed in range(4):
        captioned(tmp_path / "photos", f"{seed}.png", noise(512, 512, seed=seed))
    warning = ("warning: data.resolution 512 is 8x the base model's own size (finetune/assets/toyworld-base: 64 px, what it learned to draw and "
               "samples at): a model trained far from the size it learned draws poorly there; set data.resolution near 64 unless that is meant")  # fmt: skip
    typed = ["recipes/quickstart.yaml", f"data.image_dir={tmp_path / 'photos'}", "data.resolution=512"]
    assert main(["check-data", *typed]) == 0
    out = capsys.readouterr().out
    assert warning in out.splitlines() and out.rstrip().endswith("result: ready to train (1 warning)")
    (tmp_path / "run" / "checkpoints" / "checkpoint-1").mkdir(parents=True)  # the run stops on it, after its checks before torch
    assert main(["train", *typed, f"output_dir={tmp_path / 'run'}"]) == 2
    assert warning in capsys.readouterr().out.splitlines()
    assert main(["check-data", *typed, "data.resolution=128"]) == 0  # twice its size: a choice, not a slip
    assert "warning" not in capsys.readouterr().out


def test_an_option_of_sample_spelled_as_diffusers_spells_it_is_told_its_name_here(capsys):
    """`finetune sample --num_images 2 --guidance_scale 5` was the top-level parser's bare "unrecognized arguments"."""
    from finetune.cli.arguments import parse_arguments

    with pytest.raises(SystemExit):
        parse_arguments(["sample", "--prompt", "x", "--num_images", "2", "--guidance_scale", "5", "--zzz"])
    assert capsys.readouterr().err.splitlines()[-1] == ("finetune sample: error: unrecognized arguments: --num_images 2 --guidance_scale 5 --zzz: "
                                                        "did you mean --num-images for --num_images, --guidance for --guidance_scale?")  # fmt: skip


def test_an_adapter_given_to_sample_without_its_option_is_told_the_options(tmp_path, capsys):
    """`finetune sample outputs/lora --prompt x` was "finetune: error: unrecognized arguments: outputs/lora" alone."""
    from finetune.cli.arguments import parse_arguments

    with pytest.raises(SystemExit):
        parse_arguments(["sample", str(tmp_path), "--prompt", "x"])
    assert capsys.readouterr().err.splitlines()[-1] == (f"finetune sample: error: unrecognized arguments: {tmp_path}: give {tmp_path} with its "
                                                        "option: --lora for a LoRA (file or run folder), --controlnet for a ControlNet")  # fmt: skip


def test_accelerate_launch_asking_for_two_processes_that_started_one_is_refused_before_anything_loads(make_recipe, monkeypatch, tmp_path):
    """`accelerate launch --num_processes 2 -m finetune train ...` on a machine without GPUs runs accelerate's one-process
    launcher unless given --multi_gpu (docs/scale.md): the run trained on one process, half the global batch asked for,
    said only as "training on 1 process"."""
    import finetune.distributed.launch_options as launch_options
    from finetune.errors import FinetuneError
    from finetune.training.trainer import train

    launcher = ["/venv/bin/python", "/venv/bin/accelerate", "launch"]
    script = ["-m", "finetune", "train", "recipes/controlnet.yaml"]
    config = tmp_path / "accelerate.yaml"
    config.write_text("distributed_type: NO\nnum_processes: 4\n")
    assert launch_options.processes_asked([*launcher, "--num_processes", "2", *script]) == (2, "--num_processes 2")
    assert launch_options.processes_asked([*launcher, "--config_file", str(config), *script]) == (4, f"{config}'s num_processes: 4")
    assert launch_options.processes_asked([*launcher, "--config_file", str(config), "--num_processes", "1", *script]) is None  # the option wins
    assert launch_options.processes_asked(["/bin/bash", "-c", "pytest"]) is None and launch_options.processes_asked([]) is None

    monkeypatch.delenv("WORLD_SIZE", raising=False)  # as accelerate's one-process launcher leaves it
    monkeypatch.setattr(launch_options, "launcher_command_line", lambda: [*launcher, "--num_processes", "2", *script])
    recipe = make_recipe(model__pretrained=str(tmp_path / "no-such-model"))  # a later refusal would say "not found"
    with pytest.raises(FinetuneError, match=r"^accelerate launch --num_processes 2 started this run as 1 process: without that many GPUs accelerate "
                                            r"starts several only with --multi_gpu \(on CPUs too, over gloo\): launch with --multi_gpu "
                                            r"--num_processes 2, or --num_processes 1 for one$"):  # fmt: skip
        train(recipe)
    monkeypatch.setattr(launch_options, "launcher_command_line", lambda: [*launcher, "--num_processes", "1", *script])
    with pytest.raises(FinetuneError, match="no-such-model"):
        train(recipe)


def test_sample_given_a_folder_of_conditioning_images_names_one_image_of_it(tiny_model, tmp_path, capsys):
    """README's ControlNet sample command with its conditioning/ folder given whole (to steer by each image) said the folder,
    which is there, was "not found"."""
    from controlnet_helpers import write_controlnet_run

    run = write_controlnet_run(tiny_model, tmp_path / "run", trained=False)
    conditions = tmp_path / "controlnet_data" / "conditioning"
    conditions.mkdir(parents=True)
    for name in ("0001.png", "0000.png"):
        noise(64, 64, seed=0).save(conditions / name)
    assert main(["sample", "--base", str(tiny_model), "--controlnet", str(run), "--condition", str(conditions), "--prompt", "a red circle"]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [f"error: --condition {conditions} is a folder: give one conditioning image (such as {conditions / '0000.png'}); each --condition is one image"]


def test_a_hub_dataset_offline_by_hf_hub_offline_says_downloads_are_off(tiny_model, tmp_path, monkeypatch, capsys):
    """recipes/controlnet.yaml's fusing/fill50k with HF_HUB_OFFLINE=1 exported (as the Makefile sets it) said "the hub cannot
    be reached: ... download it where the hub can be reached", where the network was never tried."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # datasets read it as it was imported: the test suite runs offline (README)
    monkeypatch.chdir(tmp_path)
    recipe = str(REPOSITORY / "recipes" / "controlnet.yaml")
    assert main(["check-data", recipe, "data.image_dir=null", "data.dataset=fusing/fill50k", f"model.pretrained={tiny_model}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: dataset fusing/fill50k is no folder or file here ({tmp_path / 'fusing' / 'fill50k'} not found), and as a hub dataset it is not in "
        "the local cache and downloads are off (HF_HUB_OFFLINE=1): check the path, or download it once with network (run without HF_HUB_OFFLINE=1)"]


@pytest.mark.parametrize("environment, why", [
    ({"HF_DATASETS_OFFLINE": "1"}, "downloads are off (HF_DATASETS_OFFLINE=1): check the path, or download it once with network (run without HF_DATASETS_OFFLINE=1)"),
    ({"TRANSFORMERS_OFFLINE": "yes"}, "downloads are off (TRANSFORMERS_OFFLINE=yes): check the path, or download it once with network (run without TRANSFORMERS_OFFLINE=yes)"),
    ({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "0"}, "the hub cannot be reached: check the path, or download it where the hub can be reached"),
], ids=["hf-datasets-offline", "transformers-offline", "datasets-online-under-hub-offline"])  # fmt: skip
def test_a_hub_dataset_offline_says_the_variable_datasets_reads(tiny_model, tmp_path, monkeypatch, capsys, environment, why):
    """datasets also reads HF_DATASETS_OFFLINE (over HF_HUB_OFFLINE) and TRANSFORMERS_OFFLINE: only HF_HUB_OFFLINE=1 was said
    to be offline, so HF_DATASETS_OFFLINE=1 was "the hub cannot be reached", and HF_DATASETS_OFFLINE=0 "downloads are off"."""
    importlib.import_module("datasets")  # imported under the suite's HF_HUB_OFFLINE=1: offline whatever the test sets next

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    recipe = str(REPOSITORY / "recipes" / "controlnet.yaml")
    assert main(["check-data", recipe, "data.image_dir=null", "data.dataset=fusing/fill50k", f"model.pretrained={tiny_model}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: dataset fusing/fill50k is no folder or file here ({tmp_path / 'fusing' / 'fill50k'} not found), and as a hub dataset it is not in "
        f"the local cache and {why}"]


def test_accelerate_config_launched_from_another_folder_names_the_deepspeed_config_it_cannot_find(make_recipe, monkeypatch, tmp_path):
    """README's `accelerate launch --config_file accelerate_config.yaml` from a folder of one's own (the config given by
    its path): its configs/deepspeed/zero2.json is read from the current folder, and every process failed in accelerate's
    plugin with three chained tracebacks ("Expected a string path to an existing deepspeed config")."""
    import finetune.distributed.deepspeed_checks as deepspeed_checks
    from finetune.errors import FinetuneError
    from finetune.training.trainer import train

    config = REPOSITORY / "accelerate_config.yaml"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "configs/deepspeed/zero2.json")  # as the launcher hands it on
    monkeypatch.setattr(deepspeed_checks, "launcher_command_line", lambda: ["/venv/bin/accelerate", "launch", "--config_file", str(config),
                                                                             "-m", "finetune", "train", "recipes/lora.yaml"])  # fmt: skip
    monkeypatch.chdir(tmp_path)
    recipe = make_recipe(model__pretrained=str(tmp_path / "no-such-model"))  # a later refusal would say "not found"
    with pytest.raises(FinetuneError) as refused:
        train(recipe)
    assert str(refused.value) == (
        f"DeepSpeed config configs/deepspeed/zero2.json (deepspeed_config_file of {config}) not found (relative paths are read from the "
        f"current folder, {tmp_path}): launch from {REPOSITORY}, where it is, or give deepspeed_config_file as {REPOSITORY / 'configs/deepspeed/zero2.json'}")
    monkeypatch.chdir(REPOSITORY)  # from the repository's root the launch goes on to the next check
    with pytest.raises(FinetuneError, match="no-such-model"):
        train(recipe)


def test_a_deepspeed_config_given_on_the_launch_command_line_is_named_as_that_option(monkeypatch, tmp_path):
    """`accelerate launch --config_file accelerate_config.yaml --deepspeed_config_file zero3.json` with no zero3.json here was
    said to be "deepspeed_config_file of accelerate_config.yaml", and told to launch from the config file's folder."""
    import finetune.distributed.deepspeed_checks as deepspeed_checks
    from finetune.errors import FinetuneError

    config = REPOSITORY / "accelerate_config.yaml"
    monkeypatch.setattr(deepspeed_checks, "launcher_command_line", lambda: ["/venv/bin/accelerate", "launch", "--config_file", str(config),
                                                                             "--deepspeed_config_file", "configs/deepspeed/zero2.json",
                                                                             "-m", "finetune", "train", "recipes/lora.yaml"])  # fmt: skip
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FinetuneError) as refused:
        deepspeed_checks.require_config_file("configs/deepspeed/zero2.json")  # as the launcher hands it on
    assert str(refused.value) == (
        f"DeepSpeed config configs/deepspeed/zero2.json (accelerate launch --deepspeed_config_file) not found (relative paths are read from "
        f"the current folder, {tmp_path}): give its path from the current folder, or launch from the folder it is relative to")


@pytest.mark.parametrize("command", ["train", "check-data"])
def test_accelerate_launch_options_typed_after_the_command_say_where_they_go(command, capsys):
    """`accelerate launch -m finetune train recipes/lora.yaml --multi_gpu --num_processes 2` (the options after the script,
    where accelerate hands them to it) was told that recipe keys are given as key=value, which --num_processes is none of."""
    from finetune.cli.arguments import parse_arguments

    with pytest.raises(SystemExit):
        parse_arguments([command, "recipes/controlnet.yaml", "--multi_gpu", "--num_processes", "2", "--max_train_steps=20"])
    where = ("give them before -m finetune" if command == "train" else
             "check-data runs in one process, leave them out; training takes them")  # fmt: skip
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"finetune {command}: error: unrecognized arguments: --multi_gpu --num_processes 2 --max_train_steps=20: recipe keys are given as key=value "
        f"after the recipe: train.max_steps=20; --multi_gpu --num_processes 2 are accelerate launch's: {where} "
        "(accelerate launch --multi_gpu --num_processes 2 -m finetune train RECIPE)")
