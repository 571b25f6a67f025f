"""The browser demo, launched for real on a free localhost port: driven with gradio_client (Chromium drives it in
tests/test_demo_browser.py).

One app serves the module (the `demo` fixture in tests/conftest.py): the tiny model as base, and an adapters
folder (`adapters_dir`) holding what the trainer and the other commands write (a LoRA trained for 2 steps, its
kohya export, a ControlNet, a DreamBooth pipeline) plus what must be refused or must not fit (a pickle file,
a LoRA of another base).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.cli.main import main
from finetune.errors import FinetuneError
from test_demo_conditioning import declared_canvas

PROMPT = "a large red striped circle on a blue background, center"


@pytest.fixture(scope="module")
def client(demo):
    from gradio_client import Client

    return Client(demo.url, verbose=False)


def run(client, **inputs) -> tuple[list[np.ndarray], list[str], str]:
    """Call /generate; return the single images (as arrays), their captions and the summary."""
    values = dict(prompt=PROMPT, steps=6, conditioning_image=None)
    values.update(inputs)
    _grid, gallery, summary = client.predict(api_name="/generate", **values)
    return [np.asarray(Image.open(item["image"]).convert("RGB"), dtype=np.float64) for item in gallery], [item["caption"] for item in gallery], summary


def test_with_and_without_a_lora_gives_two_different_images(client):
    images, captions, summary = run(client, lora_1="trained")
    assert captions == ["base, seed 0", "trained x1, seed 0"]
    assert images[0].shape == images[1].shape == (64, 64, 3)
    assert np.abs(images[0] - images[1]).mean() > 0.5
    assert "2 columns x 1 row in" in summary


def test_the_sampler_picked_draws_the_images(client):
    ddim, _, _ = run(client, seed=5)
    assert all((a == b).all() for a, b in zip(ddim, run(client, seed=5, sampler="ddim")[0]))  # the list's default is ddim
    euler_a, _, _ = run(client, seed=5, sampler="euler_a")
    assert not (ddim[0] == euler_a[0]).all()  # a name not in the list: tests/test_walkthrough_demo.py


def test_the_same_seed_gives_the_same_image(client):
    first, _, _ = run(client, lora_1="trained", seed=5)
    again, _, _ = run(client, lora_1="trained", seed=5)
    other, _, _ = run(client, lora_1="trained", seed=6)
    assert all((a == b).all() for a, b in zip(first, again))
    assert not (first[0] == other[0]).all()


def test_several_strengths_and_layouts(client):
    images, captions, _ = run(client, lora_1="trained", strengths="0, 0.5, 1")
    assert [c.split(",")[0] for c in captions] == ["base", "trained x0", "trained x0.5", "trained x1"]
    assert (images[0] == images[1]).all()  # strength 0 is the base, exactly: the weights are restored bit for bit
    assert not (images[2] == images[3]).all()
    kohya, _, _ = run(client, lora_1="webui/trained")  # the kohya export renders what the original does
    assert np.abs(kohya[1] - images[3]).max() <= 2
    two, captions, _ = run(client, lora_1="trained", strength_1=0.5, lora_2="webui/trained", strength_2=0.5, include_base=False)
    assert captions == ["trained+trained x1, seed 0"] and np.abs(two[0] - images[3]).max() <= 2


def test_strengths_that_are_not_numbers_in_range_are_refused():
    from finetune.demo.engine import parse_strengths

    assert parse_strengths(" 0.5 ; 1") == [0.5, 1.0]
    for text in ("nan", "0.5, nan", "inf", "5"):  # "nan" rendered black columns labelled "xnan"
        with pytest.raises(FinetuneError, match="strengths between -4 and 4"):
            parse_strengths(text)


def test_the_summary_counts_columns_and_rows_in_words():
    """It said "1 column(s) x 2 row(s)"."""
    from finetune.demo.engine import summary_of

    assert summary_of(1, 2, 3.44) == "1 column x 2 rows in 3.4 s"
    assert summary_of(3, 1, 0.5) == "3 columns x 1 row in 0.5 s"


def test_unknown_or_refused_adapters_are_rejected(client, demo):
    from gradio_client.exceptions import AppError

    for name, refusal in (("nope", "unknown lora 'nope'"), ("../trained", "unknown lora '../trained'"), ("evil", "lora 'evil' cannot be used: pickle"),
                          (str(demo.engine.adapters["trained"].path), "unknown lora '/")):  # fmt: skip
        with pytest.raises(AppError, match=refusal):  # the engine's check: the names of its last scan only
            run(client, lora_1=name)
    with pytest.raises(FinetuneError, match="unknown lora 'nope'"):
        demo.engine.adapter("nope", "lora")
    with pytest.raises(FinetuneError, match="pickle checkpoint: only .safetensors files are loaded"):
        demo.engine.adapter("evil", "lora")
    with pytest.raises(FinetuneError, match="unknown lora 'edges/controlnet'"):
        demo.engine.adapter("edges/controlnet", "lora")  # a name of another kind is not a LoRA


def test_a_lora_of_another_base_is_a_readable_message(client, capfd):
    from gradio_client.exceptions import AppError

    capfd.readouterr()
    with pytest.raises(AppError) as error:
        run(client, lora_1="other-base")
    message = str(error.value)
    assert "LoRA 'other-base' does not fit base model" in message and "reads text" in message  # as sample says it, by its header
    assert message.endswith("the LoRA was trained on another base; pick the model it was trained on (it records toyworld), or start "
                            "the demo with that model as --base")
    assert "Traceback" not in message and len(message.splitlines()) == 1
    assert "Traceback" not in capfd.readouterr().err  # nor in the terminal that runs the demo


def test_a_lora_of_another_base_is_refused_before_its_weights_are_read(tiny_model, adapters_dir, monkeypatch):
    """The demo said it once load_lora had read the whole file (the page's model's shapes against the LoRA's); `sample` says
    it from the file's header and the base's configs (finetune.formats.lora_base_fit), and so does the demo now."""
    from finetune.demo import engine as demo_engine

    engine = demo_engine.DemoEngine(str(tiny_model), adapters_dir)
    read = []
    monkeypatch.setattr(demo_engine, "load_lora", lambda path: read.append(path))
    with pytest.raises(FinetuneError, match="^LoRA 'other-base' does not fit base model .* reads text"):
        engine.render(demo_engine.Request(prompt=PROMPT, steps=1, loras=[("other-base", 1.0)]))
    assert read == []


def test_a_busy_port_or_a_missing_adapters_folder_is_one_line(tiny_model, tmp_path, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["demo", "--base", str(tiny_model), "--adapters", str(tmp_path), "--port", str(port)]) == 2
    assert f"cannot serve the demo on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["demo", "--base", str(tiny_model), "--adapters", str(tmp_path / "typo")]) == 2
    assert f"adapters folder {tmp_path / 'typo'} not found" in capsys.readouterr().err


def test_the_table_lists_every_adapter_with_its_metadata(client, tiny_model):
    note, table, *_ = client.predict(api_name="/rescan")
    rows = {row[0]: row for row in table["data"]}
    for name in ("trained", "webui/trained", "edges", "db"):  # a run's ControlNet and pipeline by its run, as its LoRA
        assert str(tiny_model).endswith(rows[name][2].lstrip("…")), rows[name]  # the base the trainer recorded
    assert [rows[name][i] for name in ("trained", "webui/trained", "edges", "db") for i in (1, 3, 4, 5, 6)] == [
        "LoRA (diffusers)", "lora", "2", "4", "ok",
        "LoRA (kohya)", "lora", "2", "4", "ok",
        "ControlNet, trained on canny (low 20, high 40, sigma 1)", "controlnet", "7", "-", "ok",
        "DreamBooth pipeline", "dreambooth", "5", "-", "ok",
    ]
    assert "pickle" in rows["evil"][-1]
    assert "5 usable, 1 refused" in note


def test_rescan_finds_an_adapter_trained_while_the_demo_runs(client, demo, adapters_dir):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"^unknown lora 'late': pick one from the list \(press Rescan for newly trained ones\)$"):  # not any failure
        run(client, lora_1="late")
    shutil.copytree(adapters_dir / "trained", adapters_dir / "late")
    try:
        _, table, _, _, lora_1, *_ = client.predict(api_name="/rescan")
        assert "late" in [row[0] for row in table["data"]]
        assert "late" in demo.engine.names("lora")
        images, captions, _ = run(client, lora_1="late")
        assert captions[1].startswith("late x1")
        from gradio_client import Client  # a page opened after that rescan (another tab, a reload) lists it too

        images, captions, _ = run(Client(demo.url, verbose=False), lora_1="late")
        assert captions[1].startswith("late x1")
    finally:
        shutil.rmtree(adapters_dir / "late")
        client.predict(api_name="/rescan")


def test_controlnet_with_a_conditioning_made_from_a_photo(client, image_folder):
    from gradio_client import handle_file

    photo = sorted(image_folder.glob("*.png"))[0]
    images, captions, _ = run(client, controlnet="edges/controlnet", conditioning_image=handle_file(str(photo)), conditioning_kind="canny")
    assert [c.split(",")[0] for c in captions] == ["conditioning", "base", "edges x1"]  # a run's ControlNet by its run
    assert set(np.unique(images[0])) <= {0.0, 255.0} and images[0].max() == 255  # canny edges, white on black
    assert np.abs(images[1] - images[2]).mean() > 0.5
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="needs a conditioning image"):
        run(client, controlnet="edges/controlnet")


def test_a_dreambooth_pipeline_replaces_the_base(client, demo):
    """A run's pipeline is listed and taken by its run's name, as its LoRA is (it was listed as db/pipeline, and 'db' was an
    unknown pipeline); db/pipeline, its folder, is taken too."""
    images, captions, _ = run(client, model="db")
    assert [c.split(",")[0] for c in captions] == ["base", "db"]  # strengths scale adapters: one column for a model
    assert np.abs(images[0] - images[1]).mean() > 0.5
    assert demo.engine.names("pipeline") == ["db"]
    from finetune.demo.engine import Request

    assert demo.engine.render(Request(prompt=PROMPT, steps=1, model="db/pipeline", strengths=[0.5, 1.0]))[1] == ["base", "db"]


def test_separate_columns_are_labelled_so_they_tell_the_adapters_apart(demo):
    from finetune.demo.engine import Request, label_of, short_name

    _, labels, _, _ = demo.engine.render(Request(prompt=PROMPT, steps=1, loras=[("trained", 1.0), ("webui/trained", 1.0)], separate=True))
    assert labels == ["base", "trained x1", "webui/trained x1"]  # both are "trained" for short: full names then
    assert [short_name(n) for n in ("q/checkpoints/checkpoint-200", "db/checkpoints/checkpoint-4/pipeline", "edges/controlnet")] == ["q, step 200", "db, step 4", "edges"]
    assert label_of(["a_very_long_run_name_for_style_v2", "edges/controlnet", "db/pipeline"], short=True) == "a_very_long_run_name_for_style_v2 +2 more"


def test_uploads_are_size_limited(client, demo, tmp_path):
    import httpx
    from gradio_client import handle_file

    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 1024 * 1024  # the fixture's limit is 1 MB
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client reads the limit from the app
        run(client, controlnet="edges/controlnet", conditioning_image=handle_file(str(big)))
    response = httpx.post(demo.url + "gradio_api/upload", files={"files": ("big.png", big.read_bytes(), "image/png")})
    assert response.status_code == 413  # and the server refuses it whoever sends it


@pytest.mark.parametrize("upload", ["not_an_image", "vast_canvas"])
def test_a_bad_upload_is_a_readable_message(client, tmp_path, upload):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    path = tmp_path / "condition.png"
    if upload == "not_an_image":
        path.write_text("a text file named .png")
        expected = "the uploaded conditioning image condition.png cannot be read as an image: upload a PNG, JPEG or WebP"
    else:
        declared_canvas(path, 30000, 30000)  # a few bytes declaring 900 megapixels
        expected = "the uploaded image condition.png is too large for the demo (Image size (900000000 pixels) exceeds limit"
    with pytest.raises(AppError) as error:
        run(client, controlnet="edges/controlnet", conditioning_image=handle_file(str(path)))
    assert str(error.value).startswith(expected)


def test_offline_and_local_by_default(demo):
    import urllib.request

    assert demo.url.startswith("http://127.0.0.1:")
    assert demo.app.analytics_enabled is False and demo.app.share is False
    page = urllib.request.urlopen(demo.url).read().decode()
    theme = urllib.request.urlopen(demo.url + "theme.css").read().decode()
    assert "fonts.googleapis" not in page + theme and "@font-face" not in theme  # system fonts: nothing to fetch
    assert demo.app._queue.max_size == 4 and demo.app._queue.default_concurrency_limit == 1


def test_progress_is_reported_per_denoising_step(demo):
    from finetune.demo.engine import Request

    seen = []
    demo.engine.render(Request(prompt=PROMPT, steps=3, loras=[("trained", 1.0)], strengths=[0.5, 1.0], rows=2), lambda done, total: seen.append((done, total)))
    assert seen == [(2 * k, 18) for k in range(1, 10)]  # 3 columns x 3 steps, each denoising both rows: 18 images' steps


def test_progress_does_not_count_a_batch_remade_after_running_out_of_memory(demo, monkeypatch):
    from finetune.demo.engine import Request
    import finetune.demo.engine as demo_engine
    import finetune.sampling.pipelines as sampling

    class OutOfMemoryAtTheSecondStep:  # a GPU that holds the two rows for one step, then one at a time
        def __init__(self, pipeline):
            self.pipeline = pipeline

        def __getattr__(self, name):
            return getattr(self.pipeline, name)

        def __call__(self, **kwargs):
            if len(kwargs["generator"]) == 1:
                return self.pipeline(**kwargs)
            report = kwargs["callback_on_step_end"]

            def fail_after_the_first_step(pipe, step, timestep, values):
                report(pipe, step, timestep, values)
                raise torch.OutOfMemoryError("CUDA out of memory")

            return self.pipeline(**{**kwargs, "callback_on_step_end": fail_after_the_first_step})

    build = demo_engine._pipeline
    monkeypatch.setattr(demo_engine, "_pipeline", lambda *parts: OutOfMemoryAtTheSecondStep(build(*parts)))
    monkeypatch.setattr(sampling, "PIXELS_PER_CALL", sampling.PIXELS_PER_CALL)  # the halving lowers it: restored after
    seen = []
    demo.engine.render(Request(prompt=PROMPT, steps=3, loras=[("trained", 1.0)], rows=2), lambda done, total: seen.append((done, total)))
    assert max(done for done, _ in seen) == seen[-1][0] == 12 and seen[-1][1] == 12  # 2 columns x 2 rows x 3 steps, none twice
    assert seen[0] == (2, 12) and (1, 12) in seen  # the failed call's step shown, then taken back when the halves start


def test_default_base_falls_back_to_a_tiny_model(tmp_path, monkeypatch):
    import finetune.demo.page as demo_module

    monkeypatch.setattr(demo_module, "DEFAULT_BASE", tmp_path / "missing")
    monkeypatch.setattr(demo_module, "FALLBACK_BASE", tmp_path / "demo-base")
    base, note = demo_module.resolve_base(None)
    assert base == str(tmp_path / "demo-base") and (tmp_path / "demo-base" / "model_index.json").is_file()
    assert "make_tiny_model" in note and "toyworld-base" in note
