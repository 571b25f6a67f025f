"""The command's arguments as the parser reads them (finetune/cli/arguments.py): recipe overrides after the options,
a recipe setting given as an option answered with the override it means, a strength of nan refused, a second --lora
refused."""

import pytest

from finetune.cli.main import main


def test_overrides_may_follow_the_options_and_anything_else_is_still_refused(capsys):
    from finetune.cli.arguments import parse_arguments

    args = parse_arguments(["train", "recipes/lora.yaml", "data.image_dir=a", "--resume", "latest", "train.max_steps=5", "--overwrite", "lora.rank=4"])
    assert args.overrides == ["data.image_dir=a", "train.max_steps=5", "lora.rank=4"] and args.resume == "latest" and args.overwrite
    with pytest.raises(SystemExit):
        parse_arguments(["train", "recipes/lora.yaml", "--resume", "latest", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_arguments(["sample", "--base", "b", "--prompt", "p", "a=b"])  # no overrides there


def test_a_setting_given_as_an_option_gets_the_override_it_means(capsys):
    """diffusers' scripts take --max_train_steps 100: said by the command's own parser (not `finetune [-h] COMMAND`), with
    the key=value that means it, its value kept; an option that names no key is told how overrides are written."""
    from finetune.cli.arguments import parse_arguments

    cases = {("train", "recipes/lora.yaml", "--max_train_steps", "100"): "finetune train: error: unrecognized arguments: --max_train_steps 100: "
                                                                         "recipe keys are given as key=value after the recipe: train.max_steps=100",
             ("check-data", "recipes/lora.yaml", "--learning-rate=1e-4"): "finetune check-data: error: unrecognized arguments: --learning-rate=1e-4: "
                                                                          "recipe keys are given as key=value after the recipe: optimizer.lr=1e-4",
             ("train", "recipes/lora.yaml", "--seed", "3"): "finetune train: error: unrecognized arguments: --seed 3: "
                                                            "recipe keys are given as key=value after the recipe: seed=3",
             # a key inside a list's entry (diffusers' train_dreambooth.py option): a traceback (KeyError: '0') before
             ("train", "recipes/dreambooth.yaml", "--instance_data_dir", "dog"): "finetune train: error: unrecognized arguments: --instance_data_dir dog: "
                                                                              "recipe keys are given as key=value after the recipe: dreambooth.concepts.0.instance_dir=dog",
             ("train", "recipes/lora.yaml", "--every_n_steps=5"): "finetune train: error: unrecognized arguments: --every_n_steps=5: recipe keys are "
                                                                  "given as key=value after the recipe (train.max_steps=100); -h lists the command's options"}  # fmt: skip
    for argv, said in cases.items():
        with pytest.raises(SystemExit):
            parse_arguments(list(argv))
        assert capsys.readouterr().err.splitlines()[-1] == said


def test_a_switch_given_as_an_option_gets_the_override_that_sets_it(capsys):
    """diffusers' scripts' store_true flags take no value: --gradient_checkpointing was told train.gradient_checkpointing=VALUE
    (and with an override after it, that override as its value), --use_8bit_adam and --train_text_encoder only how overrides
    are written. The recipe's method picks the section of a key several have."""
    from finetune.cli.arguments import parse_arguments

    advice = "recipe keys are given as key=value after the recipe: "
    cases = {("train", "recipes/lora.yaml", "--gradient_checkpointing"): advice + "train.gradient_checkpointing=true",
             ("train", "recipes/lora.yaml", "--gradient_checkpointing", "train.max_steps=3"): advice + "train.gradient_checkpointing=true",
             ("train", "recipes/lora.yaml", "--gradient_checkpointing=false"): advice + "train.gradient_checkpointing=false",
             ("train", "recipes/dreambooth_lora.yaml", "--use_8bit_adam"): advice + "optimizer.name=adamw8bit",
             ("train", "recipes/lora.yaml", "--train_text_encoder"): advice + "lora.train_text_encoder=true train.cache_text_embeddings=false",
             ("train", "recipes/dreambooth.yaml", "--train_text_encoder"): advice + "dreambooth.train_text_encoder=true train.cache_text_embeddings=false",
             ("train", "recipes/lora.yaml", "method=full", "--train_text_encoder"): advice + "full.train_text_encoder=true train.cache_text_embeddings=false",
             ("train", "recipes/dreambooth.yaml", "--with_prior_preservation"): advice + "dreambooth.prior_preservation=true",
             ("train", "recipes/lora.yaml", "--use_ema"): advice + "train.ema_decay=0.999",  # diffusers' switch: a decay here
             ("train", "recipes/lora.yaml", "--enable_xformers_memory_efficient_attention"):
                 "finetune's attention already runs through PyTorch's scaled-dot-product attention (SDPA), which does what xformers did: "
                 "leave the option out"}  # fmt: skip
    for argv, said in cases.items():
        with pytest.raises(SystemExit):
            parse_arguments(list(argv))
        assert capsys.readouterr().err.splitlines()[-1].endswith(f": {said}"), argv


def test_sd_scripts_options_get_their_override_with_the_choice_spelled_as_here(capsys):
    """sd-scripts' --optimizer_type AdamW8bit was told optimizer.name=AdamW8bit, which the recipe then refused."""
    from finetune.cli.arguments import parse_arguments

    with pytest.raises(SystemExit):
        parse_arguments(["train", "recipes/lora.yaml", "--optimizer_type", "AdamW8bit", "--loss_type", "l2", "--ip_noise_gamma", "0.1"])
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        ": recipe keys are given as key=value after the recipe: optimizer.name=adamw8bit train.loss=mse train.input_perturbation=0.1")


@pytest.mark.parametrize("command", [["sample", "--prompt", "x", "--lora-scale"], ["sample", "--prompt", "x", "--guidance"], ["merge", "out", "--strength"],
                                     ["eval", "--conditioning-scale"]])
def test_a_strength_or_guidance_of_nan_is_refused(command, capsys):
    """float() reads 'nan' and 'inf': sample drew black images, merge wrote a pipeline of nan weights."""
    for value in ("nan", "inf"):
        with pytest.raises(SystemExit):
            main([*command, value])
        assert f"error: argument {command[-1]}: expected a finite number, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["sample", "--prompt", "x"], ["merge", "out"], ["eval"]])
def test_a_second_lora_is_refused_not_dropped(command, capsys):
    """argparse kept the last of two --lora silently: a merge of 'two' LoRAs held one."""
    with pytest.raises(SystemExit):
        main([*command, "--lora", "a.safetensors", "--lora", "b.safetensors"])
    assert capsys.readouterr().err.strip().endswith("error: --lora is given twice: these commands take one LoRA (the demo applies several together; "
                                                    "to merge several, merge one, then merge the next into that output given as --base)")


def test_several_lora_strengths_in_sample_say_where_strengths_are_compared(capsys):
    """`sample --lora-scale 1,0.5` (the demo's strengths field takes that) was argparse's bare "invalid finite_float value"."""
    for value in ("1,0.5", "0.5;1"):
        with pytest.raises(SystemExit):
            main(["sample", "--prompt", "x", "--lora", "a.safetensors", "--lora-scale", value])
        error = capsys.readouterr().err.strip().splitlines()
        assert error[-1].endswith(f"error: argument --lora-scale: takes one strength, got '{value}': run sample once per strength (each run is "
                                  "numbered apart in --out, and each image's settings name its strength), or compare them side by side in "
                                  "finetune demo, whose strengths field takes 1, 0.5"), error


def test_several_lora_strengths_in_eval_say_to_score_each_strength_apart(capsys):
    """`eval --lora-scale 1,0.5` (sample refuses it in one line) was argparse's bare "expected a number, got '1,0.5'"."""
    for value in ("1,0.5", "0.5;1"):
        with pytest.raises(SystemExit):
            main(["eval", "--lora", "a.safetensors", "--lora-scale", value])
        error = capsys.readouterr().err.strip().splitlines()
        assert error[-1].endswith(f"error: argument --lora-scale: takes one strength, got '{value}': run eval once per strength (without "
                                  "--out each report is named by its strength, e.g. eval-adherence-fid-strength0.5.json, and none "
                                  "replaces another)"), error
