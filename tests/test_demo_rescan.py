"""The demo's Rescan runs outside the render queue: a rescan in the middle of a render must not break it. An adapter
rewritten where it is needs no Rescan: the next render reads it again."""

import os
import shutil

import numpy as np
import pytest

from finetune.demo.engine import DemoEngine, Request
from finetune.errors import FinetuneError


def test_an_adapter_deleted_and_rescanned_during_a_render_is_one_line(adapters_dir, tiny_model, tmp_path):
    folder = tmp_path / "adapters"
    for name in ("first", "second"):
        shutil.copytree(adapters_dir / "trained", folder / name, ignore=shutil.ignore_patterns("checkpoints", "logs", "samples"))
    engine = DemoEngine(str(tiny_model), folder)

    def delete_the_second_and_rescan(done, total):  # while the first LoRA's column renders
        if (folder / "second").exists():
            shutil.rmtree(folder / "second")
            engine.rescan()

    request = Request(prompt="a red circle", steps=1, loras=[("first", 1.0), ("second", 1.0)], separate=True)
    with pytest.raises(FinetuneError, match=r"^'second' was removed from .* while this request rendered: pick another$"):
        engine.render(request, delete_the_second_and_rescan)  # was a KeyError: the page's generic "error"


def test_a_rescan_while_a_render_stores_what_it_loaded_leaves_the_cache_whole(adapters_dir, tiny_model, tmp_path):
    """Rescan (another thread) emptied the cache in place while a render went over it to make room for the adapter
    it had loaded: 'dictionary changed size during iteration'. Here the rescan falls at that moment, by design."""
    folder = tmp_path / "adapters"
    shutil.copytree(adapters_dir / "trained", folder / "first", ignore=shutil.ignore_patterns("checkpoints", "logs", "samples"))
    engine = DemoEngine(str(tiny_model), folder)

    class RescannedWhileIterated(dict):
        def __iter__(self):
            for key in super().__iter__():  # the dict's own iterator, which a change under it stops
                engine.rescan()  # as Rescan's thread would, between two keys
                yield key

    engine._cache = RescannedWhileIterated({("lora", "earlier", 0, 0): object(), ("lora", "earlier", 0, 1): object()})
    adapter = engine.adapter("first", "lora")
    loaded = engine._cached(adapter, lambda: "loaded")
    assert loaded == "loaded" and list(engine._cache.values()) == ["loaded"]  # kept for the next render (keyed by its file)


def test_a_lora_file_cut_short_is_listed_with_what_is_wrong_and_what_to_do(adapters_dir, tmp_path):
    """Its status said "unreadable safetensors file (SafetensorError)": neither what was wrong nor what to do."""
    from finetune.demo.adapter_scan import scan_adapters

    whole = (adapters_dir / "trained" / "pytorch_lora_weights.safetensors").read_bytes()
    (tmp_path / "copied").mkdir()
    (tmp_path / "copied" / "pytorch_lora_weights.safetensors").write_bytes(whole[: len(whole) // 2])
    refused = scan_adapters(tmp_path)["copied"].refused
    assert refused.startswith("unreadable safetensors file (Error while deserializing header: ")
    assert refused.endswith("; cut short?): copy it again, then Rescan")


def test_a_lora_file_replaced_with_its_size_and_time_unchanged_is_read_again(adapters_dir, tiny_model, tmp_path):
    """The loaded LoRA was kept under its file's time and size: a second run's file of the same rank renamed over it (as
    every save writes it) within the file system's time resolution, or copied keeping its time (cp -p), had the same
    key, and the demo rendered the old weights until a Rescan. Here the new file is given the old one's time, as such a clock would."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "adapters"
    shutil.copytree(adapters_dir / "trained", folder / "run", ignore=shutil.ignore_patterns("checkpoints", "logs", "samples"))
    lora = folder / "run" / "pytorch_lora_weights.safetensors"
    engine = DemoEngine(str(tiny_model), folder)
    request = Request(prompt="a red circle", steps=1, loras=[("run", 1.0)], include_base=False)
    before = np.asarray(engine.render(request)[0][0][0])

    was = os.stat(lora)
    with safe_open(lora, "pt") as opened:
        metadata = opened.metadata()
    retrained = {name: -tensor if ".up." in name else tensor for name, tensor in load_file(lora).items()}  # the opposite change
    save_file(retrained, str(tmp_path / "new.safetensors"), metadata=metadata)
    os.replace(tmp_path / "new.safetensors", lora)
    os.utime(lora, ns=(was.st_atime_ns, was.st_mtime_ns))
    assert os.stat(lora).st_size == was.st_size

    after = np.asarray(engine.render(request)[0][0][0])
    assert not np.array_equal(after, before)
    engine.rescan()
    assert np.array_equal(after, np.asarray(engine.render(request)[0][0][0]))  # what it renders once it has read the file again


def test_a_controlnet_whose_weights_are_replaced_inside_its_folder_is_read_again(tiny_model, tmp_path):
    """A ControlNet (or pipeline) was kept under its folder's time and size: a file renamed over one inside it (rsync, a
    save that writes whole files) within the file system's time resolution left both as they were, and the demo rendered
    the old ControlNet until a Rescan (a file rewritten in place leaves its folder's time as it was at any time)."""
    import torch
    from controlnet_helpers import zero_convs
    from diffusers import ControlNetModel, UNet2DConditionModel
    from PIL import Image

    from finetune.outputs.pipeline_io import save_model_folder

    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet"))
    folders = {}
    for sign, folder in ((1.0, tmp_path / "adapters" / "edges" / "controlnet"), (-1.0, tmp_path / "other" / "controlnet")):
        with torch.no_grad():
            for weight in zero_convs(controlnet).values():  # steering by its zero convolutions, made non-zero
                weight.fill_(sign * 0.05)
        folders[sign] = save_model_folder(controlnet, folder, {})
    folder, other = folders[1.0], folders[-1.0]
    engine = DemoEngine(str(tiny_model), tmp_path / "adapters")
    condition = Image.new("RGB", (64, 64))
    condition.paste((255, 255, 255), (16, 16, 48, 48))
    request = Request(prompt="a red circle", steps=1, controlnet="edges/controlnet", conditioning_image=condition, include_base=False)
    before = np.asarray(engine.render(request)[0][0][1])  # (after the conditioning image)

    weights, was = folder / "diffusion_pytorch_model.safetensors", folder.stat()
    os.replace(other / weights.name, weights)
    os.utime(folder, ns=(was.st_atime_ns, was.st_mtime_ns))  # as a clock coarser than the time since the folder was written

    after = np.asarray(engine.render(request)[0][0][1])
    assert not np.array_equal(after, before)
    engine.rescan()
    assert np.array_equal(after, np.asarray(engine.render(request)[0][0][1]))
