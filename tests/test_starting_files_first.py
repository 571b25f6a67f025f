"""The recipe's own files a run reads besides its data (controlnet.pretrained, controlnet.validation_conditions, lora.init_from)
are checked before its data check decodes every image (finetune/data_check/starting_files.py): they were said after it, so a large folder
was read in full before a typo in one of them was said."""

import subprocess
import sys

import pytest
from train_command_files import corrupt_copy, write_recipe

from finetune.cli.main import main
import finetune.cli.train_command
from finetune.config.recipe_loading import load_recipe
from finetune.data_check.starting_files import check_starting_files
from finetune.errors import FinetuneError


CASES = {  # a recipe section naming a file that is not there (or is no ControlNet), and what the one line says
    "pretrained not there": ("controlnet", lambda tmp: {"controlnet": {"pretrained": str(tmp / "edges")}}, "ControlNet {tmp}/edges not found"),
    "pretrained a file": ("controlnet", lambda tmp: {"controlnet": {"pretrained": str(tmp / "edges.txt")}}, "controlnet.pretrained {tmp}/edges.txt"),
    "validation condition not there": ("controlnet", lambda tmp: {"controlnet": {"validation_conditions": [str(tmp / "edge.png")]},
                                                                     "validation": {"prompts": ["a shape"]}},
                                       "validation conditioning image {tmp}/edge.png not found"),
    "init_from not there": ("lora", lambda tmp: {"lora": {"init_from": str(tmp / "start.safetensors")}}, "lora.init_from {tmp}/start.safetensors not found"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_starting_file_not_there_is_said_before_the_images_are_decoded(case, image_folder, pairs_folder, tmp_path, monkeypatch, capsys):
    method, sections, said = CASES[case]
    (tmp_path / "edges.txt").write_text("not a ControlNet")
    data = corrupt_copy(pairs_folder if method == "controlnet" else image_folder, tmp_path, method)
    monkeypatch.setattr(finetune.cli.train_command, "_run_training", lambda *args: pytest.fail("the training stack was loaded"))
    assert main(["train", str(write_recipe(tmp_path, method, data, **sections(tmp_path)))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said.format(tmp=tmp_path) in err[0] and "zz_corrupt" not in err[0], err


def test_train_without_the_command_checks_controlnet_pretrained_before_decoding_the_pairs(pairs_folder, tmp_path):
    """ControlNetMethod.check_data, as train() calls it for callers that do not come through `finetune train`, in the same order."""
    from finetune.methods.controlnet import ControlNetMethod

    data = corrupt_copy(pairs_folder, tmp_path, "controlnet")
    recipe = load_recipe(write_recipe(tmp_path, "controlnet", data, controlnet={"pretrained": str(tmp_path / "edges")}), [])
    with pytest.raises(FinetuneError, match="ControlNet .*edges not found"):
        ControlNetMethod(recipe).check_data()


def test_a_resume_does_not_check_the_weights_it_does_not_read(pairs_folder, tmp_path):
    """A resume's checkpoint holds the weights the run started from: their folder may be gone (finetune.models.start_weights)."""
    recipe = load_recipe(write_recipe(tmp_path, "controlnet", pairs_folder, controlnet={"pretrained": str(tmp_path / "edges")}), [])
    check_starting_files(recipe, resuming=True)
    with pytest.raises(FinetuneError, match="edges not found"):
        check_starting_files(recipe, resuming=False)


def test_the_starting_files_are_checked_without_torch(pairs_folder, tmp_path):
    """The point of checking them first: `finetune train` loads torch after its data check."""
    recipe = write_recipe(tmp_path, "controlnet", pairs_folder, controlnet={"pretrained": str(tmp_path / "edges")})
    code = ("import sys\nfrom finetune.errors import FinetuneError\nfrom finetune.config.recipe_loading import load_recipe\n"
            "from finetune.data_check.starting_files import check_starting_files\n"
            f"try:\n    check_starting_files(load_recipe({str(recipe)!r}, []), resuming=False)\nexcept FinetuneError as err:\n    print(err)\n"
            "print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert "edges not found" in out[0] and out[-1] == "False", out
