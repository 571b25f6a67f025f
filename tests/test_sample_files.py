"""`finetune sample`'s files: each run under the folder's next number, never over a file already there."""

import numpy as np
from PIL import Image

from finetune.sampling.sample_files import next_run_number, write_numbered
import finetune.sampling.sample_files as sample_files


def image(value: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (value, value, value))


def test_runs_continue_after_the_highest_number_and_keep_every_earlier_file(tmp_path):
    assert next_run_number(tmp_path / "missing") == 0
    (tmp_path / "grid.png").write_bytes(b"an earlier version's grid")  # unnumbered names are left alone
    (tmp_path / "00007-grid.png").write_bytes(b"a run of the webui's numbering")
    (tmp_path / "12 notes.txt").write_text("no dash after the digits: not a run")
    first = write_numbered(tmp_path, [("prompt0_seed0.png", image(10)), ("grid.png", image(20))])
    assert [p.name for p in first] == ["00008-prompt0_seed0.png", "00008-grid.png"]
    second = write_numbered(tmp_path, [("prompt0_seed0.png", image(30)), ("grid.png", image(40))])
    assert [p.name for p in second] == ["00009-prompt0_seed0.png", "00009-grid.png"]
    assert (tmp_path / "grid.png").read_bytes() == b"an earlier version's grid"
    assert (tmp_path / "00007-grid.png").read_bytes() == b"a run of the webui's numbering"
    assert [np.asarray(Image.open(p))[0, 0, 0] for p in first + second] == [10, 20, 30, 40]
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_a_number_taken_meanwhile_moves_the_run_to_the_next_and_replaces_nothing(tmp_path, monkeypatch):
    """Another process took this run's number between the scan and the write: its file stays, ours move on."""
    scans = []

    def scanned_before_the_other_run_wrote(folder):
        scans.append(folder)
        if len(scans) == 1:
            (folder / "00000-grid.png").write_bytes(b"the other run's grid")
            return 0
        return next_run_number(folder)

    monkeypatch.setattr(sample_files, "next_run_number", scanned_before_the_other_run_wrote)
    written = write_numbered(tmp_path, [("prompt0_seed0.png", image(1)), ("grid.png", image(2))])
    assert [p.name for p in written] == ["00001-prompt0_seed0.png", "00001-grid.png"]
    assert (tmp_path / "00000-grid.png").read_bytes() == b"the other run's grid"
    assert not (tmp_path / "00000-prompt0_seed0.png").exists()  # published before the clash, then taken back


def test_each_sampled_image_records_its_settings_as_the_webui_does(tiny_model, tmp_path):
    """Runs of several samplers and step counts in one folder were told apart only by their numbers: each image now
    carries its prompt and settings in the PNG text chunk the webui writes (its PNG Info tab reads it)."""
    from finetune.cli.main import main

    out = tmp_path / "samples"
    code = main(["sample", "--base", str(tiny_model), "--prompt", "a red circle --n blurry --d 42 --s 2 --ss k_euler_a --l 3", "--prompt", "a square",
                 "--steps", "1", "--seed", "3", "--num-images", "2", "--sampler", "unipc", "--out", str(out)])  # fmt: skip
    assert code == 0
    read = lambda name: Image.open(out / name).text.get("parameters")
    model = f"Model: {tiny_model.name}"  # the base by name, as the webui names its checkpoint
    assert read("00000-prompt0_seed43.png") == f"a red circle\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 3, Seed: 43, Size: 64x64, {model}"
    assert read("00000-prompt1_seed3.png") == f"a square\nSteps: 1, Sampler: UniPC, CFG scale: 7.5, Seed: 3, Size: 64x64, {model}"
    assert read("00000-grid.png") is None  # rows of several prompts: each image says its own


def test_an_images_sampler_is_written_by_the_name_the_webui_reads_back():
    """The webui's txt2img looks an image's Sampler up by its own labels and takes its default sampler (DPM++ 2M) for any
    other name: "Sampler: euler_a" sent from PNG Info drew with DPM++ 2M. Its "DPM++ 2M" alone is on Karras sigmas since
    webui 1.9 (hence the plain one's Uniform schedule), and it reads "DPM++ 2M Karras" as DPM++ 2M on Karras sigmas."""
    from finetune.sampling.sample_files import parameters_text
    from finetune.sampling.samplers import SAMPLER_NAMES

    webui = {"ddim": "DDIM", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M, Schedule type: Uniform",
             "dpmpp_2m_karras": "DPM++ 2M Karras", "unipc": "UniPC"}
    assert set(webui) == set(SAMPLER_NAMES)  # a sampler added here needs its webui name too
    for sampler, written in webui.items():
        text = parameters_text("a star", None, 20, sampler, 7.5, 0, 64, "finetune/assets/toyworld-base")
        assert text == f"a star\nSteps: 20, Sampler: {written}, CFG scale: 7.5, Seed: 0, Size: 64x64, Model: toyworld-base"


def test_an_images_settings_name_its_base_and_lora_without_the_folders_they_are_in(tiny_model, tmp_path, monkeypatch):
    """An image is what a creator shares: sampled with --lora /home/alice/outputs/striped/pytorch_lora_weights.safetensors, it
    carried "Lora: pytorch_lora_weights.safetensors", and `--lora .` inside the run "Lora: " (no name); nor did it name its base."""
    from finetune.cli.main import main
    from finetune.config import ModelConfig
    from finetune.models.loading import load_base_model
    from test_walkthrough_commands import trained_lora

    run = tmp_path / "home" / "alice" / "outputs" / "striped"
    (run / "checkpoints" / "checkpoint-200").mkdir(parents=True)
    for folder in (run, run / "checkpoints" / "checkpoint-200"):
        trained_lora(load_base_model(ModelConfig(pretrained=str(tiny_model))).unet, folder / "pytorch_lora_weights.safetensors", {})
    base = tmp_path / "home" / "alice" / "models" / "sd-tiny"
    base.parent.mkdir(parents=True)
    base.symlink_to(tiny_model)
    out = tmp_path / "samples"
    monkeypatch.chdir(run)
    for lora, named in ((run / "pytorch_lora_weights.safetensors", "striped"), (".", "striped"), ("checkpoints/checkpoint-200", "striped-step00000200")):
        assert main(["sample", "--base", str(base), "--lora", str(lora), "--lora-scale", "0.5", "--prompt", "a cat", "--steps", "1", "--out", str(out)]) == 0
        [image] = sorted(out.glob("*-prompt0_seed0.png"))[-1:]
        text = Image.open(image).text["parameters"]
        assert text.startswith(f"a cat <lora:{named}:0.5>\n") and text.endswith("Size: 64x64, Model: sd-tiny") and "alice" not in text, text


def test_an_images_lora_is_written_as_the_webui_writes_it_so_its_txt2img_applies_it(tiny_model, tmp_path):
    """The webui applies a LoRA named by `<lora:name:strength>` in the prompt; the "Lora: x, Lora strength: s" settings this
    wrote it ignores, so PNG Info's send-to-txt2img drew without the LoRA. A LoRA file sampled as the webui would hold it
    carries its `Lora hashes` too, the webui's hash of it (a run's LoRA none: export's file is another layout)."""
    import hashlib
    import shutil
    from finetune.cli.main import main
    from finetune.config import ModelConfig
    from finetune.models.loading import load_base_model
    from test_walkthrough_commands import trained_lora

    run = tmp_path / "striped"
    run.mkdir()
    trained_lora(load_base_model(ModelConfig(pretrained=str(tiny_model))).unet, run / "pytorch_lora_weights.safetensors", {})
    shared = tmp_path / "webui" / "models" / "Lora" / "striped-v2.safetensors"
    shared.parent.mkdir(parents=True)
    shutil.copy(run / "pytorch_lora_weights.safetensors", shared)
    data = shared.read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]  # sd-scripts': past the header
    out = tmp_path / "samples"
    for lora, settings in ((run, ""), (shared, f', Lora hashes: "striped-v2: {addnet}"')):
        args = ["sample", "--base", str(tiny_model), "--lora", str(lora), "--lora-scale", "0.8", "--prompt", "a cat --n blurry", "--steps", "1", "--num-images", "1"]
        assert main([*args, "--out", str(out)]) == 0
        [image] = sorted(out.glob("*-prompt0_seed0.png"))[-1:]
        name = "striped-v2" if settings else "striped"
        assert Image.open(image).text["parameters"] == (f"a cat <lora:{name}:0.8>\nNegative prompt: blurry\nSteps: 1, Sampler: DDIM, "
                                                        f"CFG scale: 7.5, Seed: 0, Size: 64x64, Model: {tiny_model.name}{settings}")


def test_the_webui_hash_of_a_lora_is_its_recorded_one_else_sd_scripts_hash_past_the_header(tmp_path):
    """The webui keys a .safetensors LoRA by the sshs_model_hash in its header where sd-scripts wrote one, else by the sha256
    of the file past its header: the whole file's sha256 would name no LoRA there."""
    import hashlib
    import torch
    from safetensors.torch import save_file
    from finetune.sampling.sample_files import webui_lora_hash

    plain, recorded = tmp_path / "plain.safetensors", tmp_path / "recorded.safetensors"
    save_file({"w": torch.arange(6.0)}, plain, {"ss_output_name": "plain"})
    save_file({"w": torch.arange(6.0)}, recorded, {"sshs_model_hash": "abcdef0123456789" * 4})
    data = plain.read_bytes()
    assert webui_lora_hash(plain) == hashlib.sha256(torch.arange(6.0).numpy().tobytes()).hexdigest()[:12]
    assert webui_lora_hash(plain) != hashlib.sha256(data).hexdigest()[:12]
    assert webui_lora_hash(recorded) == "abcdef012345"


def test_a_checkpoints_lora_is_named_in_an_images_settings_as_export_names_its_file(tmp_path):
    """A checkpoint's LoRA was `run@314` in an image's settings but `run-step00000314.safetensors` once exported for the webui:
    the name in the image found no file there. Both now come from one function."""
    from finetune.formats.lora_export import resolve_output_file
    from finetune.sampling.sample_files import lora_name

    for folder in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "checkpoint-314"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"")  # only its place is read
        exported = resolve_output_file(tmp_path / "webui" / "models" / "Lora", "kohya", folder / "pytorch_lora_weights.safetensors")
        assert lora_name(str(folder)) == exported.stem
    assert lora_name(str(tmp_path / "run" / "checkpoints" / "checkpoint-314")) == "run-step00000314"
