"""The prompt beside a grid's row (finetune/sampling/grid_labels.py via grids.make_grid): its words apart, its text within its
row's part of the margin, in a font that grows with the cell; with Pillow's bitmap font too, where FreeType is missing."""

import numpy as np
import pytest
from PIL import Image, ImageFont

from finetune.data.image_bounds import GRID_LABEL_WIDTH
from finetune.sampling.grid_labels import ELLIPSIS, label_font, label_lines, line_width
import finetune.sampling.grid_labels as grid_labels
from finetune.sampling.grids import make_grid

BLUE = (90, 140, 200)
LONG = "a very long prompt " * 50 + "a_tag_list_written_without_a_single_space_in_it_" * 3


def grid_of(labels: list[str], cell: int) -> Image.Image:
    return make_grid([[Image.new("RGB", (cell, cell), BLUE)] * 2 for _ in labels], labels, GRID_LABEL_WIDTH)


def ink_columns(grid: Image.Image, row: int, cell: int) -> np.ndarray:
    """Which columns of row `row`'s label margin hold dark pixels (the text)."""
    return (np.asarray(grid.crop((0, row * cell, GRID_LABEL_WIDTH, (row + 1) * cell)).convert("L")) < 128).any(axis=0)


def widest_gap(ink: np.ndarray) -> int:
    """The widest run of blank columns between the text's first and last inked ones."""
    inked = np.flatnonzero(ink)
    widest = run = 0
    for blank in ~ink[inked[0] : inked[-1] + 1]:
        run = run + 1 if blank else 0
        widest = max(widest, run)
    return widest


def bitmap_font_only(monkeypatch):
    """Pillow without FreeType (or 10.0, whose load_default takes no size): its bitmap font, one size."""

    def load_default(**size):
        if size:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return ImageFont.load_default_imagefont()

    monkeypatch.setattr(grid_labels.ImageFont, "load_default", load_default)


@pytest.mark.parametrize("fonts", ["freetype", "bitmap"])
@pytest.mark.parametrize("cell", [64, 512])
def test_a_labels_words_keep_a_visible_space_between_them(cell, fonts, monkeypatch):
    """Pillow's default font at 10 px left 2 blank columns at "of sks" beside 1 inside "ofsks": read "a photo ofsks dog"."""
    if fonts == "bitmap":
        bitmap_font_only(monkeypatch)
    grid = grid_of(["ofsks", "of sks"], cell)
    joined, spaced = widest_gap(ink_columns(grid, 0, cell)), widest_gap(ink_columns(grid, 1, cell))
    assert spaced >= 2 * joined + 2, (joined, spaced)


def test_the_label_font_grows_with_the_cell_up_to_what_the_margin_holds():
    """At 10 px whatever the cell, a 512 px row's prompt was a line of small print beside it."""
    sizes = {cell: label_font(cell, GRID_LABEL_WIDTH).size for cell in (64, 256, 384, 512, 1024)}
    assert sizes == {64: 12, 256: 12, 384: 16, 512: 16, 1024: 16}
    text_width = lambda cell: np.ptp(np.flatnonzero(ink_columns(grid_of(["a photo of sks dog"], cell), 0, cell)))
    assert text_width(512) > 1.2 * text_width(64)


@pytest.mark.parametrize("fonts", ["freetype", "bitmap"])
@pytest.mark.parametrize("cell", [64, 512])
def test_a_long_prompt_stays_in_its_rows_margin_ellipsized(cell, fonts, monkeypatch):
    """A prompt longer than its row's margin holds ran over the images (a word wider than the margin) and down into the
    next row's label: now wrapped, a long word broken, and cut with an ellipsis where the row is too short."""
    if fonts == "bitmap":
        bitmap_font_only(monkeypatch)
    grid = grid_of([LONG, ""], cell)
    pixels = np.asarray(grid)
    assert (pixels[:, GRID_LABEL_WIDTH:] == BLUE).all()  # nothing drawn over the images
    assert (pixels[cell:, :GRID_LABEL_WIDTH] == 255).all()  # nor into the next row's margin
    assert ink_columns(grid, 0, cell).any()

    font = label_font(cell, GRID_LABEL_WIDTH)
    width, height = GRID_LABEL_WIDTH - 4, cell - 4
    lines = label_lines(LONG, font, width, height)
    assert all(line_width(line, font) <= width for line in lines)
    assert len(lines) == height // grid_labels.line_height(font) and lines[-1][-1].endswith(ELLIPSIS)
    assert label_lines("a photo of sks dog", font, width, height) == [["a", "photo", "of", "sks", "dog"]]  # short: as written


def test_the_demos_grid_is_drawn_with_pillow_10_0s_font_too(monkeypatch):
    """pyproject.toml allows Pillow 10.0, whose load_default takes no size: the demo's grid asked for 14 px and raised."""
    from finetune.demo.page import MIN_CELL, labelled_grid

    bitmap_font_only(monkeypatch)
    grid = labelled_grid([[Image.new("RGB", (64, 64), "gray")] * 2], ["base", "quickstart x1"], [0])
    header = np.asarray(grid)[: grid.height - MIN_CELL]
    assert grid.width == 64 + 2 * MIN_CELL and (header < 128).any()  # the columns' names written


def test_one_wrapper_breaks_a_prompt_at_spaces_and_a_column_name_after_its_joins():
    """grid_labels.wrapped with each rule: a row's prompt breaks at spaces, which are dropped (its words are drawn a
    word_gap apart), a word too wide for a line on lines of its own; the demo's column name breaks after + / _ - or a
    space, each kept, a part too wide for a line continuing the line it starts on, letter by letter."""
    from finetune.demo.page import header_lines
    from finetune.sampling.grid_labels import AFTER_JOINS, AT_SPACES, wrapped

    font = ImageFont.load_default(size=14)
    width = font.getlength("quickstart+") + 1
    assert wrapped("quickstart+db x0.25", font, width, AFTER_JOINS) == [["quickstart+"], ["db ", "x0.25"]]
    assert header_lines("quickstart+db x0.25", width, font) == ["quickstart+", "db x0.25"]
    assert wrapped("a photo  of\tsks", font, width, AT_SPACES) == [["a", "photo", "of"], ["sks"]]
    long = "x" * 40
    for rule in (AFTER_JOINS, AT_SPACES):
        lines = wrapped(f"db {long}", font, width, rule)
        assert "".join("".join(line) for line in lines).replace(" ", "") == "db" + long
        assert all(rule.width(line, font) <= width for line in lines)
        # Spaced, "db" alone on its line (a gap inside the long word would read as two words); touching, filled.
        assert lines[0] == (["db"] if rule.spaced else ["db ", *"x" * (len(lines[0]) - 1)]), rule
