"""An upload reaches the demo's reader as it was uploaded, so the page's condition is `finetune sample --condition`'s
for the same file: gradio's Image component converted every upload that was not RGB to RGB itself first (a 16-bit
depth map clipped rather than scaled, an image's transparency dropped rather than refused or flattened onto white,
a greyscale JPEG decoded and encoded again), before the reader `sample` shares with the demo ever saw it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_image_warnings import pillows_warning

from finetune.demo.conditioning import conditioning_image
from finetune.demo.inputs import read_upload


@pytest.fixture(scope="module")
def client(demo):
    from gradio_client import Client

    return Client(demo.url, verbose=False)


def conditioning_column(client, path) -> np.ndarray:
    """The demo's conditioning column (the first single image) for the upload `path`, one step on the tiny model."""
    from gradio_client import handle_file

    _grid, gallery, _summary = client.predict(api_name="/generate", prompt="a circle", steps=1, controlnet="edges/controlnet",
                                              conditioning_image=handle_file(str(path)), include_base=False)  # fmt: skip
    assert gallery[0]["caption"] == "conditioning, seed 0"
    return np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))


def gradient(width: int = 96, height: int = 80) -> np.ndarray:
    return np.linspace(0, 1, width * height).reshape(height, width)


@pytest.mark.parametrize("kind", ["16-bit depth map", "greyscale jpeg"])
def test_an_upload_is_read_as_sample_reads_its_condition(client, tmp_path, kind):
    if kind == "16-bit depth map":  # values of 0-65535, scaled to 0-255 as training and sample read them
        path, image = tmp_path / "depth.png", Image.fromarray((gradient() * 65535).astype(np.uint16))
    elif kind == "greyscale jpeg":
        edges = np.random.default_rng(0).integers(0, 2, (80, 96), dtype=np.uint8) * 255  # what a JPEG's encoding changes most
        path, image = tmp_path / "edges.jpg", Image.fromarray(edges)
    image.save(path)
    expected = np.asarray(conditioning_image(read_upload(str(path)), "as uploaded", 64))
    assert np.array_equal(conditioning_column(client, path), expected)


def test_an_upload_drawn_in_its_transparency_is_refused_as_sample_refuses_it(client, tmp_path):
    from gradio_client.exceptions import AppError

    mask = np.zeros((80, 80, 4), dtype=np.uint8)
    mask[20:60, 20:60] = 255  # white and opaque in the square, transparent black around it: flattened onto white, one colour
    Image.fromarray(mask).save(tmp_path / "mask.png")
    with pytest.raises(AppError, match="is one colour once its transparency is flattened onto white"):
        conditioning_column(client, tmp_path / "mask.png")


def small_image(path, size: int = 16):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("upload", ["too small", "not an image", "cut short"])
def test_a_refused_upload_is_named_by_its_file_name(client, tmp_path, upload):
    """Every upload was "(uploaded)" in the page's messages."""
    from gradio_client.exceptions import AppError

    if upload == "too small":
        path, expected = small_image(tmp_path / "small-edges.png"), "conditioning image small-edges.png (uploaded) is 16x16, smaller than 32 px"
    elif upload == "not an image":
        path, expected = tmp_path / "notes.png", "the uploaded conditioning image notes.png cannot be read as an image"
        path.write_text("a text file named .png")
    else:
        whole = small_image(tmp_path / "whole.png", 128).read_bytes()
        path, expected = tmp_path / "cut-edges.png", "image cut-edges.png (uploaded) cannot be read (OSError: image file is truncated"
        path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(AppError) as raised:
        conditioning_column(client, path)
    assert str(raised.value).startswith(expected)


def toasts_of(client, path) -> list[tuple[str, str]]:
    """The (message, level) toasts the page showed for a one-step /generate with the conditioning image `path`."""
    from gradio_client import handle_file

    job = client.submit(api_name="/generate", prompt="a circle", steps=1, controlnet="edges/controlnet",
                        conditioning_image=handle_file(str(path)), include_base=False)  # fmt: skip
    job.result()  # every update is queued before the result
    updates = job.communicator.updates
    return [update.log for update in (updates.get_nowait() for _ in range(updates.qsize())) if getattr(update, "log", None)]


def test_pillow_s_warnings_are_said_for_each_upload_naming_it(client, tmp_path, capfd):
    """Said once per name and process: with every upload named "(uploaded)", only the first one's were said. And on the
    page, once per upload: they went to the demo's terminal alone, where the user looking at the page never saw them."""
    toasts = []
    for name in ("first-photo.jpg", "second-photo.jpg", "first-photo.jpg"):  # the first again: said, and shown, once
        exif = Image.Exif()
        exif[0x010E] = "x" * 200  # an EXIF description longer than the bytes left of it: Pillow warns (test_image_warnings)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        image.save(tmp_path / name, exif=exif.tobytes()[:-150])
        toasts += toasts_of(client, tmp_path / name)
    out, err = capfd.readouterr()
    warned = pillows_warning(tmp_path / "first-photo.jpg")
    said = [line for line in (out + err).splitlines() if warned in line]
    lines = [f"image {name} (uploaded): Pillow warned while reading it: {warned} (it reads as decoded; re-save it "
             "to be rid of this)" for name in ("first-photo.jpg", "second-photo.jpg")]  # fmt: skip
    assert said == [f"warning: {line}" for line in lines]
    assert toasts == [(line, "warning") for line in lines]


def test_pillow_s_warnings_of_two_uploads_of_one_name_are_said_for_each(tmp_path, capfd):
    """Said once per name and process: a second, other photo of the same name (another user's, or the first one
    edited) was read without a word. Once per upload: the same one read again (another prompt) says nothing more."""
    for folder, seed in (("first", 0), ("second", 1), ("first", 0)):
        exif = Image.Exif()
        exif[0x010E] = "x" * 200  # Pillow warns (test_image_warnings)
        image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        (tmp_path / folder).mkdir(exist_ok=True)
        image.save(tmp_path / folder / "one-name.jpg", exif=exif.tobytes()[:-150])
        read_upload(str(tmp_path / folder / "one-name.jpg"))
    out, err = capfd.readouterr()
    warned = pillows_warning(tmp_path / "first" / "one-name.jpg")
    said = [line for line in (out + err).splitlines() if warned in line]
    assert said == [f"warning: image one-name.jpg (uploaded): Pillow warned while reading it: {warned} (it reads as decoded; "
                    "re-save it to be rid of this)"] * 2  # fmt: skip


def test_the_upload_check_leaves_pillow_s_warnings_to_the_line_naming_the_upload(tmp_path):
    """The header check (before the handler) let Pillow's warnings through as Python shows them, naming Pillow's file and
    line, not the upload: a line in the demo's terminal beside the one read_upload says."""
    import warnings

    from finetune.demo.inputs import check_upload

    exif = Image.Exif()
    exif[0x010E] = "x" * 200  # Pillow warns (test_image_warnings)
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg", exif=exif.tobytes()[:-150])
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # each time, whatever was shown before in this process
        check_upload(str(tmp_path / "photo.jpg"))
    assert [str(warning.message) for warning in shown] == []


def send(demo, file: dict, wrapped=lambda file: file) -> str:
    """A raw /generate request whose conditioning image is `file` (as a client other than gradio's may send it), `wrapped`."""
    import httpx
    from gradio_client import Client

    parameters = Client(demo.url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
    given = {"prompt": "x", "steps": 1, "controlnet": "edges/controlnet", "conditioning_image": wrapped({**file, "meta": {"_type": "gradio.FileData"}})}
    data = [given.get(parameter["parameter_name"], parameter.get("parameter_default")) for parameter in parameters]
    event = httpx.post(f"{demo.url}gradio_api/call/generate", json={"data": data}).json()["event_id"]
    return httpx.get(f"{demo.url}gradio_api/call/generate/{event}", timeout=60).text


@pytest.mark.parametrize("given", ["a path on the server", "a URL", "a data: URL"])
def test_a_file_that_is_no_upload_is_refused_in_one_line_and_no_traceback(demo, tmp_path, capfd, given):
    """gradio refused a path (and downloaded a URL, failing offline) with a traceback in the demo's terminal for each
    request, and told the client nothing ("error": null); an image inlined as a data: URL was "cannot be read"."""
    import base64

    inlined = "data:image/png;base64," + base64.b64encode(small_image(tmp_path / "photo.png", 64).read_bytes()).decode()
    file = {"a path on the server": {"path": str(tmp_path / "photo.png")}, "a URL": {"path": "http://127.0.0.1:9/photo.png"},
            "a data: URL": {"path": None, "url": inlined}}[given]  # fmt: skip
    answer = send(demo, file)
    assert "event: error" in answer and f"a file in this request is {given}, not an upload: the demo reads images uploaded to it" in answer
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    named = file["path"] or inlined[:40] + "..."
    assert [line for line in (out + err).splitlines() if "refused" in line] == [f"demo: refused a request's file {named!r}: {given}, not an upload"]


@pytest.mark.parametrize("wrapped", [lambda file: [file], lambda file: {"image": file}], ids=["in a list", "in a dict"])
def test_a_url_wrapped_in_the_request_is_refused_before_gradio_fetches_it(demo, capfd, wrapped):
    """gradio fetches a file object's URL however deep in a request's value it lies; the check looked at the values
    themselves alone, so a URL wrapped in a list or a dict was downloaded (safehttpx refusing this host: a traceback in
    the demo's terminal, "error": null for the client), as before 52df919."""
    answer = send(demo, {"path": "http://127.0.0.1:9/photo.png"}, wrapped)
    assert "event: error" in answer and "a file in this request is a URL, not an upload" in answer
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
