"""lora.rank is one rank for the UNet and, with lora.train_text_encoder, the text encoder: it is refused only above
what every layer it adapts, in either model, can use."""

import pytest

from finetune.errors import FinetuneError
from finetune.methods.lora import LoRAMethod
from finetune.models.loading import load_base_model


def test_a_rank_the_unet_uses_is_kept_with_a_narrower_text_encoder(make_recipe):
    """The tiny UNet's widest adapted layers are 64 wide, its text encoder's 32: rank 48 trains the UNet's at 48 (as
    SD1.5's 1280-wide attention takes a rank above its 768-wide text encoder), so training the text encoder too does
    not refuse it."""
    recipe = make_recipe(lora__rank=48, lora__alpha=48, lora__train_text_encoder=True)
    method = LoRAMethod(recipe)
    base = load_base_model(recipe.model)
    method.setup(base)
    assert {"unet", "text_encoder"} <= set(method.trained_modules())
    for model in (base.unet, base.text_encoder):  # every down matrix at rank 48, not lowered to what all layers can use
        ranks = {tuple(p.shape)[0] for name, p in model.named_parameters() if "lora_A" in name}
        assert ranks == {48}, (type(model).__name__, ranks)


def test_a_rank_past_both_models_is_refused_naming_both(make_recipe):
    recipe = make_recipe(lora__rank=65, lora__alpha=65, lora__train_text_encoder=True)
    with pytest.raises(FinetuneError, match=r"lora.rank \(65\) is more than any adapted layer of the UNet2DConditionModel and CLIPTextModel can use .* at most 64"):
        LoRAMethod(recipe).setup(load_base_model(recipe.model))
