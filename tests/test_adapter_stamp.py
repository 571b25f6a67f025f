"""The demo's cache key of a loaded pipeline or ControlNet (`adapter_scan.adapter_files_stamp`): a stat of each file a
load reads, so that a file replaced under the demo is read again, and not a stat of every file of the folder on every
render (a hub pipeline's .bin, flax and fp16 copies, its safety checker: tens of files)."""

from __future__ import annotations

import os

from finetune.demo.adapter_scan import Adapter, adapter_files_stamp

# A pipeline folder as a hub clone has it; no file is read by the stamp, so none needs to be a real model.
LOADED = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
          "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
          "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]  # fmt: skip
NOT_LOADED = ["README.md", "v1-5-pruned.ckpt", "v1-5-pruned-emaonly.safetensors", "feature_extractor/preprocessor_config.json", "safety_checker/config.json",
              "safety_checker/model.safetensors", "safety_checker/pytorch_model.bin", "text_encoder/pytorch_model.bin",
              "text_encoder/flax_model.msgpack", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.msgpack",
              "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.msgpack"]  # fmt: skip


def hub_pipeline(folder):
    for name in LOADED + NOT_LOADED:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"weights " + name.encode())
    return Adapter("pipeline", "pipeline", folder)


def test_a_pipeline_s_stamp_stats_the_files_its_load_reads_and_no_others(tmp_path, monkeypatch):
    adapter = hub_pipeline(tmp_path / "pipeline")
    statted = []
    stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *args, **kwargs: statted.append(os.fspath(path)) or stat(path, *args, **kwargs))
    stamp = adapter_files_stamp(adapter)
    monkeypatch.undo()
    assert sorted(statted) == sorted(str(tmp_path / "pipeline" / name) for name in LOADED)  # was every file and folder: 35 stats
    assert [entry[0] for entry in stamp] == sorted(str(tmp_path / "pipeline" / name) for name in LOADED)


def test_a_pipeline_s_weights_replaced_with_their_size_and_times_kept_change_its_stamp(tmp_path):
    adapter = hub_pipeline(tmp_path / "pipeline")
    weights, unet = tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "pipeline" / "unet"
    before, file_was, folder_was = adapter_files_stamp(adapter), weights.stat(), unet.stat()
    (tmp_path / "retrained.safetensors").write_bytes(weights.read_bytes()[::-1])  # another run's weights, the same size
    os.replace(tmp_path / "retrained.safetensors", weights)
    os.utime(weights, ns=(file_was.st_atime_ns, file_was.st_mtime_ns))  # as cp -p, or a clock coarser than the two saves
    os.utime(unet, ns=(folder_was.st_atime_ns, folder_was.st_mtime_ns))
    assert adapter_files_stamp(adapter) != before


def test_a_controlnet_s_stamp_is_its_files_and_those_of_the_unet_its_run_saved_beside_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for name in ("controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors", "controlnet/finetune_metadata.json",
                 "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/finetune_metadata.json", "logs/events.out", "recipe.yaml"):  # fmt: skip
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    statted = []
    stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *args, **kwargs: statted.append(os.fspath(path)) or stat(path, *args, **kwargs))
    adapter_files_stamp(Adapter("run/controlnet", "controlnet", run / "controlnet"))
    monkeypatch.undo()
    assert sorted(statted) == sorted(str(run / part / name) for part in ("controlnet", "unet")
                                     for name in ("config.json", "diffusion_pytorch_model.safetensors", "finetune_metadata.json"))  # fmt: skip


def test_a_link_to_nothing_that_a_load_reads_refuses_its_folder_naming_the_link_and_where_it_points(tmp_path):
    """A hub cache's blob deleted: the pipeline was listed as usable and each render said the weights 'damaged (No such
    file or directory)'; a ControlNet's was said to have no weights file. A link to nothing that no load reads (a safety
    checker's weights) leaves its pipeline usable, and the stamp of a folder with one is taken (no 'gone, press Rescan')."""
    from finetune.demo.adapter_scan import scan_adapters

    pipeline = tmp_path / "adapters" / "pipeline"
    hub_pipeline(pipeline)
    (pipeline / "model_index.json").write_text("{}")
    (pipeline / "safety_checker" / "model.safetensors").unlink()
    (pipeline / "safety_checker" / "model.safetensors").symlink_to("../../blobs/deleted")
    usable = scan_adapters(tmp_path / "adapters")["pipeline"]
    assert usable.refused is None and adapter_files_stamp(usable)
    (pipeline / "unet" / "diffusion_pytorch_model.fp16.safetensors").symlink_to("../../blobs/deleted")  # diffusers' check reads every .safetensors
    controlnet = tmp_path / "adapters" / "controlnet"
    controlnet.mkdir()
    (controlnet / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    (controlnet / "diffusion_pytorch_model.safetensors").symlink_to(tmp_path / "blobs" / "moved")
    scanned = scan_adapters(tmp_path / "adapters")
    assert scanned["pipeline"].refused == ("pipeline/unet/diffusion_pytorch_model.fp16.safetensors is a link to ../../blobs/deleted, which is not there: "
                                           "put that file back, or remove the link, then Rescan")  # fmt: skip
    assert scanned["controlnet"].refused == (f"controlnet/diffusion_pytorch_model.safetensors is a link to {tmp_path / 'blobs' / 'moved'}, which is not there: "
                                             "put that file back, or remove the link, then Rescan")  # fmt: skip


def test_a_controlnets_stamp_stats_its_weights_whose_suffix_is_in_capitals(tmp_path):
    """diffusion_pytorch_model.SafeTensors, which a disk ignoring case loads as .safetensors, was left out of the stamp (a
    lowercase suffix alone): replaced under the demo, the ControlNet loaded before was kept."""
    (tmp_path / "edges").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.SafeTensors"):
        (tmp_path / "edges" / name).write_bytes(b"weights")
    stamp = adapter_files_stamp(Adapter("edges", "controlnet", tmp_path / "edges"))
    assert [entry[0] for entry in stamp] == [str(tmp_path / "edges" / name) for name in ("config.json", "diffusion_pytorch_model.SafeTensors")]
