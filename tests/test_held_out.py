"""validation.loss_images: images held out of training, their loss reported at each validation with
fixed draws, for every method."""

import json
import math

import pytest
from controlnet_helpers import controlnet_recipe

import finetune.held_out as held_out_module
from finetune.errors import FinetuneError
from finetune.held_out import split_held_out
from finetune.trainer import train


def test_held_out_images_never_train_and_their_loss_is_reported_at_each_validation(make_recipe, tmp_path, monkeypatch, capsys):
    trained_on = set()
    real_getitem = held_out_module.TrainingSubset.__getitem__
    monkeypatch.setattr(held_out_module.TrainingSubset, "__getitem__", lambda self, key: trained_on.add(self.kept[key[0]]) or real_getitem(self, key))
    common = dict(validation__loss_images=1, validation__every_n_steps=2, checkpoint__every_n_steps=2, train__max_steps=4)
    whole = train(make_recipe(output_dir=str(tmp_path / "whole"), **common))  # 4 images, batch 2
    _, [held] = split_held_out([f"image-{i}" for i in range(4)], 1, make_recipe().seed)
    assert trained_on == {0, 1, 2, 3} - {held}
    assert [step for step, _ in whole.validation_losses] == [0, 2, 4] and all(math.isfinite(loss) for _, loss in whole.validation_losses)
    assert whole.validation_losses[0][1] != whole.validation_losses[-1][1]
    out = capsys.readouterr().out
    assert "validation loss: 1 image held out of training, scored at each validation" in out
    assert "4 used, 0 skipped; 3 uses per epoch (1 held out by validation.loss_images)" in out  # the summary counts what trains
    assert f"validation loss at step 4: {whole.validation_losses[-1][1]:.4f}" in out
    assert "length: 4 steps of 2 images = 4 epochs of 2 of the 3 images" in out  # the held-out image is not counted

    # The same draws every time: an untrained model scores the same at step 0 of any run, and a
    # resumed run ends at the uninterrupted one's number.
    again = train(make_recipe(output_dir=str(tmp_path / "again"), **{**common, "train__max_steps": 1}))
    assert again.validation_losses[0] == whole.validation_losses[0]
    resumed = train(make_recipe(output_dir=str(tmp_path / "resumed"), **common), resume=str(whole.output_dir / "checkpoints" / "checkpoint-2"))
    assert resumed.validation_losses[-1] == whole.validation_losses[-1]

    import finetune.trainer as trainer  # before any model loads

    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(FinetuneError, match=r"^1 training image \(repeats counted\) \(4 before validation.loss_images held some out\) is fewer than one batch "
                                            r"\(train.batch_size 2\): lower validation.loss_images or train.batch_size, or add images$"):
        train(make_recipe(output_dir=str(tmp_path / "greedy"), validation__loss_images=3))
    with pytest.raises(FinetuneError, match=r"^validation.loss_images \(10\) holds out every image, leaving none to train: lower it below the number of images$"):
        train(make_recipe(output_dir=str(tmp_path / "greedy"), validation__loss_images=10))


@pytest.mark.parametrize("method", ["controlnet", "dreambooth"])
def test_every_method_reports_its_validation_loss(method, make_recipe, pairs_folder, image_folder, tmp_path):
    settings = dict(validation__loss_images=1, validation__at_start=False, train__max_steps=1, train__batch_size=1)
    if method == "controlnet":
        recipe = controlnet_recipe(make_recipe, pairs_folder, **settings)
    else:
        concept = {"instance_dir": str(image_folder), "instance_prompt": "a sks shape", "class_prompt": "a shape", "class_dir": str(tmp_path / "class")}
        dreambooth = {"concepts": [concept], "adapter": "lora", "num_class_images": 2, "class_generation": {"num_inference_steps": 1}}
        recipe = make_recipe(method="dreambooth", dreambooth=dreambooth, data__image_dir=None, **settings)
    [(step, loss)] = train(recipe).validation_losses
    assert step == 1 and math.isfinite(loss) and loss > 0


def test_every_copy_of_a_held_out_image_leaves_training(tmp_path):
    """data.folders repeats (or one folder under two templates, or spelled another way) list an image several times."""
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"")
    spellings = [str(tmp_path / "a.png"), str(tmp_path / ".." / tmp_path.name / "a.png"), str(tmp_path / "b.png")]
    for seed in range(4):
        trained, [scored] = split_held_out(spellings, 1, seed)
        assert trained == ([2] if scored in (0, 1) else [0, 1])

    sources = ["a", "b", "b", "b", "c", "c"]
    trained, scored = split_held_out(sources, 2, seed=0)
    held = {sources[i] for i in scored}
    assert len(held) == 2 and len(scored) == 2  # two images, each scored once
    assert not held & {sources[i] for i in trained} and len(trained) + sum(sources.count(h) for h in held) == 6
    listed_otherwise = sources[::-1]  # the choice is by image, whatever the order the method lists them in
    assert {listed_otherwise[i] for i in split_held_out(listed_otherwise, 2, seed=0)[1]} == held


def test_a_vae_run_keeps_its_scaling_factor_and_preview_from_training_images(make_recipe, tmp_path):
    """Scoring held-out images must not feed the running latent std, nor become the reconstruction preview."""
    common = dict(method="vae", train__max_steps=4, train__batch_size=2, validation__every_n_steps=2, checkpoint__every_n_steps=2)
    scored = train(make_recipe(output_dir=str(tmp_path / "scored"), validation__loss_images=1, **common))
    resumed = train(make_recipe(output_dir=str(tmp_path / "resumed"), validation__loss_images=1, **common),
                    resume=str(scored.output_dir / "checkpoints" / "checkpoint-2"))  # fmt: skip
    factors = [json.loads((run.output_dir / "pipeline" / "vae" / "config.json").read_text())["scaling_factor"] for run in (scored, resumed)]
    assert factors[0] == factors[1]
    assert scored.sample_grids[-1].read_bytes() == resumed.sample_grids[-1].read_bytes()  # the same images reconstructed
