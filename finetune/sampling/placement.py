"""Where `finetune sample`, `finetune eval` and the demo run a model: the device and the weights' precision.

Training places models through accelerate; sampling outside training chooses here. By default it uses
the GPU when there is one (CUDA, else Apple's MPS), in fp16 on CUDA, as the webui and diffusers'
examples sample SD1.x (half the memory, tensor cores), and in fp32 elsewhere. `--device` and
`--precision` choose otherwise (`--device cpu` while a GPU trains, `--precision fp32` to compare
with fp32 validation grids).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from finetune.errors import FinetuneError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def bf16_emulated() -> str | None:
    """Why bf16 would be emulated on this machine's CUDA GPU (one before NVIDIA's Ampere: a T4, a V100), in words;
    None where it is native or there is no CUDA GPU. torch, and so accelerate, accept bf16 there and emulate it."""
    if not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False):
        return None
    major, minor = torch.cuda.get_device_capability()
    return (f"this GPU ({torch.cuda.get_device_name()}, compute capability {major}.{minor}) has no bf16 arithmetic "
            "(NVIDIA's came with Ampere, 8.0) and would emulate it, far slower")  # fmt: skip


def mps_without_bf16() -> str | None:
    """Why bf16 cannot run on this Mac's MPS (before macOS 14), in words; None where it can or there is no MPS (or a CUDA
    GPU, which accelerate uses instead). accelerate stopped such a run with "bf16 mixed precision requires PyTorch >=
    1.10 and a supported device", once the data had been checked."""
    if torch.cuda.is_available() or not _mps_available() or torch.backends.mps.is_macos_or_newer(14, 0):
        return None
    return "Apple's MPS has bf16 from macOS 14 on, and this Mac runs an older macOS"


def inference_placement(device: str = "auto", precision: str = "auto") -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for `--device` and `--precision` ("auto": see the module's docstring)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("--device cuda: torch sees no CUDA GPU here (a CPU build of torch, or no driver): leave --device out to use the CPU")
    elif device == "mps" and not _mps_available():
        raise FinetuneError("--device mps: Apple's MPS is not available here: leave --device out")
    if precision == "auto":
        precision = "fp16" if device == "cuda" else "fp32"
    if precision == "fp16" and device == "cpu":
        raise FinetuneError("--precision fp16 needs a GPU: on a CPU use fp32 or bf16")
    if precision == "bf16" and device == "cuda" and (emulated := bf16_emulated()):
        raise FinetuneError(f"--precision bf16: {emulated}: leave --precision out (fp16)")
    if precision == "bf16" and device == "mps" and (missing := mps_without_bf16()):
        raise FinetuneError(f"--precision bf16: {missing}: leave --precision out (fp32), or update macOS")
    return torch.device(device), PRECISIONS[precision]


def out_of_device_memory(err: BaseException) -> bool:
    """Whether `err` is a GPU's allocator running out: torch.OutOfMemoryError on CUDA; on Apple's MPS a plain
    RuntimeError, "MPS backend out of memory (MPS allocated: ...)", which the halving of sampled batches missed."""
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError) and "MPS backend out of memory" in str(err))


def free_device_memory() -> None:
    """After `out_of_device_memory`, before the batch is made again smaller: the allocator's cached blocks (the failed
    call's among them) go back to the device, so that the retry starts from all the memory it has free, unfragmented.
    Sampling's halving and the class images' share it."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif _mps_available():
        torch.mps.empty_cache()


def place(modules, device: torch.device, dtype: torch.dtype):
    """Move a pipeline or modules (frozen, for sampling) to `device` in `dtype`; returns what it was given."""
    for module in modules if isinstance(modules, (list, tuple)) else [modules]:
        if module is not None:
            module.to(device=device, dtype=dtype)
    return modules


def placement_line(device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    precision = next(key for key, value in PRECISIONS.items() if value == dtype)
    return f"sampling on {name} in {precision}" + (" (--device cpu or --precision fp32 to choose otherwise)" if device.type == "cuda" else "")


@contextmanager
def without_tf32():
    """Full fp32 on CUDA: cuBLAS matmuls and cuDNN convolutions (cuDNN's in TF32 by default, and training may
    have turned TF32 on for matmuls) both in fp32 while inside; the flags as they were afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
