"""The training knobs do what they say (logged loss terms, optimizer settings)."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from safetensors.torch import load_file

from finetune.errors import FinetuneError
from finetune.optim.max_norm import apply_max_norm
from finetune.toyworld.datasets import write_folder
from finetune.training.ema import EMA_FILE
from finetune.training.trainer import train


def test_logged_loss_terms_average_every_micro_batch_as_the_loss_does(make_recipe, tmp_path, monkeypatch):
    """DreamBooth's instance and class losses in TensorBoard cover the same micro-batches as train/loss (all of a
    step's accumulation), so train/loss = instance_loss + prior_loss_weight x class_loss at every logged step."""
    star = write_folder(tmp_path / "star", 3, seed=11, include_held_out="only_shape")
    concept = {"instance_dir": str(star), "instance_prompt": "a sks shape", "class_prompt": "a shape"}
    dreambooth = {"concepts": [concept], "num_class_images": 4, "prior_loss_weight": 0.5,
                  "class_generation": {"num_inference_steps": 2, "batch_size": 2}}  # fmt: skip
    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None: logged.append(values))
    recipe = make_recipe(method="dreambooth", dreambooth=dreambooth, data__image_dir=None, train__batch_size=1,
                         train__gradient_accumulation_steps=3, train__max_steps=3, logging__every_n_steps=1)  # fmt: skip
    train(recipe)
    steps = [values for values in logged if "train/loss" in values]
    assert len(steps) == 3
    for values in steps:
        assert values["train/loss"] == pytest.approx(values["train/instance_loss"] + 0.5 * values["train/class_loss"], rel=1e-5)


def _lora_layer(norm: float) -> SimpleNamespace:
    """A stand-in for a peft LoRA layer whose update, up @ down (scale 1), has Frobenius norm `norm`."""
    down, up = torch.nn.Linear(4, 1, bias=False), torch.nn.Linear(1, 4, bias=False)
    with torch.no_grad():
        down.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        up.weight.copy_(torch.tensor([[norm], [0.0], [0.0], [0.0]]))
    return SimpleNamespace(lora_A={"default": down}, lora_B={"default": up}, scaling={"default": 1.0})


def test_max_norm_leaves_layers_within_the_limit_untouched_and_uncounted():
    """A limit of any value: limit / limit in float32 (torch divides a number by a tensor as a reciprocal times the
    number) came out 1 - 2^-24 for about one limit in seven, so every layer within it was counted and shrunk."""
    limit = 9.709460258483887
    layers = {"within": _lora_layer(5.0), "near": _lora_layer(9.7), "above": _lora_layer(20.0)}
    before = {name: [w.detach().clone() for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)] for name, layer in layers.items()}
    logs = apply_max_norm(layers, limit)
    assert logs["lora/layers_scaled"] == 1
    for name in ("within", "near"):
        assert torch.equal(layers[name].lora_A["default"].weight, before[name][0]) and torch.equal(layers[name].lora_B["default"].weight, before[name][1])
    above = layers["above"]
    assert torch.linalg.norm(above.lora_B["default"].weight @ above.lora_A["default"].weight).item() == pytest.approx(limit, rel=1e-6)


@pytest.mark.parametrize("name,setting", [("adafactor", {"betas": [0.8, 0.99]}), ("adafactor", {"eps": 1e-6}), ("lion8bit", {"eps": 1e-6})])
def test_an_optimizer_setting_the_optimizer_does_not_read_is_one_line(make_recipe, name, setting):
    """Adafactor keeps no first moment and has its own pair of epsilons, Lion has no epsilon: a value of one's
    own for them did nothing, without a word. The defaults (as the shipped recipes name them) still load."""
    key = next(iter(setting))
    with pytest.raises(FinetuneError, match=rf"optimizer\.{key} .*does nothing with optimizer\.name {name}"):
        make_recipe(optimizer={"name": name, "lr": 1e-3, **setting})
    make_recipe(optimizer={"name": name, "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8})


@pytest.mark.parametrize("gamma", [0, -5.0])
def test_a_min_snr_gamma_that_would_weigh_every_loss_zero_or_negative_is_refused(make_recipe, gamma):
    """min(SNR, gamma) / SNR: gamma 0 (sd-scripts' 'off') trained nothing at all (a loss of 0), a negative gamma
    climbed the loss. null is off."""
    with pytest.raises(FinetuneError, match=r"train\.snr_gamma.*greater than 0"):
        make_recipe(train__snr_gamma=gamma)
    assert make_recipe(train__snr_gamma=None).train.snr_gamma is None


def test_an_average_begun_at_a_resume_starts_from_the_resumed_weights(make_recipe):
    """A checkpoint without a weight average, resumed with train.ema_decay: the warning says the average starts
    from the resumed weights, and so it does (it started from the untrained weights, read before the checkpoint)."""
    train(make_recipe(train__max_steps=2, checkpoint__every_n_steps=2))
    result = train(make_recipe(train__max_steps=3, train__ema_decay=0.5, checkpoint__every_n_steps=2), resume="latest")
    checkpoints = result.output_dir / "checkpoints"
    resumed, trained = (load_file(checkpoints / name / "trainable_0.safetensors") for name in ("checkpoint-2", "checkpoint-3"))
    average = load_file(checkpoints / "checkpoint-3" / EMA_FILE)
    for name, weight in trained.items():  # one update, at the warm-up's decay of 0.1
        assert torch.allclose(average[f"unet.{name}"], 0.1 * resumed[name] + 0.9 * weight, atol=1e-6), name


def test_the_logged_loss_is_the_mean_of_the_steps_since_the_last_log(make_recipe, monkeypatch):
    """logging.every_n_steps: 3 logs each loss term as its mean over the 3 steps, not the last step's alone (a
    diffusion loss swings with each batch's timesteps: one step in three was a noisy sample of the curve)."""
    logged = {}
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None: logged.__setitem__(step, values))
    result = train(make_recipe(train__max_steps=4, logging__every_n_steps=3))
    assert sorted(logged) == [3, 4]
    assert logged[3]["train/loss"] == pytest.approx(sum(result.losses[:3]) / 3, rel=1e-6)
    assert logged[4]["train/loss"] == pytest.approx(result.losses[3], rel=1e-6)


@pytest.mark.parametrize("key", ["kl_weight", "l1_weight", "l2_weight", "salience_weight", "perceptual_weight"])
def test_a_negative_vae_loss_weight_is_refused(make_recipe, key):
    """A negative weight would climb its term (or, for salience, weigh pixels below zero) without a word."""
    with pytest.raises(FinetuneError, match=rf"vae\.{key}.*greater than or equal to 0"):
        make_recipe(method="vae", vae={key: -0.5})


def test_a_perceptual_network_without_its_weight_is_one_line(make_recipe, tmp_path):
    """vae.perceptual_network names the classifier of the perceptual term, which vae.perceptual_weight 0 leaves off."""
    with pytest.raises(FinetuneError, match=r"vae\.perceptual_network does nothing with vae\.perceptual_weight 0: set perceptual_weight"):
        make_recipe(method="vae", vae={"perceptual_network": str(tmp_path / "classifier.safetensors")})
    assert make_recipe(method="vae", vae={"perceptual_weight": 0.1, "perceptual_network": str(tmp_path / "c.safetensors")}).vae.perceptual_weight == 0.1


def test_max_grad_norm_clips_the_gradients_the_optimizer_steps_with_to_that_norm(make_recipe, tmp_path, monkeypatch):
    """train.max_grad_norm is the total norm of every trained weight's gradient at the optimizer's step. Every run of
    the suite clipped at the default 1.0, which a LoRA's gradients on the tiny model stay under: a clip at 1.0 whatever
    the setting, or over part of the weights, passed it. The norm is read at the step, over the optimizer's own weights."""
    from accelerate.optimizer import AcceleratedOptimizer

    norms, step = [], AcceleratedOptimizer.step

    def step_and_record(self, *args, **kwargs):
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(AcceleratedOptimizer, "step", step_and_record)
    common = dict(train__max_steps=2, lora__train_text_encoder=True)  # two parameter groups: the norm is of both
    train(make_recipe(output_dir=str(tmp_path / "unclipped"), train__max_grad_norm=None, **common))
    unclipped, norms[:] = list(norms), []
    max_norm = min(unclipped) / 10  # below every step's own norm: each step is clipped
    train(make_recipe(output_dir=str(tmp_path / "clipped"), train__max_grad_norm=max_norm, **common))
    assert len(unclipped) == len(norms) == 2 and norms == pytest.approx([max_norm] * 2, rel=1e-4), (unclipped, norms, max_norm)
