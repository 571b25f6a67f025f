"""What the demo's server gives a browser or an API client that is not this machine's user (`--host 0.0.0.0`): no
file of the machine (the adapters folder, the base model, the current folder, any path) through gradio's file route,
and no file named by path in a request in place of an upload. The demo passes gradio no `allowed_paths`; these
tests stop one that would (a folder there is served whole, to anyone who reaches the port)."""

from __future__ import annotations

import httpx
import pytest
from conftest import REPO, SHIPPED_BASE
from PIL import Image
from ports import free_port

SECRET = "not for the browser"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from finetune.demo.engine import DemoEngine
    from finetune.demo.page import build_app, launch_app

    folder = tmp_path_factory.mktemp("demo")
    (folder / "adapters").mkdir()
    (folder / "adapters" / "notes.txt").write_text(SECRET)
    Image.new("RGB", (16, 16), "red").save(folder / "photo.png")
    app = build_app(DemoEngine(str(SHIPPED_BASE), folder / "adapters"), note="", queue_size=2)
    url = launch_app(app, port=free_port(), max_upload_mb=1, block=False)
    yield url, folder
    app.close()


def test_no_file_of_the_machine_is_served(served):
    url, folder = served
    for path in (folder / "adapters" / "notes.txt", SHIPPED_BASE / "model_index.json", REPO / "README.md", folder / "photo.png"):
        response = httpx.get(f"{url}gradio_api/file={path}")
        assert response.status_code in (403, 404), path
        assert SECRET not in response.text and response.content[:4] != b"\x89PNG"


def test_a_request_naming_a_file_by_path_in_place_of_an_upload_is_refused(served):
    from gradio_client import Client

    url, folder = served
    parameters = Client(url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
    given = {"prompt": "x", "steps": 1, "conditioning_image": {"path": str(folder / "photo.png"), "meta": {"_type": "gradio.FileData"}}}
    data = [given.get(parameter["parameter_name"], parameter.get("parameter_default")) for parameter in parameters]
    event = httpx.post(f"{url}gradio_api/call/generate", json={"data": data}).json()["event_id"]
    answer = httpx.get(f"{url}gradio_api/call/generate/{event}", timeout=60).text
    assert "event: error" in answer and "event: complete" not in answer
