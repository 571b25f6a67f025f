"""`finetune eval`: deterministic prompt suites, scores in range on a random model, a sane ceiling, clear errors.

Fast (a few seconds on one CPU thread): the tiny random model, 2-3 prompts, 1-2 DDIM steps.
"""

import argparse
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from real_renders import evaluate_real_images
from safetensors import safe_open

from finetune.errors import FinetuneError
from finetune.evaluation.command import add_eval_parser, run_eval_command
from finetune.evaluation.evaluate import SUITES, run_eval
from finetune.toyworld.metrics import frechet_distance
from finetune.toyworld.prompt_sets import class_set, held_in_set, style_set, subject_set
from finetune.toyworld.world import SHAPES, parse_caption, sample_scenes

torch.set_num_threads(1)


def test_prompt_suites_are_deterministic_and_parse_back():
    assert held_in_set(16).prompts == held_in_set(16).prompts
    assert held_in_set(8).prompts == held_in_set(16).prompts[:8]  # prefix-stable: more prompts keep the first ones
    assert held_in_set(8, seed=1).prompts != held_in_set(8).prompts
    for prompt, scene in zip(held_in_set(32, seed=5).prompts, sample_scenes(32, 5, "no")):
        assert parse_caption(prompt) == {**dataclasses.asdict(scene), "style": None}  # solid is not written
    for prompt in style_set(32).prompts:
        parsed = parse_caption(prompt)
        assert parsed["style"] == "striped" and parsed["shape"] in SHAPES and parsed["shape"] != "star"

    subject, klass = subject_set(8, identifier="zwx", class_word="star").prompts, class_set(8, class_word="star").prompts
    assert subject == subject_set(8, identifier="zwx", class_word="star").prompts
    assert subject[0] == "a zwx star" and klass[0] == "a star"
    for s, c in zip(subject, klass):
        assert s.startswith("a zwx star") and c == s.replace("zwx ", "")  # paired prompts
        ps, pc = parse_caption(s), parse_caption(c)
        assert ps == pc and ps["shape"] == "star" and ps["colour"] is None
    named = [parse_caption(p) for p in subject[:4]]
    assert [p["background"] is not None for p in named] == [False, True, False, True]
    assert [p["position"] is not None for p in named] == [False, False, True, True]
    assert subject_set(2).prompts == ["a sks shape", subject_set(2).prompts[1]] and "sks" not in class_set(4).prompts[3]


def test_run_eval_on_tiny_model_scores_every_suite_and_writes_json(tiny_model, tmp_path):
    out = tmp_path / "report" / "eval.json"
    result = run_eval(str(tiny_model), suites=list(SUITES), num_prompts=3, steps=2, out=out)
    metrics = result["metrics"]
    expected = {"adherence_all", "adherence_shape", "adherence_colour", "fid", "subject_fidelity", "prior_drift", "style_share"}
    assert expected <= set(metrics)
    for name, value in metrics.items():
        assert value >= 0 if name == "fid" else 0.0 <= value <= 1.0, name
        assert result["n"][name] == 3
    report = json.loads(out.read_text())
    assert report["metrics"] == pytest.approx(metrics)
    assert report["settings"]["base"] == str(tiny_model) and report["settings"]["steps"] == 2
    assert (report["settings"]["clip_skip"], report["settings"]["prediction_type"], report["settings"]["zero_terminal_snr"]) == (1, "epsilon", False)
    assert report["settings"]["suites"] == list(SUITES) and report["settings"]["seed"] == 0
    for grid in report["grids"].values():
        assert (out.parent / grid).is_file()
    # Fixed seeds: a second run gives the same numbers.
    again = run_eval(str(tiny_model), suites=["adherence"], num_prompts=3, steps=2)
    assert again["metrics"]["adherence_all"] == metrics["adherence_all"]


def test_real_image_ceiling_is_near_perfect():
    evaluated = evaluate_real_images(48, seed=0, suites=list(SUITES))
    result = evaluated["metrics"]
    assert result["adherence_shape"] > 0.95 and result["adherence_colour"] > 0.95
    assert result["adherence_all"] > 0.9
    assert result["subject_fidelity"] > 0.95 and result["style_share"] > 0.95 and result["prior_drift"] < 0.05
    # Renders of the same scenes at another jitter: above 0 (not the reference itself), far below as many noise images
    # measured against the same renders (56 against 1107 at 48 images).
    renders = [image for row in evaluated["images"]["held_in"] for image in row]
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in renders]
    assert 0 < result["fid"] < frechet_distance(noise, renders) / 5


def assert_one_line_error(call, line: str) -> None:
    """`call` raises FinetuneError with `line` as its whole message: one line, naming what it names, its advice too."""
    with pytest.raises(FinetuneError, match=rf"^{re.escape(line)}$"):
        call()


def test_bad_requests_are_one_line_errors(tmp_path, tiny_model):
    assert_one_line_error(lambda: run_eval(str(tiny_model), suites=["sharpness"]),
                          f"unknown eval suite 'sharpness': choose from {', '.join(SUITES)}")  # fmt: skip
    assert_one_line_error(lambda: run_eval(str(tmp_path / "missing"), num_prompts=2, steps=1),
                          f"base model {tmp_path / 'missing'} not found: no such folder or file (check --base)")  # fmt: skip
    assert_one_line_error(lambda: run_eval(str(tiny_model), suites=["subject"], subject="hexagon"),
                          f"subject 'hexagon' is not a toy-world shape: choose from {', '.join(SHAPES)}")  # fmt: skip
    assert_one_line_error(lambda: run_eval(str(tiny_model), suites=["fid"], num_prompts=1),
                          "--num-prompts and --images-per-prompt must be >= 1 (and give >= 2 images for the fid suite)")  # fmt: skip


def _parser():
    parser = argparse.ArgumentParser(prog="finetune")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_writes_report_and_documents_every_flag(tiny_model, tmp_path, capsys):
    parser = _parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--base", "--lora", "--lora-scale", "--suite", "--num-prompts", "--images-per-prompt", "--steps",
                 "--guidance", "--seed", "--identifier", "--subject", "--class-word", "--out", "example"):  # fmt: skip
        assert flag in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--base", "x", "--suite", "nope"])

    out = tmp_path / "eval.json"
    args = parser.parse_args(["eval", "--base", str(tiny_model), "--suite", "adherence", "--suite", "style",
                              "--num-prompts", "2", "--steps", "1", "--out", str(out)])  # fmt: skip
    assert run_eval_command(args) == 0
    printed = capsys.readouterr().out
    assert "adherence_all" in printed and "style_share" in printed
    assert json.loads(out.read_text())["settings"]["suites"] == ["adherence", "style"]


def test_finetune_cli_main_runs_eval(tiny_model, tmp_path, capsys):
    from finetune.cli import main as cli

    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--base", str(tiny_model), "--suite", "adherence", "--num-prompts", "2", "--steps", "1", "--seed", "3", "--out", str(out)]) == 0
    printed, err = capsys.readouterr()
    assert "sampling held_in:" in err and "/2 [" in err  # the steps (1 of 2 images) as a bar, named by the prompt set: minutes without a word on a CPU
    assert printed.splitlines()[-1] == f"wrote {out}"  # the bar, cleared, leaves the lines as they were
    report = json.loads(out.read_text())
    assert 0 <= report["metrics"]["adherence_all"] <= 1 and report["n"]["adherence_all"] == 2
    settings = report["settings"]
    assert (settings["base"], settings["suites"], settings["num_prompts"], settings["steps"], settings["seed"]) == (str(tiny_model), ["adherence"], 2, 1, 3)
    assert cli.main(["eval", "--base", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: base model {tmp_path / 'missing'} not found: no such folder or file (check --base)"
    assert cli.main(["eval", "--base", str(tiny_model), "--lora-scale", "0.5"]) == 2  # a strength of no LoRA
    assert capsys.readouterr().err == "error: --lora-scale is the LoRA's strength: pass --lora too, or leave it out\n"


def test_a_report_without_base_names_the_base_by_name_as_shared_files_do(make_recipe, tiny_model, tmp_path, capsys):
    """Without --base the report's base was the absolute path the run's base_paths.json gave, which no one typed, in a
    report left in the run folder: named as shared files name it, as merge does (--base given: as given, above)."""
    from finetune.cli import main as cli
    from finetune.training.trainer import train

    run = train(make_recipe(train__max_steps=1)).output_dir
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--lora", str(run), "--suite", "adherence", "--num-prompts", "2", "--steps", "1", "--out", str(out)]) == 0
    assert f"base model: {tiny_model} (recorded by the adapter's training run as {tiny_model.name};" in capsys.readouterr().out
    assert json.loads(out.read_text())["settings"]["base"] == tiny_model.name
    # An older output, which recorded the path itself (no base_paths.json then): named so too.
    from safetensors.numpy import load_file, save_file

    from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
    from finetune.outputs.base_names import BASE_PATHS_FILE

    old = tmp_path / "old" / LORA_WEIGHTS_NAME
    old.parent.mkdir()
    with safe_open(str(run / LORA_WEIGHTS_NAME), "np") as f:
        save_file(load_file(str(run / LORA_WEIGHTS_NAME)), str(old), {**f.metadata(), "finetune.base_model": str(tiny_model)})
    assert not (old.parent / BASE_PATHS_FILE).exists()
    assert cli.main(["eval", "--lora", str(old), "--suite", "adherence", "--num-prompts", "2", "--steps", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["base"] == tiny_model.name


def test_an_out_that_is_a_folder_is_one_line_before_any_image_is_made_and_scoring_runs_in_full_fp32(tiny_model, tmp_path, monkeypatch):
    """--out of a folder failed after all the generating, with a traceback and stray files beside it. Scoring
    runs with TF32 off for matmuls and convolutions alike (on a GPU, cuDNN's is on by default)."""
    import finetune.evaluation.evaluate as evaluate

    monkeypatch.setattr("finetune.sampling.inference.load_sampling_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "a-file").write_text("")
    for out, message in ((tmp_path, f"--out {tmp_path} is a folder: give the report's file name, e.g. {tmp_path / 'eval.json'}"),
                         (tmp_path / "a-file" / "eval.json", f"--out {tmp_path / 'a-file' / 'eval.json'}: {tmp_path / 'a-file'} is a file, not a folder: give a folder for the report and its grids")):  # fmt: skip
        with pytest.raises(FinetuneError, match=rf"^{re.escape(message)}$"):
            run_eval_command(_parser().parse_args(["eval", "--base", str(tiny_model), "--out", str(out)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]

    monkeypatch.undo()
    flags = []

    def record(*args, **kwargs):
        flags.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        raise InterruptedError

    monkeypatch.setattr(evaluate, "score_suites", record)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    with pytest.raises(InterruptedError):
        run_eval(str(tiny_model), suites=["adherence"], num_prompts=1, steps=1)
    assert flags == [(False, False)] and torch.backends.cudnn.allow_tf32


def test_real_renders_of_a_negative_seed_are_refused_not_the_reference_itself():
    """numpy seeds ignore trailing zeros: seed -1 (salt 0) rendered the FID reference and the control masks' own
    jitter, a ceiling of fid 0 and control_iou 1.0; -2 was numpy's traceback."""
    for seed in (-1, -2):
        assert_one_line_error(lambda: evaluate_real_images(4, seed=seed, suites=["fid", "control"]),
                              f"the seed of the real renders is a number from 0 up, got {seed}")  # fmt: skip
    assert evaluate_real_images(4, seed=0, suites=["fid"])["metrics"]["fid"] > 0
