"""The row labels of a labelled grid (sample, validation and eval grids: a prompt beside its images): a font that grows with
the cell, words kept apart by a visible gap, and a prompt wrapped to the label's margin, ellipsized where the row is too
short for it. Drawn with Pillow's default font at size 10, words ran together ("a photo ofsks dog": its space is 2 px,
less than the gaps hinting leaves inside words), and a long prompt ran over the images and into the next row's label."""

from __future__ import annotations

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


def label_lines(text: str, font, width: float, height: float) -> list[list[str]]:
    """`text`'s words in lines of at most `width` px (a word wider than a line broken into pieces that fit), as many lines
    as `height` px holds (at least one); where they do not all fit, the last one ends in ELLIPSIS, still within `width`."""
    lines: list[list[str]] = []
    for word in text.split():
        for piece in _pieces(word, font, width):
            if lines and line_width(lines[-1] + [piece], font) <= width:
                lines[-1].append(piece)
            else:
                lines.append([piece])
    room = max(1, int(height // line_height(font)))
    if len(lines) <= room:
        return lines
    return lines[: room - 1] + [_ellipsized(lines[room - 1], font, width)]


def _pieces(word: str, font, width: float) -> list[str]:
    """`word`, or where it is wider than `width` (a URL, a long tag list without spaces), pieces of it that fit."""
    pieces = [""]
    for letter in word:
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
