"""Canny's hysteresis (scipy's labelling since a flood fill in Python took seconds of a large photo's edges) keeps what
the flood fill kept: make-conditions' images, and the demo's made the same way, stay the lines ControlNets trained on."""

import numpy as np

from finetune.controlnet.conditions import _hysteresis


def flood_filled(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """The hysteresis as it was written first: from every strong pixel, through 8-connected weak pixels."""
    h, w = weak.shape
    keep, stack = strong.copy(), list(zip(*np.nonzero(strong)))
    while stack:
        y, x = stack.pop()
        for ny in range(max(0, y - 1), min(h, y + 2)):
            for nx in range(max(0, x - 1), min(w, x + 2)):
                if weak[ny, nx] and not keep[ny, nx]:
                    keep[ny, nx] = True
                    stack.append((ny, nx))
    return keep


def test_the_weak_pixels_kept_are_those_connected_to_a_strong_one_diagonals_and_frame_included():
    rng = np.random.default_rng(0)
    for _ in range(100):
        weak = rng.random((30, 40)) < rng.uniform(0.1, 0.7)
        strong = weak & (rng.random((30, 40)) < 0.05)
        assert np.array_equal(_hysteresis(strong, weak), flood_filled(strong, weak))
    weak = np.eye(6, dtype=bool)  # a diagonal line, touching the frame at both ends
    strong = np.zeros((6, 6), dtype=bool)
    strong[0, 0] = True
    assert _hysteresis(strong, weak).sum() == 6
    assert not _hysteresis(np.zeros((6, 6), dtype=bool), weak).any()  # no strong pixel: nothing kept
