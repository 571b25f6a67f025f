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


def test_demo_calls_only_dreambooth_pipelines_dreambooth_pipelines():
    # Every folder with a model_index.json was listed as a "DreamBooth pipeline": a full fine-tune, a VAE
    # pretraining run and a `finetune merge` output too, beside a method column saying otherwise.
    from types import SimpleNamespace

    from finetune.demo import table_row

    def kind(method: str) -> str:
        metadata = {"finetune.method": method, "finetune.base_model": "finetune/assets/toyworld-base", "finetune.steps": "6"}
        return table_row(SimpleNamespace(name="run", kind="pipeline", layout=None, metadata=metadata, refused=None))[1]

    assert kind("dreambooth") == "DreamBooth pipeline"
    assert kind("full") == kind("vae") == kind("lora merged at 0.8") == "pipeline"
