"""Long captions and prompts (model.max_token_length): chunks of 75 tokens laid out as sd-scripts lays
them out, words past CLIP's 77 tokens reaching training and sampling, the text cache keyed by the
chunking, and the setting recorded where sd-scripts records it."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer
from conftest import SHIPPED_BASE

from finetune.config import ModelConfig
from finetune.data.cache import caption_key
from finetune.formats.kohya import to_kohya
from finetune.formats.kohya_metadata import finetune_metadata_from_kohya
from finetune.models.encoders import chunks_needed, text_hidden_states, token_chunks
from finetune.models.loading import load_base_model
from finetune.sampling.pipelines import build_pipeline, generate, prompt_arguments
from finetune.training.trainer import train

LONG = ", ".join(["red circle", "blue square", "green triangle"] * 14)  # ~84 words: over 75 tokens, under 150


def sd_scripts_chunks(tokenizer, caption, max_token_length, v2):
    """sd-scripts' get_input_ids (library/train_util.py) for one caption, as it is written there."""
    tokenizer_max_length = max_token_length + 2
    input_ids = tokenizer(caption, padding="max_length", truncation=True, max_length=tokenizer_max_length, return_tensors="pt").input_ids[0]
    iids_list = []
    for i in range(1, tokenizer_max_length - tokenizer.model_max_length + 2, tokenizer.model_max_length - 2):
        ids_chunk = (input_ids[0].unsqueeze(0), input_ids[i : i + tokenizer.model_max_length - 2], input_ids[-1].unsqueeze(0))
        ids_chunk = torch.cat(ids_chunk)
        if v2:
            if ids_chunk[-2] != tokenizer.eos_token_id and ids_chunk[-2] != tokenizer.pad_token_id:
                ids_chunk[-1] = tokenizer.eos_token_id
            if ids_chunk[1] == tokenizer.pad_token_id:
                ids_chunk[1] = tokenizer.eos_token_id
        iids_list.append(ids_chunk)
    return torch.stack(iids_list)


@pytest.fixture(scope="module")
def base(tiny_model):
    return load_base_model(ModelConfig(pretrained=str(tiny_model)))


@pytest.mark.parametrize("max_token_length", [150, 225])
def test_chunks_are_laid_out_as_sd_scripts_lays_them_out(base, tmp_path, max_token_length):
    tokenizer = base.tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SD1's tokenizer pads with the end token
    sd2_style = CLIPTokenizer.from_pretrained(tokenizer.name_or_path, pad_token="!", model_max_length=77)  # SD2's pads with "!"
    assert sd2_style.pad_token_id != sd2_style.eos_token_id
    chunks = max_token_length // 75
    for tok, v2 in ((tokenizer, False), (sd2_style, True)):
        for caption in ("red circle", LONG, LONG + ", " + LONG, ""):
            assert torch.equal(token_chunks(tok, [caption], chunks), sd_scripts_chunks(tok, caption, max_token_length, v2)), (v2, caption[:20])


def test_hidden_states_join_the_chunks_and_words_past_77_tokens_count(base):
    tokenizer, encoder = base.tokenizer, base.text_encoder
    assert chunks_needed(tokenizer, ["red circle"]) == 1 and chunks_needed(tokenizer, [LONG]) == 2
    with torch.no_grad():
        plain = text_hidden_states(tokenizer, encoder, ["red circle", LONG], "cpu")
        assert torch.equal(text_hidden_states(tokenizer, encoder, ["red circle", LONG], "cpu", chunks=1), plain)
        joined = text_hidden_states(tokenizer, encoder, ["red circle", LONG], "cpu", chunks=3)
        assert joined.shape == (2, 2 + 75 * 3, plain.shape[-1])
        # A short caption's first chunk is its plain encoding: start and word states are the same.
        assert torch.allclose(joined[0, :76], plain[0, :76], atol=1e-6)
        # The long caption's last words (cut at 77 tokens) change the chunked states, not the plain ones.
        changed = LONG.rsplit(",", 1)[0] + ", yellow star"
        other = text_hidden_states(tokenizer, encoder, ["red circle", changed], "cpu", chunks=3)
        assert torch.equal(text_hidden_states(tokenizer, encoder, ["red circle", changed], "cpu")[1], plain[1])
        assert not torch.allclose(other[1], joined[1])
    assert caption_key(LONG) != caption_key(LONG, chunks=2) and caption_key(LONG) == caption_key(LONG, chunks=1)


def test_training_reads_long_captions_whole_and_the_text_cache_agrees(make_recipe, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(LONG + (", yellow star" if i else ", purple hexagon"))
    common = dict(data__image_dir=str(folder), train__max_steps=3)
    short = train(make_recipe(output_dir=str(tmp_path / "short"), **common))
    assert "2 of 2 captions are longer than model.max_token_length (75 tokens) and are cut there" in capsys.readouterr().out
    long = train(make_recipe(output_dir=str(tmp_path / "long"), model__max_token_length=150, **common))
    assert "captions are longer" not in capsys.readouterr().out
    cached = train(make_recipe(output_dir=str(tmp_path / "cached"), model__max_token_length=150, train__cache_text_embeddings=True, **common))
    assert short.losses != long.losses
    assert torch.allclose(torch.tensor(long.losses), torch.tensor(cached.losses), rtol=1e-5, atol=1e-6)
    from safetensors import safe_open

    with safe_open(str(long.output_dir / "pytorch_lora_weights.safetensors"), "pt") as weights:
        metadata = weights.metadata()
    assert metadata["finetune.max_token_length"] == "150"
    lora_metadata = to_kohya_metadata(long.output_dir / "pytorch_lora_weights.safetensors")
    assert lora_metadata["ss_max_token_length"] == "150"
    assert finetune_metadata_from_kohya({"ss_max_token_length": "225"})["finetune.max_token_length"] == "225"
    assert "finetune.max_token_length" not in finetune_metadata_from_kohya({"ss_max_token_length": "None"})


def to_kohya_metadata(path):
    from finetune.formats.kohya import load_lora

    return to_kohya(load_lora(path))[1]


def test_sampling_reads_a_long_prompt_whole(base):
    pipeline = build_pipeline(base)
    assert prompt_arguments(pipeline, "red circle", None) == {"prompt": "red circle", "negative_prompt": None}
    arguments = prompt_arguments(pipeline, LONG, "blurry")
    assert arguments["prompt_embeds"].shape == arguments["negative_prompt_embeds"].shape == (1, 152, base.text_encoder.config.hidden_size)
    ids = pipeline.tokenizer(LONG, truncation=True).input_ids  # what the pipeline alone would read: the first 77 tokens
    truncated = pipeline.tokenizer.decode(ids[1:-1])
    whole, cut = (np.asarray(generate(pipeline, [prompt], 1, 0, 2, 7.5, 64, negative_prompt="blurry")[0][0], dtype=np.float32) for prompt in (LONG, truncated))
    assert np.abs(whole - cut).mean() > 0.5  # the words past 77 tokens reach the image


def test_class_images_and_batches_read_long_prompts_whole(base, tmp_path):
    from finetune.config import ClassImageGeneration
    from finetune.dreambooth.class_images import generate_class_images

    pipeline = build_pipeline(base)
    batch = prompt_arguments(pipeline, ["red circle", LONG], None)
    assert batch["prompt_embeds"].shape[:2] == batch["negative_prompt_embeds"].shape[:2] == (2, 152)
    truncated = pipeline.tokenizer.decode(pipeline.tokenizer(LONG, truncation=True).input_ids[1:-1])
    settings = ClassImageGeneration(num_inference_steps=2, guidance_scale=7.5, batch_size=1, seed=5)
    images = {}
    for name, prompt in (("whole", LONG), ("cut", truncated)):
        generate_class_images(pipeline, [prompt], tmp_path / name, "k", [0], settings, 64)
        images[name] = np.asarray(Image.open(next((tmp_path / name).glob("*.png"))), dtype=np.float32)
    assert np.abs(images["whole"] - images["cut"]).mean() > 0.5  # the words past 77 tokens reach the class image
    assert caption_key("a cat", 2) != caption_key("a cat") and len({caption_key("a cat", n) for n in (1, 2, 3)}) == 3


def test_starting_from_a_lora_trained_on_another_caption_length_warns(make_recipe, tmp_path, capsys):
    first = train(make_recipe(output_dir=str(tmp_path / "long"), model__max_token_length=150, train__max_steps=1))
    train(make_recipe(output_dir=str(tmp_path / "short"), lora__init_from=str(first.output_dir), train__max_steps=1))
    assert (f"warning: lora.init_from {first.output_dir} was trained reading 150 caption tokens, this run reads 75 (model.max_token_length): "
            "set it to 150" in capsys.readouterr().out)  # fmt: skip
    train(make_recipe(output_dir=str(tmp_path / "same"), lora__init_from=str(first.output_dir), model__max_token_length=150, train__max_steps=1))
    assert "caption tokens" not in capsys.readouterr().out


def test_the_model_card_says_the_pipeline_cuts_long_prompts(tmp_path):
    from finetune.formats.kohya import LoRA, LoRALayer
    from finetune.formats.model_card import write_model_card

    layers = {"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": LoRALayer(torch.zeros(2, 4), torch.zeros(4, 2), 2.0)}
    long_card = write_model_card(LoRA(layers, {"finetune.max_token_length": "150"}), tmp_path / "long.safetensors", "kohya")[0].read_text()
    plain_card = write_model_card(LoRA(layers), tmp_path / "plain.safetensors", "kohya")[0].read_text()
    assert "# Trained on captions of up to 150 tokens, read in chunks of 75. The pipeline cuts a" in long_card
    assert "chunks of 75. The pipeline" not in plain_card


def test_check_data_counts_caption_tokens_with_the_recipes_tokenizer(tiny_model, tmp_path, capsys):
    from finetune.cli.main import main

    folder = tmp_path / "data"
    folder.mkdir()
    for i, caption in enumerate([LONG, "red circle"]):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  pretrained: {tiny_model}\ndata:\n  image_dir: {folder}\n  resolution: 64\n")
    assert main(["check-data", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert (f"warning: 1 of 2 captions are longer than model.max_token_length (75 tokens) and are cut there (the longest: {folder / '0.png'}, "
            in out and "result: ready to train (1 warning)" in out)  # fmt: skip
    assert main(["check-data", str(recipe), "model.max_token_length=150"]) == 0
    assert "captions are longer" not in capsys.readouterr().out
    assert main(["check-data", str(recipe), f"model.pretrained={tmp_path / 'nowhere'}"]) == 1  # training stops on that base
    out = capsys.readouterr().out
    assert f"fatal: base model {tmp_path / 'nowhere'} not found" in out
    assert f"captions: not counted in tokens, {tmp_path / 'nowhere'}'s tokenizer is not at hand" in out
    # The tokenizer alone: the check does not wait for diffusers and the models to load.
    script = f"import sys; from finetune.cli.main import main; assert main(['check-data', {str(recipe)!r}]) == 0; print(' '.join(sys.modules))"
    checked = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert checked.returncode == 0 and "captions are longer" in checked.stdout, checked.stderr[-2000:]
    assert "transformers" in checked.stdout.split() and "diffusers" not in checked.stdout.split()


def test_check_data_with_the_hub_out_of_reach_says_its_own_line_alone_and_reads_a_cached_tokenizer(tmp_path):
    """No HF_HUB_OFFLINE and no network (an endpoint where nothing listens): a hub base's tokenizer not in the cache was
    asked for file by file, retried for 23 s, with two of the hub's warnings a try before our line; one in the cache
    is read from there."""
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "0.png")
    (folder / "0.txt").write_text(LONG)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data:\n  image_dir: {folder}\n  resolution: 64\n")
    cached = tmp_path / "hf" / "hub" / "models--someone--cached-sd"  # the hub cache's layout, as a download leaves it
    shutil.copytree(SHIPPED_BASE / "tokenizer", cached / "snapshots" / ("0" * 40) / "tokenizer")
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("0" * 40)
    script = (f"from finetune.cli.main import main\nfor base in ('someone/not-cached', 'someone/cached-sd'):\n"
              f"    assert main(['check-data', {str(recipe)!r}, 'model.pretrained=' + base]) == 0")  # fmt: skip
    hub_settings = ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "HF_HOME")
    env = {**{k: v for k, v in os.environ.items() if k not in hub_settings}, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    checked = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert checked.stderr == ""
    not_cached, cached_out = checked.stdout.split("result: ready to train")[:2]
    assert "captions: not counted in tokens, someone/not-cached's tokenizer is not at hand (training counts them" in not_cached
    assert "not at hand" not in cached_out and "warning: 1 of 1 captions are longer than model.max_token_length" in cached_out


def test_the_untrained_step_0_grid_reads_prompts_as_the_base_did(base):
    """The step-0 validation grid of a run from the base alone is drawn as the base itself samples (predicting_as_pretrained):
    with model.max_token_length 150 it read even a short prompt in 2 chunks, states the base never learned, so the
    'before' grid was not what the base draws (`finetune sample --base` reads it in one)."""
    from finetune.sampling.pipelines import trained_prompt_chunks

    with base.predicting_as_pretrained():
        assert trained_prompt_chunks(build_pipeline(base, max_token_length=150)) == 1
    assert trained_prompt_chunks(build_pipeline(base, max_token_length=150)) == 2  # a trained model reads prompts as training did
