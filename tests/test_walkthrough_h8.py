"""What a new user meets running the README's and docs' commands as written (walkthrough h8)."""

from __future__ import annotations

from finetune.evaluate import print_table


def test_eval_table_names_the_models_scored_in_whole_paths(capsys):
    # The title was the rich table's, wrapped to the width of a three-column table: the paths of the base
    # and the LoRA came out split mid-word, neither readable nor copyable.
    result = {
        "settings": {"base": "finetune/assets/toyworld-base", "lora": "outputs/quickstart"},
        "metrics": {"style_share": 0.25},
        "n": {"style_share": 4},
    }
    print_table(result)
    out = capsys.readouterr().out
    assert "eval of finetune/assets/toyworld-base + outputs/quickstart" in out
    assert "style_share" in out and "0.250" in out
