"""Per-prompt options (sd-scripts' --n --d --l --s): parsed, refused when unknown, and reaching the
validation samples and `finetune sample`."""

import pytest

from finetune.cli.main import main
from finetune.errors import FinetuneError
import finetune.sampling.pipelines as sampling
from finetune.sampling.prompt_options import PromptSettings, with_options
from finetune.training.trainer import train

DEFAULTS = PromptSettings("", "lowres", 0, 7.5, 25)


def test_options_replace_the_defaults_they_name():
    assert with_options("a dog on a beach", DEFAULTS) == PromptSettings("a dog on a beach", "lowres", 0, 7.5, 25)
    assert with_options("a dog, sunny --n blurry, dark --d 7 --l 5.5 --s 30", DEFAULTS) == PromptSettings("a dog, sunny", "blurry, dark", 7, 5.5, 30)
    assert with_options("a dog --d 3", DEFAULTS) == PromptSettings("a dog", "lowres", 3, 7.5, 25)
    assert with_options("a dog--d", DEFAULTS).prompt == "a dog--d"  # an option starts after a space, as in sd-scripts' files
    # sd-scripts' lines paste as they are: letters in any case, its sizes accepted and ignored, its sampler read.
    pasted = "masterpiece, 1girl --N lowres --W 512 --h 768 --D 12 --ss euler_a --s 28"
    assert with_options(pasted, DEFAULTS) == PromptSettings("masterpiece, 1girl", "lowres", 12, 7.5, 28, "euler_a")
    assert with_options("--n blurry", DEFAULTS) == PromptSettings("", "blurry", 0, 7.5, 25)  # only options: the empty prompt


@pytest.mark.parametrize(
    "text, message",
    [
        ("a dog --x 1", r"unknown option --x \(' --' starts an option\); the options are --n \(negative prompt\), --d \(seed\), --l \(guidance scale\), --s \(steps\), --ss \(sampler\)"),
        ("a cat -- sitting", r"unknown option --sitting \(' --' starts an option\)"),
        ("a dog --d seven", r"--d needs a seed, got 'seven'"),
        ("a dog --s 0", r"--s 0 is out of range \(1 to 999\)"),
        ("a dog --d 99999999999999999999999", r"--d 99999999999999999999999 is out of range \(0 to 9223372036854775807\)"),
        ("a dog --l nan", r"--l nan is out of range \(a finite number\)"),
        ("a dog --ss heun", r"--ss needs a sampler \(ddim, euler or k_euler, euler_a or k_euler_a or \"Euler a\", dpmpp_2m or dpmsolver\+\+ or \"DPM\+\+ 2M Uniform\", "
         r"dpmpp_2m_karras or \"DPM\+\+ 2M Karras\" or \"DPM\+\+ 2M\", unipc\), got 'heun'"),
    ],
)
def test_unknown_options_and_bad_values_are_refused_in_one_line(make_recipe, text, message):
    with pytest.raises(ValueError, match=message):
        with_options(text, DEFAULTS)
    with pytest.raises(FinetuneError, match=r"key 'validation.prompts'.*" + message):
        make_recipe(validation__prompts=[text])


def test_validation_samples_each_prompt_with_its_options(make_recipe, monkeypatch, tmp_path):
    calls, real = [], sampling.generate
    monkeypatch.setattr(sampling, "generate", lambda pipeline, prompts, *args, **kwargs: calls.append((prompts, *args)) or real(pipeline, prompts, *args, **kwargs))
    prompts = ["a red circle --n blurry --d 7 --l 3 --s 2", "a blue square", "a green star --d 9"]
    recipe = make_recipe(
        train__max_steps=1, validation__prompts=prompts, validation__at_start=False, validation__images_per_prompt=1,
        validation__num_inference_steps=3, validation__negative_prompt="dark", validation__seed=5, validation__guidance_scale=6.0,
    )  # fmt: skip
    train(recipe)
    # Prompts of the same steps and guidance are one batch, each with its own seed and negative prompt.
    assert calls == [(["a red circle"], 1, [7], 2, 3.0, 64, ["blurry"], None), (["a blue square", "a green star"], 1, [5, 9], 3, 6.0, 64, ["dark", "dark"], None)]
    assert (tmp_path / "run" / "samples" / "step-000001.png").is_file()


def test_sample_takes_options_in_a_prompt_and_names_files_by_the_seed_used(tiny_model, tmp_path, capsys):
    out = tmp_path / "samples"
    code = main(["sample", "--base", str(tiny_model), "--prompt", "a red circle --d 42 --s 1", "--prompt", "a square", "--steps", "1",
                 "--seed", "3", "--num-images", "1", "--out", str(out)])  # fmt: skip
    assert code == 0 and {p.name for p in out.glob("*.png")} == {"00000-prompt0_seed42.png", "00000-prompt1_seed3.png", "00000-grid.png"}
    capsys.readouterr()
    assert main(["sample", "--base", str(tmp_path / "missing"), "--prompt", "x --q 1", "--out", str(out)]) == 2
    assert "--prompt 'x --q 1': unknown option --q" in capsys.readouterr().err  # before the (missing) base is looked for
