"""The command line: useful --help, and one clear line with a non-zero exit for bad input, before training."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from PIL import Image
from conftest import SHIPPED_BASE
from ports import free_port

from finetune.cli.main import main


def write_recipe(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), **sections}))
    return path


def run_train(tmp_path, capsys, recipe_path, *extra):
    code = main(["train", str(recipe_path), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_one_line_error(code, err, pattern, tmp_path):
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(pattern, err[0]), err[0]
    assert not (tmp_path / "out" / "checkpoints").exists()  # stopped before training


def good_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), "red").save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red square")
    return folder


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("missing_folder", r"data folder .*missing not found"),
        ("empty_folder", r"data folder .*empty has no images"),
        ("truncated_image", r"image .*bad\.png cannot be read"),
        ("missing_caption", r"image .*nocap\.png has no caption"),
        ("unknown_key", r"unknown key 'train.max_step' \(did you mean 'train.max_steps'\?\)"),
        ("bad_resolution", r"key 'data.resolution': must be a positive multiple of 8"),
        ("missing_model_path", r"base model .*nowhere not found"),
        ("uncached_hub_model", r"base model someone/not-cached is not in the local Hugging Face cache"),
        ("missing_model_file", r"base model file .*model\.safetensors not found"),
        ("model_without_vae", r"base model folder .*partial has no vae: a Stable Diffusion pipeline folder holds unet, vae, "),
        ("model_without_unet_weights", r"base model folder .*partial has no weights in unet: "),
    ],
)
def test_bad_input_is_one_line_before_training(case, pattern, tmp_path, capsys, tiny_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = {"image_dir": str(good_folder(tmp_path)), "resolution": 64}
    model = {"pretrained": str(tiny_model)}
    train = {"max_steps": 1}
    if case == "missing_folder":
        data["image_dir"] = str(tmp_path / "missing")
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        data["image_dir"] = str(tmp_path / "empty")
    elif case == "truncated_image":
        good = (Path(data["image_dir"]) / "0.png").read_bytes()
        (Path(data["image_dir"]) / "bad.png").write_bytes(good[: len(good) // 2])
        (Path(data["image_dir"]) / "bad.txt").write_text("x")
    elif case == "missing_caption":
        Image.new("RGB", (64, 64)).save(Path(data["image_dir"]) / "nocap.png")
    elif case == "unknown_key":
        train = {"max_step": 1}
    elif case == "bad_resolution":
        data["resolution"] = 60
    elif case == "missing_model_path":
        model["pretrained"] = str(tmp_path / "nowhere")
    elif case == "uncached_hub_model":
        model["pretrained"] = "someone/not-cached"
    elif case == "missing_model_file":
        model["pretrained"] = str(tmp_path / "model.safetensors")
    elif case in ("model_without_vae", "model_without_unet_weights"):
        shutil.copytree(tiny_model, tmp_path / "partial")
        model["pretrained"] = str(tmp_path / "partial")
        if case == "model_without_vae":
            shutil.rmtree(tmp_path / "partial" / "vae")
        else:
            for weights in (tmp_path / "partial" / "unet").glob("*.safetensors"):
                weights.unlink()
    recipe = write_recipe(tmp_path, data=data, model=model, train=train)
    code, err = run_train(tmp_path, capsys, recipe)
    assert_one_line_error(code, err, pattern, tmp_path)


def test_an_uncached_hub_model_is_said_to_need_the_network_or_a_local_copy(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from finetune.config import ModelConfig
    from finetune.errors import FinetuneError
    from finetune.models.loading import load_base_model

    def not_in_the_cache(*args, **kwargs):  # what huggingface_hub raises offline, and online when the hub is out of reach
        raise LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_in_the_cache)
    for offline, why in (("1", r"downloads are off \(HF_HUB_OFFLINE=1\)"), ("0", r"the hub could not be reached \(no network\?\)")):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        with pytest.raises(FinetuneError, match=rf"^base model someone/sd is not in the local Hugging Face cache and {why}: download it once"):
            load_base_model(ModelConfig(pretrained="someone/sd"))


def test_under_a_launcher_the_error_line_comes_once_per_machine(tmp_path, capsys, monkeypatch):
    """Every process of `accelerate launch` checks the same recipe: local rank 0 says it, the others only exit 2."""
    recipe = write_recipe(tmp_path, train={"max_step": 1})
    monkeypatch.setattr("finetune.cli.main.FIRST_PROCESS_GRACE", 0)  # the others' wait for the launcher: tests/test_error_lines.py
    for local_rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        code, err = run_train(tmp_path, capsys, recipe)
        assert code == 2 and len(err) == lines, err


def test_resume_from_something_that_is_not_a_checkpoint(tmp_path, capsys, tiny_model):
    recipe = write_recipe(tmp_path, data={"image_dir": str(good_folder(tmp_path)), "resolution": 64}, model={"pretrained": str(tiny_model)})
    code, err = run_train(tmp_path, capsys, recipe, "--resume", str(tmp_path))
    assert_one_line_error(code, err, r"not a complete checkpoint folder", tmp_path)
    code, err = run_train(tmp_path, capsys, recipe, "--resume", "latest", "--overwrite")
    assert_one_line_error(code, err, r"--overwrite starts over .* and --resume continues one: pass one of them", tmp_path)


def test_train_then_sample_with_the_adapter(tmp_path, capsys, tiny_model, image_folder):
    recipe = write_recipe(
        tmp_path,
        model={"pretrained": str(tiny_model)},
        data={"image_dir": str(image_folder), "resolution": 64},
        train={"max_steps": 2, "batch_size": 2},
        validation={"prompts": ["a red striped circle"], "num_inference_steps": 2, "images_per_prompt": 2},
        logging={"tensorboard": True},
    )
    assert main(["train", str(recipe), "optimizer.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "output: " in out and "samples: " in out
    # The grid drawn before the first step is named as the later ones are (it was written without a word).
    assert [line for line in out.splitlines() if line.startswith("samples: ") and line.endswith("step-000000.png")] != []
    grids = sorted((tmp_path / "out" / "samples").glob("step-*.png"))
    assert [g.name for g in grids] == ["step-000000.png", "step-000002.png"]  # before and after
    assert Image.open(grids[-1]).size == (160 + 2 * 64, 64)
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))

    samples = tmp_path / "samples"
    code = main(["sample", "--base", str(tiny_model), "--lora", str(tmp_path / "out"), "--prompt", "a red striped circle",
                 "--num-images", "2", "--steps", "2", "--out", str(samples)])
    assert code == 0
    assert sorted(p.name for p in samples.iterdir()) == ["00000-grid.png", "00000-prompt0_seed0.png", "00000-prompt0_seed1.png"]

    # `finetune export`'s folder holds one .safetensors file: --lora takes the folder too.
    assert main(["export", str(tmp_path / "out"), str(tmp_path / "webui"), "--to", "kohya"]) == 0
    code = main(["sample", "--base", str(tiny_model), "--lora", str(tmp_path / "webui"), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "s2")])
    assert code == 0 and (tmp_path / "s2" / "00000-grid.png").is_file()
    capsys.readouterr()
    # Without --base: the base its training run recorded (its name, where the run's base_paths.json has it); with none recorded, one line.
    code = main(["sample", "--lora", str(tmp_path / "out"), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "s4")])
    assert code == 0 and f"base model: {tiny_model} (recorded by the adapter's training run as {tiny_model.name}" in capsys.readouterr().out
    assert main(["sample", "--prompt", "x"]) == 2
    assert "error: pass --base MODEL: the base model to use" in capsys.readouterr().err
    # An export out of its run folder names the base as shared files do, by name only: found in no folder above it, one line.
    assert main(["sample", "--lora", str(tmp_path / "webui"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err == (f"error: pass --base MODEL: {tmp_path / 'webui'} records the base by its name only, {tiny_model.name} "
                                       "(shared files name no folders), and no folder above it holds one of that name\n")
    # eval and merge take the recorded base the same way, in sd-scripts' layout too.
    report = tmp_path / "eval.json"
    shutil.copy(next((tmp_path / "webui").glob("*.safetensors")), tmp_path / "out" / "webui.safetensors")
    assert main(["eval", "--lora", str(tmp_path / "out" / "webui.safetensors"), "--suite", "style", "--num-prompts", "1", "--steps", "1", "--out", str(report)]) == 0
    assert f"base model: {tiny_model} (recorded" in capsys.readouterr().out and yaml.safe_load(report.read_text())["settings"]["base"] == tiny_model.name  # as shared files name it
    assert main(["merge", "--lora", str(tmp_path / "out"), str(tmp_path / "merged")]) == 0
    assert yaml.safe_load((tmp_path / "merged" / "finetune_metadata.json").read_text())["finetune.base_model"] == tiny_model.name
    assert main(["eval", "--suite", "style"]) == 2 and "error: pass --base MODEL" in capsys.readouterr().err
    moved = tmp_path / "moved.safetensors"  # trained elsewhere with a relative model.pretrained
    save_file(load_file(next((tmp_path / "webui").glob("*.safetensors"))), moved, {"finetune.base_model": "models/sd/base", "format": "pt"})
    assert main(["sample", "--lora", str(moved), "--prompt", "x"]) == 2
    assert "records the base models/sd/base, which is not there from here" in capsys.readouterr().err
    # ... found from a folder above the adapter, as from the project folder a run trained in (outputs/...)
    (tmp_path / "project" / "models" / "sd").mkdir(parents=True)
    (tmp_path / "project" / "models" / "sd" / "base").symlink_to(tiny_model)
    (tmp_path / "project" / "outputs").mkdir()
    moved.rename(tmp_path / "project" / "outputs" / "moved.safetensors")
    code = main(["sample", "--lora", str(tmp_path / "project" / "outputs" / "moved.safetensors"), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "s5")])
    assert code == 0 and f"base model: {tmp_path / 'project' / 'models' / 'sd' / 'base'} (recorded" in capsys.readouterr().out
    # Another prompt into the same folder keeps the earlier run's files (it used to replace them): its own take the
    # next number, and the console names them.
    s5 = tmp_path / "s5"
    earlier = {p.name: p.read_bytes() for p in s5.iterdir()}
    code = main(["sample", "--lora", str(tmp_path / "project" / "outputs" / "moved.safetensors"), "--prompt", "y", "--steps", "1", "--num-images", "1",
                 "--out", str(s5)])  # fmt: skip
    assert code == 0 and f"wrote 1 image and a grid: {s5 / '00001-grid.png'} (images beside it: 00001-prompt0_seed0.png)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in s5.iterdir() if p.name in earlier} == earlier
    assert sorted({p.name for p in s5.iterdir()} - set(earlier)) == ["00001-grid.png", "00001-prompt0_seed0.png"]
    # Many images are named by their first and last, not in a line of every name.
    code = main(["sample", "--lora", str(tmp_path / "project" / "outputs" / "moved.safetensors"), "--prompt", "y", "--steps", "1", "--num-images", "5",
                 "--out", str(s5)])  # fmt: skip
    assert code == 0 and (f"wrote 5 images and a grid: {s5 / '00002-grid.png'} "
                          "(images beside it: 00002-prompt0_seed0.png, 00002-prompt0_seed1.png, ... 00002-prompt0_seed4.png)\n") in capsys.readouterr().out
    # Another base model: one line naming a layer that does not fit, from the LoRA's header and the base's configs (before
    # torch loads: finetune/formats/lora_base_fit.py); a base that is not there names --base.
    code = main(["sample", "--base", str(SHIPPED_BASE), "--lora", str(tmp_path / "out"), "--prompt", "x", "--out", str(tmp_path / "s3")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert re.search(rf"does not fit base model {SHIPPED_BASE}: its layer \S+ reads text 32 wide, the base's \S+ has (cross_attention_dim|hidden_size) 64 "
                     r"\(.*\): the LoRA was trained on another base; pass that one as --base$", err[0]), err
    code = main(["sample", "--base", str(tmp_path / "nowhere"), "--prompt", "x"])
    assert code == 2 and capsys.readouterr().err.strip().endswith("nowhere not found: no such folder or file (check --base)")


def test_python_dash_m_entry_point(tmp_path):
    """`python -m finetune` is the command (tests/test_checkpoints.py trains with it); a recipe that is not
    there is said before the training stack loads."""
    result = subprocess.run([sys.executable, "-m", "finetune", "train", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: recipe {tmp_path / 'missing.yaml'} not found: pass the path of a YAML file such as recipes/lora.yaml\n"
    script = "import sys; from finetune.cli.main import main; assert main(['train', 'missing.yaml']) == 2; print(' '.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert loaded.returncode == 0 and "finetune.config.recipe_loading" in loaded.stdout.split(), loaded.stderr[-2000:]
    assert "torch" not in loaded.stdout.split()


def test_train_and_sample_print_no_third_party_noise(tmp_path, tiny_model, image_folder):
    """Warnings libraries print on every run (CLIP's image processor without torchvision, DeepSpeed on a
    CPU, diffusers on a LoRA that leaves the text encoder alone, peft saving a text-encoder LoRA) drown
    what the run says. Nor do they import what they do not use."""
    recipe = write_recipe(tmp_path, model={"pretrained": str(tiny_model)}, data={"image_dir": str(image_folder), "resolution": 64}, train={"max_steps": 1})
    commands = [["train", str(recipe)],
                ["sample", "--base", str(tiny_model), "--lora", str(tmp_path / "out"), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "s")],
                ["train", str(recipe), "lora.train_text_encoder=true", f"output_dir={tmp_path / 'te'}"]]  # fmt: skip
    # One interpreter start; a run without DeepSpeed never imports it (accelerate's unwrap_model did, at the first validation).
    script = f"import sys\nfrom finetune.cli.main import main\nfor command in {commands!r}:\n    assert main(command) == 0\nassert 'deepspeed' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "s" / "00000-grid.png").is_file()
    for noise in ("requires torchvision", "Setting accelerator to CPU", "No LoRA keys associated", "kept in float32", "Could not find a config file", "gemm_4bit_forward"):
        assert noise not in result.stdout + result.stderr, noise


# About a minute of the default suite's budget (two interpreters with DeepSpeed). The default suite launches the same
# config file, with the tests' worker in place of `-m finetune`: tests/test_deepspeed_zero2.py.
@pytest.mark.slow
def test_accelerate_launch_with_the_top_level_config_trains_with_deepspeed(tmp_path, tiny_model, image_folder):
    recipe = write_recipe(
        tmp_path,
        model={"pretrained": str(tiny_model)},
        data={"image_dir": str(image_folder), "resolution": 64},
        train={"max_steps": 2, "batch_size": 2},
        validation={"prompts": []},
    )
    repo = Path(__file__).resolve().parent.parent
    # The README's command, from the repository root (the config names configs/deepspeed/zero2.json).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
               "--main_process_port", str(free_port()), "-m", "finetune", "train", str(recipe)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on 2 processes (distributed: deepspeed)" in result.stdout
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    for noise in ("built successfully", "is deprecated"):  # DeepSpeed's lines from each process (the launcher's own stay)
        assert noise not in result.stdout + result.stderr, noise


def test_ctrl_c_outside_the_training_loop_is_one_line_and_exit_130(monkeypatch, capsys):
    import finetune.sampling.inference

    def interrupted(request):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune.sampling.inference, "sample_to_folder", interrupted)
    assert main(["sample", "--base", str(SHIPPED_BASE), "--prompt", "p"]) == 130
    # A rerun makes every image anew: "run the command again to continue" promised what it does not do.
    assert capsys.readouterr().err.strip() == ("stopped (Ctrl-C): files written so far are kept; "
                                               "run the command again to start over (every image is made anew, as a new numbered run)")
    # Under `accelerate launch` (class images, loading) every process gets the Ctrl-C: the main process says it, once
    # for the run as the training loop's stop does; another machine's first process said it too.
    for rank, local_rank in (("1", "1"), ("2", "0")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert main(["sample", "--base", str(SHIPPED_BASE), "--prompt", "p"]) == 130
        assert capsys.readouterr().err == ""


def test_eval_stopped_says_a_rerun_starts_over(monkeypatch, capsys):
    """eval makes and scores every image anew when run again: its stop line said "run the command again to continue"."""
    import finetune.evaluation.command

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune.evaluation.command, "run_eval_command", interrupted)
    assert main(["eval", "--lora", "run"]) == 130
    assert capsys.readouterr().err.strip() == ("stopped (Ctrl-C): files written so far are kept; "
                                               "run the command again to start over (every image is made and scored anew)")


@pytest.mark.parametrize("command, rerun", [(["make-tiny-model", "out"], "run the command again to start over"),
                                             (["make-conditions", "in", "out", "--kind", "canny"], "run the command again with --overwrite to start over")])
def test_commands_that_make_their_outputs_anew_say_so_when_stopped(command, rerun, monkeypatch, capsys):
    """Every command but train starts over when run again; their stop line said "run the command again to continue".
    make-conditions also refuses its own earlier images unless told to replace them."""
    from finetune.cli import main as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, command[0], interrupted)
    assert main(command) == 130
    assert capsys.readouterr().err.strip() == f"stopped (Ctrl-C): files written so far are kept; {rerun}"


def test_a_run_folder_of_the_wrong_kind_says_what_to_pass(tmp_path, capsys, tiny_model, monkeypatch):
    from finetune.evaluation.command import default_out

    full = tmp_path / "full-run"  # what method full or full DreamBooth writes
    shutil.copytree(tiny_model, full / "pipeline")
    (full / "recipe_as_run.yaml").write_text("method: full\n")
    (tmp_path / "cn-run" / "controlnet").mkdir(parents=True)
    (tmp_path / "cn-run" / "controlnet" / "config.json").write_text("{}")
    hints = {full: f"sample or evaluate it with --base {full / 'pipeline'}, or write it as one webui/ComfyUI checkpoint with finetune export-checkpoint {full} OUT.safetensors",
             tmp_path / "cn-run": f"sample or evaluate it with --controlnet {tmp_path / 'cn-run' / 'controlnet'} (a ControlNet is not merged or exported as a LoRA)"}
    for lora, hint in hints.items():  # the same words from every command that takes a LoRA, each naming what takes this
        for command in (["sample", "--base", str(tiny_model), "--lora", str(lora), "--prompt", "x"], ["export", str(lora), str(tmp_path / "x"), "--to", "kohya"],
                        ["merge", "--base", str(tiny_model), "--lora", str(lora), str(tmp_path / "merged")]):
            assert main(command) == 2
            assert f"{lora} holds no LoRA but a" in (err := capsys.readouterr().err) and err.strip().endswith(hint), err
    assert main(["sample", "--base", str(full), "--prompt", "x"]) == 2
    assert f"is a training run's (or checkpoint's) folder: point --base at {full / 'pipeline'}" in capsys.readouterr().err
    # Each run's eval report goes into its own folder (every such pipeline folder is named "pipeline").
    assert default_out(str(full / "pipeline"), None, suites=["style"]) == full / "eval-style.json"
    # Named by what it scores: other suites, strengths or LoRA files of one folder keep their own reports.
    assert default_out("base", str(full), suites=["adherence", "fid"], lora_scale=0.5, recorded_base="base") == full / "eval-adherence-fid-strength0.5.json"
    assert default_out("base", str(full / "mine.safetensors"), suites=["style"], recorded_base="base") == full / "mine-eval-style.json"
    assert default_out("base", str(full / "pytorch_lora_weights.safetensors"), suites=["style"], recorded_base="base") == full / "eval-style.json"
    # ... or bases: on another base than the one its run recorded, the report says which.
    assert default_out("org/sd-v1.5", str(full), suites=["style"], recorded_base="base") == full / "eval-style-on-org--sd-v1.5.json"
    assert default_out("org/sd-v1.4", str(full), suites=["style"], recorded_base="base") == full / "eval-style-on-org--sd-v1.4.json"
    (tmp_path / "db" / "pipeline").mkdir(parents=True)
    assert default_out(str(tmp_path / "db" / "pipeline"), str(full), suites=["style"], recorded_base="base") == full / "eval-style-on-db.json"
    (tmp_path / "db" / "checkpoints" / "checkpoint-500" / "pipeline").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "db" / "checkpoints" / "checkpoint-500")  # `--base pipeline` from inside a checkpoint
    assert default_out("pipeline", str(full), suites=["style"], recorded_base="base") == full / "eval-style-on-db-500.json"
    from finetune.evaluation.command import base_tag

    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "9f8e7d").write_bytes(b"")
    (tmp_path / "sd15.safetensors").symlink_to(tmp_path / "blobs" / "9f8e7d")  # as the hub cache keeps files
    assert base_tag(str(tmp_path / "sd15.safetensors")) == "sd15"
    checkpoint = full / "checkpoints" / "checkpoint-4"  # a checkpoint's pipeline: into that checkpoint
    (checkpoint / "pipeline").mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"step": 4}')
    assert default_out(str(checkpoint / "pipeline"), None, suites=["subject"]) == checkpoint / "eval-subject.json"
    (tmp_path / "cn-run" / "controlnet" / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    with_lora = default_out("base", str(full / "mine.safetensors"), str(tmp_path / "cn-run"), ["control"], conditioning_scale=0.5, recorded_base="base")
    assert with_lora == tmp_path / "cn-run" / "eval-control-scale0.5-with-mine.json"
