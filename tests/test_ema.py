"""train.ema_decay: the run saves the exponential moving average of its weights, step by step as the
formula says, without changing what trains; a resumed run continues the average. (Under DeepSpeed: test_deepspeed_ema.py.)"""

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from finetune.checkpoints.run_files import LORA_WEIGHTS_NAME, PIPELINE_DIR
from finetune.checkpoints.run_files import list_checkpoints
from finetune.errors import FinetuneError
from finetune.training.ema import EMA_FILE
from finetune.training.trainer import train

DECAY = 0.15  # the warm-up gives 0.1 at the first update, then this cap: both branches of the rule


def trained_weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "trainable_0.safetensors")


def test_a_full_fine_tune_saves_the_average_of_its_steps_and_trains_as_without(make_recipe, tiny_model, tmp_path):
    common = dict(method="full", train__max_steps=3, optimizer__lr=1e-3, checkpoint__every_n_steps=1, checkpoint__keep_last=5)
    plain = train(make_recipe(output_dir=str(tmp_path / "plain"), **common))
    # Validation (after each step here) samples with the average in place of the trained weights.
    averaged = train(make_recipe(output_dir=str(tmp_path / "ema"), train__ema_decay=DECAY, validation__every_n_steps=1, **common))

    # The average never feeds back into training: the same losses, the same trained weights.
    assert averaged.losses == plain.losses
    steps = [trained_weights(path) for path in list_checkpoints(tmp_path / "plain" / "checkpoints")]
    last = trained_weights(list_checkpoints(tmp_path / "ema" / "checkpoints")[-1])
    assert len(steps) == 3 and all(torch.equal(last[name], steps[-1][name]) for name in last)

    # avg_0 = the pretrained UNet; after update n: avg += (1 - d_n) * (w_n - avg), d_n = min(DECAY, (1 + n) / (10 + n)).
    pretrained = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").state_dict()
    expected = {name: pretrained[name].float().clone() for name in steps[0]}
    for n, weights in enumerate(steps):
        decay = min(DECAY, (1 + n) / (10 + n))
        for name, average in expected.items():
            average.lerp_(weights[name], 1 - decay)
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "ema" / PIPELINE_DIR / "unet").state_dict()
    unsaved = UNet2DConditionModel.from_pretrained(tmp_path / "plain" / PIPELINE_DIR / "unet").state_dict()
    for name, average in expected.items():
        assert torch.allclose(saved[name], average, atol=1e-6), name
    assert any(not torch.allclose(saved[name], unsaved[name], atol=1e-6) for name in expected)  # it is not the last step's


def test_a_resumed_run_continues_the_average(make_recipe, tmp_path):
    common = dict(train__max_steps=4, train__ema_decay=0.5, checkpoint__every_n_steps=2)
    straight = train(make_recipe(output_dir=str(tmp_path / "straight"), **common))
    train(make_recipe(output_dir=str(tmp_path / "resumed"), **{**common, "train__max_steps": 2}))
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-2" / EMA_FILE).is_file()
    train(make_recipe(output_dir=str(tmp_path / "resumed"), **common), resume="latest")
    a, b = load_file(straight.output_dir / LORA_WEIGHTS_NAME), load_file(tmp_path / "resumed" / LORA_WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_checkpoint_without_an_average_starts_one_with_a_warning(make_recipe, tmp_path, capsys):
    train(make_recipe(train__max_steps=2, checkpoint__every_n_steps=2))
    result = train(make_recipe(train__max_steps=3, train__ema_decay=0.5, checkpoint__every_n_steps=2), resume="latest")
    assert result.final_step == 3
    assert "checkpoint-2 has no weight average (train.ema_decay was off): it starts from the resumed weights" in capsys.readouterr().out


def test_the_decay_must_be_below_one(make_recipe):
    with pytest.raises(FinetuneError, match=r"key 'train.ema_decay'"):
        make_recipe(train__ema_decay=1.0)


def test_the_average_of_bf16_weights_is_kept_in_float32_so_small_steps_still_move_it(tmp_path):
    """Under DeepSpeed's bf16 the trained parameters are bf16. An average kept in their dtype would round every
    update away (decay 0.9999: 1e-4 of a one-bit step is far below bf16's resolution, so it stays the same number);
    it is kept in float32 and rounded to the weights' dtype only where it is written into them."""
    from finetune.training.ema import WeightAverage

    layer = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    average = WeightAverage({"w": layer.weight}, decay=0.9999)
    average.updates = 10**6  # past the warm-up: the full decay
    with torch.no_grad():
        layer.weight.fill_(1.0078125)  # one bf16 step above 1.0
    for _ in range(100):
        average.update()
    assert average.averages["w"].dtype == torch.float32
    moved = average.averages["w"] - 1.0
    # 100 small moves, none lost (a bf16 average would not have moved at all); float32's own rounding near 1.0
    # (a 1e-7 step) puts the sum a few percent off the exact value.
    assert torch.allclose(moved, torch.full_like(moved, 0.0078125 * (1 - 0.9999**100)), rtol=0.1)
    with average.applied():  # written into the bf16 weights: rounded there, to the nearest bf16 (1.0)
        assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, torch.ones_like(layer.weight))
    assert torch.equal(layer.weight, torch.full_like(layer.weight, 1.0078125))  # the trained weights back
    # Saved and resumed in float32 too: a checkpoint does not round it to the weights' dtype.
    average.save(tmp_path / EMA_FILE)
    resumed = WeightAverage({"w": layer.weight}, decay=0.9999)
    assert resumed.load(tmp_path / EMA_FILE) and torch.equal(resumed.averages["w"], average.averages["w"]) and resumed.updates == 10**6 + 100
