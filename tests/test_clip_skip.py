"""model.clip_skip, counted as the webui and sd-scripts count it: 2 trains on the text encoder's
layer before last. Training encodes prompts that way, the outputs record it, and sample, eval, merge,
export and the demo encode prompts the same way for that adapter (and only for it)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kohya_helpers import sd_scripts_round_trip
from test_quickstart import pasted_in_its_folder

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.cli.main import main
from finetune.demo import engine as demo_engine
from finetune.demo.engine import DemoEngine, Request
from finetune.errors import FinetuneError
from finetune.models.encoders import clip_skipped, encode_prompts, layer_stack, tokenize
from finetune.models.loading import load_base_model
from finetune.sampling.inference import load_sampling_pipeline
from finetune.training.trainer import train


def layer_count(text_encoder) -> int:
    return len(layer_stack(text_encoder).layers)


def test_clip_skip_2_is_diffusers_clip_skip_1_and_is_undone_after(make_recipe):
    base = load_base_model(make_recipe().model)
    prompts = ["a red circle", "a blue square on a gray background"]
    whole = encode_prompts(base.tokenizer, base.text_encoder, prompts)
    with clip_skipped(base.text_encoder, 2):
        skipped = encode_prompts(base.tokenizer, base.text_encoder, prompts)
    # What diffusers' encode_prompt(clip_skip=1) computes (it counts the layers skipped; with transformers 5
    # its own code fails, looking for text_model): the hidden states before the last layer, final norm applied.
    with torch.no_grad():
        hidden = base.text_encoder(tokenize(base.tokenizer, prompts), output_hidden_states=True).hidden_states
        theirs = getattr(base.text_encoder, "text_model", base.text_encoder).final_layer_norm(hidden[-2])
    assert torch.allclose(skipped, theirs, atol=1e-6) and not torch.allclose(skipped, whole, atol=1e-3)
    assert torch.equal(encode_prompts(base.tokenizer, base.text_encoder, prompts), whole)
    with pytest.raises(FinetuneError, match=r"model.clip_skip 9: this text encoder has \d+ layers; use 1 to \d+"):
        with clip_skipped(base.text_encoder, 9):
            pass


def test_a_lora_trained_with_clip_skip_records_it_and_is_sampled_with_it(tiny_model, make_recipe, tmp_path, monkeypatch, capsys):
    skipped = train(make_recipe(output_dir=str(tmp_path / "skip2"), model__clip_skip=2, lora__train_text_encoder=True, train__max_steps=2))
    plain = train(make_recipe(output_dir=str(tmp_path / "skip1"), lora__train_text_encoder=True, train__max_steps=2))
    assert skipped.losses[0] != plain.losses[0]  # the same draws, prompts encoded by another layer
    lora_file = skipped.output_dir / LORA_WEIGHTS_NAME
    with safe_open(str(lora_file), "pt") as f:
        assert f.metadata()["finetune.clip_skip"] == "2"
        last = layer_count(load_base_model(make_recipe().model).text_encoder) - 1
        assert not [k for k in f.keys() if f"layers.{last}." in k]  # the skipped layer has no LoRA
    whole = layer_count(load_sampling_pipeline(str(tiny_model), str(plain.output_dir)).text_encoder)

    # lora.init_from: another clip skip than the run's is one line; a file with LoRAs of the skipped layer
    # (as sd-scripts saves them) starts the layers the run keeps.
    continued = dict(model__clip_skip=2, lora__train_text_encoder=True, train__max_steps=1, output_dir=str(tmp_path / "continued"))
    with pytest.raises(FinetuneError, match=r"was trained with clip skip 1, this recipe's model.clip_skip is 2: set it to 1"):
        train(make_recipe(lora__init_from=str(plain.output_dir), **continued))
    with safe_open(str(plain.output_dir / LORA_WEIGHTS_NAME), "pt") as f:
        relabelled = {**f.metadata(), "finetune.clip_skip": "2"}
    save_file(load_file(plain.output_dir / LORA_WEIGHTS_NAME), tmp_path / "all-layers-skip2.safetensors", relabelled)
    assert train(make_recipe(lora__init_from=str(tmp_path / "all-layers-skip2.safetensors"), **continued)).final_step == 1
    assert layer_count(load_sampling_pipeline(str(tiny_model), str(skipped.output_dir)).text_encoder) == whole - 1

    # sd-scripts' layout keeps it both ways (ss_clip_skip), and its model card says how to sample with it.
    metadata, theirs = sd_scripts_round_trip(lora_file, tmp_path / "kohya")
    assert metadata["ss_clip_skip"] == "2" and theirs.metadata["finetune.clip_skip"] == "2"
    [card_path] = (tmp_path / "kohya").glob("*.md")
    assert "set *Clip skip* to 2 in the webui" in card_path.read_text()
    namespace: dict = {}  # the card's diffusers code, pasted, encodes prompts without the last layer
    exec(pasted_in_its_folder(card_path, tiny_model, monkeypatch), namespace)
    assert layer_count(namespace["pipeline"].text_encoder) == whole - 1

    # eval samples with it and its report says so.
    assert main(["eval", "--lora", str(lora_file), "--suite", "style", "--num-prompts", "1", "--steps", "1", "--out", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["settings"]["clip_skip"] == 2

    # A merge keeps it for sample and the demo.
    assert main(["merge", "--base", str(tiny_model), "--lora", str(lora_file), str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "finetune_metadata.json").read_text())["finetune.clip_skip"] == "2"
    assert layer_count(load_sampling_pipeline(str(tmp_path / "merged")).text_encoder) == whole - 1
    # export-base's fp16 copy keeps what was recorded.
    assert main(["export-base", str(tmp_path / "merged"), str(tmp_path / "fp16")]) == 0
    assert layer_count(load_sampling_pipeline(str(tmp_path / "fp16")).text_encoder) == whole - 1

    # The demo: the base column with every layer, the adapter's with its skip; adapters that disagree are refused.
    engine = DemoEngine(str(tiny_model), tmp_path)
    used = []
    real_generate = demo_engine.generate
    monkeypatch.setattr(demo_engine, "generate", lambda pipeline, *a, **k: used.append(layer_count(pipeline.text_encoder)) or real_generate(pipeline, *a, **k))
    engine.render(Request(prompt="a red circle", steps=1, loras=[("skip2", 1.0)]))
    assert used == [whole, whole - 1]
    with pytest.raises(FinetuneError, match=r"adapters trained with different clip_skip cannot be combined"):
        engine.render(Request(prompt="a red circle", steps=1, loras=[("skip2", 1.0), ("skip1", 1.0)]))
    # skip2 retrained with clip skip 1 while the demo runs: its new file is read with its new skip, unrescanned.
    with safe_open(str(lora_file), "pt") as f:
        retrained = {**f.metadata(), "finetune.clip_skip": "1"}
    save_file(load_file(lora_file), lora_file, retrained)
    used.clear()
    engine.render(Request(prompt="a red circle", steps=1, loras=[("skip2", 1.0)], include_base=False))
    assert used == [whole]


def test_a_full_fine_tune_with_clip_skip_saves_a_whole_text_encoder_and_samples_with_its_skip(tiny_model, make_recipe, tmp_path, monkeypatch):
    result = train(make_recipe(method="full", model__clip_skip=2, train__max_steps=1))  # fp32: the text encoder is not reloaded for its precision
    pipeline_dir = result.output_dir / "pipeline"
    saved = load_file(next((pipeline_dir / "text_encoder").glob("*.safetensors")))
    original = load_file(next((tiny_model / "text_encoder").glob("*.safetensors")))
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k].float()) for k in original)
    assert json.loads((pipeline_dir / "finetune_metadata.json").read_text())["finetune.clip_skip"] == "2"
    whole = layer_count(load_base_model(make_recipe().model).text_encoder)
    assert layer_count(load_sampling_pipeline(str(pipeline_dir)).text_encoder) == whole - 1
    # The demo with that pipeline as its base: the base column too.
    used = []
    real_generate = demo_engine.generate
    monkeypatch.setattr(demo_engine, "generate", lambda pipeline, *a, **k: used.append(layer_count(pipeline.text_encoder)) or real_generate(pipeline, *a, **k))
    DemoEngine(str(pipeline_dir), tmp_path / "no-adapters").render(Request(prompt="a red circle", steps=1))
    assert used == [whole - 1]


def test_training_the_whole_text_encoder_with_clip_skip_is_refused(make_recipe):
    with pytest.raises(FinetuneError, match=r"model.clip_skip above 1 leaves the text encoder's last layers out: train it with a LoRA"):
        make_recipe(method="full", model__clip_skip=2, full__train_text_encoder=True)


def test_a_clip_skip_past_the_text_encoders_layers_is_refused_as_the_base_is_located(tiny_model):
    """It was refused once the base had loaded, after the data check: the base's text encoder config says its layers."""
    from finetune.config import ModelConfig
    from finetune.models.model_source import locate_base

    layers = json.loads((tiny_model / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    with pytest.raises(FinetuneError, match=rf"^model.clip_skip {layers + 1}: this text encoder has {layers} layers; use 1 to {layers}$"):
        locate_base(ModelConfig(pretrained=str(tiny_model), clip_skip=layers + 1))
    assert locate_base(ModelConfig(pretrained=str(tiny_model), clip_skip=layers)).folder == tiny_model
