"""An exponential moving average (EMA) of the trained weights: `train.ema_decay`.

After every optimizer step each average moves towards its weight: avg += (1 - d) * (weight - avg).
The average of the last few hundred steps is smoother than the last step's weights, which is why
full fine-tunes (diffusers' train_text_to_image --use_ema, SimpleTuner) save it instead. As in
diffusers' EMAModel, the decay warms up as min(ema_decay, (1 + n) / (10 + n)) after n updates, so
the first steps (still near the pretrained weights) do not dominate a long average. (EMAModel takes its very first
update whole, decay 0, where n = 0 gives 0.1 here: the start weights keep 5e-4 of the average after 5 updates, 1e-5 after 10.)

The averages are fp32 copies on the weights' device (for SD1.5's full UNet, 3.4 GB more memory), under DeepSpeed
on the masters' device (in CPU memory under an offloaded optimizer: no GPU memory, the update on the CPU). They
are what validation samples and what the run saves; checkpoints keep them in `ema.safetensors`.

Under DeepSpeed (`MasterWeightAverage`) what trains is the optimizer's fp32 master weights, split between the
processes (`finetune.training.master_weights`); the module's parameters are the engine's bf16/fp16 copies, and under ZeRO-3
empty shards outside a gather. Averaging those copies would average weights that bf16 rounds (an update below its
resolution lost each step, where a run without the average saves the masters), and under ZeRO-3 nothing. So each
process averages its own slice of the masters: no communication per step, and 1/N of the average's memory on each
of N processes. The other way, gathering each master whole every step (`safe_get_full_fp32_param`), would send the
whole model between the processes at every step and hold the whole average on each: cheap for a LoRA, not for a full
UNet, and against ZeRO-3's point that no process holds the model whole. The slices are gathered only where the
average is used, by every process together: to sample and save, the average takes the masters' place (and the
engine's copies are made from it, as after a step), so the outputs' gather of the masters (`full_parameters`) saves
it; a checkpoint's `ema.safetensors` holds it whole, as without DeepSpeed, and a resumed process takes its slice.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from finetune.errors import FinetuneError
from finetune.outputs.atomic_files import atomic_save_safetensors
from finetune.training import master_weights

EMA_FILE = "ema.safetensors"


def weight_average(parameters: dict[str, torch.nn.Parameter], decay: float) -> WeightAverage:
    """The average of the named parameters: of their fp32 masters where DeepSpeed keeps them (see above)."""
    if any(master_weights.has_master(p) for p in parameters.values()):
        return MasterWeightAverage(parameters, decay)
    # Trained weights in half precision are DeepSpeed's copies of masters it keeps elsewhere (without DeepSpeed they
    # train in fp32): an average of the copies would lose each update below their resolution, silently.
    half = next((name for name, p in parameters.items() if p.dtype in (torch.bfloat16, torch.float16)), None)
    if half is not None:
        raise FinetuneError(master_weights.layout_refusal(f"{half}: a {parameters[half].dtype} copy, and no fp32 master where finetune looks for one"))
    return WeightAverage(parameters, decay)


class WeightAverage:
    """The EMA of named parameters; `applied()` puts it into them for a while (sampling, saving)."""

    sharded = False  # each process holds the whole average: any one may put it in or save it alone

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float):
        self.parameters = parameters
        self.decay = decay
        self.start_from_weights()

    def weights(self) -> dict[str, torch.Tensor]:
        """What is averaged, by name: the parameters themselves."""
        return self.parameters

    def start_from_weights(self) -> None:
        """A new average: the weights as they are now, no update yet."""
        self.updates = 0
        self.averages = {name: w.detach().float().clone() for name, w in self.weights().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        weights = self.weights()
        # One foreach call, a few fused kernels on a GPU, where a lerp_ per parameter launched hundreds each step
        # (a UNet's, a LoRA's): the same lerp, elementwise. The weights as they are (fp32: `weight_average`), not
        # detached (no_grad): a detach per parameter was hundreds of operators for the host to dispatch each step.
        averages = [self.averages[name] for name in weights]
        torch._foreach_lerp_(averages, [w.float() for w in weights.values()], weight)
        self.updates += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The averages in the parameters (copied in place: they may be views of a flat buffer), and the trained
        weights back afterwards."""
        trained = {name: p.detach().to("cpu", copy=True) for name, p in self.parameters.items()}  # not in GPU memory
        try:
            for name, parameter in self.parameters.items():
                parameter.copy_(self.averages[name])
            yield
        finally:
            for name, parameter in self.parameters.items():
                parameter.copy_(trained[name])

    def whole(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The averages, whole, on the CPU (`keep`: False gives nothing, where that is not the process that saves)."""
        return {name: average.cpu().contiguous() for name, average in self.averages.items()} if keep else {}

    def save(self, path: Path, writer: bool = True) -> None:
        """`writer`: whether this process writes the file (where the average is `sharded`, every process calls this)."""
        tensors = self.whole(keep=writer)
        if writer:
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
        except (SafetensorError, OSError, ValueError) as err:  # ValueError: an "updates" that is no count  # cut short by a full disk or a killed copy: said as for the checkpoint's other files
            raise FinetuneError(
                f"checkpoint {path.parent} is damaged or incomplete ({path.name}: {type(err).__name__}: {str(err).splitlines()[0][:100]}): "
                f"move it out of {path.parent.parent} and resume from the one before it"
            ) from None
        if set(tensors) != set(self.averages):
            raise FinetuneError(f"{path} averages other weights than this recipe trains: resume with the recipe that wrote it")
        def part_held_here(name: str) -> torch.Tensor:
            try:
                part = self.held_part(name, tensors[name])
            except (RuntimeError, IndexError, ValueError):  # a slice of a whole of another shape
                part = None
            if part is None or part.shape != self.averages[name].shape:  # copy_ would broadcast a (1,) into anything
                raise FinetuneError(f"{path} averages {name} at shape {tuple(tensors[name].shape)}, not this recipe's: "
                                    f"resume with the recipe that wrote it")
            return part

        parts = {name: part_held_here(name) for name in self.averages}
        self.updates = updates
        for name, average in self.averages.items():
            average.copy_(parts[name])
        return True

    def held_part(self, name: str, whole: torch.Tensor) -> torch.Tensor:
        """What this process averages of the whole value of the parameter `name`: all of it."""
        return whole


class MasterWeightAverage(WeightAverage):
    """Under DeepSpeed: each process's average of its slice of the fp32 masters (see the module's docstring)."""

    sharded = True  # putting it in and saving it are collectives: every process, together

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float):
        master_weights.check_layout(parameters)  # read through DeepSpeed's internals: a version that differs is one line
        super().__init__(parameters, decay)

    def weights(self) -> dict[str, torch.Tensor]:
        """This process's slices of the masters, where the optimizer keeps them (views, read again at each update: views
        kept would outlive the storage DeepSpeed's offload_states and reload_states swap under them)."""
        return {name: master_weights.local_master(p) for name, p in self.parameters.items()}

    @contextlib.contextmanager
    @torch.no_grad()
    def in_masters(self) -> Iterator[None]:
        """The averages in this process's slices of the masters, the trained values back afterwards; no communication."""
        trained = {name: master.clone() for name, master in self.weights().items()}  # this process's slices only
        try:
            for name, parameter in self.parameters.items():
                master_weights.set_local_master(parameter, self.averages[name])
            yield
        finally:
            for name, parameter in self.parameters.items():
                master_weights.set_local_master(parameter, trained[name])

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """Collective: the averages in the masters and, made from them, in the engine's copies the forward pass uses;
        afterwards the trained masters, and the copies made from them again (the same values they had)."""
        try:
            with self.in_masters():
                master_weights.copy_masters_to_engine(self.parameters.values())
                yield
        finally:
            master_weights.copy_masters_to_engine(self.parameters.values())

    def whole(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """Collective: each average gathered from every process's slice."""
        tensors = {}
        with self.in_masters():
            for name, parameter in self.parameters.items():
                average = master_weights.whole_master(parameter)
                if keep:
                    tensors[name] = average.cpu().contiguous()
        return tensors

    def held_part(self, name: str, whole: torch.Tensor) -> torch.Tensor:
        return master_weights.local_slice(self.parameters[name], whole)
