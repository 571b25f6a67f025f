"""Where controlnet.pretrained is: a local folder, or a hub id, told apart as the base model's source is
(`finetune.models.model_source.looks_like_hub_id`). A local folder that moved or was never written, spelled as a hub id
(runs/edges), was asked of the hub as the ControlNet loaded, after the base model: the hub's error, late."""

import json
import shutil

import huggingface_hub.constants
import pytest
from controlnet_helpers import controlnet_recipe, write_controlnet_run
from test_base_model_errors import fake_hub_cache

from finetune.checkpoints.run_files import CONTROLNET_DIR
from finetune.errors import FinetuneError
from finetune.methods.controlnet import ControlNetMethod
from finetune.models.model_source import looks_like_hub_id
from finetune.training.trainer import train
import finetune.training.trainer as trainer

EXPECTED = ("controlnet.pretrained must be a diffusers ControlNet folder (a ControlNetModel's config.json beside its weights, as "
            "ControlNetModel.from_pretrained reads it), a controlnet run's output folder, a hub id, or null to start from the UNet")  # fmt: skip


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, read offline (as the tests run); the current folder is tmp_path/work."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "hub"


def refusal(make_recipe, pairs_folder, pretrained: str) -> str:
    with pytest.raises(FinetuneError) as refused:
        ControlNetMethod(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=pretrained)).check_data()
    return str(refused.value)


def test_hub_ids_and_local_paths_are_told_apart_as_for_the_base_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert looks_like_hub_id("lllyasviel/sd-controlnet-canny") and looks_like_hub_id("edges/v2")  # no edges/ folder here
    for path in ("runs/edges", "./runs/edges", "../x/edges", "~/edges", "/abs/edges", "runs\\edges", "a/b/c", "edges", "edges/", "/edges"):
        assert not looks_like_hub_id(path), path


def test_a_local_controlnet_folder_not_there_is_not_found_before_any_model_loads(make_recipe, pairs_folder, offline_cache, monkeypatch):
    """runs/edges beside a runs/ folder (moved, or never written) was taken as a hub id and failed as the ControlNet loaded."""
    work = offline_cache.parent / "work"
    (work / "runs").mkdir()
    here = f"(relative paths are read from the current folder, {work}"
    assert refusal(make_recipe, pairs_folder, "runs/edges") == (
        f"ControlNet runs/edges not found {here}, whose folder runs makes it a path into that folder, not a hub id): {EXPECTED}")
    for path in ("./runs/edges", "../x/edges", "runs\\edges", "runs/edges/controlnet"):
        assert refusal(make_recipe, pairs_folder, path) == f"ControlNet {path} not found {here}): {EXPECTED}"

    def no_model_loads(*args, **kwargs):
        raise AssertionError("the base model loaded")

    monkeypatch.setattr(trainer, "load_base_model", no_model_loads)
    with pytest.raises(FinetuneError, match=r"^ControlNet runs/edges not found \(relative paths"):
        train(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained="runs/edges"))


def test_a_hub_id_not_in_the_cache_offline_is_said_before_any_model_loads(make_recipe, pairs_folder, offline_cache, monkeypatch):
    """runs/edges where no runs/ folder is here either (the whole runs/ moved) reads as a hub id: offline and not in the
    cache, that is said whole, as the base model's is, where it was the hub's error as the ControlNet loaded."""
    monkeypatch.setattr(trainer, "load_base_model", lambda *args, **kwargs: pytest.fail("the base model loaded"))
    with pytest.raises(FinetuneError) as refused:
        train(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained="runs/edges"))
    assert str(refused.value) == (
        "ControlNet runs/edges is not in the local Hugging Face cache and downloads are off (HF_HUB_OFFLINE=1): download it once with "
        f"network, or set controlnet.pretrained to a local ControlNet folder (looked in the cache at {offline_cache}; there is no folder "
        f"runs/edges in the current folder, {offline_cache.parent / 'work'}, either)")


def test_a_cached_hub_controlnet_is_checked_from_its_config_before_any_model_loads(make_recipe, pairs_folder, tiny_model, offline_cache):
    """Its config (read only as it loaded, after the base) is checked at the data check, as a local folder's is."""
    run = write_controlnet_run(tiny_model, offline_cache.parent / "made", trained=False)
    fake_hub_cache(offline_cache, "someone/edges", run / CONTROLNET_DIR)
    method = ControlNetMethod(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained="someone/edges"))
    method.check_data()
    assert method.start_metadata() == {"finetune.controlnet_pretrained": "someone/edges"}

    config = offline_cache / "models--someone--edges" / "snapshots" / ("0" * 40) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "conditioning_channels": 1}))
    assert refusal(make_recipe, pairs_folder, "someone/edges").startswith("controlnet.pretrained someone/edges takes 1-channel conditioning images")
    shutil.copy(tiny_model / "unet" / "config.json", config)
    assert refusal(make_recipe, pairs_folder, "someone/edges").startswith("controlnet.pretrained someone/edges holds a UNet2DConditionModel, not a ControlNet")
    config.unlink()  # the cache's snapshot without it
    assert refusal(make_recipe, pairs_folder, "someone/edges") == (
        "ControlNet someone/edges has no config.json in the local Hugging Face cache: download it once with network, or set "
        "controlnet.pretrained to a local ControlNet folder")


def test_a_controlnet_recording_no_prediction_type_is_said_to_be_taken_as_the_bases(make_recipe, pairs_folder, tiny_model, offline_cache):
    """A hub ControlNet (or one trained elsewhere) records no finetune.prediction_type: it was taken, unsaid, as trained
    for whatever this run trains. It is taken to be trained for the base's own target, in the start line; where the run
    trains another (model.prediction_type), a warning (assumed, so not refused as a recorded other target is)."""
    from controlnet_helpers import set_up

    run = write_controlnet_run(tiny_model, offline_cache.parent / "made", trained=False)
    fake_hub_cache(offline_cache, "someone/edges", run / CONTROLNET_DIR)
    method = set_up(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained="someone/edges"))
    assert method.start_lines == ["starting from the ControlNet someone/edges (controlnet.pretrained): no prediction type recorded, taken to be the base's (epsilon)"]
    method = set_up(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained="someone/edges", model__prediction_type="v_prediction"))
    assert method.start_lines[1:] == [
        "warning: controlnet.pretrained someone/edges records no prediction type and is taken to be trained for the base's epsilon, this run "
        "trains for v_prediction (model.prediction_type): it starts from what it did not learn (its step-0 samples are read as epsilon, the "
        "later ones as v_prediction); remove model.prediction_type if it was trained for epsilon"]
    (run / CONTROLNET_DIR / "finetune_metadata.json").write_text(json.dumps({"finetune.method": "controlnet", "finetune.prediction_type": "epsilon"}))
    assert set_up(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(run))).start_lines == [
        f"starting from the ControlNet {run} (controlnet.pretrained)"]  # recorded: nothing to take


def test_the_step_0_samples_of_a_controlnet_recording_no_prediction_type_read_it_as_the_bases(make_recipe, pairs_folder, tiny_model, offline_cache):
    """Under model.prediction_type, a ControlNet taken to be trained for the base's target (it records none) was sampled at
    step 0 as this run's target: noise, where the user expects the ControlNet as it was loaded. It is read as the base's
    then, and as the run's once it trains; one that records the run's target is read as that from the start."""
    from controlnet_helpers import set_up
    from validation_sampling import sampled_as

    run = write_controlnet_run(tiny_model, offline_cache.parent / "made", trained=False)
    fake_hub_cache(offline_cache, "someone/edges", run / CONTROLNET_DIR)
    method = set_up(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained="someone/edges", model__prediction_type="v_prediction"))
    assert (sampled_as(method, 0), sampled_as(method, 2)) == ("epsilon", "v_prediction")
    (run / CONTROLNET_DIR / "finetune_metadata.json").write_text(json.dumps({"finetune.method": "controlnet", "finetune.prediction_type": "v_prediction"}))
    method = set_up(controlnet_recipe(make_recipe, pairs_folder, controlnet__pretrained=str(run), model__prediction_type="v_prediction"))
    assert sampled_as(method, 0) == "v_prediction"
