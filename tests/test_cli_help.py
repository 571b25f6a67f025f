"""`finetune --help` and each command's: every command listed, every argument explained, examples whole; every command's
parser reads a negative number as a value."""

from __future__ import annotations

import argparse

import pytest

from finetune.cli.arguments import build_parser, parse_arguments
from finetune.cli.main import main


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


SUBCOMMANDS = list(subcommands())


def test_help_lists_every_subcommand_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert len(SUBCOMMANDS) >= 14
    for command in SUBCOMMANDS:
        assert f"\n    {command} " in text or f"\n    {command}\n" in text, command
    assert "accelerate launch" in text


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: finetune " + command)
    assert len(text.splitlines()) > 4


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_argument_says_what_it_is(command):
    # make-tiny-model's output_dir, --seed and --prediction-type, make-sample-data's output_dir (and that it
    # defaults to datasets/), export-base's destination and make-conditions' --kind were names alone.
    unexplained = [a.option_strings[-1] if a.option_strings else a.dest for a in subcommands()[command]._actions if not a.help]
    assert not unexplained, f"finetune {command}: {unexplained} have no help"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_examples_stay_whole_and_the_text_is_wrapped(command, monkeypatch):
    # A one-command epilog ("example: finetune train ...") was wrapped into the text around it, broken mid-command
    # ("... --kind canny then: finetune train" on one line, its data.image_dir on the next), so it could not be
    # copied; bench's description, kept raw to keep its examples whole, was one line of 400 characters.
    monkeypatch.setenv("COLUMNS", "80")
    parser = subcommands()[command]
    text = parser.format_help()
    examples = [line.strip() for line in (parser.epilog or "").splitlines() if line.strip().startswith("finetune ")]
    assert examples, f"finetune {command} --help shows no example"
    for example in examples:
        assert f"\n  {example}" in text, example
    after_usage = text.split("\n\n", 1)[1]  # argparse wraps the usage itself, on its own terms
    prose = [line for line in after_usage.splitlines() if not line.strip().startswith("finetune ")]
    assert not [line for line in prose if len(line) > 80], command


def test_the_classifiers_own_command_names_itself_and_its_arguments(monkeypatch):
    # README's `python -m finetune.toyworld.classifier --out PATH --seed 0 --threads 1`: its help said
    # "usage: classifier.py", --seed, --num-images, --steps, --eval-images and --threads had no word, and --out's
    # help broke this machine's absolute path of the shipped file mid-word.
    from finetune.toyworld.classifier import build_parser

    monkeypatch.setenv("COLUMNS", "80")
    parser = build_parser()
    text = parser.format_help()
    assert text.startswith("usage: python -m finetune.toyworld.classifier ")
    assert [a.dest for a in parser._actions if not a.help] == []
    assert "finetune/assets/toyworld_classifier.safetensors)" in text and "\n  python -m finetune.toyworld.classifier --out PATH" in text


@pytest.mark.parametrize("argv, key, value", [
    (["merge", "--base", "b", "--lora", "l", "--strength", "-1e30", "out"], "strength", -1e30),
    (["merge", "--base", "b", "--lora", "l", "--strength", "-.5", "out"], "strength", -0.5),
    (["sample", "--prompt", "p", "--guidance", "-2E1"], "guidance", -20.0),
    (["sample", "--prompt", "p", "--lora-scale", "-3."], "lora_scale", -3.0),
    (["eval", "--lora-scale", "-1e-3"], "lora_scale", -0.001),
])
def test_a_negative_number_in_scientific_notation_is_a_value_not_an_option(argv, key, value):
    """argparse read `--strength -1e30` as an option (\"expected one argument\"), where -0.5 and `--strength=-1e30` worked."""
    assert getattr(parse_arguments(argv), key) == value


def test_every_command_reads_negative_numbers_as_values_and_has_no_option_like_one(capsys):
    """The demo's --max-upload-mb -1e3 gets its own bound's message, not argparse's; no option of any command looks like
    a number (argparse would then read every negative number as an option)."""
    from finetune.cli.arguments import NegativeNumbersAsValues

    for command, parser in subcommands().items():
        assert isinstance(parser, NegativeNumbersAsValues), command
        assert not parser._has_negative_number_optionals, command
    with pytest.raises(SystemExit):
        main(["demo", "--max-upload-mb", "-1e3"])
    assert "argument --max-upload-mb: must be above 0, got -1e3" in capsys.readouterr().err


def test_train_overwrite_help_says_it_deletes_the_earlier_runs_outputs():
    """train --overwrite's help said it 'deletes its checkpoints, samples and logs': it deletes the earlier run's outputs too
    (checkpoints.earlier_run.RUN_OUTPUTS), except one the new run starts from."""
    from finetune.checkpoints.earlier_run import RUN_OUTPUTS
    from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME

    said = next(action.help for action in subcommands()["train"]._actions if "--overwrite" in action.option_strings)
    assert "LoRA file" in said and all(f"{name}/" in said for name in RUN_OUTPUTS if name != LORA_WEIGHTS_NAME), said
    assert "except one the new run starts from" in said, said
