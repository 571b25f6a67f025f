"""`finetune train` draws no transformers bar for loading or writing the text encoder: every process of a
launch drew 'Loading weights' at once (two bars on one line), and a save mid-run drew 'Writing model
shards' into the training bar's line (with a cursor-up escape). The hub's download bars stay."""

import yaml
from huggingface_hub.utils import are_progress_bars_disabled
from transformers.utils import logging as transformers_logging

from finetune.cli import main


def test_train_draws_no_bar_for_the_text_encoders_weights(make_recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(transformers_logging, "_tqdm_active", transformers_logging.is_progress_bar_enabled())  # given back after
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(train__max_steps=1).model_dump(mode="json")))
    assert not are_progress_bars_disabled()
    assert main(["train", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "training: 100%" in err  # the run's own bar
    assert "Loading weights" not in err and not transformers_logging.is_progress_bar_enabled()
    assert not are_progress_bars_disabled()  # downloads of a hub model still show theirs
