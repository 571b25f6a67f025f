"""What the command line imports before it answers: help and input errors come back without the heavy
libraries (torch, diffusers, transformers, gradio, deepspeed take seconds to import; numpy, PIL and pydantic
a good part of a second on a small machine)."""

from __future__ import annotations

import json
import subprocess
import sys

from finetune.cli_arguments import build_parser

HEAVY = ("torch", "diffusers", "transformers", "gradio", "deepspeed", "accelerate", "peft", "numpy", "PIL", "pydantic")


def imported_after(calls: list[list[str]]) -> set[str]:
    """The heavy modules a fresh interpreter holds after running `finetune` with each argument list."""
    script = f"""
import contextlib, io, json, sys
from finetune.cli import main
for argv in {calls!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout))


def subcommands() -> list[str]:
    return list(build_parser()._subparsers._group_actions[0].choices)


def test_help_imports_no_heavy_library():
    assert imported_after([["--help"]] + [[command, "--help"] for command in subcommands()]) == set()


def test_eval_choices_are_the_suites_and_shapes():
    """eval's options name the suites and shapes without importing them (numpy, PIL): the same names."""
    from finetune.eval_command import SHAPE_NAMES, SUITE_NAMES
    from finetune.evaluate import SUITES
    from finetune.toyworld.world import SHAPES

    assert SUITE_NAMES == tuple(SUITES) and SHAPE_NAMES == SHAPES
