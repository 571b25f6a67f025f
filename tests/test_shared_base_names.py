"""What a creator shares (a run's LoRA header, a ControlNet's finetune_metadata.json, the model card, `export`'s and
`export-checkpoint`'s headers) named a local base by its path as training was given it: /home/alice/models/sd15 went into
every uploaded copy, and a relative one (finetune/assets/toyworld-base, as the quickstart's recipe names it) was not found
when sample, eval or merge ran from another folder. Shared files name the base by its folder or file name now (a hub id
whole); the run's own record, base_paths.json in its output_dir, keeps where it is on this machine."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from finetune.checkpoints.run_files import CONTROLNET_DIR, LORA_WEIGHTS_NAME, METADATA_FILE
from finetune.cli.main import base_or_recorded, main
from finetune.outputs.base_names import BASE_PATHS_FILE, shared_base_name, shared_record
from finetune.sampling.adapter_records import recorded_base

from conftest import build_recipe
from test_moved_base import lora_recording

CONTROLNET_CONFIG = Path(__file__).parents[1] / "finetune" / "assets" / "toyworld-controlnet-mask" / "config.json"


@pytest.mark.parametrize(("given", "shared"), [("runwayml/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
                                               ("/home/alice/models/sd15", "sd15"), ("/home/alice/models/sd15/", "sd15"),
                                               ("/home/alice/v1-5-pruned.safetensors", "v1-5-pruned.safetensors"),
                                               ("C:\\Users\\alice\\sd15.ckpt", "sd15.ckpt"),
                                               # another machine's hub cache: its revision's folder name was shared, not the id
                                               ("/home/alice/.cache/huggingface/hub/models--runwayml--stable-diffusion-v1-5/snapshots/1d0c4eb",
                                                "runwayml/stable-diffusion-v1-5"),
                                               ("C:\\Users\\alice\\.cache\\huggingface\\hub\\models--runwayml--stable-diffusion-v1-5\\snapshots\\1d0c4eb\\",
                                                "runwayml/stable-diffusion-v1-5")])  # fmt: skip
def test_a_base_not_here_is_shared_by_its_name_and_a_hub_id_whole(given, shared):
    """An older output's record of a path on its machine, exported here, is named as a new run names its base."""
    assert shared_base_name(given) == shared
    assert shared_record({"finetune.base_model": given, "finetune.steps": "5"}) == {"finetune.base_model": shared, "finetune.steps": "5"}


def test_a_local_base_is_shared_by_its_name_and_a_hub_cache_folder_by_the_hub_id_it_records(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--runwayml--stable-diffusion-v1-5" / "snapshots" / "1d0c4eb"
    snapshot.mkdir(parents=True)
    (tmp_path / "models" / "sd15").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert shared_base_name(str(snapshot)) == "runwayml/stable-diffusion-v1-5"
    assert shared_base_name("models/sd15") == shared_base_name(str(tmp_path / "models" / "sd15")) == "sd15"  # spelled like a hub id, but a folder here
    assert shared_base_name(".") == tmp_path.name


def test_a_run_on_a_relative_base_shares_its_name_and_finds_it_from_another_folder(tiny_model, image_folder, tmp_path, monkeypatch, capsys):
    from finetune.training.trainer import train

    project, run = tmp_path / "home" / "alice" / "proj", tmp_path / "runs" / "cat"
    (project / "models").mkdir(parents=True)
    (project / "models" / "sd15").symlink_to(tiny_model)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(project)
    train(build_recipe(Path("models/sd15"), image_folder, run, train__max_steps=1, train__batch_size=1, checkpoint__every_n_steps=1))
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()

    # The run's outputs, a checkpoint's and the run's own, find it from here, by the run's own record.
    assert json.loads((run / BASE_PATHS_FILE).read_text()) == {"sd15": str(project / "models" / "sd15")}
    for adapter in (run, run / LORA_WEIGHTS_NAME, run / "checkpoints" / "checkpoint-1"):
        assert recorded_base(str(adapter), None) == str(project / "models" / "sd15"), adapter
    assert base_or_recorded(SimpleNamespace(lora=str(run), controlnet=None, base=None, base_config=None)) == str(project / "models" / "sd15")
    assert capsys.readouterr().out == f"base model: {project / 'models' / 'sd15'} (recorded by the adapter's training run as sd15; --base picks another)\n"

    # What is shared names it without its folders: the LoRA's header, the export's, the model card.
    assert main(["export", str(run), str(tmp_path / "webui"), "--to", "kohya"]) == 0
    exported = tmp_path / "webui" / "cat.safetensors"
    for path in (run / LORA_WEIGHTS_NAME, run / "checkpoints" / "checkpoint-1" / LORA_WEIGHTS_NAME, exported):
        with safe_open(str(path), "np") as f:
            metadata = f.metadata()
        assert metadata["finetune.base_model"] == "sd15", path
        assert "models/sd15" not in json.dumps(metadata) and str(tmp_path) not in json.dumps(metadata), path
    card = (tmp_path / "webui" / "cat.md").read_text()
    assert "| base model | `sd15` |" in card and 'from_pretrained("sd15"' in card and str(project) not in card
    assert str(tmp_path) not in card and 'load_lora_weights(".", weight_name="cat.safetensors"' in card  # nor its own folder's path
    # merge without --base takes the path from the run's record, never given: its pipeline's record and card name it.
    assert main(["merge", "--lora", str(run), str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / METADATA_FILE).read_text())["finetune.base_model"] == "sd15"
    assert "pipeline: `sd15` with the LoRA" in (tmp_path / "merged" / "README.md").read_text()
    assert str(project) not in (tmp_path / "merged" / METADATA_FILE).read_text() + (tmp_path / "merged" / "README.md").read_text()
    assert [config for config in (tmp_path / "merged").rglob("*.json") if str(project) in config.read_text()] == []  # diffusers' _name_or_path

    # A file of an older run, which recorded the path: its export and card name the base as a new run's do.
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(run / LORA_WEIGHTS_NAME)), str(old), {**metadata, "finetune.base_model": str(project / "models" / "sd15")})
    assert main(["export", str(old), str(tmp_path / "old-export"), "--to", "diffusers"]) == 0
    with safe_open(str(tmp_path / "old-export" / LORA_WEIGHTS_NAME), "np") as f:
        assert f.metadata()["finetune.base_model"] == "sd15"
    card = (tmp_path / "old-export" / "README.md").read_text()
    assert "| base model | `sd15` |" in card and str(project) not in card and str(tmp_path) not in card


def test_a_controlnet_in_a_runs_checkpoint_finds_its_base_by_the_runs_record(tmp_path, monkeypatch):
    base, run = tmp_path / "models" / "sd15", tmp_path / "runs" / "edges"
    base.mkdir(parents=True)
    controlnet = run / "checkpoints" / "checkpoint-500" / CONTROLNET_DIR
    controlnet.mkdir(parents=True)
    shutil.copy(CONTROLNET_CONFIG, controlnet / "config.json")
    (controlnet / METADATA_FILE).write_text(json.dumps({"finetune.method": "controlnet", "finetune.base_model": "sd15"}))
    (run / BASE_PATHS_FILE).write_text(json.dumps({"sd15": str(base)}))
    monkeypatch.chdir(tmp_path / "runs")
    assert recorded_base(None, str(controlnet)) == str(base)
    # The run's folder moved with its base (another machine): its record's path is found by its trailing parts.
    moved = tmp_path / "bob"
    moved.mkdir()
    shutil.move(tmp_path / "models", moved / "models")
    shutil.move(tmp_path / "runs", moved / "runs")
    monkeypatch.chdir(moved)
    assert recorded_base(None, str(moved / "runs" / "edges" / "checkpoints" / "checkpoint-500" / CONTROLNET_DIR)) == str(moved / "models" / "sd15")


def test_an_older_outputs_record_of_its_bases_path_is_still_found(tmp_path, monkeypatch):
    """Outputs written before base_paths.json recorded the path itself; a record of another run's base beside them changes nothing."""
    base = tmp_path / "models" / "sd15"
    base.mkdir(parents=True)
    old = lora_recording(tmp_path / "runs" / "old" / LORA_WEIGHTS_NAME, str(base))
    (tmp_path / "runs" / "old" / BASE_PATHS_FILE).write_text(json.dumps({"other": str(tmp_path / "other")}))
    relative = lora_recording(tmp_path / "runs" / "older" / LORA_WEIGHTS_NAME, "models/sd15")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert recorded_base(old, None) == str(base)
    assert recorded_base(relative, None) == str(base)  # from the folders above the adapter, as before


def test_a_controlnet_trained_from_a_local_one_does_not_carry_its_path(tmp_path):
    """A ControlNet (and the UNet saved beside it) loaded from /home/alice/edges, as a run on a local controlnet.pretrained
    loads it, was saved with that path as _name_or_path in its config.json: saved as pipelines are, without it."""
    from diffusers import ControlNetModel

    from finetune.outputs.pipeline_io import save_model_folder

    started = tmp_path / "home" / "alice" / "edges"
    shutil.copytree(CONTROLNET_CONFIG.parent, started)
    controlnet = ControlNetModel.from_pretrained(started)
    assert str(controlnet.config._name_or_path) == str(started)  # what diffusers writes, unless left out
    saved = json.loads((save_model_folder(controlnet, tmp_path / "run" / CONTROLNET_DIR, {}) / "config.json").read_text())
    assert "_name_or_path" not in saved and str(started) not in json.dumps(saved)
    assert ControlNetModel.from_pretrained(tmp_path / "run" / CONTROLNET_DIR).config.block_out_channels == controlnet.config.block_out_channels
