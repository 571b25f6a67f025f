"""`make test` on a machine without apt-get (macOS, Fedora): its `browser` step installs Debian's Chromium."""

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_make_browser_without_apt_get_says_so_and_lets_make_test_go_on(tmp_path):
    # `make test` stopped at `apt-get: command not found` before a test ran, where the demo's browser test would
    # only have skipped.
    tools = tmp_path / "bin"  # a PATH without apt-get (nor sudo)
    tools.mkdir()
    (tools / "id").symlink_to(shutil.which("id"))
    missing = tmp_path / "missing"
    result = subprocess.run([shutil.which("make"), "--no-print-directory", "-f", str(REPO / "Makefile"), "browser",
                             f"CHROMIUM={missing}", f"CHROMEDRIVER={missing}"],
                            cwd=tmp_path, env={"PATH": str(tools)}, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("no apt-get here: install chromium and chromedriver"), result.stdout
