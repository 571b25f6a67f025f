"""The packages an optimizer.name needs beyond torch, looked up without importing them (nor torch, which they import):
`finetune train` says a missing one before its data check decodes every image, train() before the base model loads."""

from __future__ import annotations

import importlib.util

from finetune.config import OptimizerConfig
from finetune.errors import FinetuneError


def check_optimizer_installed(config: OptimizerConfig) -> None:
    """optimizer.name prodigy without its package, refused before the model loads (bitsandbytes' optimizers fall
    back to AdamW with a warning instead: they save memory, where Prodigy's learning rate is another training)."""
    if config.name == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        raise FinetuneError("optimizer.name prodigy needs the prodigyopt package: pip install prodigyopt")
