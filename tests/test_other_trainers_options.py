"""Another trainer's option given to `finetune train` that no single override gives (sd-scripts' --v2, --logging_dir,
--optimizer_args): told 'recipe keys are given as key=value after the recipe (train.max_steps=100)', as if no key were
known, where a recipe holding the same name is told what it is here (recipe_keys.OTHER_TRAINERS_NAMES)."""

import pytest

from finetune.cli.arguments import parse_arguments


@pytest.mark.parametrize("options,said", [
    (["--v2"], "--v2 needs no setting here: an SD2.x base is known from its configs (model.pretrained); leave it out"),
    (["--logging_dir", "logs"], "--logging_dir: here it is output_dir's logs/, where every run logs"),
    (["--optimizer_args", "weight_decay=0.1"], "--optimizer_args: here it is optimizer.weight_decay, optimizer.betas and optimizer.eps"),
    # beside an option that has its override: both said, in one line
    (["--max_train_steps", "10", "--v2"], "recipe keys are given as key=value after the recipe: train.max_steps=10; --v2 needs no setting here: "
                                          "an SD2.x base is known from its configs (model.pretrained); leave it out"),
])  # fmt: skip
def test_an_option_no_override_gives_is_told_what_it_is_here(options, said, capsys):
    with pytest.raises(SystemExit):
        parse_arguments(["train", "recipes/lora.yaml", *options])
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"{' '.join(options)}: {said}")


def test_an_option_of_no_trainer_keeps_the_generic_advice(capsys):
    with pytest.raises(SystemExit):
        parse_arguments(["train", "recipes/lora.yaml", "--bogus", "3"])
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "--bogus 3: recipe keys are given as key=value after the recipe (train.max_steps=100); -h lists the command's options")
