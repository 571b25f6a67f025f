"""How `finetune train` ends: each output named once. The trainer said 'saved PATH' for every output and the
command then 'output: PATH' for the same files, two lines apart."""

import yaml

from finetune.cli.main import main


def test_train_names_each_output_once(make_recipe, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(train__max_steps=1).model_dump(mode="json")))
    assert main(["train", str(recipe)]) == 0
    lines = capsys.readouterr().out.splitlines()
    adapter = tmp_path / "run" / "pytorch_lora_weights.safetensors"
    assert [line for line in lines if str(adapter) in line] == [f"output: {adapter}"]
