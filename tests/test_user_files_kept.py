"""Nothing a user made is lost: a file of theirs where finetune writes (a recipe beside the run it makes, ...) stays as it was."""

from __future__ import annotations

import pytest
import yaml

from finetune.config.recipe_loading import load_recipe
from finetune.config.run_recipe import RUN_RECIPE, RUN_RECIPE_HEADER
from finetune.training.trainer import train


def test_a_recipe_kept_in_its_output_dir_is_never_written_over(tiny_model, image_folder, tmp_path, monkeypatch):
    """`finetune train runs/cat/recipe.yaml` with `output_dir: runs/cat`: the run wrote the resolved recipe over it, its
    comments and layout gone. The recipe as run has a name of its own, and continues the run as it was."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "cat").mkdir(parents=True)
    mine = tmp_path / "runs" / "cat" / "recipe.yaml"
    mine.write_text(
        "# my cat: keep these notes\n"
        "method: lora\nseed: 3\noutput_dir: runs/cat   # beside this file\n"
        f"model: {{pretrained: {tiny_model}}}\ndata: {{image_dir: {image_folder}, resolution: 64}}\n"
        "train: {batch_size: 2, max_steps: 1}\nlora: {rank: 4, alpha: 2}\nvalidation: {prompts: []}\n"
        "checkpoint: {every_n_steps: 1}\nlogging: {tensorboard: false}\n"
    )
    written = mine.read_bytes()
    train(load_recipe(mine, ["optimizer.lr=1e-3"]))
    assert mine.read_bytes() == written
    as_run = tmp_path / "runs" / "cat" / RUN_RECIPE
    assert as_run.read_text().startswith(RUN_RECIPE_HEADER) and yaml.safe_load(as_run.read_text())["optimizer"]["lr"] == 1e-3  # the override too
    resumed = train(load_recipe(as_run, ["train.max_steps=2"]), resume="latest")
    assert resumed.final_step == 2 and mine.read_bytes() == written


def test_overwrite_removes_the_earlier_runs_files_and_keeps_the_users_beside_them(tmp_path):
    """--overwrite removed checkpoints/, samples/ and logs/ whole: a file of the user's there went with them, even the log
    of this very run (`finetune train ... --overwrite > run/logs/train.log`, reproduced with the CLI)."""
    from finetune.checkpoints.earlier_run import _removal_failure, check_clearable

    theirs = ["checkpoints/notes.txt", "samples/favourite.png", "logs/train.log", "logs/mine/a.txt"]
    runs = ["checkpoints/checkpoint-2/trainer_state.json", "checkpoints/.partial-checkpoint-3/x", "checkpoints/.removed-checkpoint-1/x",
            "checkpoints/.checkpoint-4.old/trainer_state.json",  # replace_folder's aside of a checkpoint, as a kill between its renames left it
            "samples/step-000002.png", "samples/.step-000004.png.partial", "samples/loss-masks.png", "logs/finetune/events.out.tfevents.1"]  # fmt: skip
    for name in theirs + runs:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    check_clearable(tmp_path)
    assert _removal_failure(tmp_path) is None
    left = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file())
    assert left == sorted(theirs)
    for name in ("checkpoints/checkpoint-2", "samples/step-000002.png", "logs/finetune"):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
    (tmp_path / "logs" / "train.log").unlink()
    (tmp_path / "logs" / "mine" / "a.txt").unlink()
    (tmp_path / "logs" / "mine").rmdir()
    assert _removal_failure(tmp_path) is None and not (tmp_path / "logs").exists()  # a folder of the run's alone goes, as before


def test_bench_never_trains_in_a_folder_of_its_workdir_that_it_did_not_make(tmp_path, monkeypatch):
    """`finetune bench --workdir .` beside the user's runs/lora: its lora variant trained there with --overwrite, and
    replaced that run's checkpoints, samples and LoRA (reproduced with the command on the tiny preset)."""
    import finetune.bench.runner as runner
    from finetune.errors import FinetuneError

    (tmp_path / "runs" / "lora").mkdir(parents=True)
    (tmp_path / "runs" / "lora" / "pytorch_lora_weights.safetensors").write_text("theirs")
    monkeypatch.setattr(runner, "prepare_model", lambda *args: pytest.fail("the model was made"))
    with pytest.raises(FinetuneError) as refused:
        runner.run_benchmark(preset="tiny", variants=["lora"], workdir=tmp_path, log=lambda line: None)
    assert str(refused.value) == (f"--workdir {tmp_path}: {tmp_path / 'runs' / 'lora'} was not made by finetune bench, and its lora run would "
                                  "replace what it holds: give another --workdir (or move that folder)")
    (tmp_path / "runs" / "lora.spec.json").write_text("{}")  # an earlier bench's run: trained in again
    with pytest.raises(pytest.fail.Exception, match="the model was made"):
        runner.run_benchmark(preset="tiny", variants=["lora"], workdir=tmp_path, log=lambda line: None)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_named_as_a_checkpoint_that_no_run_completed_is_said_before_anything_loads(tmp_path, overwrite):
    """checkpoints/checkpoint-1 holding weights the user copied in (no trainer_state.json): a fresh run's save of step 1
    replaced it, and its rotation deleted that (reproduced with `finetune train`); --overwrite removed it by its name."""
    from finetune.checkpoints.earlier_run import guard_earlier_run
    from finetune.errors import FinetuneError

    theirs = tmp_path / "checkpoints" / "checkpoint-1"
    theirs.mkdir(parents=True)
    (theirs / "pytorch_lora_weights.safetensors").write_text("theirs")
    with pytest.raises(FinetuneError) as refused:
        guard_earlier_run(tmp_path, None, overwrite=overwrite)
    assert str(refused.value) == (f"{theirs} is not a checkpoint a run completed (no trainer_state.json), and this run's checkpoint of that step "
                                  f"would replace it: move it out of {theirs.parent} (or delete it), then run again")
    (theirs / "trainer_state.json").write_text('{"step": 1}')  # a run's: an earlier run, refused (or replaced) as ever
    if overwrite:
        guard_earlier_run(tmp_path, None, overwrite=True)
    else:
        with pytest.raises(FinetuneError, match=r"holds an earlier run \(checkpoint-1\)"):
            guard_earlier_run(tmp_path, None, overwrite=False)


@pytest.mark.parametrize("layout, theirs", [("kohya", "cat.preview.png"), ("kohya", "samples/cat-step-000002.png"), ("diffusers", "samples/step-000002.png")])
def test_export_refuses_to_write_the_cards_images_over_the_users_files(tmp_path, layout, theirs):
    """The card's images were written over files of those names unasked: the webui's `cat.preview.png` beside a LoRA,
    the user's own thumbnail, went (reproduced with `finetune export runs/cat webui --to kohya`)."""
    from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
    from finetune.errors import FinetuneError
    from finetune.formats.lora_export import export_lora

    run = tmp_path / "cat"
    (run / "samples").mkdir(parents=True)
    (run / LORA_WEIGHTS_NAME).write_text("not read before the check")
    (run / "samples" / "step-000002.png").write_text("the run's grid")
    (tmp_path / "webui" / theirs).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "webui" / theirs).write_text("theirs")
    with pytest.raises(FinetuneError) as refused:
        export_lora(run, tmp_path / "webui", layout)
    assert str(refused.value) == f"export would replace {tmp_path / 'webui' / theirs}: give another output, or pass --overwrite"
    assert (tmp_path / "webui" / theirs).read_text() == "theirs"


def test_eval_refuses_an_out_that_is_no_report_of_its_own(tiny_model, tmp_path):
    """`finetune eval --base tinycopy --out tinycopy/model_index.json` wrote its report over the pipeline's own file (the
    base it had just read, which then no longer loaded). An earlier report is replaced, as a rerun asks."""
    import json
    import shutil

    from finetune.errors import FinetuneError
    from finetune.evaluation.command import check_report_path

    base = shutil.copytree(tiny_model, tmp_path / "base", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    with pytest.raises(FinetuneError) as refused:
        check_report_path(base / "model_index.json")
    assert str(refused.value) == (f"--out {base / 'model_index.json'} is a file eval did not write (not one of its reports), which the "
                                  "report would replace: give another file name")
    earlier = tmp_path / "eval.json"
    earlier.write_text(json.dumps({"settings": {}, "metrics": {}, "n": {}, "prompts": {}, "grids": {}}))
    check_report_path(earlier)
    check_report_path(tmp_path / "new.json")


def test_bench_refuses_an_out_that_is_no_report_of_its_own(tmp_path, monkeypatch):
    """`finetune bench --out mylora.safetensors` wrote its JSON over the LoRA once the first variant had run (reproduced
    on the tiny preset); an earlier bench report is replaced, as a rerun asks."""
    import json

    import finetune.bench.runner as runner
    from finetune.errors import FinetuneError

    mine = tmp_path / "mylora.safetensors"
    mine.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    monkeypatch.setattr(runner, "prepare_model", lambda *args: pytest.fail("the model was made"))
    for out, refusal in ((mine, f"--out {mine} is a file the bench did not write (not one of its reports), which the report would replace: give "
                                "another file name"), (tmp_path, f"--out {tmp_path} is a folder: give the report's file name, e.g. {tmp_path / 'bench.json'}")):  # fmt: skip
        with pytest.raises(FinetuneError) as refused:
            runner.run_benchmark(preset="tiny", variants=["lora"], out=out, workdir=tmp_path / "work", log=lambda line: None)
        assert str(refused.value) == refusal
    earlier = tmp_path / "bench.json"
    earlier.write_text(json.dumps({"command": "finetune bench", "date": None, "machine": {}, "settings": {}, "results": []}))
    with pytest.raises(pytest.fail.Exception, match="the model was made"):
        runner.run_benchmark(preset="tiny", variants=["lora"], out=earlier, workdir=tmp_path / "work", log=lambda line: None)


def test_a_resume_is_not_stopped_by_a_folder_named_as_an_earlier_checkpoint(tmp_path):
    """A resume saves only the steps past its checkpoint: checkpoint-1 without its state (an older finetune's rotation,
    killed while it deleted it) stopped `--resume latest` from checkpoint-2 as if the run would replace it."""
    from finetune.checkpoints.earlier_run import guard_earlier_run
    from finetune.errors import FinetuneError

    checkpoints = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
    (checkpoints / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2}')
    (checkpoints / "checkpoint-3").rmdir()
    guard_earlier_run(tmp_path, checkpoints / "checkpoint-2", overwrite=False)
    (checkpoints / "checkpoint-3").mkdir()  # a step it would save: in the way, as for a fresh run
    with pytest.raises(FinetuneError, match=r"checkpoint-3 is not a checkpoint a run completed"):
        guard_earlier_run(tmp_path, checkpoints / "checkpoint-2", overwrite=False)


def test_the_recipe_as_run_of_a_run_made_before_it_had_its_name_is_named(tmp_path):
    """`finetune train OUTPUT/recipe_as_run.yaml --resume latest`, as the docs say, in an output_dir an earlier finetune
    wrote (its record: recipe.yaml) was 'not found: pass the path of a YAML file such as recipes/lora.yaml'."""
    from finetune.errors import FinetuneError

    (tmp_path / "recipe.yaml").write_text("method: lora\n")
    with pytest.raises(FinetuneError) as missing:
        load_recipe(tmp_path / "recipe_as_run.yaml")
    assert str(missing.value) == (f"recipe {tmp_path / 'recipe_as_run.yaml'} not found: a run of an earlier finetune kept its recipe as run "
                                  f"as recipe.yaml: pass {tmp_path / 'recipe.yaml'}")
    with pytest.raises(FinetuneError, match=r"not found: pass the path of a YAML file such as recipes/lora.yaml$"):
        load_recipe(tmp_path / "other" / "recipe_as_run.yaml")
