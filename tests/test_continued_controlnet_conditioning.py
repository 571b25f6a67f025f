"""A ControlNet continued (controlnet.pretrained) on a data folder without conditioning.json (make-conditions' record of how
its conditioning images were made) recorded no conditioning kind: `finetune sample` and the demo then neither said what
kind of condition it wants nor made one the way it learned, as they do for the ControlNet it began as. Its outputs now
keep that one's record, said where the run starts, and kept across a resume that no longer reads controlnet.pretrained."""

import json
import shutil

from controlnet_helpers import controlnet_recipe, set_up, write_controlnet_run

from finetune.checkpoints.run_files import CONTROLNET_DIR, METADATA_FILE
from finetune.cli.main import main
from finetune.sampling.adapter_records import saved_model_metadata
from finetune.training.trainer import train

CANNY = {"kind": "canny", "low": 20.0, "high": 40.0, "sigma": 1.0}


def pretrained_run(tiny_model, folder, conditioning: dict | None = None):
    """A controlnet run's output folder whose ControlNet records `conditioning` (finetune.conditioning), or none."""
    run = write_controlnet_run(tiny_model, folder, trained=True)
    recorded = {"finetune.method": "controlnet", "finetune.steps": "7", **({"finetune.conditioning": json.dumps(conditioning)} if conditioning else {})}
    (run / CONTROLNET_DIR / METADATA_FILE).write_text(json.dumps(recorded))
    return run


def test_a_controlnet_continued_on_data_recording_no_conditioning_keeps_the_one_it_began_as(make_recipe, pairs_folder, tiny_model, tmp_path):
    run = pretrained_run(tiny_model, tmp_path / "edges", CANNY)
    method = set_up(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(run)))
    assert json.loads(method.data_metadata()["finetune.conditioning"]) == CANNY
    assert method.start_lines[1] == (f"the data folder {pairs_folder} records no conditioning kind (no conditioning.json, which finetune "
                                     "make-conditions writes): the outputs record controlnet.pretrained's, canny (low 20, high 40, sigma 1), "
                                     "so finetune sample and the demo make and check conditions for them as for it")  # fmt: skip

    # A data folder's own record is the one kept, said as before; a ControlNet recording none passes none on.
    own = shutil.copytree(pairs_folder, tmp_path / "own")
    (own / "conditioning.json").write_text(json.dumps({"kind": "luminance"}))
    method = set_up(controlnet_recipe(make_recipe, own, controlnet__pretrained=str(run)))
    assert method.data_metadata() == {"finetune.conditioning": '{"kind": "luminance"}'} and len(method.start_lines) == 1, method.start_lines
    unrecorded = pretrained_run(tiny_model, tmp_path / "plain")
    method = set_up(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(unrecorded)))
    assert method.data_metadata() == {} and len(method.start_lines) == 1, method.start_lines
    # A record make-conditions could not have written (the demo refuses it of the pretrained one) is not passed on.
    damaged = pretrained_run(tiny_model, tmp_path / "damaged", {**CANNY, "sigma": 1e9})
    assert set_up(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(damaged))).data_metadata() == {}


def test_sample_treats_the_continued_controlnet_as_the_one_it_began_as_across_a_resume(make_recipe, pairs_folder, tiny_model, tmp_path, capsys):
    pretrained = pretrained_run(tiny_model, tmp_path / "edges", CANNY)
    common = dict(output_dir=str(tmp_path / "continued"), checkpoint__every_n_steps=1, validation__prompts=[])
    continued = train(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(pretrained), train__max_steps=1, **common)).output_dir
    photo = pairs_folder / "0000.png"  # a colour image given as a mask: the usual mistake, said for an edge ControlNet

    def notes(controlnet) -> list[str]:
        capsys.readouterr()
        sample = ["sample", "--base", str(tiny_model), "--prompt", "a shape", "--steps", "1", "--num-images", "1", "--condition", str(photo)]
        assert main([*sample, "--controlnet", str(controlnet), "--out", str(tmp_path / "samples")]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]

    said = notes(pretrained)
    assert any("trained on canny (low 20, high 40, sigma 1) conditioning images" in line for line in said), said
    assert any(f"--condition {photo} is no canny image" in line for line in said), said
    assert notes(continued) == said

    shutil.rmtree(pretrained)  # a resume reads no controlnet.pretrained: the checkpoint keeps the record
    resumed = train(controlnet_recipe(make_recipe, pairs_folder, train__max_steps=2, **common), resume="latest")
    assert resumed.final_step == 2
    assert json.loads(saved_model_metadata(resumed.output_dir / CONTROLNET_DIR)["finetune.conditioning"]) == CANNY
