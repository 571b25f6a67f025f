"""The row labels of a labelled grid (sample, validation and eval grids: a prompt beside its images): a font that grows with
the cell, words kept apart by a visible gap, and a prompt wrapped to the label's margin, ellipsized where the row is too
short for it. Drawn with Pillow's default font at size 10, words ran together ("a photo ofsks dog": its space is 2 px,
less than the gaps hinting leaves inside words), and a long prompt ran over the images and into the next row's label."""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import ImageDraw, ImageFont

PADDING = 2  # px between a label and its margin's edges
ELLIPSIS = "..."  # in every font (the bitmap fallback has no "…")
SMALLEST_SIZE = 12  # px; below it the default font's letters blur together


def label_font(cell_height: int, label_width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font (its FreeType one, Pillow >= 10.1 with FreeType) at a size growing with the row's height
    (1/24 of it), at most a tenth of the margin's width (some 18 letters a line), at least SMALLEST_SIZE (`default_font`:
    its bitmap font where FreeType is missing, one size, still wrapped and spaced)."""
    return default_font(max(SMALLEST_SIZE, min(cell_height // 24, label_width // 10)))


def default_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at `size` px, or its bitmap font (one size) where FreeType is missing or Pillow is 10.0, which
    pyproject.toml allows and whose load_default takes no size (asked for one, it raised TypeError)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def line_height(font) -> int:
    return font.getbbox("Ag|")[3] + 2


def word_gap(font) -> float:
    """The px between two words: the font's space, widened to a third of a line where it is narrower (the default font's
    2 to 3 px at 10 to 16 px, lost among the gaps inside words)."""
    return max(font.getlength(" "), (font.getbbox("Ag|")[3] - font.getbbox("Ag|")[1]) / 3)


def line_width(words: list[str], font) -> float:
    return sum(font.getlength(word) for word in words) + word_gap(font) * max(0, len(words) - 1)


@dataclass(frozen=True)
class BreakRule:
    """Where a text may break into lines, and how the tokens of a line sit: apart by `word_gap` (`spaced`: a label's
    words, drawn one at a time, the text's own separators dropped), or touching, each keeping its separator (a line drawn
    as one string). `split`: a pattern for re.split giving the tokens."""

    split: str
    spaced: bool

    def tokens(self, text: str) -> list[str]:
        return [token for token in re.split(self.split, text) if token]

    def width(self, tokens: list[str], font) -> float:
        return line_width(tokens, font) if self.spaced else font.getlength("".join(tokens))


AT_SPACES = BreakRule(r"\s+", spaced=True)  # a prompt beside its row
# A column's name (the demo's "quickstart+quickstart@30+db x0.25"): a run's name breaks where its parts join.
AFTER_JOINS = BreakRule(r"(?<=[+ /_-])", spaced=False)


def wrapped(text: str, font, width: float, rule: BreakRule = AT_SPACES) -> list[list[str]]:
    """`text`'s tokens (`rule`'s) in lines of at most `width` px, a token wider than a line broken into pieces that fit."""
    lines: list[list[str]] = []
    for token in rule.tokens(text):
        for piece in _pieces(token, font, width, rule):
            if lines and rule.width(lines[-1] + [piece], font) <= width:
                lines[-1].append(piece)
            else:
                lines.append([piece])
    return lines


def label_lines(text: str, font, width: float, height: float) -> list[list[str]]:
    """`text`'s words in lines of at most `width` px (`wrapped`), as many lines as `height` px holds (at least one); where
    they do not all fit, the last one ends in ELLIPSIS, still within `width`."""
    lines = wrapped(text, font, width, AT_SPACES)
    room = max(1, int(height // line_height(font)))
    if len(lines) <= room:
        return lines
    return lines[: room - 1] + [_ellipsized(lines[room - 1], font, width)]


def _pieces(token: str, font, width: float, rule: BreakRule) -> list[str]:
    """`token`, or where it is wider than `width` (a URL, a long tag list without spaces), pieces of it: touching pieces
    are its letters, each filling the line it is on; spaced ones each fill a line of their own, as a gap between two
    pieces on one line would read as two words."""
    if font.getlength(token) <= width:
        return [token]
    if not rule.spaced:
        return list(token)
    pieces = [""]
    for letter in token:
        if pieces[-1] and font.getlength(pieces[-1] + letter) > width:
            pieces.append("")
        pieces[-1] += letter
    return pieces


def _ellipsized(words: list[str], font, width: float) -> list[str]:
    """`words` ending in ELLIPSIS (letters dropped from the end until it fits in `width`): the line a cut label ends on."""
    words = list(words)
    while words:
        shown = words[:-1] + [words[-1] + ELLIPSIS]
        if line_width(shown, font) <= width:
            return shown
        words[-1] = words[-1][:-1]
        if not words[-1]:
            words.pop()
    return [ELLIPSIS]


def draw_label(draw: ImageDraw.ImageDraw, text: str, left: int, top: int, width: int, height: int, font) -> None:
    """`text` in the box (`left`, `top`, `width` x `height` px), a word at a time, so each gap is `word_gap`."""
    gap, step = word_gap(font), line_height(font)
    inner_width, inner_height = width - 2 * PADDING, height - 2 * PADDING
    for row, words in enumerate(label_lines(text, font, inner_width, inner_height)):
        x = left + PADDING
        for word in words:
            draw.text((x, top + PADDING + row * step), word, fill="black", font=font)
            x += font.getlength(word) + gap
