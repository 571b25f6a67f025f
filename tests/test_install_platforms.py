"""What `pip install -e .` asks for on each platform, read from pyproject.toml's markers as pip evaluates them. Checked by
hand with `pip download --only-binary=:all: --platform P --python-version 3.11` and `uv pip compile --python-platform P
--only-binary :all: --extra dev pyproject.toml` (Dec 2026): DeepSpeed >= 0.16 has no wheel for macOS (its sdist imports
torch to build) and for Windows only 0.16.5, for Python 3.10 to 3.12; bitsandbytes >= 0.45 has wheels for win_amd64 and
macosx_14_0_arm64 alone (no sdist), so macOS 13 could not install it. Without them both resolve with wheels alone."""

import re
import shlex
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


def make_quickstart() -> tuple[list[list[str]], list[list[str]]]:
    """(the pip installs of `make setup`, the commands of `make quickstart`), each as its words, from the Makefile."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    torch_version = re.search(r"^TORCH_VERSION \?= (\S+)$", text, re.M).group(1)
    recipe = {name: re.search(rf"^{re.escape(name)}:.*\n((?:\t.*\n)+)", text, re.M).group(1) for name in ("$(VENV)/.installed", "quickstart")}
    words = {name: [shlex.split(line.replace("$(TORCH_VERSION)", torch_version)) for line in lines.splitlines()] for name, lines in recipe.items()}
    installs = [[w for w in line[2:] if w != "--quiet"] for line in words["$(VENV)/.installed"] if line[:4] == ["$(BIN)/python", "-m", "pip", "install"]]
    return [i for i in installs if i != ["pip", "install", "--upgrade", "pip"]], [["finetune", *line[1:]] for line in words["quickstart"]]


def readme_windows_quickstart() -> tuple[list[list[str]], list[list[str]], list[str]]:
    """(its pip installs, its finetune commands, its other lines) of the README's PowerShell block."""
    block = re.search(r"```powershell\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    prefix = ".venv\\Scripts\\python -m "
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    ours = [shlex.split(line[len(prefix):]) for line in lines if line.startswith(prefix)]
    return [w for w in ours if w[0] == "pip"], [w for w in ours if w[0] == "finetune"], [line for line in lines if not line.startswith(prefix)]


def test_the_readmes_windows_lines_do_what_make_quickstart_does():
    """Windows has no `make`: the README's PowerShell lines are `make quickstart`'s setup and commands, kept the same here
    (run by hand on Linux with `python -m finetune` they trained and sampled as `make quickstart` does)."""
    installs, commands = make_quickstart()
    readme_installs, readme_commands, other_lines = readme_windows_quickstart()
    assert readme_installs == installs and installs[-1] == ["pip", "install", "-e", ".[dev]"]
    assert readme_commands == commands and commands[0][:3] == ["finetune", "train", "recipes/quickstart.yaml"]
    assert other_lines == ["py -3.11 -m venv .venv", '$env:HF_HUB_OFFLINE = "1"']  # the Makefile's venv, and what it exports
    assert "export HF_HUB_OFFLINE ?= 1" in (REPO / "Makefile").read_text()
