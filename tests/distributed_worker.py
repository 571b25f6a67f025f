"""Run by `accelerate launch` in tests/test_distributed.py: train a recipe (optionally resuming:
`distributed_worker.py RECIPE [RESUME]`), then write this rank's trainable weights to
<output_dir>/rank<N>.safetensors so the test can compare ranks."""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

import finetune.trainer as trainer
from finetune.checkpoint import trainable_state_dict
from finetune.config import load_recipe

captured = {}
load = trainer.load_base_model
trainer.load_base_model = lambda *args, **kwargs: captured.setdefault("base", load(*args, **kwargs))
recipe = load_recipe(sys.argv[1])
trainer.train(recipe, resume=sys.argv[2] if len(sys.argv) > 2 else None)
rank = int(os.environ["RANK"])
save_file(trainable_state_dict(captured["base"].unet), str(Path(recipe.output_dir) / f"rank{rank}.safetensors"))
