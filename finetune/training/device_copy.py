"""Host-to-device copies that do not make the host wait for the GPU.

`tensor.to("cuda")` from ordinary (pageable) host memory waits until every kernel already queued on the stream
has finished: in the training loop (noise, timesteps, cached latents, pixels each step) that stopped the CPU from
queueing the step's kernels while the GPU ran the last ones. Staged in pinned (page-locked) memory, the copy is
queued like a kernel (`non_blocking=True`); torch's caching host allocator keeps the pinned staging block alive
until the copy has run, so the source may be dropped at once.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor.to(device, dtype)`, queued without waiting when it copies from the host to a CUDA GPU (a conversion
    to `dtype` then runs on the GPU); elsewhere (CPU, Apple's MPS) the same as `.to`. Not non_blocking to MPS:
    there a copy from pageable memory may read the source after it was freed (the step's noise, pixels and latents
    are, at once), silently training on other values (pytorch/pytorch#139550, #189690)."""
    source, target = tensor.device.type, torch.device(device).type
    if source == "cpu" and target == "cuda":
        tensor = tensor.pin_memory()  # a pinned tensor (a data loader's with pin_memory) is used as it is
    return tensor.to(device=device, dtype=dtype, non_blocking="mps" not in (source, target))
