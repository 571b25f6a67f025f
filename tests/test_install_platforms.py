"""What `pip install -e .` asks for on each platform, read from pyproject.toml's markers as pip evaluates them. Checked by
hand with `pip download --only-binary=:all: --platform P --python-version 3.11` and `uv pip compile --python-platform P
--only-binary :all: --extra dev pyproject.toml` (Dec 2026): DeepSpeed >= 0.16 has no wheel for macOS (its sdist imports
torch to build) and for Windows only 0.16.5, for Python 3.10 to 3.12; bitsandbytes >= 0.45 has wheels for win_amd64 and
macosx_14_0_arm64 alone (no sdist), so macOS 13 could not install it. Without them both resolve with wheels alone."""

import tomllib

import pytest
from conftest import REPO
from packaging.markers import default_environment
from packaging.requirements import Requirement


def installed_on(platform: str, python: str = "3.11") -> set[str]:
    """The names of the dependencies pip installs for `pip install .` on `platform` (sys.platform's value there)."""
    environment = default_environment() | {"sys_platform": platform, "python_version": python, "python_full_version": f"{python}.0"}
    requirements = [Requirement(line) for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    return {r.name for r in requirements if r.marker is None or r.marker.evaluate(environment)}


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_deepspeed_is_not_required_on_macos_or_windows(platform):
    assert "deepspeed" not in installed_on(platform)
    assert {"torch", "diffusers", "accelerate", "peft"} <= installed_on(platform)  # the rest, as on Linux


def test_bitsandbytes_is_not_required_on_macos():
    """Its macOS wheels need macOS 14, and on a Mac's MPS it has no 8-bit optimizer step (test_mps: the fallback)."""
    assert "bitsandbytes" not in installed_on("darwin")
    assert "bitsandbytes" in installed_on("win32") and "bitsandbytes" in installed_on("linux")


def test_deepspeed_is_required_on_linux():
    assert "deepspeed" in installed_on("linux")
