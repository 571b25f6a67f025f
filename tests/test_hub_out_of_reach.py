"""A hub id as the base with the hub out of reach: said in one line naming the id and the cache looked in, before the
data check. A hub that takes the connection and never answers (a stalled proxy or network) kept `finetune train`
silent for good: huggingface_hub asks it for the repository's files with no time limit."""

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from test_base_model_errors import fake_hub_cache, hub_recipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def silent_hub():
    """The address of a server that takes every connection and answers none; closed (its clients let go) after the test."""
    server = socket.create_server(("127.0.0.1", 0))
    held, stop = [], threading.Event()

    def take_connections():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except (TimeoutError, OSError):
                pass

    thread = threading.Thread(target=take_connections, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


def online_env(tmp_path, endpoint):
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_ETAG_TIMEOUT": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        env.pop(name, None)
    return env


def test_a_hub_that_never_answers_is_said_before_the_data_check(silent_hub, tmp_path, image_folder):
    data = tmp_path / "data"
    data.mkdir()
    (data / "0000.png").write_bytes(b"cut short")  # reaching the data check would say this image instead
    recipe = hub_recipe(tmp_path, data)
    try:
        done = subprocess.run([sys.executable, "-m", "finetune", "train", str(recipe)], env=online_env(tmp_path, silent_hub),
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("finetune train waited on a hub that never answers")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: base model someone/tiny is not in the local Hugging Face cache and the hub ({silent_hub}) did not answer within 1 s "
        "(HF_HUB_ETAG_TIMEOUT): download it once with network, or set model.pretrained to a local diffusers folder or .safetensors file "
        f"(looked in the cache at {tmp_path / 'hf' / 'hub'}; there is no folder someone/tiny in the current folder, {tmp_path}, either)")


def test_a_hub_that_never_answers_leaves_the_cache_to_be_read(silent_hub, tiny_model, tmp_path, monkeypatch):
    """As where the hub refuses the connection, huggingface_hub's cache is read: a cached base still trains."""
    import huggingface_hub.constants as constants

    from finetune.models.model_source import hub_files

    fake_hub_cache(tmp_path / "hub", "someone/tiny", tiny_model)
    for name, value in (("HF_HUB_CACHE", str(tmp_path / "hub")), ("ENDPOINT", silent_hub), ("HF_HUB_ETAG_TIMEOUT", 1), ("HF_HUB_OFFLINE", False)):
        monkeypatch.setattr(constants, name, value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    found = []
    lookup = threading.Thread(target=lambda: found.append(hub_files("someone/tiny", "model.pretrained", allow_patterns=["*.json"])), daemon=True)
    lookup.start()
    lookup.join(timeout=30)
    assert found == [tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("0" * 40)]
