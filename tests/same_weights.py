"""How the tests compare runs' trained weights: bit for bit, or as a whole update (tests/test_distributed.py and the
other launched tests import them from there)."""

import torch
from numerics import ON_GPU

# A resume on the CPU replays the uninterrupted run's steps bit for bit: its checkpoint holds all a step reads (weights,
# optimizer states, RNGs, the data position), and gloo sums the 2 processes' gradients in the same order every time.
# Any tolerance would let a state that is not saved go unseen. A GPU's kernels are not bit-reproducible (tests/numerics.py).
RESUME_IS_EXACT = not ON_GPU


def assert_same_weights(a: dict, b: dict, exact: bool) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), (key, (a[key] - b[key]).abs().max())
        else:
            assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-4), (key, (a[key] - b[key]).abs().max())


def assert_same_update(got: dict, expected: dict, initial: dict) -> None:
    """Two runs that saw the same batches made the same update, up to float summation order. Compared
    as a whole: Adam moves a weight by about lr whatever its gradient, so a near-zero gradient whose
    sign depends on the order of float sums moves its weight either way (ControlNet's body at step 2,
    behind zero convolutions that have just left zero, is full of them)."""
    assert got.keys() == expected.keys() == initial.keys()
    difference = sum(((got[k] - expected[k]) ** 2).sum() for k in got) ** 0.5
    update = sum(((expected[k] - initial[k]) ** 2).sum() for k in got) ** 0.5
    assert update > 0 and difference < 1e-2 * update, (difference, update)


def lora_start(adapter: dict) -> dict:
    """A saved LoRA's start for assert_same_update: its up matrices start at zero (the down ones' starts are not
    saved: taken as where they ended, so the update's norm is at most the real one's, a stricter test)."""
    return {k: torch.zeros_like(v) if ".lora.up." in k else v for k, v in adapter.items()}
