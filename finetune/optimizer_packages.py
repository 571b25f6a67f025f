"""The packages an optimizer.name needs beyond torch, looked up without importing them (nor torch, which they import):
`finetune train` says a missing one before its data check decodes every image, train() before the base model loads."""

from __future__ import annotations

import importlib.util

from finetune.checked_once import kept_check
from finetune.config import OptimizerConfig
from finetune.console import warn
from finetune.errors import FinetuneError

# optimizer.name -> its bitsandbytes class (finetune.optim builds it).
BITSANDBYTES_OPTIMIZERS = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit", "lion8bit": "Lion8bit"}
_FALLBACK_SAID = "optimizer.name: bitsandbytes fallback said"  # its checked_once key


def check_optimizer_installed(config: OptimizerConfig) -> None:
    """optimizer.name prodigy without its package, refused before the model loads (bitsandbytes' optimizers fall
    back to AdamW with a warning instead: they save memory, where Prodigy's learning rate is another training)."""
    if config.name == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        raise FinetuneError("optimizer.name prodigy needs the prodigyopt package: pip install prodigyopt")


def warn_bitsandbytes_missing(config: OptimizerConfig) -> None:
    """An 8-bit optimizer.name where bitsandbytes is not installed: its fallback to AdamW, said by `finetune train` before
    its data check (it came once every image was decoded, minutes late on a large folder). One installed that cannot run
    here (a build for another CUDA) is found only by importing it (and torch): train() says that as it builds the optimizer."""
    if config.name in BITSANDBYTES_OPTIMIZERS and importlib.util.find_spec("bitsandbytes") is None:
        say_bitsandbytes_fallback(config.name, "is not installed (pip install bitsandbytes for its 8-bit states)")


def say_bitsandbytes_fallback(name: str, why: str) -> None:
    """optimizer.name `name` falling back to torch's AdamW because bitsandbytes `why`: said by each machine, once in a
    `finetune train` (checked_once.py: its early word stands for train()'s), each time outside one (a test, the benchmark)."""
    kept_check(_FALLBACK_SAID, lambda: warn(f"optimizer.name={name}: bitsandbytes {why}; falling back to torch AdamW (32-bit states)", by="machine"))
