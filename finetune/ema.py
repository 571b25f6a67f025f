"""An exponential moving average (EMA) of the trained weights: `train.ema_decay`.

After every optimizer step each average moves towards its weight: avg += (1 - d) * (weight - avg).
The average of the last few hundred steps is smoother than the last step's weights, which is why
full fine-tunes (diffusers' train_text_to_image --use_ema, SimpleTuner) save it instead. As in
diffusers' EMAModel, the decay warms up as min(ema_decay, (1 + n) / (10 + n)) after n updates, so
the first steps (still near the pretrained weights) do not dominate a long average.

The averages are fp32 copies on the weights' device (for SD1.5's full UNet, 3.4 GB more memory). They
are what validation samples and what the run saves; checkpoints keep them in `ema.safetensors`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from finetune.atomic_files import atomic_save_safetensors
from finetune.errors import FinetuneError

EMA_FILE = "ema.safetensors"


class WeightAverage:
    """The EMA of named parameters; `applied()` puts it into them for a while (sampling, saving)."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float):
        self.parameters = parameters
        self.decay = decay
        self.start_from_weights()

    def start_from_weights(self) -> None:
        """A new average: the parameters as they are now, no update yet."""
        self.updates = 0
        self.averages = {name: p.detach().float().clone() for name, p in self.parameters.items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        # One foreach call, a few fused kernels on a GPU, where a lerp_ per parameter launched hundreds each step
        # (a UNet's, a LoRA's): the same lerp, elementwise.
        averages = [self.averages[name] for name in self.parameters]
        torch._foreach_lerp_(averages, [parameter.detach().float() for parameter in self.parameters.values()], weight)
        self.updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The averages in the parameters (copied in place: DeepSpeed's parameters are views of its
        flat buffers), and the trained weights back afterwards."""
        trained = {name: p.detach().to("cpu", copy=True) for name, p in self.parameters.items()}  # not in GPU memory
        try:
            for name, parameter in self.parameters.items():
                parameter.copy_(self.averages[name])
            yield
        finally:
            for name, parameter in self.parameters.items():
                parameter.copy_(trained[name])

    def save(self, path: Path) -> None:
        tensors = {name: average.cpu().contiguous() for name, average in self.averages.items()}
        atomic_save_safetensors(tensors, path, {"updates": str(self.updates)})

    def load(self, path: Path) -> bool:
        """Read the averages a checkpoint kept; False when it has none (a run without train.ema_decay): the
        average then starts from the resumed weights, loaded after this average was made from the untrained ones."""
        if not path.is_file():
            self.start_from_weights()
            return False
        try:
            with safe_open(str(path), "pt") as f:
                updates = int((f.metadata() or {}).get("updates", 0))
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:  # cut short by a full disk or a killed copy: said as for the checkpoint's other files
            raise FinetuneError(
                f"checkpoint {path.parent} is damaged or incomplete ({path.name}: {type(err).__name__}: {str(err).splitlines()[0][:100]}): "
                f"move it out of {path.parent.parent} and resume from the one before it"
            ) from None
        if set(tensors) != set(self.averages):
            raise FinetuneError(f"{path} averages other weights than this recipe trains: resume with the recipe that wrote it")
        self.updates = updates
        for name, average in self.averages.items():
            average.copy_(tensors[name])
        return True
