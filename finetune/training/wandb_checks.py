"""Whether a run with `logging.wandb.enabled` can log to Weights & Biases without stopping to ask: said by `finetune train`
and `finetune check-data` before the data check, and by train() before the model loads, without importing torch or wandb.

wandb.init() with no API key asks for one at the terminal (or, without one, fails with "No API key configured"): a launched
run waited there, or failed once every image had been decoded and the model had loaded. Its credentials are read here as
wandb reads them (wandb/sdk/lib/wbauth: WANDB_API_KEY or WANDB_IDENTITY_TOKEN_FILE, else the netrc entry `wandb login`
writes for the server's host), and so is its mode (WANDB_MODE, else the `mode` of the settings files `wandb offline`
writes): offline and disabled need no key."""

from __future__ import annotations

import configparser
import importlib.util
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

from finetune.errors import FinetuneError

DEFAULT_SERVER = "https://api.wandb.ai"
KEYLESS_MODES = ("offline", "dryrun", "disabled")  # wandb's modes that log locally, or not at all


def check_wandb(enabled: bool) -> None:
    """`logging.wandb.enabled`'s refusal, if any, as one line."""
    if problem := wandb_problem(enabled):
        raise FinetuneError(problem)


def wandb_problem(enabled: bool) -> str | None:
    """Why a run logging to W&B (`enabled`) would fail or stop to ask for a key; None where it would not."""
    if not enabled:
        return None
    if importlib.util.find_spec("wandb") is None:
        return ('logging.wandb.enabled needs the wandb package, which is not installed: pip install wandb (or pip install -e ".[wandb]"), '
                "or set logging.wandb.enabled=false")  # fmt: skip
    if wandb_setting("mode", "WANDB_MODE", "online").lower() in KEYLESS_MODES or has_credentials():
        return None
    host = urlsplit(wandb_setting("base_url", "WANDB_BASE_URL", DEFAULT_SERVER)).netloc
    return (f"logging.wandb.enabled: no W&B API key (WANDB_API_KEY is not set, and {netrc_path()} has none for {host}), and wandb would stop "
            "the run to ask for one: run `wandb login` (or set WANDB_API_KEY) first, or set WANDB_MODE=offline to log to local files "
            "(`wandb sync` uploads them later)")  # fmt: skip


def has_credentials() -> bool:
    """Whether wandb finds an API key without asking: its environment variables, else the netrc entry for its server."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(wandb_setting("base_url", "WANDB_BASE_URL", DEFAULT_SERVER)).netloc
    try:
        entry = netrc.netrc(str(netrc_path())).authenticators(host)
    except (OSError, netrc.NetrcParseError):  # no netrc file (wandb warns of a damaged one, and asks)
        return False
    return bool(entry and entry[2])  # wandb reads the key as the entry's password


def netrc_path() -> Path:
    """The netrc file wandb reads and `wandb login` writes: $NETRC, else ~/.netrc (~/_netrc where only that exists)."""
    if path := os.environ.get("NETRC"):
        return Path(path).expanduser()
    unix, windows = Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()
    return windows if windows.exists() and not unix.exists() else unix


def wandb_setting(key: str, variable: str, default: str) -> str:
    """A wandb setting as wandb reads it: its environment variable, else the workspace's settings file (`wandb offline`'s:
    wandb/settings under $WANDB_DIR or the current folder), else the global one (~/.config/wandb/settings, `wandb login
    --host`'s), else `default`."""
    if value := os.environ.get(variable):
        return value
    root = Path(os.environ.get("WANDB_DIR") or ".")
    workspace = root / (".wandb" if (root / ".wandb").exists() else "wandb") / "settings"
    global_settings = Path(os.environ.get("WANDB_CONFIG_DIR") or Path("~/.config/wandb").expanduser()) / "settings"
    for path in (workspace, global_settings):
        settings = configparser.ConfigParser()
        try:
            settings.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError):  # wandb treats a damaged file as empty
            continue
        if value := settings.get("default", key, fallback=None):
            return value
    return default
