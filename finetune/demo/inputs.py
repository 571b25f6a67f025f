"""What the demo's page accepts from the browser or the API, checked before anything renders: every input's
value (gradio's own checks let some through, and print a traceback for others) and the uploaded image.

Kept apart from `finetune.demo.page` (the page) so that the checks read as one list. Each wrapper is set on the
component instance (gradio writes a .pyi stub beside any module that subclasses a component).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable

from finetune.errors import FinetuneError

NONE = "(none)"  # an adapter list's "nothing picked"
# The adapter lists' values are checked by the engine (`DemoEngine.adapter`, the one gate to the files: "unknown
# lora 'x': pick one from the list"), not by gradio: its check of a list's choices runs on the copy of the list that
# gradio keeps per page once a page load or Rescan updates it (where no wrapper of ours reaches), and printed a
# traceback in the demo's terminal with a message listing every choice.
ADAPTER_LIST = dict(allow_custom_value=True)
UPLOADED = "(uploaded)"  # how the demo's messages name an upload (after its file name, where gradio gives one)
# The demo makes a condition at the upload's full size (canny works in float64 on three channels: ~1.2 GB an array at
# 48 megapixels). make-conditions reads a user's own files up to 600 megapixels; a page's upload, a 10 MB PNG that
# decodes to that, would take the demo's memory for everyone using it.
MAX_UPLOAD_PIXELS = 8192 * 8192


def upload_source(path: str | None) -> str:
    """An upload as the demo's messages (and Pillow's warnings, said once per upload) name it: its file name, which gradio
    keeps in its cache folder (`edges.png (uploaded)`), or UPLOADED where there is none. Every upload was "(uploaded)"."""
    name = Path(str(path)).name if path else ""
    return f"{name} {UPLOADED}" if name else UPLOADED


def the_upload(source: str, what: str) -> str:
    """The upload `source` (`upload_source`) in a sentence: "the uploaded {what} edges.png", or "the uploaded {what}" unnamed."""
    name = source.removesuffix(UPLOADED).strip()
    return f"the uploaded {what} {name}" if name else f"the uploaded {what}"


def unreadable_upload(source: str = UPLOADED) -> str:
    return f"{the_upload(source, 'conditioning image')} cannot be read as an image: upload a PNG, JPEG or WebP"


def too_large_upload(detail: str, source: str = UPLOADED) -> str:
    return (f"{the_upload(source, 'image')} is too large for the demo ({detail}; at most {MAX_UPLOAD_PIXELS // 1_000_000} megapixels, "
            "a 48-megapixel phone photo fits): downscale it, or make its condition with finetune make-conditions and upload that")


def check_upload(path: str, source: str | None = None) -> None:
    """An uploaded image (`source`: its name, else the path's) must be an image of at most MAX_UPLOAD_PIXELS; else one
    line for the page. A small PNG may declare a vast canvas (a decompression bomb): refused by its header."""
    from PIL import Image

    from finetune.data.image_warnings import pillow_warnings

    source = source or upload_source(path)
    try:
        # Pillow's warnings of the header (a cut EXIF block) are said by read_upload, naming the upload: here they were
        # shown too, as Python shows a warning, naming Pillow's file and line instead of the upload.
        with pillow_warnings(), Image.open(path) as header:
            width, height = header.size
    except Image.DecompressionBombError as err:  # past Pillow's own bound (the size is not read)
        raise FinetuneError(too_large_upload(str(err), source)) from None
    except OSError:
        raise FinetuneError(unreadable_upload(source)) from None
    if width * height > MAX_UPLOAD_PIXELS:
        raise FinetuneError(too_large_upload(f"{width}x{height}", source))


def checked_preprocess(preprocess):
    """gradio decodes an upload before the handler runs, and a file it cannot decode (or a vast canvas)
    ends there in a generic "the app raised an exception": checked first, with a readable message.
    (Wrapped on the instance: gradio writes a .pyi stub beside any module that subclasses a component.)"""
    import gradio as gr

    def checked(payload):
        source = upload_source(getattr(payload, "orig_name", None) or getattr(payload, "path", None))
        try:
            if payload is not None:
                check_upload(payload.path, source)
            return preprocess(payload)
        except FinetuneError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Exception:
            raise gr.Error(unreadable_upload(source), print_exception=False) from None

    return checked


def image_file_required(component):
    """An image sent through the API as anything but a file (text, a number, a dict of other fields) failed gradio's
    own validation of it, before any preprocess, with a traceback in the demo's terminal and a generic error: one
    line naming the input. (The data model is set on the instance, as gradio's File component sets its own.)"""
    import gradio as gr

    model = component.data_model

    class Checked:
        def __getattr__(self, name):  # the schema and the rest: the image's own data model
            return getattr(model, name)

        def model_validate(self, payload, **kwargs):
            try:
                return model.model_validate(payload, **kwargs)
            except ValueError:  # pydantic's ValidationError
                raise gr.Error(f"{component.label} must be an image file, got {str(payload)[:60]!r}", print_exception=False) from None

    component.data_model = Checked()
    return component


def number_required(component):
    """Refuse a value that is no number for a slider or number field, naming it: sent through the API (null, text),
    gradio's own bounds check fails on it as a generic "the app raised an exception" (and lets NaN through, which
    renders black images: a raw JSON request may hold it). A count (a slider of whole steps, the seed) must be whole:
    2.5 steps were cut to 2 without a word. A number field may be empty (the handler reads an empty seed as 0).
    Wrapped on the instance, as `checked_preprocess`."""
    import gradio as gr

    preprocess = component.preprocess
    low, high = (str(int(v)) if float(v).is_integer() else f"{v:g}" for v in (component.minimum, component.maximum))
    whole = component.precision == 0 if isinstance(component, gr.Number) else float(component.step).is_integer()

    def checked(payload):
        empty_allowed = payload is None and isinstance(component, gr.Number)
        if not empty_allowed and (isinstance(payload, bool) or not isinstance(payload, (int, float)) or not math.isfinite(payload)):
            raise gr.Error(f"{component.label} must be a number from {low} to {high}, got {payload!r}", print_exception=False)
        if whole and payload is not None and not float(payload).is_integer():
            raise gr.Error(f"{component.label} must be a whole number from {low} to {high}, got {payload!r}", print_exception=False)
        return preprocess(payload)

    component.preprocess = checked
    return component


def boolean_required(component):
    """Refuse a checkbox value that is no true or false, naming the box: through the API gradio passes any value on,
    and the text "false" (or "no") read as ticked. Wrapped on the instance, as `checked_preprocess`."""
    import gradio as gr

    preprocess = component.preprocess

    def checked(payload):
        if payload is not None and not isinstance(payload, bool):
            raise gr.Error(f"'{component.label}' must be true or false, got {payload!r}", print_exception=False)
        return preprocess(payload)

    component.preprocess = checked
    return component


def quiet_validation(component):
    """gradio's own checks of a value sent through the API (a name not in a dropdown's list, a number past a
    slider's range) raise an error that prints a traceback in the demo's terminal for every such request, and
    whose message names no input ("Value 0 is less than minimum value 1."): named, and not printed. Our own
    checks' errors (print_exception already off) pass as they are. Wrapped on the instance, as `checked_preprocess`
(so not for the adapter lists, which gradio copies when they are updated: see ADAPTER_LIST)."""
    import gradio as gr

    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except gr.Error as err:
            if not err.print_exception:
                raise
            raise gr.Error(f"{component.label}: {err.message}", print_exception=False) from None

    component.preprocess = checked
    return component


def picked_name(value, list_name: str) -> str | None:
    """An adapter list's value: a name (the engine checks that it is listed), or None where none is picked."""
    if value in (None, "", NONE):
        return None
    if not isinstance(value, str):  # through the API: a number or a list
        raise FinetuneError(f"{list_name} must be a name from its list, got {value!r}")
    return value


def read_upload(path: str | None, photo: bool = False, tell_page: Callable[[str], None] | None = None):
    """The uploaded image in RGB (None: no upload); checked_preprocess has checked that it is an image. A conditioning
    image is read and checked as `finetune sample --condition` reads it (`read_conditioning`: its values as they are);
    a `photo` to make the condition of, as `finetune make-conditions` reads its photos (`open_rgb`: a colour profile
    converted to sRGB), so the demo makes the condition training was given. Pillow's warnings about it are said in the
    demo's terminal and, once per upload as there, given to `tell_page` (the page's handler: a toast)."""
    if not path:
        return None
    from PIL import Image

    from finetune.controlnet.pairs import read_conditioning
    from finetune.data.image_warnings import pillow_warnings, say_pillow_warnings
    from finetune.data.images import open_rgb
    from finetune.data.sources import Example

    upload = Example(upload_source(path), "", lambda: Image.open(path))
    with pillow_warnings() as heard:
        image = open_rgb(upload) if photo else read_conditioning(upload)
    if heard:  # once per upload, told by its name and bytes: by its name alone, a second photo.jpg's warnings went unsaid
        said = say_pillow_warnings(upload.source, heard, f"{upload.source} {hashlib.sha256(Path(path).read_bytes()).hexdigest()}")
        if said and tell_page:  # the user looks at the page, not the terminal
            tell_page(said)
    return image


def uploads_only(app):
    """A request whose file is no upload is refused in one line, to the client and in the demo's terminal. gradio
    refuses a path on this machine itself (InvalidPathError: the tests in test_untrusted_demo_files hold it to that)
    and downloads a URL (offline, or a host of this network, it fails), each with a traceback in the demo's terminal
    per request and no message for the client ("error": null). A URL is refused before gradio looks at it: the demo
    fetches nothing. (Set on the Blocks instance, as the components' wrappers are.)"""
    import sys

    import gradio as gr
    from gradio.exceptions import InvalidPathError
    from gradio_client.utils import is_file_obj_with_meta, is_http_url_like

    preprocess_data = app.preprocess_data

    def refused(path, why: str):
        print(f"demo: refused a request's file {str(path)[:200]!r}: {why}", file=sys.stderr, flush=True)
        return gr.Error(f"a file in this request is {why}: the demo reads images uploaded to it (gradio_client: handle_file of a local file)",
                        print_exception=False)  # fmt: skip

    async def checked(block_fn, inputs, state, explicit_call=False):
        # At any depth, as gradio finds the files it fetches: a URL wrapped in a list or a dict was downloaded all the same.
        found = list(_objects_in(inputs))
        for value in found:
            # (the path: a browser's upload also has a URL, the one gradio serves it at)
            if is_file_obj_with_meta(value) and is_http_url_like(value.get("path")):
                raise refused(value["path"], "a URL, not an upload")
            # An image inlined as a data: URL (no path) was "cannot be read as an image": the upload checks read a file.
            if not value.get("path") and str(value.get("url") or "").startswith("data:"):
                raise refused(str(value["url"])[:40] + "...", "a data: URL, not an upload")
        try:
            return await preprocess_data(block_fn, inputs, state, explicit_call)
        except InvalidPathError:
            raise refused(next((v.get("path") for v in found if is_file_obj_with_meta(v)), "?"), "a path on the server, not an upload") from None

    app.preprocess_data = checked
    return app


def _objects_in(value):
    """Every dict in a request's JSON value, however deep in lists and dicts (a file object is one)."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _objects_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _objects_in(item)


def other_kind_notes(metadata: dict[str, str], kind: str, name: str) -> list[str]:
    """The page's note where the condition is made as another kind than the ControlNet's training images were (a mask
    for a canny ControlNet, by its finetune.conditioning): it steers as it never learned to, and rendered without a
    word. Said, not refused: trying another kind is a choice."""
    try:
        trained_on = json.loads(metadata["finetune.conditioning"])["kind"]
    except (KeyError, ValueError, TypeError):  # not recorded (a ControlNet not made by finetune, or trained on own images)
        return []
    if kind in ("as uploaded", trained_on):
        return []
    return [f"ControlNet {name} was trained on {trained_on} images and this condition was made as {kind}: pick {trained_on} to steer as it learned"]
