"""`finetune demo`: a Gradio page to try trained adapters side by side with the base model.

The page is a thin layer over `finetune.demo.engine` (scanning, safety checks, rendering), so what
the browser can do is exactly what the engine allows: adapters are picked by name from the scanned
folder, only safetensors are loaded, and a mismatched adapter is a message, not a traceback.

It is built to run on a laptop with no network: analytics are off, no share link is made, the theme
uses the system's fonts (gradio's default theme would serve its own font files; a Google font would be
fetched from fonts.googleapis.com), server-side rendering (a Node process) is off, and the server binds
to 127.0.0.1 unless told otherwise. One generation runs at a time, behind a queue of bounded size.
"""

from __future__ import annotations

import gc
import html
import os
import time
from pathlib import Path

# Only light imports here: `finetune --help` builds this module's parser; torch, diffusers and gradio load
# when the demo starts.
from finetune.demo.inputs import (
    ADAPTER_LIST,
    NONE,
    boolean_required,
    checked_preprocess,
    image_file_required,
    number_required,
    picked_name,
    quiet_validation,
    read_upload,
    upload_source,
    uploads_only,
)
from finetune.errors import FinetuneError
from finetune.library_noise import quiet_weight_progress_bars
from finetune.sampling.samplers import DEFAULT_SAMPLER, SAMPLER_NAMES, webui_label

DEFAULT_BASE = Path(__file__).resolve().parents[1] / "assets" / "toyworld-base"
FALLBACK_BASE = Path("outputs/demo-base")
ADAPTERS_DEFAULT = "outputs"  # where training runs write
LORA_SLOTS = 3
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"]
SYSTEM_MONO_FONTS = ["ui-monospace", "Consolas", "monospace"]
TABLE_HEADERS = ["name", "type", "base", "method", "steps", "rank", "status"]
MIN_CELL = 192  # grid cells are enlarged (nearest neighbour) to at least this, so 64 px models are visible


def resolve_base(base: str | None) -> tuple[str, str]:
    """(base model, a note for the page): the given base, else the shipped toy-world base, else a tiny one."""
    if base:
        return base, ""
    if (DEFAULT_BASE / "model_index.json").is_file():
        return str(DEFAULT_BASE), "the shipped toy-world base model"
    if not (FALLBACK_BASE / "model_index.json").is_file():
        from finetune.models.tiny_model import make_tiny_model

        make_tiny_model(FALLBACK_BASE)
    return str(FALLBACK_BASE), (
        f"The shipped toy-world base (`finetune/assets/toyworld-base`) is not in this checkout yet, so the demo runs on a "
        f"**tiny random model** made with `make_tiny_model` in `{FALLBACK_BASE}`: its pictures are noise. "
        "Start it with `--base <model>` (the base your adapters were trained on) for real pictures."
    )


def table_row(adapter) -> list[str]:
    """An adapter's line in the page's table: what the trainer recorded in its file or folder."""
    from finetune.controlnet.conditioning_records import recorded_conditioning  # numpy, PIL and the recipe schema: not for --help

    meta = adapter.metadata
    made = recorded_conditioning(meta)  # the conditioning images a ControlNet wants, as make-conditions made them
    controlnet = f"ControlNet, trained on {made}" if made else "ControlNet"
    # Any folder with a model_index.json is a pipeline: DreamBooth's, but also a full fine-tune's, a VAE
    # pretraining's or `finetune merge`'s, whose method column says so; only DreamBooth's is called that.
    pipeline = "DreamBooth pipeline" if meta.get("finetune.method") == "dreambooth" else "pipeline"
    kind = {"lora": f"{'DoRA' if meta.get('finetune.use_dora') == 'true' else 'LoRA'} ({adapter.layout})", "pipeline": pipeline, "controlnet": controlnet}.get(adapter.kind, adapter.kind)
    base = meta.get("finetune.base_model", "?")
    base = base if len(base) <= 48 else "…" + base[-47:]
    rank = meta.get("finetune.rank", "-") + (f" (3x3 conv {meta['finetune.conv_rank']})" if meta.get("finetune.conv_rank") else "")
    return [adapter.name, kind, base, meta.get("finetune.method", "?"), meta.get("finetune.steps", "?"), rank, adapter.refused or "ok"]


def labelled_grid(rows: list[list], column_labels: list[str], seeds: list[int]):
    """`make_grid` with cells enlarged to MIN_CELL px, a header naming each column and a seed per row."""
    from PIL import Image, ImageDraw

    from finetune.sampling.grid_labels import default_font
    from finetune.sampling.grids import make_grid

    cell = rows[0][0].size
    factor = max(1, -(-MIN_CELL // min(cell)))
    big = [[image.convert("RGB").resize((cell[0] * factor, cell[1] * factor), Image.Resampling.NEAREST) for image in row] for row in rows]
    margin, font, line_height = 64, default_font(14), 18
    headers = [header_lines(label, cell[0] * factor - 8, font) for label in column_labels]
    top = 6 + line_height * max(len(lines) for lines in headers)
    body = make_grid(big, row_labels=[f"seed {seed}" for seed in seeds], label_width=margin)
    grid = Image.new("RGB", (body.width, body.height + top), "white")
    grid.paste(body, (0, top))
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(headers):
        draw.multiline_text((margin + c * cell[0] * factor + 4, 4), "\n".join(lines), fill="black", font=font, spacing=line_height - 14)
    return grid


def header_lines(label: str, width: float, font) -> list[str]:
    """A column's label in lines of at most `width` px, broken after '+', ' ', '/', '_' or '-' (a name too long for a
    line anywhere; grid_labels.AFTER_JOINS): written on one line, a long label ran into the next column's and hid both
    strengths."""
    from finetune.sampling.grid_labels import AFTER_JOINS, wrapped

    return ["".join(line).strip() for line in wrapped(label, font, width, AFTER_JOINS)] or [""]


def offline_theme():
    """gradio's default look with system fonts only: nothing to download, not even gradio's own font files."""
    import gradio as gr

    return gr.themes.Default(font=SYSTEM_FONTS, font_mono=SYSTEM_MONO_FONTS)


def build_app(engine, note: str = "", queue_size: int = 8):
    """The Blocks app over `engine`, with its queue configured (launch it with `launch_app`)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    from finetune.demo.adapter_scan import BASE, by_name
    from finetune.demo.conditioning import CONDITIONING_KINDS
    from finetune.demo.engine import Request, parse_strengths

    def choices(kind: str, first: str = NONE) -> list[str]:
        return [first, *engine.names(kind)]

    def table() -> list[list[str]]:
        return [table_row(adapter) for adapter in engine.adapters.values()] or [["(no adapters found)", "", "", "", "", "", ""]]

    def folder_note() -> str:
        usable = sum(1 for a in engine.adapters.values() if not a.refused)
        return f"Adapters in `{engine.adapters_dir}`: {usable} usable, {len(engine.adapters) - usable} refused."

    # delete_cache: rendered images gradio keeps for the browser are removed after an hour (checked every 10 minutes).
    with gr.Blocks(title="finetune demo", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(f"# finetune demo\nBase model: `{engine.base_name}`" + (f"\n\n{note}" if note else ""), elem_id="base-note")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="prompt", value="a large red star on a blue background, center", lines=2, max_length=1000, elem_id="prompt")
                negative = gr.Textbox(label="negative prompt", value="", max_length=1000)
                with gr.Row():
                    seed = gr.Number(label="seed", value=0, precision=0, minimum=0, maximum=2**31 - 1)
                    steps = gr.Slider(1, 100, value=20, step=1, label="steps")
                    guidance = gr.Slider(0, 20, value=5.0, step=0.5, label="guidance")
                    size = gr.Slider(32, 1024, value=engine.base.unet.config.sample_size * 8, step=8, label="size")
                sampler = gr.Dropdown([(webui_label(name), name) for name in SAMPLER_NAMES], value=DEFAULT_SAMPLER, label="sampler (as the webui names them)", elem_id="sampler")
                model = gr.Dropdown([BASE, *engine.names("pipeline")], value=BASE, label="model (base or a trained pipeline)", elem_id="model", **ADAPTER_LIST)
                slots = []
                with gr.Accordion("LoRAs (several at once, each with its strength)", open=True):
                    for i in range(1, LORA_SLOTS + 1):
                        with gr.Row():
                            slots.append(gr.Dropdown(choices("lora"), value=NONE, label=f"LoRA {i}", elem_id=f"lora-{i}", scale=3, **ADAPTER_LIST))
                            slots.append(gr.Slider(-2, 2, value=1.0, step=0.05, label=f"strength {i}", scale=2))
                with gr.Accordion("ControlNet", open=False):
                    controlnet = gr.Dropdown(choices("controlnet"), value=NONE, label="ControlNet", elem_id="controlnet", **ADAPTER_LIST)
                    # image_mode None: the file as uploaded, read by sample's reader (gradio's default, RGB, converted it first).
                    condition = gr.Image(label="conditioning image, or a photo to make one from", type="filepath", sources=["upload"], image_mode=None)
                    condition.preprocess = checked_preprocess(condition.preprocess)
                    image_file_required(condition)
                    kind = gr.Radio(list(CONDITIONING_KINDS), value="as uploaded", label="use the upload as is, or make (as finetune make-conditions)")
                    scale = gr.Slider(0, 2, value=1.0, step=0.05, label="conditioning scale")
                with gr.Accordion("Compare", open=True):
                    strengths = gr.Textbox(label="adapter strengths, one column each (multiply every LoRA strength and the conditioning scale)", value="1.0", elem_id="strengths")
                    include_base = gr.Checkbox(value=True, label="add a column with the base model alone (no adapters)")
                    separate = gr.Checkbox(value=False, label="each LoRA in its own columns (compare runs, or a run's checkpoints), not all together", elem_id="separate")
                    rows = gr.Slider(1, 4, value=1, step=1, label="rows (seeds seed, seed+1, ...)")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                gr.Markdown("**Side by side**: the same seed in every column, one row per seed.")
                result = gr.Image(label="side by side", show_label=False, type="pil", format="png", interactive=False, elem_id="result")
                summary = gr.Markdown(elem_id="summary", label="summary")
                with gr.Accordion("single images", open=False):
                    gallery = gr.Gallery(label="single images", columns=4, format="png", elem_id="singles")
        with gr.Row():
            found = gr.Markdown(folder_note(), label="adapters folder")
            rescan = gr.Button("Rescan adapters", elem_id="rescan", scale=0)
        adapters = gr.Dataframe(value=table(), headers=TABLE_HEADERS, interactive=False, wrap=True,
                                label="adapters (metadata recorded by the trainer)", column_widths=["17%", "15%", "26%", "11%", "7%", "6%", "18%"])

        def page_warning(line: str) -> None:
            gr.Warning(html.escape(line), duration=None)  # the toast renders HTML (an upload's name may hold '<'); it stays until closed

        def generate_images(prompt, negative_prompt, seed, steps, guidance, size, model, lora_1, strength_1, lora_2, strength_2,
                            lora_3, strength_3, controlnet, conditioning_image, conditioning_kind, conditioning_scale, strengths,
                            include_base, rows, separate=False, sampler=DEFAULT_SAMPLER, progress=gr.Progress()):
            try:
                slots_picked = [(picked_name(name, f"LoRA {i}"), s) for i, (name, s) in enumerate(((lora_1, strength_1), (lora_2, strength_2), (lora_3, strength_3)), 1)]
                picked = [(name, float(s)) for name, s in slots_picked if name]
                request = Request(
                    prompt=str(prompt or ""), negative_prompt=str(negative_prompt or ""), seed=int(seed or 0), steps=int(steps),
                    guidance=float(guidance), size=int(size), model=picked_name(model, "model") or BASE, loras=picked,
                    controlnet=picked_name(controlnet, "ControlNet"), conditioning_image=read_upload(conditioning_image, photo=(conditioning_kind or "as uploaded") != "as uploaded", tell_page=page_warning),
                    conditioning_source=upload_source(conditioning_image), conditioning_kind=conditioning_kind or "as uploaded", conditioning_scale=float(conditioning_scale),
                    strengths=parse_strengths(strengths), include_base=bool(include_base), rows=int(rows), separate=bool(separate),
                    sampler=str(sampler or DEFAULT_SAMPLER),
                )
                progress(0, desc="starting")
                images, labels, seeds, text = engine.render(request, lambda done, total: progress(done / total, desc=f"denoising {done}/{total}"))
            except FinetuneError as err:
                raise gr.Error(str(err), print_exception=False) from None
            except (RuntimeError, ValueError) as err:  # a model that cannot run this request: one line, not a traceback
                raise gr.Error(f"generation failed: {str(err).splitlines()[0][:300]}", print_exception=False) from None
            captions = [(image, f"{label}, seed {seed}") for seed, row in zip(seeds, images) for label, image in zip(labels, row)]
            return labelled_grid(images, labels, seeds), captions, text

        lists = [model, controlnet, *slots[::2]]

        def listed_names() -> list[list[str]]:  # each of `lists`' choices, as the engine's last scan has them
            return [[BASE, *engine.names("pipeline")], choices("controlnet"), *(choices("lora") for _ in range(LORA_SLOTS))]

        def still_picked(value, names: list[str], kind: str) -> str:
            """A list's selection as the last scan lists it: by the name it lists now where it was picked by the one listed
            before, a run's folder (db/pipeline, edges/controlnet: now db and edges; it went back to none); else none."""
            if value in names or not isinstance(value, str):
                return value if value in names else names[0]
            adapter = by_name(engine.adapters, engine.adapters_dir, value)
            return adapter.name if adapter is not None and adapter.kind == kind and adapter.name in names else names[0]

        def adapter_views(*picked):
            """The table and lists as the last scan has them; a list's selection (`picked`, where given) whose adapter
            that scan no longer found (a checkpoint rotated away, a run deleted) goes back to none."""
            kinds = ["pipeline", "controlnet", *["lora"] * LORA_SLOTS]  # of `lists`
            updates = [gr.Dropdown(choices=names, **({"value": still_picked(value, names, kind)} if picked else {}))
                       for names, value, kind in zip(listed_names(), picked or [None] * len(lists), kinds)]  # fmt: skip
            return (folder_note(), table(), *updates)

        def rescan_adapters(*picked):
            engine.rescan()
            # Also the components' own lists, which a session opened later starts from (an API client runs no page load).
            for dropdown, names in zip(lists, listed_names()):
                dropdown.choices = [(name, name) for name in names]
            return adapter_views(*picked)

        inputs = [prompt, negative, seed, steps, guidance, size, model, *slots, controlnet, condition, kind, scale, strengths, include_base, rows, separate, sampler]
        for component in inputs:
            quiet_validation(component)
        for number in (seed, steps, guidance, size, *slots[1::2], scale, rows):
            number_required(number)  # checked before gradio's own checks, which fail on null and text without a word
        for box in (include_base, separate):
            boolean_required(box)
        button.click(generate_images, inputs, [result, gallery, summary], api_name="generate", show_progress="full")
        views = [found, adapters, *lists]
        rescan.click(rescan_adapters, lists, views, api_name="rescan", queue=False)
        # A page opened (or reloaded) after a rescan in another tab shows that scan, not the one at start.
        app.load(adapter_views, None, views, queue=False)
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    return uploads_only(app)


def launch_app(app, host: str = "127.0.0.1", port: int | None = None, max_upload_mb: float = 10, block: bool = True):
    """Serve `app` locally: no share link, no SSR, uploads limited to `max_upload_mb` MB; returns the URL."""
    try:
        _, url, _ = app.launch(
            server_name=host, server_port=port, share=False, prevent_thread_lock=True, max_file_size=int(max_upload_mb * 1024 * 1024),
            theme=offline_theme(), ssr_mode=False, mcp_server=False, pwa=False, show_error=False, quiet=True, inbrowser=False,
        )
    except OSError as err:  # gradio's message tells of environment variables and launch() arguments
        raise FinetuneError(f"cannot serve the demo on {host}:{port} ({str(err).splitlines()[0][:100]}): is another demo running? pass --port N") from None
    if block:  # gradio's own lines would add "To create a public link, set `share=True` in `launch()`", which it is not
        serve_until_stopped(app, f"demo running on {url} (Ctrl-C stops it)")
    return url


def serve_until_stopped(app, running_line: str) -> None:
    """Gradio's `block_thread` without its "Keyboard interruption in main thread... closing server." (which it said of
    an OSError too, hiding it): Ctrl-C, or SIGTERM (`finetune.cli.main.main` makes it one), closes the server with the
    demo's own line; anything else is raised, the server closed. `running_line` is said inside: a Ctrl-C right
    after it is the demo's stop too."""
    try:
        print(running_line, flush=True)
        while app.is_running:
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("demo stopped", flush=True)
    finally:
        app.close(verbose=False)  # verbose: "Closing server running on port: N"


def add_demo_parser(commands) -> None:
    from finetune.cli.argument_types import port_number, positive_int, positive_number
    from finetune.cli.arguments import add_base_options, add_placement_options

    demo = commands.add_parser(
        "demo",
        help="open a browser demo to try trained adapters side by side with the base model",
        description="Start a local Gradio page that loads a base model and lists the adapters found under a folder (LoRAs in "
        "diffusers or kohya layout, DreamBooth pipelines, ControlNets) with their recorded metadata, and renders the same "
        "seed with and without them in one grid. Offline; binds to 127.0.0.1.",
        epilog="example, then open http://127.0.0.1:7860:\n  finetune demo --base outputs/tiny-sd --adapters outputs",
    )
    add_base_options(demo, default_help=" (default: the shipped toy-world base, else a tiny model in outputs/demo-base)")
    demo.add_argument("--adapters", default=ADAPTERS_DEFAULT, help=f"folder scanned for adapters (default {ADAPTERS_DEFAULT})")
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    demo.add_argument("--port", type=port_number, default=7860, help="port (default 7860)")
    demo.add_argument("--queue-size", type=positive_int, default=8, help="requests waiting at most; more are turned away (default 8)")
    demo.add_argument("--max-upload-mb", type=positive_number, default=10, help="largest upload accepted, in MB (default 10)")
    add_placement_options(demo)


def run_demo_command(args) -> int:
    if not Path(args.adapters).is_dir():
        if args.adapters != ADAPTERS_DEFAULT:  # a typo would show an empty list and no word why
            raise FinetuneError(f"adapters folder {args.adapters} not found: pass --adapters with the folder your training runs write to")
        Path(args.adapters).mkdir(parents=True)  # where training runs will write; Rescan finds them there
    from finetune.demo.engine import DemoEngine  # torch, diffusers and gradio: after the check above
    from finetune.sampling.placement import placement_line

    quiet_weight_progress_bars()  # the page's first line is the demo's own
    base, note = resolve_base(args.base)
    engine = DemoEngine(base, Path(args.adapters), exclude=(Path(base),), base_config=args.base_config, device=args.device, precision=args.precision)
    print(f"base model: {base}; {len(engine.adapters)} adapters under {args.adapters}; {placement_line(*engine.placement)}")
    launch_app(build_app(engine, note, args.queue_size), args.host, args.port, args.max_upload_mb, block=True)
    # Stopped, its server closed, nothing left to write: the exit took 6 to 16 s after "demo stopped", the interpreter's
    # last garbage collections walking every object gradio, torch and the models made (the modules' teardown and the
    # atexit handlers still run). Not in serve_until_stopped, which tests run in their own long-lived process.
    gc.freeze()
    return 0
