"""Pillow's warnings about an image ("Possibly corrupt EXIF data", DecompressionBombWarning, "Truncated File Read",
a palette's transparency) name no file, and Python says each text once per process: among a thousand photos, which
one was it, and which others did it stay silent about? They are caught around an image's decode and said again in
one line that names the image: the data check's summary (a finding), or `warning: ...` once per image and process.

Caught per thread (the data check decodes on several), by one hook on `warnings.showwarning` that takes the warnings
raised in Pillow's own modules while this thread reads an image; `warnings.catch_warnings` swaps process-wide state
and, entered on two threads at once, can leave one thread's catcher in place for good. This module's filter comes
first (see PILLOW_ALWAYS), so the hook asks the other filters what Python would do with each Pillow warning: a user's
`python -W error`, PYTHONWARNINGS=ignore or warnings.simplefilter still raises it, or silences it (no finding, no
line), inside a decode and after it. What they let through is collected inside a decode, and outside one shown as
their action says (by default once per text and place). Every other warning is left to Python."""

from __future__ import annotations

import os
import re
import sys
import threading
import warnings
from contextlib import contextmanager
from typing import Iterator

import PIL

from finetune.console import warn

PILLOW_FOLDER = os.path.dirname(PIL.__file__) + os.sep
# Every Pillow warning reaches the hook (the default action would show the second image's "Palette images with
# Transparency" to no one); the hook then does what the other filters say (_others_action), once-per rules included.
PILLOW_ALWAYS = ("always", None, Warning, re.compile(r"PIL\."), 0)
_this_thread = threading.local()  # .heard: the list this thread's image decode collects into, or None
_install_lock = threading.Lock()
_shown_outside: set[tuple] = set()
_said: set[str] = set()  # the images said in this process (say_pillow_warnings)
_previous_show = warnings.showwarning


def _show(message, category, filename, lineno, file=None, line=None):
    if str(filename).startswith(PILLOW_FOLDER):
        action = _others_action(str(message), category, str(filename), lineno)
        if action == "error":
            raise message if isinstance(message, Warning) else category(message)  # out of Pillow's warn, as Python raises it
        if action == "ignore":
            return
        heard = getattr(_this_thread, "heard", None)
        if heard is not None:
            text = " ".join(str(message).split())  # Pillow writes "data.  Expecting" with two spaces
            if text not in heard:
                heard.append(text)
            return
        # The key Python's registry would keep for the action: "always" none, "once" the text, "module" per file.
        place = {"always": None, "once": (str(message), category), "module": (str(message), category, filename)}.get(
            action, (str(message), category, filename, lineno))
        if place in _shown_outside:
            return
        if place is not None:
            _shown_outside.add(place)
    _previous_show(message, category, filename, lineno, file, line)


def _others_action(text: str, category: type, filename: str, lineno: int) -> str:
    """The action of the first filter other than this module's that fits a warning raised in Pillow's `filename`,
    matched as Python matches them (warnings.defaultaction where none fits)."""
    relative = os.path.splitext(filename[len(PILLOW_FOLDER):])[0]
    module = ".".join(["PIL", *relative.split(os.sep)]).removesuffix(".__init__")  # the raising module's __name__
    for entry in list(warnings.filters):  # a copy: another thread may add a filter meanwhile
        if entry == PILLOW_ALWAYS:
            continue
        action, text_pattern, filter_category, module_pattern, filter_lineno = entry
        if (_fits(text_pattern, text) and issubclass(category, filter_category) and _fits(module_pattern, module)
                and filter_lineno in (0, lineno)):
            return action
    return warnings.defaultaction


def _fits(pattern, value: str) -> bool:
    """None fits anything; a plain string (Python's own `default::DeprecationWarning:__main__`) only itself; a
    compiled pattern from the start of the value, as warnings does."""
    if pattern is None:
        return True
    if isinstance(pattern, str):
        return pattern == value
    return pattern.match(value) is not None


def _listen() -> None:
    """The hook and the filter in place; again after anything (a test's catch_warnings) put back its own."""
    global _previous_show
    if warnings.showwarning is _show and warnings.filters[:1] == [PILLOW_ALWAYS]:
        return
    with _install_lock:
        if warnings.showwarning is not _show:
            _previous_show, warnings.showwarning = warnings.showwarning, _show
        if warnings.filters[:1] != [PILLOW_ALWAYS]:
            # First (filterwarnings moves it there): behind a "default" filter (python -W default, -X dev, pytest's) the
            # first image's warning would register its text and place, and the next image's, the same text, would reach no one.
            warnings.filterwarnings("always", category=Warning, module=r"PIL\.")


@contextmanager
def pillow_warnings() -> Iterator[list[str]]:
    """The texts of the Pillow warnings raised on this thread inside the block (each once), instead of shown. Inside
    another such block, that one's list: the outer block says them."""
    outer = getattr(_this_thread, "heard", None)
    if outer is not None:
        yield outer
        return
    _listen()
    _this_thread.heard = heard = []
    try:
        yield heard
    finally:
        _this_thread.heard = None


def pillow_warning_line(source: str, heard: list[str]) -> str:
    # A DecompressionBombWarning is of the image's size (past Pillow's bound, below finetune's: it trains), which a re-save keeps.
    fix = "downscale it" if any("decompression bomb" in text for text in heard) else "re-save it"
    return f"image {source}: Pillow warned while reading it: {'; '.join(heard)} (it reads as decoded; {fix} to be rid of this)"


@contextmanager
def pillow_warnings_named(source: str, checked: bool = False) -> Iterator[None]:
    """Pillow's warnings while the block reads the image `source`, said in one `warning:` line naming it, once per image
    and process. `checked`: the data check has named them in its summary (the training data loader, every epoch): not
    said again. Inside a `pillow_warnings` block, that block collects them."""
    nested = getattr(_this_thread, "heard", None) is not None
    with pillow_warnings() as heard:
        yield
    if not nested and not checked:
        say_pillow_warnings(source, heard)


def say_pillow_warnings(source: str, heard: list[str], image: str | None = None) -> str | None:
    """The Pillow warnings `heard` while reading the image `source` in one `warning:` line, once per image and process:
    `image` tells the image (default: `source`, a file's path), where two images may have one name (the demo's uploads).
    Returns the line where it was said now (the demo shows it on the page too), else None."""
    image = source if image is None else image
    if not heard or image in _said:
        return None
    _said.add(image)
    line = pillow_warning_line(source, heard)
    warn(line, by="this process")  # over any progress bar (tqdm.write), not after its text
    sys.stdout.flush()  # now, into a log file too, as print(..., flush=True) said it
    return line
