"""The demo's adapter list says which LoRA files cannot load, from their header, before Generate is pressed."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from finetune.checkpoints.run_files import MAX_RECORD_BYTES
from finetune.demo.adapter_scan import scan_adapters
from finetune.errors import FinetuneError
from finetune.formats.kohya import load_lora

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
PLAIN = {f"{Q}.lora_down.weight": torch.zeros(4, 32), f"{Q}.lora_up.weight": torch.zeros(32, 4), f"{Q}.alpha": torch.tensor(4.0)}
FILES = {
    "plain": (PLAIN, {}),
    "loha": ({f"{Q}.hada_w1_a": torch.zeros(32, 4), f"{Q}.hada_w1_b": torch.zeros(4, 32), f"{Q}.alpha": torch.tensor(4.0)}, {}),
    "dora": ({**PLAIN, f"{Q}.dora_scale": torch.ones(1, 32)}, {}),
    "peft-dora": ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.zeros(4, 32),
                   "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": torch.zeros(32, 4)},
                  {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4, "unet.use_dora": True})}),
    "sdxl": ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
              "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
              "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}, {}),
}  # fmt: skip


@pytest.fixture
def adapters(tmp_path):
    for name, (tensors, metadata) in FILES.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata)
    return scan_adapters(tmp_path)


def test_lycoris_and_sdxl_lora_files_are_listed_as_refused_with_the_reason_and_dora_files_as_usable(adapters):
    refused = {name: adapter.refused for name, adapter in adapters.items()}
    assert refused == {
        "plain": None,
        "loha": "a LyCORIS LoHa, LoKr or Tucker LoCon file: only LoRA (down/up weights) and DoRA (with magnitudes) load",
        "dora": None,  # the demo applies a DoRA (tests/test_dora_demo.py); these two are damaged, which loading them says
        "peft-dora": None,
        "sdxl": "an SDXL LoRA (lora_te1_/lora_te2_ or text_encoder_2 names): only SD1.x LoRAs are loaded",
    }
    # What the loader refuses (a DoRA per input channel, one without magnitudes) when Generate is pressed, each for its reason
    said = {"loha": " is a LyCORIS LoHa, LoKr or Tucker LoCon file: ", "dora": r": LoRA key \S+dora_scale \(\(1, 32\)\) is not one DoRA magnitude per output channel",
            "peft-dora": r": its lora_adapter_metadata says DoRA \(use_dora\) and it holds no DoRA magnitudes"}  # fmt: skip
    for name, reason in said.items():
        with pytest.raises(FinetuneError, match=rf"^LoRA {re.escape(str(adapters[name].path))}{reason}"):
            load_lora(adapters[name].path)


def test_damaged_run_files_are_listed_not_raised(tmp_path):
    """A demo's adapters folder holds what users left there: a run whose recipe.yaml was cut or edited by hand is still listed
    (the scan read its base and steps from it, and a YAML error or a section written as a plain value raised out of the scan),
    and a pipeline whose model_index.json is no JSON is listed as refused with the reason, not offered."""
    # A recipe of the user's kept in its output_dir (bb37e8b's layout) names only what it changes: no model: section.
    for run, recipe in (("cut", "model: {pretrained: [\n"), ("plain-model", "method: lora\nmodel: some-base\n"), ("own", "method: lora\n")):
        (tmp_path / run / "pipeline").mkdir(parents=True)
        (tmp_path / run / "pipeline" / "model_index.json").write_text("{}")
        (tmp_path / run / "recipe.yaml").write_text(recipe)
    (tmp_path / "half-copied").mkdir()
    (tmp_path / "half-copied" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", ')
    adapters = scan_adapters(tmp_path)
    assert sorted(adapters) == ["cut", "half-copied", "own", "plain-model"]  # a run's pipeline by its run
    assert adapters["cut"].metadata == adapters["plain-model"].metadata == adapters["own"].metadata == {}
    assert adapters["half-copied"].refused == "its model_index.json is not readable JSON (a copy cut short?): copy the pipeline folder again"


def test_a_pipeline_missing_weights_is_not_said_to_hold_pickles(tmp_path):
    """A pipeline copied without its UNet weights was refused as 'unet weights are not .safetensors (pickle checkpoints
    are not loaded)': the user looked for a .bin that was not there. Pickles, where they are, are still named as such."""
    for name in ("cut-short", "pickled"):
        for part in ("unet", "vae", "text_encoder"):
            (tmp_path / name / part).mkdir(parents=True)
            (tmp_path / name / part / "config.json").write_text("{}")
            if part != "unet":
                (tmp_path / name / part / "model.safetensors").write_bytes(b"")
        (tmp_path / name / "model_index.json").write_text("{}")
    (tmp_path / "pickled" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    adapters = scan_adapters(tmp_path)
    assert adapters["cut-short"].refused == "no unet weights (a copy cut short?): copy the pipeline folder again"
    assert adapters["pickled"].refused == "unet weights are not .safetensors (pickle checkpoints are not loaded)"


def test_a_record_too_large_to_be_ours_refuses_its_model_not_the_scan(tmp_path):
    """A ControlNet's (or pipeline's) finetune_metadata.json was read whole by the scan (a file of gigabytes: all of it in
    memory); one past MAX_RECORD_BYTES is now not read, and its ControlNet listed as refused, the others as before."""
    shipped = Path(__file__).resolve().parents[1] / "finetune" / "assets" / "toyworld-controlnet-mask"
    for name in ("kept", "huge"):
        (tmp_path / name).mkdir()
        for file in ("config.json", "diffusion_pytorch_model.safetensors"):
            (tmp_path / name / file).symlink_to(shipped / file)
    (tmp_path / "kept" / "finetune_metadata.json").write_text(json.dumps({"finetune.steps": 5}))
    with open(tmp_path / "huge" / "finetune_metadata.json", "wb") as file:
        file.truncate(MAX_RECORD_BYTES + 1)  # sparse: no disk taken
    adapters = scan_adapters(tmp_path)
    assert (adapters["kept"].metadata, adapters["kept"].refused) == ({"finetune.steps": "5"}, None)
    assert adapters["huge"].metadata == {}
    assert adapters["huge"].refused.startswith(f"{tmp_path / 'huge' / 'finetune_metadata.json'} holds 100,000,001 bytes, more than finetune records")


def test_the_scan_reads_every_kind_without_torch(tmp_path, adapters):
    """The demo's folder scan reads headers and JSON only, yet importing it loaded torch (finetune.formats.dora's module-level
    import, for a name test) and each LoRA header was opened for torch (safe_open's "pt"): the scan alone is cheap."""
    assets = Path(__file__).resolve().parents[1] / "finetune" / "assets"
    for folder, shipped in (("mask", "toyworld-controlnet-mask"), ("world", "toyworld-base")):  # a ControlNet, a pipeline
        (tmp_path / folder).mkdir()
        for part in (assets / shipped).iterdir():
            (tmp_path / folder / part.name).symlink_to(part)
    script = f"""
import json, sys
from finetune.demo.adapter_scan import scan_adapters
found = {{name: [adapter.kind, adapter.metadata.get("finetune.use_dora")] for name, adapter in scan_adapters({str(tmp_path)!r}).items()}}
print(json.dumps([found, "torch" in sys.modules]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    found, torch_imported = json.loads(result.stdout)
    assert found == {name: [adapter.kind, adapter.metadata.get("finetune.use_dora")] for name, adapter in scan_adapters(tmp_path).items()}
    assert (found["dora"], found["mask"][0], found["world"][0]) == (["lora", "true"], "controlnet", "pipeline")
    assert not torch_imported



def _unreadable_by_this_user(monkeypatch, unlistable: tuple[Path, ...], unsearchable: tuple[Path, ...]) -> None:
    """Listing an `unlistable` folder raises PermissionError, as does a stat of an entry in an `unsearchable` one (a folder
    of mode r--): as for another user's folders, which chmod cannot make of a test that runs as root."""
    def refusing(real, refused):
        def call(path=".", *args, **kwargs):
            if refused(Path(path)):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path, *args, **kwargs)
        return call

    for name in ("scandir", "listdir"):
        monkeypatch.setattr(os, name, refusing(getattr(os, name), lambda path: path in unlistable))
    monkeypatch.setattr(os, "stat", refusing(os.stat, lambda path: path.parent in unsearchable))


def test_a_folder_this_user_cannot_read_is_said_and_skipped_not_raised(tmp_path, monkeypatch, capsys):
    """A pipeline part folder the demo's user could not list (copied as another user) stopped the scan, so the demo, with
    a traceback: its pipeline is now listed as refused naming the part, and a folder the scan cannot read is skipped with
    one warning line naming it; everything else is listed as before."""
    for name in ("ok", "locked"):
        for part in ("unet", "vae", "text_encoder"):
            (tmp_path / name / part).mkdir(parents=True)
            (tmp_path / name / part / "model.safetensors").write_bytes(b"")
        (tmp_path / name / "model_index.json").write_text("{}")
    for name in ("private", "no-search", "kept"):
        (tmp_path / name).mkdir()
        save_file(PLAIN, str(tmp_path / name / "style.safetensors"))
    _unreadable_by_this_user(monkeypatch, unlistable=(tmp_path / "locked" / "unet", tmp_path / "private"), unsearchable=(tmp_path / "no-search",))
    adapters = scan_adapters(tmp_path)
    assert {name: adapter.refused for name, adapter in adapters.items()} == {
        "kept/style": None,
        "locked": "locked/unet cannot be read by this user (permission denied): give this user read access to it (chmod -R u+rX), then Rescan",
        "ok": None,
    }
    assert capsys.readouterr().out.splitlines() == [
        f"warning: {name} cannot be read by this user (permission denied), so its adapters are not listed: give this user read "
        "access to it (chmod -R u+rX), then Rescan" for name in ("no-search", "private")]


def test_runs_linked_into_the_adapters_folder_are_listed(tmp_path):
    """Runs gathered as links (`ln -s ../outputs/lora adapters/lora`): os.walk does not follow a link to a folder, and the
    demo said "0 adapters under adapters" without a word. A link back up the tree is walked once, not in a loop."""
    (tmp_path / "outputs" / "lora").mkdir(parents=True)
    save_file(PLAIN, str(tmp_path / "outputs" / "lora" / "pytorch_lora_weights.safetensors"))
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "lora").symlink_to(tmp_path / "outputs" / "lora", target_is_directory=True)
    (tmp_path / "adapters" / "up").symlink_to(tmp_path / "adapters", target_is_directory=True)
    found = scan_adapters(tmp_path / "adapters")
    assert [(name, adapter.path) for name, adapter in found.items()] == [("lora", tmp_path / "adapters" / "lora" / "pytorch_lora_weights.safetensors")]


def test_a_runs_pipeline_is_listed_by_its_run_as_its_lora_is(tmp_path):
    """A DreamBooth run's pipeline was listed as db/pipeline, a LoRA run's file as lora (not lora/pytorch_lora_weights), and
    the demo's model='db' was an unknown pipeline. Now both by their run; db/pipeline, the folder, still finds it, and a
    checkpoint's pipeline is its checkpoint's, as a checkpoint's LoRA is."""
    from finetune.demo.adapter_scan import by_name

    for pipeline, steps in ((tmp_path / "db" / "pipeline", 8), (tmp_path / "db" / "checkpoints" / "checkpoint-4" / "pipeline", 4), (tmp_path / "merged", 8)):
        pipeline.mkdir(parents=True)
        (pipeline / "model_index.json").write_text("{}")
        (pipeline / "finetune_metadata.json").write_text(json.dumps({"finetune.steps": steps}))
    (tmp_path / "db" / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text('{"step": 4}')
    (tmp_path / "db" / "recipe_as_run.yaml").write_text("method: dreambooth\n")  # the run's record: what makes db a run
    adapters = scan_adapters(tmp_path)
    assert {name: adapter.path.relative_to(tmp_path).as_posix() for name, adapter in adapters.items()} == {
        "db": "db/pipeline", "db/checkpoints/checkpoint-4": "db/checkpoints/checkpoint-4/pipeline", "merged": "merged"}
    assert by_name(adapters, tmp_path, "db/pipeline") is by_name(adapters, tmp_path, "db") is adapters["db"]
    assert by_name(adapters, tmp_path, "db/nothing") is by_name(adapters, tmp_path, str(tmp_path / "db" / "pipeline")) is None  # names, not paths


def test_a_runs_controlnet_is_listed_by_its_run_as_its_pipeline_is(tmp_path):
    """A ControlNet run's folder was listed as edges/controlnet while its pipeline and LoRA were listed by their run. Now edges;
    edges/controlnet, the folder, still finds it, and a checkpoint's ControlNet is its checkpoint's. One saved directly in
    the adapters folder as controlnet keeps its own name."""
    from finetune.demo.adapter_scan import by_name

    for folder, steps in ((tmp_path / "edges" / "controlnet", 8), (tmp_path / "edges" / "checkpoints" / "checkpoint-4" / "controlnet", 4), (tmp_path / "controlnet", 8)):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"_class_name": "ControlNetModel"}')
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
        (folder / "finetune_metadata.json").write_text(json.dumps({"finetune.steps": steps}))
    (tmp_path / "edges" / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text('{"step": 4}')
    (tmp_path / "edges" / "recipe_as_run.yaml").write_text("method: controlnet\n")
    adapters = scan_adapters(tmp_path)
    assert {name: (adapter.kind, adapter.path.relative_to(tmp_path).as_posix()) for name, adapter in adapters.items()} == {
        "edges": ("controlnet", "edges/controlnet"), "controlnet": ("controlnet", "controlnet"),
        "edges/checkpoints/checkpoint-4": ("controlnet", "edges/checkpoints/checkpoint-4/controlnet")}
    assert by_name(adapters, tmp_path, "edges/controlnet") is by_name(adapters, tmp_path, "edges") is adapters["edges"]
    assert by_name(adapters, tmp_path, "edges/checkpoints/checkpoint-4/controlnet") is adapters["edges/checkpoints/checkpoint-4"]


def test_a_pipeline_or_controlnet_folder_in_a_folder_that_is_no_run_is_listed_by_its_own_path(tmp_path):
    """A user's models/controlnet and models/pipeline were listed by their parent's name, as a run's are, though models is
    no run (it holds no run's record): listed as 'models', twice over. By their own path now; a run's (a record beside
    them, of this version or an earlier one) still by its run."""
    from finetune.demo.adapter_scan import by_name

    for parent in ("models", "edges", "db"):
        (tmp_path / parent / "controlnet").mkdir(parents=True)
        (tmp_path / parent / "controlnet" / "config.json").write_text('{"_class_name": "ControlNetModel"}')
        (tmp_path / parent / "controlnet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (tmp_path / "models" / "pipeline").mkdir()
    (tmp_path / "models" / "pipeline" / "model_index.json").write_text("{}")
    (tmp_path / "edges" / "recipe_as_run.yaml").write_text("method: controlnet\n")
    (tmp_path / "db" / "recipe.yaml").write_text("method: controlnet\n")  # an earlier finetune's record of its run
    adapters = scan_adapters(tmp_path)
    assert {name: (adapter.kind, adapter.path.relative_to(tmp_path).as_posix()) for name, adapter in adapters.items()} == {
        "db": ("controlnet", "db/controlnet"), "edges": ("controlnet", "edges/controlnet"),
        "models/controlnet": ("controlnet", "models/controlnet"), "models/pipeline": ("pipeline", "models/pipeline")}
    assert by_name(adapters, tmp_path, "models") is None
