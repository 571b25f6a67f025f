"""The kinds of conditioning image `finetune make-conditions` makes, and their thresholds' defaults and bounds: one
definition for the command's options (finetune/cli/arguments.py, which imports no numpy) and the makers
(finetune/controlnet/conditions.py), which the demo and sample call with these defaults where a ControlNet records none."""

KINDS = ("canny", "luminance", "mask")
OPTION_NAMES = {"canny": ("low", "high", "sigma"), "mask": ("threshold",), "luminance": ()}  # each maker's thresholds
CANNY_LOW, CANNY_HIGH, CANNY_SIGMA = 20.0, 40.0, 1.0
# The toy world's closest shape/background colours are ~83 apart (see toyworld.metrics.SEGMENT_THRESHOLD).
MASK_THRESHOLD = 40.0
# The most blur canny takes: its kernel spans 6 sigma pixels, each a pass over the photo (sigma 1e9, as a ControlNet's
# record may say, asked for a kernel of 48 GB); past a few pixels no edge a ControlNet follows survives anyway.
MAX_CANNY_SIGMA = 50.0
