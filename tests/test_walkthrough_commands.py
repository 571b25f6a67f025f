"""Walkthrough of the commands run after training (sample, eval, merge, export-checkpoint): options that did
nothing, or did something else than asked, without a word."""

import pytest

from finetune.cli.main import main


def trained_lora(unet, path, metadata: dict[str, str]):
    """A LoRA file on `unet`'s attention with non-zero up weights (as training leaves them) and the given record."""
    import torch

    from finetune.config import LoRAConfig
    from finetune.methods.lora import add_lora, save_lora

    add_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], torch.float32, LoRAConfig(rank=4, alpha=4.0))
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)) * 0.1
    return save_lora({"unet": unet}, path, metadata)


def refuse_to_sample(*args, **kwargs):
    raise AssertionError("sampled: the options should have been refused before any model loads")


def test_a_lora_scale_without_a_lora_is_refused_before_sampling(tmp_path, monkeypatch, capsys):
    """sample --lora-scale 0.5 without --lora sampled the base model at no strength at all, and said nothing (eval refused it)."""
    monkeypatch.setattr("finetune.sampling.inference.sample_to_folder", refuse_to_sample)
    argv = ["sample", "--base", "finetune/assets/toyworld-base", "--lora-scale", "0.5", "--prompt", "a star", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "--lora-scale is the LoRA's strength: pass --lora too, or leave it out" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_merged_v_prediction_lora_exported_as_one_file_samples_as_its_folder_does(tmp_path, capsys):
    """merge wrote the v-prediction LoRA's target into the merged pipeline's scheduler but not into its record, which
    is all export-checkpoint's file keeps of it: sampled from that file with the base's configs (--base-config, as for
    any single file), it predicted noise where the UNet predicts v, and drew noise."""
    import copy

    import numpy as np
    from PIL import Image
    from test_single_file import sd15_shaped_pipeline

    pipeline = sd15_shaped_pipeline(tmp_path)
    configs = tmp_path / "base"
    pipeline.save_pretrained(configs)
    lora = trained_lora(copy.deepcopy(pipeline.unet), tmp_path / "lora.safetensors", {"finetune.prediction_type": "v_prediction"})
    merged, single_file = tmp_path / "merged", tmp_path / "merged.safetensors"
    assert main(["merge", "--base", str(configs), "--lora", str(lora), str(merged)]) == 0
    assert main(["export-checkpoint", str(merged), str(single_file)]) == 0

    def sample(*base):
        out = tmp_path / f"samples-{len(list(tmp_path.glob('samples-*')))}"
        argv = ["sample", *base, "--prompt", "a red circle", "--num-images", "1", "--steps", "2", "--out", str(out)]
        assert main(argv) == 0, capsys.readouterr().err
        return np.asarray(Image.open(out / "00000-prompt0_seed0.png")).astype(int)

    from_folder = sample("--base", str(merged))
    from_file = sample("--base", str(single_file), "--base-config", str(configs))
    # Equal with 2 or more CPU threads; with one (an earlier test's torch.set_num_threads(1), or OMP_NUM_THREADS=1)
    # a level apart (the file's and the folder's loading paths differ in rounding there). A wrong prediction
    # type or a dropped LoRA changes the image far more than a couple of levels.
    assert np.abs(from_file - from_folder).max() <= 2, np.abs(from_file - from_folder).max()


@pytest.mark.parametrize("options, said", [
    (["--negative-prompt", "blurry", "--guidance", "1"], "negative prompts act through classifier-free guidance, which is off at guidance 1 (1 or below)"),
    (["--guidance", "0.5"], "guidance 0.5 samples as guidance 1 does (classifier-free guidance runs only above 1)"),
    (["--guidance", "7", "--prompt", "a star --n blurry --l 0.5"], "which is off at guidance 0.5 (1 or below)"),
])  # fmt: skip
def test_guidance_that_leaves_an_option_unused_says_so(options, said, tmp_path, monkeypatch, capsys):
    """At guidance 1 or below diffusers runs no classifier-free guidance: a negative prompt changed nothing, and guidance
    0.5 drew what guidance 1 draws (as 0 does), with no word of either."""
    from finetune.sampling import inference

    monkeypatch.setattr(inference, "load_sampling_pipeline", refuse_to_sample)
    argv = ["sample", "--base", "finetune/assets/toyworld-base", "--prompt", "a star", *options, "--out", str(tmp_path / "out")]
    with pytest.raises(AssertionError, match="sampled"):  # the notes come before the model loads
        main(argv)
    out = capsys.readouterr().out
    assert out.startswith("note: ") and said in out


@pytest.mark.parametrize("options", [["--guidance", "0"], ["--guidance", "1"], ["--guidance", "1.5", "--negative-prompt", "blurry"]])
def test_guidance_that_uses_every_option_given_says_nothing_of_it(options, tmp_path, monkeypatch, capsys):
    from finetune.sampling import inference

    monkeypatch.setattr(inference, "load_sampling_pipeline", refuse_to_sample)
    with pytest.raises(AssertionError, match="sampled"):
        main(["sample", "--base", "finetune/assets/toyworld-base", "--prompt", "a star", *options, "--out", str(tmp_path / "out")])
    assert "guidance" not in capsys.readouterr().out


def test_eval_says_a_guidance_below_1_samples_as_1(monkeypatch, capsys):
    monkeypatch.setattr("finetune.evaluation.evaluate.run_eval", refuse_to_sample)  # eval_command imports it when eval runs
    with pytest.raises(AssertionError, match="sampled"):
        main(["eval", "--base", "finetune/assets/toyworld-base", "--guidance", "0.5"])
    assert "note: guidance 0.5 samples as guidance 1 does" in capsys.readouterr().out


@pytest.mark.parametrize("options, said", [
    (["--identifier", "zwx"], "--identifier writes the prompts of the subject suite, which this eval does not run: add --suite subject, or leave it out"),
    (["--class-word", "dog", "--suite", "style"], "--class-word writes the prompts of the subject and drift suites"),
    (["--subject", "circle"], "add --suite subject and --suite drift, or leave it out"),
    (["--identifier", "zwx", "--suite", "drift"], "--identifier writes the prompts of the subject suite"),
])  # fmt: skip
def test_eval_refuses_subject_options_no_suite_it_runs_reads(options, said, monkeypatch, capsys):
    """eval --lora dreambooth --identifier zwx scored the default suites (adherence and fid), whose prompts have no
    identifier, and said nothing: the DreamBooth subject looked scored."""
    monkeypatch.setattr("finetune.evaluation.evaluate.run_eval", refuse_to_sample)  # eval_command imports it when eval runs
    assert main(["eval", "--base", "finetune/assets/toyworld-base", *options]) == 2
    assert said in capsys.readouterr().err


def test_eval_takes_subject_options_with_a_suite_that_reads_them(monkeypatch):
    monkeypatch.setattr("finetune.evaluation.evaluate.run_eval", refuse_to_sample)  # eval_command imports it when eval runs
    with pytest.raises(AssertionError, match="sampled"):
        main(["eval", "--base", "finetune/assets/toyworld-base", "--suite", "drift", "--class-word", "dog", "--subject", "circle"])


def test_eval_writes_its_report_only_to_a_json_file_name(tmp_path, monkeypatch, capsys):
    """eval --out LORA.safetensors (or a grid, or the run's recipe.yaml) wrote the JSON report over that file after
    making every image: the LoRA was gone."""
    monkeypatch.setattr("finetune.evaluation.evaluate.run_eval", refuse_to_sample)  # eval_command imports it when eval runs
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"weights")
    assert main(["eval", "--base", "finetune/assets/toyworld-base", "--out", str(lora)]) == 2
    assert f"--out {lora} is not a .json file name: give the report's, e.g. {tmp_path / 'pytorch_lora_weights.json'}" in capsys.readouterr().err
    assert lora.read_bytes() == b"weights"


def test_merging_loras_one_by_one_keeps_what_the_first_was_trained_with_and_refuses_what_disagrees(tiny_model, tmp_path, monkeypatch, capsys):
    """Merging a second LoRA into a first one's merge (as --lora given twice tells) recorded only the second's clip skip:
    one that records none (a file from elsewhere) left the pipeline sampled at clip skip 1 where the first LoRA needs 2,
    and one trained at 1 was merged in silently, a combination sample refuses."""
    from diffusers import UNet2DConditionModel

    from finetune.evaluation.evaluate import sampled_as
    from finetune.sampling.inference import load_sampling_pipeline

    def lora(name, metadata):
        return str(trained_lora(UNet2DConditionModel.from_pretrained(tiny_model / "unet"), tmp_path / name, metadata))

    first, elsewhere, at_one = lora("a.safetensors", {"finetune.clip_skip": "2"}), lora("b.safetensors", {}), lora("c.safetensors", {"finetune.clip_skip": "1"})
    assert main(["merge", "--base", str(tiny_model), "--lora", first, str(tmp_path / "a")]) == 0
    assert main(["merge", "--base", str(tmp_path / "a"), "--lora", elsewhere, str(tmp_path / "ab")]) == 0
    assert sampled_as(load_sampling_pipeline(str(tmp_path / "ab")))["clip_skip"] == 2

    monkeypatch.setattr("finetune.formats.merge.load_base_model", refuse_to_sample)
    capsys.readouterr()
    assert main(["merge", "--base", str(tmp_path / "a"), "--lora", at_one, str(tmp_path / "ac")]) == 2
    assert "adapters trained with different clip_skip cannot be combined" in capsys.readouterr().err
    assert not (tmp_path / "ac").exists()


def test_an_eval_of_a_lora_with_a_controlnet_records_the_steps_of_both(tmp_path, capsys):
    """With --lora and --controlnet the report and its title gave the LoRA's steps alone, as "trained 7 steps": reports of
    one LoRA beside several ControlNet checkpoints could not be told apart."""
    import json

    from diffusers import UNet2DConditionModel

    base, controlnet = "finetune/assets/toyworld-base", "finetune/assets/toyworld-controlnet-mask"
    lora = trained_lora(UNet2DConditionModel.from_pretrained(f"{base}/unet"), tmp_path / "lora.safetensors", {"finetune.steps": "7"})
    out = tmp_path / "eval.json"
    argv = ["eval", "--base", base, "--lora", str(lora), "--controlnet", controlnet, "--suite", "control", "--num-prompts", "2", "--steps", "1", "--out", str(out)]
    assert main(argv) == 0
    settings = json.loads(out.read_text())["settings"]
    controlnet_steps = json.loads(open(f"{controlnet}/finetune_metadata.json").read())["finetune.steps"]
    assert (settings["adapter_steps"], settings["controlnet_steps"]) == ("7", controlnet_steps)
    assert f"(LoRA trained 7 steps, ControlNet {controlnet_steps})" in capsys.readouterr().out


def test_a_lora_given_again_with_its_own_merge_as_the_base_is_said_to_be_added_twice(tiny_model, tmp_path, capsys):
    """sample --base MERGED --lora LORA (the habit of sampling a LoRA on its base) added the LoRA a second time on top
    of its merge, at twice the strength, without a word; merging it into its own merge again likewise. Its kohya
    export in fp16 is the same LoRA."""
    from diffusers import UNet2DConditionModel

    from finetune.formats.lora_export import export_lora

    lora = trained_lora(UNet2DConditionModel.from_pretrained(tiny_model / "unet"), tmp_path / "lora.safetensors", {})
    other = trained_lora(UNet2DConditionModel.from_pretrained(tiny_model / "unet"), tmp_path / "other.safetensors", {})
    export_lora(lora, tmp_path / "webui" / "lora.safetensors", "kohya", precision="fp16")
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_model), "--lora", str(lora), "--strength", "0.8", str(merged)]) == 0
    capsys.readouterr()
    sample = ["sample", "--base", str(merged), "--prompt", "a star", "--num-images", "1", "--steps", "1"]
    assert main([*sample, "--lora", str(tmp_path / "webui" / "lora.safetensors"), "--out", str(tmp_path / "s1")]) == 0
    said = f"note: --base {merged}: this LoRA is already merged into that base (from {lora} at strength 0.8); it is added again on top at 1"
    assert said in capsys.readouterr().out
    assert main(["merge", "--base", str(merged), "--lora", str(lora), str(tmp_path / "twice")]) == 0
    assert "this LoRA is already merged into that base" in capsys.readouterr().out
    # Another LoRA (other weights) on the merge, or the LoRA on the plain base, is what it seems.
    assert main([*sample, "--lora", str(other), "--out", str(tmp_path / "s2")]) == 0
    assert main(["sample", *sample[1:2], str(tiny_model), *sample[3:], "--lora", str(lora), "--out", str(tmp_path / "s3")]) == 0
    assert "already merged" not in capsys.readouterr().out


def test_sample_help_says_every_options_default_and_what_the_negative_prompt_needs(capsys):
    """sample --help gave no default for --num-images, --seed, --steps or --guidance, and --negative-prompt and --seed had no
    help at all (eval's help gave every default)."""
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help: compare it as one line
    for said in ("(default 4;", "seed of each prompt's first image (default 0)", "sampling steps (default 25)", "(default ddim;", "(default 7.5; 1 or below: none)",
                 "acts only at --guidance above 1"):  # fmt: skip
        assert said in text


def test_an_eval_of_a_fine_tuned_pipeline_records_its_training_steps(tiny_model, tmp_path, capsys):
    """A LoRA's report recorded the steps it scored; a full fine-tune's pipeline scored as --base (its report goes in
    its run folder, where a resumed run trains on) recorded none."""
    import json
    import shutil

    from finetune.checkpoints.run_files import METADATA_FILE

    pipeline = tmp_path / "run" / "pipeline"
    shutil.copytree(tiny_model, pipeline)
    (pipeline / METADATA_FILE).write_text(json.dumps({"finetune.method": "full", "finetune.steps": "12"}))
    out = tmp_path / "eval.json"
    assert main(["eval", "--base", str(pipeline), "--suite", "adherence", "--num-prompts", "2", "--steps", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["base_steps"] == "12"
    assert f"eval of {pipeline} (trained 12 steps)" in capsys.readouterr().out


def test_eval_names_no_other_base_when_the_recorded_one_is_found_from_the_adapter(tiny_model, tmp_path, monkeypatch):
    # A run records model.pretrained as it was given (models/base, from the project folder). Scored from another
    # folder with --base naming that same base, the report was eval-style-on-base.json, as if scored on another base:
    # the recorded path was compared from the current folder, where sample (without --base) looks from the adapter's.
    from diffusers import UNet2DConditionModel

    (tmp_path / "project" / "models").mkdir(parents=True)
    (tmp_path / "project" / "models" / "base").symlink_to(tiny_model)
    run = tmp_path / "project" / "outputs" / "run"
    trained_lora(UNet2DConditionModel.from_pretrained(tiny_model / "unet"), run / "pytorch_lora_weights.safetensors", {"finetune.base_model": "models/base"})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    reports = []
    monkeypatch.setattr("finetune.evaluation.evaluate.run_eval", lambda *args, out, **kwargs: reports.append(out) or refuse_to_sample())
    for base in (tmp_path / "project" / "models" / "base", tiny_model):  # the recorded base by another path, then the same model's folder
        with pytest.raises(AssertionError, match="sampled"):
            main(["eval", "--base", str(base), "--lora", str(run), "--suite", "style"])
    assert reports == [run / "eval-style.json", run / "eval-style.json"]
