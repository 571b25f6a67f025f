"""The shapes of a single-file base's tensors, by name, read without torch and without its weights: a `.safetensors` file's
header, or a `.ckpt`'s pickle (torch's zip format keeps it apart from the weights, as data.pkl) read by an unpickler that
builds nothing but dicts, lists and shapes. `finetune.formats.lora_base_fit` tells a LoRA of another base by them before the
base loads (gigabytes): a .ckpt base was left to loading, whose names "are not read before it loads".
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path


def tensor_shapes(path: Path, names: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors named `names` that the single file `path` holds; {} where it cannot be read so (damaged,
    a pickle of other objects or of torch's legacy format: loading says what it is)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open  # numpy's reader: "pt" imports torch

        try:
            with safe_open(str(path), "np") as f:
                keys = set(f.keys())
                return {name: tuple(f.get_slice(name).get_shape()) for name in names if name in keys}
        except (SafetensorError, OSError):
            return {}
    state = _ckpt_state(path)
    return {name: tuple(state[name]) for name in names if isinstance(state.get(name), _Shape)}


class _Shape(tuple):
    """A tensor of a .ckpt, as its shape."""


def _shape(storage, offset, size, *rest) -> _Shape:  # torch._utils._rebuild_tensor_v2's arguments: the storage is never read
    return _Shape(size)


def _parameter(data, *rest):  # torch._utils._rebuild_parameter's: the tensor it wraps
    return data


class _ShapeUnpickler(pickle.Unpickler):
    """torch.save's pickle with its tensors as shapes: the only callables it finds are the tensor builders (here `_shape`),
    OrderedDict and the storage classes' names; any other (a Lightning callback, code made to run) stops it."""

    ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _shape, ("torch._utils", "_rebuild_tensor"): _shape,
               ("torch._utils", "_rebuild_parameter"): _parameter, ("collections", "OrderedDict"): collections.OrderedDict}  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[module, name]
        if module == "torch" and name.endswith("Storage"):  # the dtype, in a persistent id: read as its name
            return name
        raise pickle.UnpicklingError(f"{module}.{name} is not read here")

    def persistent_load(self, pid):  # a tensor's storage, in the archive beside data.pkl: not read
        return None


def _ckpt_state(path: Path) -> dict:
    """A .ckpt's state dict (under "state_dict", as original Stable Diffusion checkpoints keep it), tensors as `_Shape`s."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((name for name in archive.namelist() if name == "data.pkl" or name.endswith("/data.pkl")), None)
            if name is None:
                return {}
            with archive.open(name) as pickled:
                state = _ShapeUnpickler(pickled).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError):
        return {}
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state if isinstance(state, dict) else {}
