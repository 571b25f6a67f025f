"""LoRA files that load everywhere: kohya export/import keeps keys and alpha exact, merging equals the
LoRA at strength s, and exported files carry metadata and a model card."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME
from finetune.cli.main import main
from finetune.config import LoRAConfig
from finetune.config.methods import TEXT_ENCODER_TARGETS
from finetune.data.image_bounds import GRID_LABEL_WIDTH
from finetune.formats.kohya import LoRA, LoRALayer, kohya_name, load_lora, module_key, save_lora_file, to_kohya
from finetune.formats.lora_export import export_lora
from finetune.formats.merge import merge_into
from finetune.methods.lora import add_lora, save_lora
from finetune.models.tiny_model import build_tiny_pipeline
from finetune.outputs.metadata import output_metadata
from finetune.sampling.grids import make_grid
from finetune.training.trainer import train

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


Settings = LoRAConfig(rank=4, alpha=2.0)  # alpha != rank: a lost alpha changes every output


def randomise_lora(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for training: give every LoRA B a non-zero value (at init B = 0 and the LoRA is a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1


def load_pipeline(path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(str(path), safety_checker=None, requires_safety_checker=False)


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), text).sample


def text_output(text_encoder) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(torch.arange(2, 20).reshape(2, 9))[0]


def outputs(pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    return unet_output(pipeline.unet), text_output(pipeline.text_encoder)


def assert_close(a, b, atol=1e-5):
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=atol), (x - y).abs().max()


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory, image_folder):
    """A training output folder as `finetune train` leaves it: LoRA (UNet + text encoder), samples, and
    the reference outputs of the live peft model."""
    from finetune.config.recipe_loading import recipe_from_dict

    run = tmp_path_factory.mktemp("run") / "striped-lora"
    recipe = recipe_from_dict({
        "method": "lora", "output_dir": str(run), "model": {"pretrained": str(tiny_model)},
        "data": {"image_dir": str(image_folder), "resolution": 64}, "lora": {"rank": 4, "alpha": 2},
    })
    pipeline = load_pipeline(tiny_model)
    add_lora(pipeline.unet, UNET_TARGETS, torch.float32, Settings)
    add_lora(pipeline.text_encoder, TEXT_ENCODER_TARGETS, torch.float32, Settings)
    randomise_lora(pipeline.unet, 1)
    randomise_lora(pipeline.text_encoder, 2)
    pipeline.unet.eval(), pipeline.text_encoder.eval()
    save_lora({"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}, run / LORA_WEIGHTS_NAME, output_metadata(recipe, 150, "epsilon"))
    (run / "samples").mkdir()
    for step in (0, 50, 150):  # validation grids as the trainer writes them: a label, then the samples
        samples = [Image.new("RGB", (64, 64), (step, 0, 0)), Image.new("RGB", (64, 64), (0, step, 0))]
        make_grid([samples], row_labels=["a prompt"], label_width=GRID_LABEL_WIDTH).save(run / "samples" / f"step-{step:06d}.png")
    return SimpleNamespace(path=run, expected=outputs(pipeline))  # what the trained model computes


def test_kohya_export_loads_in_diffusers_with_the_same_outputs(trained, tiny_model, tmp_path):
    path, *_ = export_lora(trained.path, tmp_path, "kohya")
    assert path == tmp_path / "striped-lora.safetensors"
    tensors = load_file(path)
    assert all(k.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_", "lora_te_text_model_encoder_layers_")) for k in tensors)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    alphas = [v for k, v in tensors.items() if k.endswith(".alpha")]
    assert len(alphas) == len(tensors) // 3 and all(a.shape == () and a.item() == 2.0 for a in alphas)

    pipeline = load_pipeline(tiny_model)
    base = outputs(pipeline)
    pipeline.load_lora_weights(str(path.parent), weight_name=path.name)
    assert_close(outputs(pipeline), trained.expected)
    assert not torch.allclose(base[0], trained.expected[0], atol=1e-3) and not torch.allclose(base[1], trained.expected[1], atol=1e-3)


def test_kohya_import_round_trips_exactly(trained, tmp_path):
    ours = load_file(trained.path / LORA_WEIGHTS_NAME)
    kohya = save_lora_file(load_lora(trained.path / LORA_WEIGHTS_NAME), tmp_path / "k.safetensors", "kohya")
    back = save_lora_file(load_lora(kohya), tmp_path / "d.safetensors", "diffusers")
    again = save_lora_file(load_lora(back), tmp_path / "k2.safetensors", "kohya")
    theirs = load_file(back)
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    first, second = load_file(kohya), load_file(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_per_module_alpha_and_rank_survive_import(trained, tiny_model, tmp_path):
    """Files from other tools may mix alphas and ranks: the imported file gives each module its own
    alpha/rank in diffusers. (diffusers 0.42 loading such a kohya file directly drops the odd alphas:
    its alpha_pattern keys miss the modules, a reason to import first.)"""
    tensors = load_file(save_lora_file(load_lora(trained.path / LORA_WEIGHTS_NAME), tmp_path / "k.safetensors", "kohya"))
    unet_name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    te_name = "lora_te_text_model_encoder_layers_1_self_attn_v_proj"
    tensors[f"{unet_name}.alpha"], tensors[f"{te_name}.alpha"] = torch.tensor(7.0), torch.tensor(0.5)
    tensors[f"{unet_name}.lora_down.weight"] = tensors[f"{unet_name}.lora_down.weight"][:2].contiguous()  # rank 2 here
    tensors[f"{unet_name}.lora_up.weight"] = tensors[f"{unet_name}.lora_up.weight"][:, :2].contiguous()
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    imported = save_lora_file(load_lora(tmp_path / "mixed.safetensors"), tmp_path / "ours.safetensors", "diffusers")

    pipeline = load_pipeline(tiny_model)
    pipeline.load_lora_weights(str(tmp_path), weight_name=imported.name, adapter_name="x")
    scalings = {f"unet.{n}": m.scaling["x"] for n, m in pipeline.unet.named_modules() if hasattr(m, "scaling")}
    scalings.update({f"text_encoder.{n}": m.scaling["x"] for n, m in pipeline.text_encoder.named_modules() if hasattr(m, "scaling")})
    expected = {key: 0.5 for key in load_lora(trained.path / LORA_WEIGHTS_NAME).layers}
    expected["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"] = 7.0 / 2
    expected["text_encoder.encoder.layers.1.self_attn.v_proj"] = 0.5 / 4
    assert scalings == expected

    merged = load_pipeline(tiny_model)  # merging computes W + alpha/rank * up @ down per module
    merge_into({"unet": merged.unet, "text_encoder": merged.text_encoder}, load_lora(tmp_path / "mixed.safetensors"), 1.0)
    assert_close(outputs(pipeline), outputs(merged))


def test_sd15_shaped_unet_gets_the_names_webui_expects(tmp_path):
    pipeline = build_tiny_pipeline("medium")
    add_lora(pipeline.unet, UNET_TARGETS, torch.float32, Settings)
    save_lora({"unet": pipeline.unet}, tmp_path / LORA_WEIGHTS_NAME, {})
    keys = set(load_file(save_lora_file(load_lora(tmp_path / LORA_WEIGHTS_NAME), tmp_path / "k.safetensors", "kohya")))

    # SD1.5: 3 cross-attention down blocks x 2 transformers, 1 in the middle, 3 up blocks x 3.
    blocks = [f"down_blocks_{b}_attentions_{a}" for b in range(3) for a in range(2)] + ["mid_block_attentions_0"]
    blocks += [f"up_blocks_{b}_attentions_{a}" for b in (1, 2, 3) for a in range(3)]
    expected = {
        f"lora_unet_{block}_transformer_blocks_0_{attn}_{proj}.{tensor}"
        for block in blocks
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out_0")
        for tensor in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert keys == expected and len(keys) == 16 * 8 * 3
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.alpha" in keys

    # Every module of the SD1.5-shaped UNet and CLIP reads back from its kohya name.
    for part, model in (("unet", pipeline.unet), ("text_encoder", pipeline.text_encoder)):
        for module, _ in model.named_modules():
            if module and "lora_" not in module and not module.endswith(("base_layer", "lora_dropout")):
                assert module_key(kohya_name(f"{part}.{module}")) == f"{part}.{module}"
    assert kohya_name("text_encoder.encoder.layers.11.mlp.fc1") == "lora_te_text_model_encoder_layers_11_mlp_fc1"


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_merge_equals_the_lora_at_that_strength(trained, tiny_model, tmp_path, capsys, strength):
    lora = trained.path / LORA_WEIGHTS_NAME
    if strength == 1.0:  # merging a kohya file is the same as merging ours
        lora, *_ = export_lora(trained.path, tmp_path / "kohya", "kohya")
    assert main(["merge", "--base", str(tiny_model), "--lora", str(lora), "--strength", str(strength), str(tmp_path / "merged")]) == 0
    assert str(tmp_path / "merged") in capsys.readouterr().out
    merged = outputs(load_pipeline(tmp_path / "merged"))

    pipeline = load_pipeline(tiny_model)
    pipeline.load_lora_weights(str(trained.path), weight_name=LORA_WEIGHTS_NAME, adapter_name="lora")
    pipeline.set_adapters(["lora"], adapter_weights=[strength])
    assert_close(merged, outputs(pipeline))
    if strength == 1.0:
        assert_close(merged, trained.expected)
    assert "strength" in (tmp_path / "merged" / "README.md").read_text()


def test_export_command_writes_metadata_and_a_model_card(trained, tiny_model, tmp_path, capsys, monkeypatch):
    assert main(["export", str(trained.path), str(tmp_path / "webui"), "--to", "kohya"]) == 0
    path, webui = tmp_path / "webui" / "striped-lora.safetensors", tmp_path / "webui"
    assert capsys.readouterr().out.strip() == (f"wrote {path} (kohya layout), its model card {webui / 'striped-lora.md'}, "
                                               f"{webui / 'samples' / 'striped-lora-step-000150.png'}, {webui / 'striped-lora.preview.png'}")  # fmt: skip
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["finetune.rank"] == "4" and metadata["finetune.alpha"] == "2.0"
    assert metadata["finetune.base_model"] == tiny_model.name and metadata["finetune.steps"] == metadata["ss_steps"] == "150"
    assert metadata["finetune.method"] == "lora" and metadata["finetune.resolution"] == "64" and metadata["finetune.recipe_hash"]
    assert "lora_adapter_metadata" not in metadata  # diffusers must read alpha from the .alpha tensors

    card = (tmp_path / "webui" / "striped-lora.md").read_text()  # one card per file: a webui models/Lora folder holds many
    assert str(tiny_model) not in card  # the base by name: a card goes wherever the file is shared
    for text in (f"| base model | `{tiny_model.name}` |", "4 / 2", "150", "load_lora_weights", "<lora:striped-lora:1.0>", "ComfyUI", "samples/striped-lora-step-000150.png",
                 "| precision | fp32 |"):
        assert text in card, text
    grid = Image.open(tmp_path / "webui" / "samples" / "striped-lora-step-000150.png")
    preview = Image.open(tmp_path / "webui" / "striped-lora.preview.png")  # the webui's Lora tab thumbnail: the first sample
    assert preview.size == (64, 64) and np.array_equal(np.asarray(preview), np.asarray(grid.crop((160, 0, 224, 64))))
    assert np.asarray(preview)[0, 0].tolist() == [150, 0, 0]  # the newest grid's first sample

    # ... and back to our layout: loads with alpha from the LoraConfig in its metadata.
    assert main(["export", str(path), str(tmp_path / "ours"), "--to", "diffusers"]) == 0
    with safe_open(str(tmp_path / "ours" / LORA_WEIGHTS_NAME), "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 2.0 and config["text_encoder.lora_alpha"] == 2.0
    assert metadata["finetune.steps"] == "150" and not any(k.startswith("ss_") for k in metadata)
    ours_card = (tmp_path / "ours" / "README.md").read_text()
    assert "pipeline.load_lora_weights" in ours_card
    # The webui conversion that card gives runs as written in its folder, into the same folder.
    convert = ours_card.split("Convert first, in this card's folder: `finetune ", 1)[1].split("`", 1)[0].split()
    monkeypatch.chdir(tmp_path / "ours")
    assert main(convert) == 0 and (tmp_path / "ours" / "ours.safetensors").is_file() and (tmp_path / "ours" / "ours.md").is_file()


def test_a_cards_samples_are_never_the_grid_drawn_before_training(tmp_path):
    # The quickstart's checkpoint-200, exported, showed samples/step-000000.png (the base's squares for "star") as its
    # samples and their first image as the webui's thumbnail: the newest grid up to step 200, the run's next being 300.
    from finetune.formats.model_card import newest_sample_grid

    (tmp_path / "samples").mkdir()
    for step in (0, 300):
        Image.new("RGB", (8, 8)).save(tmp_path / "samples" / f"step-{step:06d}.png")
    assert newest_sample_grid(tmp_path, up_to_step=200) is None
    assert newest_sample_grid(tmp_path, up_to_step=300).name == newest_sample_grid(tmp_path).name == "step-000300.png"
    for step in (999_999, 1_000_000):  # past 6 digits the names no longer sort as their steps: step-1000000.png was older than step-000300.png
        Image.new("RGB", (8, 8)).save(tmp_path / "samples" / f"step-{step:06d}.png")
    assert (newest_sample_grid(tmp_path).name, newest_sample_grid(tmp_path, up_to_step=999_999).name) == ("step-1000000.png", "step-999999.png")


def test_export_of_something_that_is_not_a_lora_is_one_line(tmp_path, capsys):
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    assert main(["export", str(tmp_path / "model.safetensors"), str(tmp_path / "out"), "--to", "kohya"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'model.safetensors'} holds no SD1.x LoRA weights "
                                       "(expected unet./text_encoder. or lora_unet_/lora_te_ keys)\n")


def test_an_rslora_run_merges_exports_and_loads_in_diffusers_alike(make_recipe, tiny_model, tmp_path):
    """lora.use_rslora scales by alpha/sqrt(rank) (2/2 here, not 2/4): diffusers reads that from the saved
    LoraConfig, and merge and the kohya export (alpha * sqrt(rank)) must give the same model."""
    result = train(make_recipe(lora__use_rslora=True, lora__rank=4, lora__alpha=2, optimizer__lr=1e-2, train__max_steps=2))
    with safe_open(str(result.output_dir / LORA_WEIGHTS_NAME), "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.use_rslora"] is True
    pipeline = load_pipeline(tiny_model)
    base = outputs(pipeline)
    pipeline.load_lora_weights(str(result.output_dir), weight_name=LORA_WEIGHTS_NAME)
    expected = outputs(pipeline)
    assert not torch.allclose(expected[0], base[0], atol=1e-4)

    assert main(["merge", "--base", str(tiny_model), "--lora", str(result.output_dir), str(tmp_path / "merged")]) == 0
    assert_close(outputs(load_pipeline(tmp_path / "merged")), expected)
    kohya_file, *_ = export_lora(result.output_dir, tmp_path / "kohya", "kohya")
    pipeline = load_pipeline(tiny_model)
    pipeline.load_lora_weights(str(kohya_file.parent), weight_name=kohya_file.name)
    assert_close(outputs(pipeline), expected)


def test_merge_replaces_an_existing_folder_only_when_asked_and_never_its_source(trained, tiny_model, tmp_path, capsys):
    merge = ["merge", "--base", str(tiny_model), "--lora", str(trained.path)]
    before = sorted(p.name for p in trained.path.iterdir())
    for lora in (trained.path, trained.path / LORA_WEIGHTS_NAME):  # the training folder it merges from, given as the LoRA or holding it
        assert main(["merge", "--base", str(tiny_model), "--lora", str(lora), str(trained.path), "--overwrite"]) == 2
        assert capsys.readouterr().err == f"error: merge output {trained.path} holds the LoRA being merged ({lora}): pick another folder\n"
    assert sorted(p.name for p in trained.path.iterdir()) == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main([*merge, str(mine)]) == 2
    assert capsys.readouterr().err == f"error: merge output {mine} is not empty: pick a new folder, or pass --overwrite to replace what is in it\n"
    assert (mine / "notes.txt").read_text() == "keep me"
    assert main([*merge, str(mine), "--overwrite"]) == 0 and (mine / "model_index.json").is_file()
    # The demo lists it with what was merged, as it lists a training run's pipeline.
    from finetune.demo.adapter_scan import scan_adapters

    [merged] = [a for a in scan_adapters(tmp_path).values() if a.path == mine]
    merged_loras = json.loads(merged.metadata.pop("finetune.merged_loras"))
    assert merged.kind == "pipeline" and merged.metadata == {
        "finetune.method": "lora merged at 1", "finetune.base_model": tiny_model.name, "finetune.steps": "150", "finetune.clip_skip": "1",
        "finetune.prediction_type": "epsilon"}
    assert [(entry["file"], entry["strength"]) for entry in merged_loras] == [(str(trained.path), 1.0)]  # as given

    assert main([*merge, str(trained.path / LORA_WEIGHTS_NAME)]) == 2
    assert capsys.readouterr().err == f"error: merge output {trained.path / LORA_WEIGHTS_NAME} is a file: give a folder for the pipeline\n"
    assert main([*merge, str(trained.path / LORA_WEIGHTS_NAME / "merged")]) == 2  # was a traceback after the merge
    assert capsys.readouterr().err == (f"error: merge output {trained.path / LORA_WEIGHTS_NAME / 'merged'} is inside a file "
                                       f"({trained.path / LORA_WEIGHTS_NAME}): give a folder for the pipeline\n")
    assert not list(trained.path.glob(".*partial"))


def test_export_replaces_files_only_when_asked_refuses_a_file_as_folder_and_a_truncated_lora_is_one_line(trained, tiny_model, tmp_path, capsys):
    out = tmp_path / "webui"
    out.mkdir()
    (out / "README.md").write_text("# my notes")
    assert main(["export", str(trained.path), str(out), "--to", "kohya"]) == 0  # its card is striped-lora.md
    assert (out / "README.md").read_text() == "# my notes"
    card = (out / "striped-lora.md").read_text()
    assert main(["export", str(trained.path), str(out), "--to", "kohya"]) == 2
    replaced = [out / "striped-lora.safetensors", out / "striped-lora.md", out / "samples" / "striped-lora-step-000150.png", out / "striped-lora.preview.png"]
    # the card's images too (the run's newest grid, step 150): a webui thumbnail of the user's was written over unasked
    assert capsys.readouterr().err == f"error: export would replace {', '.join(map(str, replaced))}: give another output, or pass --overwrite\n"
    assert (out / "striped-lora.md").read_text() == card
    assert main(["export", str(trained.path), str(out), "--to", "kohya", "--overwrite"]) == 0
    assert main(["export", str(trained.path), str(trained.path), "--to", "diffusers", "--overwrite"]) == 2
    assert capsys.readouterr().err == f"error: export would write {trained.path / LORA_WEIGHTS_NAME} over the LoRA it reads: give another output\n"
    (tmp_path / "notes.txt").write_text("kept")  # an output that is, or is inside, a file was a traceback
    for output, layout in (("notes.txt", "kohya"), ("notes.txt/my.safetensors", "kohya"), ("notes.txt/lora", "diffusers")):
        assert main(["export", str(trained.path), str(tmp_path / output), "--to", layout]) == 2
        assert capsys.readouterr().err == (f"error: export output {tmp_path / output}: {tmp_path / 'notes.txt'} is a file, not a folder: "
                                           "give a folder for the LoRA and its model card\n")

    truncated = tmp_path / "download.safetensors"
    truncated.write_bytes((trained.path / LORA_WEIGHTS_NAME).read_bytes()[:100])
    sample = ["sample", "--base", str(tiny_model), "--lora", str(truncated), "--prompt", "a", "--steps", "1", "--out", str(tmp_path / "s")]
    for argv in (["export", str(truncated), str(tmp_path / "x"), "--to", "kohya"], sample):
        assert main(argv) == 2
        err = capsys.readouterr().err  # safetensors' own words in the brackets
        assert re.fullmatch(rf"error: LoRA {re.escape(str(truncated))} is not a readable safetensors file \([^\n]+\): a truncated download\? get it again\n", err), err


def test_an_fp16_export_is_half_the_file_and_loads_in_diffusers_alike(trained, tiny_model, tmp_path, capsys):
    assert main(["export", str(trained.path), str(tmp_path / "half"), "--to", "kohya", "--precision", "fp16"]) == 0
    assert "(kohya layout, fp16)" in capsys.readouterr().out
    assert "| precision | fp16 |" in (tmp_path / "half" / "striped-lora.md").read_text()
    half, full = tmp_path / "half" / "striped-lora.safetensors", export_lora(trained.path, tmp_path / "full", "kohya")[0]
    tensors = load_file(half)
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {t.dtype for k, t in tensors.items() if k.endswith(".alpha")} == {torch.float32}
    weight_bytes = lambda path: sum(t.numel() * t.element_size() for k, t in load_file(path).items() if not k.endswith(".alpha"))
    assert weight_bytes(half) * 2 == weight_bytes(full) and half.stat().st_size < full.stat().st_size  # (the tiny file's header weighs much)
    pipeline = load_pipeline(tiny_model)
    pipeline.load_lora_weights(str(half.parent), weight_name=half.name)
    assert_close(outputs(pipeline), trained.expected, atol=1e-3)  # the same model, to fp16's rounding
    # Converted again without --precision, an fp16 file stays fp16 (not doubled back to fp32).
    again, *_ = export_lora(half, tmp_path / "again", "diffusers")
    assert {t.dtype for t in load_file(again).values()} == {torch.float16}


def test_locon_files_name_the_linear_layers_rank_and_the_convolutions_apart(tmp_path):
    """sd-scripts' network_dim is the linear (and 1x1) layers' rank, conv_dim the 3x3 convolutions', even
    where the convolutions are the most; rsLoRA's alphas (alpha x sqrt(rank)) are written rounded."""
    from finetune.formats.model_card import write_model_card

    linear = LoRALayer(torch.zeros(4, 8), torch.zeros(8, 4), 4.000000000000001)
    conv = LoRALayer(torch.zeros(2, 8, 3, 3), torch.zeros(8, 2, 1, 1), 2.0000000000000004)
    pointwise = LoRALayer(torch.zeros(4, 8, 1, 1), torch.zeros(8, 4, 1, 1), 4.000000000000001)  # proj_in: not a LoCon layer
    lora = LoRA({"unet.a.to_q": linear, "unet.a.proj_in": pointwise, **{f"unet.b{i}.conv1": conv for i in range(3)}}, {})
    assert lora.common_rank_alpha() == (4, 4.000000000000001) and lora.conv_rank_alpha() == (2, 2.0000000000000004)
    metadata = to_kohya(lora)[1]
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "4.0")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    card = write_model_card(lora, tmp_path / LORA_WEIGHTS_NAME, "diffusers")[0].read_text()
    assert "| rank / alpha | 4 / 4 (updates scaled by alpha/rank = 1) |" in card
    assert "| 3x3 conv layers (LoCon) | rank 2 / alpha 2 (scaled by 1) |" in card
    plain = LoRA({"unet.a.to_q": linear}, {})
    assert plain.conv_rank_alpha() is None and "ss_network_args" not in to_kohya(plain)[1] and "LoCon" not in write_model_card(plain, tmp_path / "x.safetensors", "kohya")[0].read_text()


def test_merge_writes_fp16_when_asked_and_it_loads(trained, tiny_model, tmp_path):
    from safetensors import safe_open

    assert main(["merge", "--base", str(tiny_model), "--lora", str(trained.path), "--precision", "fp16", str(tmp_path / "half")]) == 0
    with safe_open(str(next((tmp_path / "half" / "unet").glob("*.safetensors"))), "pt") as f:
        assert {f.get_tensor(key).dtype for key in f.keys()} == {torch.float16}
    half = StableDiffusionPipeline.from_pretrained(tmp_path / "half", torch_dtype=torch.float32)
    assert main(["merge", "--base", str(tiny_model), "--lora", str(trained.path), str(tmp_path / "full")]) == 0
    full = StableDiffusionPipeline.from_pretrained(tmp_path / "full")
    half_unet = half.unet.state_dict()
    for name, tensor in full.unet.state_dict().items():  # the same merge, rounded to fp16
        assert torch.allclose(half_unet[name], tensor.half().float()), name

