"""Apple's MPS device, simulated on a machine without one: what the trainer, `sample` and the demo do where
`torch.backends.mps.is_available()`. Tensors cannot be put on an MPS device here: the calls that would are recorded."""

import torch

from finetune.device_copy import to_device


def test_copies_to_mps_wait_for_their_source(monkeypatch):
    """A non_blocking copy from pageable CPU memory to MPS may read its source after it is freed, as each step's
    noise, pixels and latents are at once (pytorch/pytorch#139550, #189690): silently other values."""
    copies = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: copies.append(kwargs) or self)
    to_device(torch.zeros(2), torch.device("mps"))
    to_device(torch.zeros(2), "mps", torch.float16)
    assert [copy["non_blocking"] for copy in copies] == [False, False]
