"""validation.loss_images: images held out of training, their loss reported at each validation with
fixed draws, for every method."""

import json
import math
import shutil
from pathlib import Path

import pytest
from controlnet_helpers import controlnet_recipe

from finetune.config import DataConfig
from finetune.data_check.check import checked_examples
from finetune.errors import FinetuneError
from finetune.training.held_out import image_identities, split_held_out
import finetune.training.held_out as held_out_module
from finetune.training.trainer import train


def test_held_out_images_never_train_and_their_loss_is_reported_at_each_validation(make_recipe, tmp_path, monkeypatch, capsys):
    import finetune.training.trainer as trainer
    import finetune.training.training_run as training_run

    trained_on, scored = set(), set()
    real_getitem, real_loss = held_out_module.TrainingSubset.__getitem__, training_run.held_out_loss
    monkeypatch.setattr(held_out_module.TrainingSubset, "__getitem__", lambda self, key: trained_on.add(self.kept[key[0]]) or real_getitem(self, key))
    monkeypatch.setattr(training_run, "held_out_loss", lambda *args: scored.update(args[4]) or real_loss(*args))
    common = dict(validation__loss_images=1, validation__every_n_steps=2, checkpoint__every_n_steps=2, train__max_steps=4)
    whole = train(make_recipe(output_dir=str(tmp_path / "whole"), **common))  # 4 images, batch 2
    assert len(scored) == 1 and trained_on == {0, 1, 2, 3} - scored
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

    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(FinetuneError, match=r"^1 training image \(repeats counted\) \(4 before validation.loss_images held some out\) is fewer than one batch "
                                            r"\(train.batch_size 2\): lower validation.loss_images, lower train.batch_size to 1, or add images$"):
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


def test_every_copy_of_a_held_out_image_leaves_training(image_folder, tmp_path):
    """data.folders repeats (or one folder under two templates, or spelled another way) list an image several times;
    the same pixels in another file are the same image too."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name, original in (("a", "0000"), ("b", "0001"), ("copy-of-a", "0000")):
        shutil.copy(image_folder / f"{original}.png", folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"{name} caption")
    spellings = [{"path": "."}, {"path": f"../{folder.name}", "template": "photo of {caption}", "repeats": 2}]
    items, _ = checked_examples(DataConfig(image_dir=str(folder), resolution=64, folders=spellings))
    names = [Path(item.source).stem for item in items]
    assert sorted(names) == ["a", "a", "a", "b", "b", "b", "copy-of-a", "copy-of-a", "copy-of-a"]
    for seed in range(4):
        trained, [scored] = split_held_out(image_identities(items), 1, seed)
        kept = {names[i] for i in trained}
        assert kept == ({"b"} if names[scored] in ("a", "copy-of-a") else {"a", "copy-of-a"}) and len(trained) == (3 if kept == {"b"} else 6)

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


def test_check_datas_choice_is_a_new_runs_beside_no_checkpoint_or_a_damaged_one(tmp_path):
    """A damaged trainer state stops a resume (`read_state`), not a new run: check-data says it and shows a new run's choice."""
    from types import SimpleNamespace

    from finetune.training.held_out import held_out_for_check

    items = [SimpleNamespace(digest=f"pixels {i}", source=f"{i}.png") for i in range(6)]
    new = split_held_out(image_identities(items), 2, 3)
    split, note = held_out_for_check(items, 2, 3, tmp_path / "run")
    assert (split.trained, split.scored, split.lines, note) == (new[0], new[1], [], "")
    (tmp_path / "run" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{cut short")
    split, note = held_out_for_check(items, 2, 3, tmp_path / "run")
    assert (split.trained, split.scored, note) == (new[0], new[1], "")
    assert split.lines == [f"warning: with --resume latest: checkpoint {tmp_path / 'run' / 'checkpoints' / 'checkpoint-2'} is damaged "
                           "(trainer_state.json: JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)): "
                           f"move it out of {tmp_path / 'run' / 'checkpoints'} and resume from the one before it"]  # fmt: skip
