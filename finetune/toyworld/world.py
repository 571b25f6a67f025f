"""The toy world: a procedurally generated, exactly labelled set of captioned images.

Real Stable Diffusion weights cannot be downloaded here, so the project pretrains a
tiny SD on this world and fine-tunes it on parts of the world it never saw (the
held-out shape ``star`` and the held-out style ``striped``). Because every image is
generated from a :class:`Scene`, we know its caption, its attributes and the exact
pixel mask of its shape, which makes evaluation exact (see ``classifier``/``metrics``).

A scene is one coloured shape on a plain background::

    >>> caption(Scene("circle", "red", "blue", "small", "top left", "solid"))
    'a small red circle on a blue background, top left'

Rendering is deterministic: the same scene and seed give byte-identical images.
Dataset folders of rendered scenes are written by :mod:`finetune.toyworld.datasets`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------- vocabulary

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
# Backgrounds are a separate list (gray is background-only); a shape never has the
# colour of its background (enforced by ``sample_scenes`` and ``Scene.__post_init__``).
BACKGROUNDS = ("blue", "green", "gray", "white", "black", "yellow")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
STYLES = ("solid", "striped")

HELD_OUT_SHAPES = ("star",)
HELD_OUT_STYLES = ("striped",)

#: attribute name -> vocabulary, in the order the classifier heads use.
ATTRIBUTES = {
    "shape": SHAPES,
    "colour": COLOURS,
    "background": BACKGROUNDS,
    "size": SIZES,
    "position": POSITIONS,
    "style": STYLES,
}

#: sRGB values, chosen so every shape colour is >= 80 (euclidean, 0-255) from every
#: different background colour and the classes stay distinct at 64 px.
RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 50),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}

# Stripe colours: the one farthest from both the shape colour and the background.
_STRIPE_CANDIDATES = ((30, 30, 30), (235, 235, 235), (128, 128, 128))

#: The generic word a partial caption uses instead of the shape's name ("a red shape").
GENERIC_SHAPE = "shape"


#: Every word ``caption`` and ``partial_caption`` can produce, sorted (e.g. for a tokenizer vocabulary).
WORLD_WORDS = tuple(
    sorted(
        {"a", "on", "background", "striped", GENERIC_SHAPE}
        | set(SHAPES)
        | set(COLOURS)
        | set(BACKGROUNDS)
        | set(SIZES)
        | {w for p in POSITIONS for w in p.split()}
    )
)


@dataclass(frozen=True)
class Scene:
    """One toy-world image: a single shape on a plain background."""

    shape: str
    colour: str
    background: str
    size: str
    position: str
    style: str = "solid"

    def __post_init__(self):
        for name, vocab in ATTRIBUTES.items():
            if getattr(self, name) not in vocab:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {vocab}")
        if self.colour == self.background:
            raise ValueError("the shape colour must differ from the background colour")


# ------------------------------------------------------------------------------ captions


def caption(scene: Scene) -> str:
    """The canonical caption, e.g. 'a small red striped circle on a blue background, top left'.

    Solid scenes do not say "solid" (it is the default look of the world).
    """
    style = "striped " if scene.style == "striped" else ""
    return (
        f"a {scene.size} {scene.colour} {style}{scene.shape} "
        f"on a {scene.background} background, {scene.position}"
    )


def partial_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption that leaves some attributes unsaid: "a red shape, top left", "a small circle".

    Size, colour, background and position are each named with probability 1/2 and the shape
    with 1/2 (else the generic "shape"). A base model trained only on full captions has never
    seen an underspecified prompt, so "a shape" (DreamBooth's class prompt) or a word it does not
    know draws whatever blob the noise suggests; with some partial captions in its data it learns
    to fill in what the prompt leaves open with things of its world.
    """
    keep = rng.random(5) < 0.5
    style = "striped" if scene.style == "striped" else ""
    words = ["a", scene.size if keep[0] else "", scene.colour if keep[1] else "", style, scene.shape if keep[2] else GENERIC_SHAPE]
    text = " ".join(w for w in words if w)
    if keep[3]:
        text += f" on a {scene.background} background"
    if keep[4]:
        text += f", {scene.position}"
    return text


_COLOUR_WORDS = frozenset(COLOURS) | frozenset(BACKGROUNDS)
_SYNONYMS = {"grey": "gray", "centre": "center", "middle": "center", "big": "large", "plus": "cross"}


def parse_caption(text: str) -> dict:
    """The attributes a free-form prompt names; attributes it does not name are ``None``.

    Deliberately simple word spotting, so prompts with extra words still parse
    ("a photo of sks star", "a sks star on a blue background"):

    - shape: the first shape word (plurals "stars", "crosses" and "plus" are accepted);
    - background: the colour word directly before "background";
    - colour: the first other colour word.
      Colours outside the vocabulary of their attribute ("a gray star", "on a red
      background") are returned as written: such prompts can never be satisfied;
    - size: "small" / "large" ("big");
    - position: "top"/"bottom" + "left"/"right", or "center" ("centre", "middle");
    - style: "striped" or "solid" when written, else ``None`` (canonical captions of
      solid scenes do not say "solid", so ``parse_caption(caption(s))`` gives
      ``style=None`` for solid scenes).
    """
    words = [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", text.lower())]
    out = dict.fromkeys(ATTRIBUTES)

    bg_index = None
    for i in range(1, len(words)):
        if words[i] == "background" and words[i - 1] in _COLOUR_WORDS:
            bg_index, out["background"] = i - 1, words[i - 1]
            break
    for i, w in enumerate(words):
        shape = next((stem for stem in (w, w[:-1], w[:-2]) if stem in SHAPES and w[len(stem):] in ("", "s", "es")), None)
        if shape and out["shape"] is None:
            out["shape"] = shape
        elif w in _COLOUR_WORDS and i != bg_index and out["colour"] is None:
            out["colour"] = w
        elif w in SIZES and out["size"] is None:
            out["size"] = w
        elif w in STYLES and out["style"] is None:
            out["style"] = w

    vertical = next((w for w in words if w in ("top", "bottom")), None)
    horizontal = next((w for w in words if w in ("left", "right")), None)
    if vertical and horizontal:
        out["position"] = f"{vertical} {horizontal}"
    elif "center" in words:
        out["position"] = "center"
    return out


# ----------------------------------------------------------------------------- rendering

# Geometry in pixels of a 64 px image (scaled for other sizes). Shapes stay inside the
# image: the widest outline (1.2 r) of a large shape (12 * 1.1 jitter) around a corner
# centre (19 +- 2) spans [1.2, 36.8].
_CENTRES = {
    "top left": (19, 19),
    "top right": (45, 19),
    "bottom left": (19, 45),
    "bottom right": (45, 45),
    "center": (32, 32),
}
_RADII = {"small": 7.0, "large": 12.0}
_CENTRE_JITTER = 2.0  # +- pixels
_RADIUS_JITTER = 0.1  # +- fraction
_STRIPE_PERIOD, _STRIPE_WIDTH = 8, 3  # diagonal stripes, pixels along x


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of a non-circle shape centred on (cx, cy) with nominal radius r."""

    def ring(radii, start_deg):
        n = len(radii)
        angles = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
        return [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for rr, a in zip(radii, angles)]

    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return ring([1.15 * r] * 4, -90)
    if shape == "triangle":
        return ring([1.2 * r] * 3, -90)
    if shape == "star":
        return ring([1.2 * r, 0.5 * r] * 5, -90)
    if shape == "cross":
        w, a = 0.38 * r, 1.05 * r
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
               (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]  # fmt: skip
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}")


def stripe_colour(colour: str, background: str) -> tuple[int, int, int]:
    """Colour of the stripes of a striped shape: the candidate (dark, light, mid gray)
    farthest from both the shape colour and the background, so stripes stay visible
    and the striped shape stays separable from its background."""
    a, b = np.array(RGB[colour]), np.array(RGB[background])
    return max(
        _STRIPE_CANDIDATES,
        key=lambda c: min(np.linalg.norm(np.array(c) - a), np.linalg.norm(np.array(c) - b)),
    )


def _as_rng(rng) -> np.random.Generator | None:
    if rng is None or isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def draw(scene: Scene, size: int = 64, rng=None) -> tuple[Image.Image, np.ndarray]:
    """Render ``scene`` and return ``(RGB image, bool mask of the shape)``.

    ``rng`` is ``None`` (no jitter: canonical placement), an int seed, or a numpy
    ``Generator``; it jitters the centre (+-2 px) and radius (+-10 %). The image is
    built from the mask, so the mask is exactly the shape's pixels.
    """
    g = _as_rng(rng)
    k = size / 64.0
    cx, cy = _CENTRES[scene.position]
    r = _RADII[scene.size]
    if g is not None:
        dx, dy = g.uniform(-_CENTRE_JITTER, _CENTRE_JITTER, size=2)
        cx, cy = cx + dx, cy + dy
        r = r * (1.0 + g.uniform(-_RADIUS_JITTER, _RADIUS_JITTER))
    cx, cy, r = cx * k, cy * k, r * k

    canvas = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(canvas)
    if scene.shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        pen.polygon(_polygon(scene.shape, cx, cy, r), fill=255)
    mask = np.asarray(canvas) > 0

    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = RGB[scene.background]
    pixels[mask] = RGB[scene.colour]
    if scene.style == "striped":
        period = max(3, round(_STRIPE_PERIOD * k))
        width = max(1, round(_STRIPE_WIDTH * k))
        yy, xx = np.mgrid[0:size, 0:size]
        stripes = ((xx + yy) % period) < width
        pixels[mask & stripes] = stripe_colour(scene.colour, scene.background)
    return Image.fromarray(pixels, "RGB"), mask


# -------------------------------------------------------------------------------- scenes

_HELD_OUT_MODES = ("no", "only_shape", "only_style", "all")


def sample_scenes(n: int, seed: int, include_held_out: str = "no") -> list[Scene]:
    """``n`` random scenes, deterministic from ``seed`` (and prefix-stable in ``n``).

    ``include_held_out``:
      - ``"no"``: never the held-out shape (star) nor style (striped) — pretraining data;
      - ``"only_shape"``: only stars, solid — the DreamBooth subject;
      - ``"only_style"``: only striped, non-held-out shapes — the new-style LoRA data;
      - ``"all"``: every shape and style uniformly — e.g. for training the evaluator.
    Other attributes are uniform; the background is resampled until it differs from
    the shape colour.
    """
    if include_held_out not in _HELD_OUT_MODES:
        raise ValueError(f"include_held_out must be one of {_HELD_OUT_MODES}")
    base_shapes = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)
    base_styles = tuple(s for s in STYLES if s not in HELD_OUT_STYLES)
    shapes, styles = {
        "no": (base_shapes, base_styles),
        "only_shape": (HELD_OUT_SHAPES, base_styles),
        "only_style": (base_shapes, HELD_OUT_STYLES),
        "all": (SHAPES, STYLES),
    }[include_held_out]

    g = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        colour = COLOURS[g.integers(len(COLOURS))]
        background = colour
        while background == colour:
            background = BACKGROUNDS[g.integers(len(BACKGROUNDS))]
        scenes.append(
            Scene(
                shape=shapes[g.integers(len(shapes))],
                colour=colour,
                background=background,
                size=SIZES[g.integers(len(SIZES))],
                position=POSITIONS[g.integers(len(POSITIONS))],
                style=styles[g.integers(len(styles))],
            )
        )
    return scenes


def mask_image(mask: np.ndarray) -> Image.Image:
    """A bool shape mask as a ControlNet conditioning image: white shape on black, RGB."""
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L").convert("RGB")
