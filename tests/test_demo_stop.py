"""`finetune demo` stopped by Ctrl-C says so in its own line: gradio's wait printed "Keyboard interruption in main
thread... closing server." (and the same of an OSError, which it hid)."""

import gradio
import pytest
from PIL import Image

from finetune.demo import launch_app


class Served:
    """An app as launch() leaves it serving, with gradio's own wait; Ctrl-C comes while it waits, once running was
    looked at `checks` times (or `stop` is raised there)."""

    block_thread = gradio.Blocks.block_thread
    server = None

    def __init__(self, stop=KeyboardInterrupt):
        self.stop, self.closed, self.checks = stop, False, 0

    def launch(self, **options):
        return None, "http://127.0.0.1:7860/", None

    @property
    def is_running(self):
        self.checks += 1
        if self.checks == 2:
            raise self.stop
        return not self.closed

    def close(self, verbose=True):
        self.closed = True


def test_ctrl_c_stops_the_demo_with_its_own_line_and_closes_the_server(monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # launch_app lowers it for uploads: given back after
    app = Served()
    assert launch_app(app, block=True) == "http://127.0.0.1:7860/"
    assert capsys.readouterr().out == "demo running on http://127.0.0.1:7860/ (Ctrl-C stops it)\ndemo stopped\n"
    assert app.closed
    failing = Served(stop=OSError("the disk went away"))
    with pytest.raises(OSError, match="the disk went away"):  # said, not taken for a Ctrl-C
        launch_app(failing, block=True)
    assert failing.closed and "Keyboard interruption" not in capsys.readouterr().out


def test_ctrl_c_right_after_the_running_line_is_the_demos_stop_too(monkeypatch):
    """The line was said before the wait's try: a Ctrl-C at once after it (as a test or a quick hand sends it) went
    past the demo's stop to the command's "stopped (Ctrl-C): files written so far are kept", exit status 130."""
    import io
    import sys

    class InterruptedAfterTheRunningLine(io.StringIO):
        def flush(self):  # the line said whole (print flushes it), then Ctrl-C
            if self.getvalue().endswith("(Ctrl-C stops it)\n"):
                raise KeyboardInterrupt

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setattr(sys, "stdout", InterruptedAfterTheRunningLine())
    app = Served()
    try:
        launch_app(app, block=True)
    except KeyboardInterrupt:  # left unseen, it would stop pytest itself
        pytest.fail("the Ctrl-C went past the demo's stop")
    assert sys.stdout.getvalue() == "demo running on http://127.0.0.1:7860/ (Ctrl-C stops it)\ndemo stopped\n" and app.closed
