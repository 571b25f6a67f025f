"""The toy world: captioned 64x64 shape images, an exact evaluator, and metrics.

- :mod:`finetune.toyworld.world`: scenes, captions, rendering;
- :mod:`finetune.toyworld.datasets`: rendered samples and dataset folders;
- :mod:`finetune.toyworld.classifier`: a small CNN that recognises every attribute;
- :mod:`finetune.toyworld.metrics`: prompt adherence, subject fidelity, prior drift,
  control IoU and a Fréchet distance on the classifier's features.
"""

from .datasets import generate, write_folder
from .world import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_SHAPES,
    HELD_OUT_STYLES,
    POSITIONS,
    RGB,
    SHAPES,
    SIZES,
    STYLES,
    WORLD_WORDS,
    Scene,
    caption,
    draw,
    parse_caption,
    render,
    sample_scenes,
    shape_mask,
)

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLOURS",
    "HELD_OUT_SHAPES",
    "HELD_OUT_STYLES",
    "POSITIONS",
    "RGB",
    "SHAPES",
    "SIZES",
    "STYLES",
    "WORLD_WORDS",
    "Scene",
    "caption",
    "draw",
    "generate",
    "parse_caption",
    "render",
    "sample_scenes",
    "shape_mask",
    "write_folder",
]
