"""What the command line imports before it answers: help and input errors come back without the heavy
libraries (torch, diffusers, transformers, gradio, deepspeed take seconds to import; numpy, PIL and pydantic
a good part of a second on a small machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli.arguments import build_parser
from finetune.errors import FinetuneError

ROOT = Path(__file__).resolve().parents[1]

HEAVY = ("torch", "diffusers", "transformers", "gradio", "deepspeed", "accelerate", "peft", "numpy", "PIL", "pydantic")


def run_in_fresh_python(calls: list[list[str]]) -> tuple[set[str], list[str]]:
    """Run `finetune` with each argument list in one fresh interpreter (in the repository, as a user would):
    the heavy modules it then holds, and what each call wrote to stderr."""
    script = f"""
import contextlib, io, json, sys
from finetune.cli.main import main
errors = []
for argv in {calls!r}:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit:
            pass
    errors.append(err.getvalue())
print(json.dumps([[name for name in {HEAVY!r} if name in sys.modules], errors]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    modules, errors = json.loads(result.stdout)
    return set(modules), errors


def imported_after(calls: list[list[str]]) -> set[str]:
    return run_in_fresh_python(calls)[0]


def subcommands() -> list[str]:
    return list(build_parser()._subparsers._group_actions[0].choices)


def test_help_imports_no_heavy_library():
    assert imported_after([["--help"]] + [[command, "--help"] for command in subcommands()]) == set()


def test_eval_choices_are_the_suites_and_shapes():
    """eval's options name the suites and shapes without importing them (numpy, PIL): the same names."""
    from finetune.evaluation.command import SHAPE_NAMES, SUITE_NAMES
    from finetune.evaluation.evaluate import SUITES
    from finetune.toyworld.world import SHAPES

    assert SUITE_NAMES == tuple(SUITES) and SHAPE_NAMES == SHAPES


def test_train_says_a_missing_data_folder_or_base_model_before_torch_loads(tmp_path):
    """Each was said only after torch, diffusers and transformers had loaded (10 s and more on a small machine)."""
    quickstart = ["train", "recipes/quickstart.yaml", f"output_dir={tmp_path}"]
    calls = [
        quickstart + [f"data.image_dir={tmp_path / 'photos'}"],
        quickstart + ["data.folders=[{path: nope}]"],
        quickstart + [f"model.pretrained={tmp_path / 'base'}"],
        ["train", "recipes/dreambooth.yaml", f"output_dir={tmp_path}", "dreambooth.concepts.0.instance_dir=nope"],
    ]
    modules, errors = run_in_fresh_python(calls)
    assert errors == [
        f"error: data folder {tmp_path / 'photos'} not found: check data.image_dir\n",
        "error: data folder datasets/star/nope not found: check data.folders path 'nope' (read from data.image_dir, datasets/star)\n",  # not the current folder
        f"error: base model {tmp_path / 'base'} not found: no such folder or file (check model.pretrained)\n",
        f"error: data folder nope not found: check dreambooth.concepts.0.instance_dir (relative paths are read from the current folder, {ROOT})\n",
    ]
    assert modules <= {"numpy", "PIL", "pydantic"}  # the recipe's schema and the data folder's reader, not the training stack



def test_check_data_reads_every_image_without_torch(tmp_path):
    """check-data decodes and checks images with PIL and numpy; it loaded torch (~800 modules) through the training
    dataset's module, the bucket sampler's, the loss masks' and the held-out split's, and for a DreamBooth recipe through
    the class images' plan (finetune/methods/dreambooth.py, finetune/dreambooth/class_images.py). With a recipe it reads the base
    model's tokenizer (transformers) to count caption tokens, as training warns."""
    base = tmp_path / "base"  # a local base: its files are read for the class images' key
    base.mkdir()
    (base / "model_index.json").write_text("{}")
    dreambooth = ["check-data", "recipes/dreambooth.yaml", f"output_dir={tmp_path / 'run'}", f"model.pretrained={base}", "data.resolution=64",
                  "dreambooth.concepts.0.instance_dir=datasets/star", "dreambooth.concepts.0.class_dir=datasets/striped"]  # fmt: skip
    modules, errors = run_in_fresh_python([["check-data", "--image-dir", "datasets/star", "--resolution", "64"],
                                           ["check-data", "recipes/quickstart.yaml", "data.loss_mask.source=alpha"], dreambooth])
    assert errors == ["", "", ""]
    assert modules <= {"numpy", "PIL", "pydantic", "transformers"}


def test_train_says_a_bad_recipe_with_the_schema_alone():
    """An unknown key or a bad value is the recipe schema's (pydantic) to say: the data folders' reader (numpy,
    PIL) loads only for a recipe that passed."""
    modules, errors = run_in_fresh_python([["train", "recipes/quickstart.yaml", "lora.rnak=4"], ["train", "recipes/quickstart.yaml", "train.max_steps=0"]])
    assert errors[0] == "error: override 'lora.rnak=4': unknown key 'lora.rnak' (did you mean 'lora.rank'?)\n"
    assert errors[1].startswith("error: ") and "train.max_steps" in errors[1]
    assert modules == {"pydantic"}


def test_sample_export_and_eval_refuse_bad_options_before_torch_loads(tmp_path):
    """Options that are wrong together, or an output under a file, are said before the models' libraries load."""
    (tmp_path / "file").write_text("")
    calls = [
        ["sample", "--prompt", "x", "--lora-scale", "0.5"],
        ["sample", "--prompt", "x", "--condition", "a.png", "--condition", "b.png"],
        ["sample", "--prompt", "x", "--base", "b", "--out", str(tmp_path / "file" / "out")],
        ["export", "lora", str(tmp_path / "file" / "out"), "--to", "kohya"],
        ["eval", "--base", "b", "--lora-scale", "0.5"],
    ]
    modules, errors = run_in_fresh_python(calls)
    assert errors[0] == "error: --lora-scale is the LoRA's strength: pass --lora too, or leave it out\n"
    assert errors[1].startswith("error: --condition takes one image")
    assert errors[2].startswith(f"error: --out {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} is a file")
    assert errors[3].startswith(f"error: export output {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} is a file")
    assert errors[4] == errors[0]
    assert modules <= {"numpy", "PIL"}  # eval's prompt suites


def test_make_tiny_model_refuses_a_folder_with_contents_before_torch_loads(tmp_path):
    (tmp_path / "kept.txt").write_text("")
    modules, errors = run_in_fresh_python([["make-tiny-model", str(tmp_path)]])
    assert errors == [f"error: make-tiny-model output {tmp_path} is not empty: pick a new folder, or pass --overwrite to replace what is in it\n"]
    assert modules == set()


def test_merge_refuses_its_output_folder_before_torch_loads(tmp_path):
    """A folder with contents, a file, or the LoRA's own folder as merge's output was refused only after torch and
    diffusers had loaded (reading the LoRA and its base)."""
    (tmp_path / "kept.txt").write_text("")
    (tmp_path / "run").mkdir()
    merge = ["merge", "--base", "b", "--lora"]
    calls = [[*merge, "l", str(tmp_path)], [*merge, "l", str(tmp_path / "kept.txt")], [*merge, str(tmp_path / "run"), str(tmp_path), "--overwrite"]]
    modules, errors = run_in_fresh_python(calls)
    assert errors == [
        f"error: merge output {tmp_path} is not empty: pick a new folder, or pass --overwrite to replace what is in it\n",
        f"error: merge output {tmp_path / 'kept.txt'} is a file: give a folder for the pipeline\n",
        f"error: merge output {tmp_path} holds the LoRA being merged ({tmp_path / 'run'}): pick another folder\n",
    ]
    assert modules == set()


def test_eval_refuses_its_report_path_before_torch_loads(tmp_path):
    """--out that is no .json file name, or a folder, was said once torch, transformers and diffusers had imported (12 s
    to 20 s on a busy 2-core machine): the report's path is known from the options alone."""
    from conftest import SHIPPED_BASE

    calls = [["eval", "--base", str(SHIPPED_BASE), "--out", str(tmp_path / "report")], ["eval", "--base", str(SHIPPED_BASE), "--out", str(tmp_path)]]
    modules, errors = run_in_fresh_python(calls)
    assert errors[0] == f"error: --out {tmp_path / 'report'} is not a .json file name: give the report's, e.g. {tmp_path / 'report.json'} (its grids go beside it)\n"
    assert errors[1].startswith(f"error: --out {tmp_path} is a folder: give the report's file name"), errors[1]
    assert not modules & {"torch", "diffusers", "transformers"}, modules


def test_export_checkpoint_refuses_a_pipeline_of_another_shape_before_torch_loads(tiny_model, tmp_path):
    """The original layout names SD1.x's blocks alone: a pipeline of another shape was refused from its configs, but after
    torch and the weights' libraries had imported (13 s on a busy 2-core machine)."""
    modules, errors = run_in_fresh_python([["export-checkpoint", str(tiny_model), str(tmp_path / "model.safetensors")]])
    assert errors[0].startswith(f"error: {tiny_model} cannot be exported as a webui checkpoint: that layout describes SD1.x's architecture, "
                                "and this UNet has 2 blocks of 1 layer (SD1.x's: 4 of 2)"), errors  # fmt: skip
    assert not modules & {"torch", "diffusers", "transformers"}, modules


def test_sample_refuses_fp16_on_the_cpu_asked_for_before_torch_loads():
    """--device cpu --precision fp16 is wrong on any machine: it was said by inference_placement, once torch, diffusers and
    the models had loaded (16 s on a busy 2-core machine)."""
    from conftest import SHIPPED_BASE

    from finetune.sampling.placement import inference_placement

    modules, errors = run_in_fresh_python([["sample", "--prompt", "x", "--base", str(SHIPPED_BASE), "--device", "cpu", "--precision", "fp16"]])
    with pytest.raises(FinetuneError) as placed:  # the same words as inference_placement's
        inference_placement("cpu", "fp16")
    assert errors == [f"error: {placed.value}\n"]
    assert not modules & {"torch", "diffusers", "transformers"}, modules


def test_train_says_it_is_loading_before_torch_and_diffusers_import(tmp_path):
    """After the data check's bar nothing was said for 10-20 s (2 CPU cores) while torch, diffusers and the base model
    loaded: the line that says so comes before any of them is imported. The run is stopped at that line (its write raises)."""
    stack = ("torch", "diffusers", "accelerate", "peft", "deepspeed")
    script = f"""
import json, sys
from finetune.cli.main import main

class Loading(Exception):
    pass

class Stdout:
    def __init__(self, stream):
        self.stream, self.said = stream, []
    def write(self, text):
        if text.startswith("loading "):
            self.said.append([text, [name for name in {stack!r} if name in sys.modules]])
            raise Loading
        return len(text)
    def flush(self):
        pass

out = sys.stdout = Stdout(sys.stdout)
try:
    main(["train", "recipes/quickstart.yaml", "output_dir={tmp_path / 'run'}", "train.max_steps=1", "optimizer.warmup_steps=0",
          "validation.at_start=false", "validation.prompts=[]"])
except Loading:
    pass
out.stream.write(json.dumps(out.said))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    said = json.loads(result.stdout.splitlines()[-1])
    assert said == [["loading torch, diffusers and the base model finetune/assets/toyworld-base (UNet, VAE, text encoder)...", []]], said
