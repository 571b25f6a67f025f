"""`finetune bench`: the command runs variants through the real loop and writes a complete report; the
SD1.5-size model it builds for GPUs has SD1.5's architecture. No timing is asserted."""

import json
import math
import subprocess
from datetime import datetime

import pytest
import torch

from finetune.bench.measure import _worker, reset_peak_rss
from finetune.bench.report import memory_label
from finetune.bench.runner import default_resolution
from finetune.bench.sd15 import build_sd15_pipeline, peak_tflops
from finetune.cli.main import main
from finetune.config import ModelConfig
from finetune.errors import FinetuneError
from finetune.models.loading import load_base_model
from finetune.training.trainer import train


def test_bench_runs_two_variants_and_writes_the_report(tmp_path, capsys, monkeypatch):
    from transformers.utils import logging as transformers_logging

    # The lora variant runs in the process the bench starts for it; the dreambooth variant's worker runs in this one, from
    # the spec file the bench wrote (a fresh interpreter's imports: 8 CPU s), its row read back from the file it writes.
    started = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda command, **options: subprocess.CompletedProcess(command, _worker(command[-2:]), "", "")
                        if "--worker" in command and command[-2].endswith("dreambooth.spec.json") else started(command, **options))  # fmt: skip
    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--batch", "2", "--num-images", "2"]
    transformers_logging.enable_progress_bar()  # as in a fresh process (another test may have quieted it)
    code = main([*args, "--recipes", "lora,dreambooth", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    printed, said = capsys.readouterr()
    assert code == 0, printed
    assert "Writing model shards" not in said  # transformers' bar as the model was saved, between the bench's lines
    assert "lora" in printed and "dreambooth" in printed and "s/step" in printed

    report = json.loads(out.read_text())
    assert report["command"].startswith("finetune bench --preset tiny --steps 2 --warmup 1 --batch 2 --resolution 64")
    datetime.fromisoformat(report["date"])
    machine = report["machine"]
    assert machine["cpu"] and machine["cpu_cores"] >= 1 and machine["torch"] == torch.__version__
    assert machine["device"] == ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name())
    assert report["settings"]["preset"] == "tiny" and report["settings"]["resolution"] == 64
    assert (tmp_path / "work" / "models" / "tiny" / "model_index.json").is_file()  # another preset gets its own

    rows = {row["variant"]: row for row in report["results"]}
    assert list(rows) == ["lora", "dreambooth"]
    assert rows["lora"]["method"] == "lora" and rows["dreambooth"]["method"] == "dreambooth"
    assert rows["lora"]["images_per_step"] == 2
    assert rows["dreambooth"]["images_per_step"] == 2  # one instance and one class image
    for row in rows.values():
        assert "error" not in row
        for key in ("sec_per_step", "sec_per_step_median", "cpu_sec_per_step", "images_per_sec", "peak_memory_mb", "flops_per_step", "achieved_tflops", "speedup_vs_lora"):
            assert row[key] > 0, (row["variant"], key, row[key])
        assert row["images_per_sec"] == pytest.approx(row["images_per_step"] / row["sec_per_step"])
        assert len(row["step_seconds"]) == 2 and sum(row["step_seconds"]) == pytest.approx(2 * row["sec_per_step"], rel=1e-3)
        assert row["memory_kind"] in ("max RSS", "cuda max allocated")
        assert isinstance(row["final_loss"], float) and math.isfinite(row["final_loss"])  # a number: not NaN, inf or missing (null)
        if not torch.cuda.is_available():
            assert "mfu" not in row  # no peak FLOP/s for a CPU
    assert rows["lora"]["speedup_vs_lora"] == 1.0
    # Each variant's process restarts its peak for the timed steps (tests/test_bench_memory.py: what that peak leaves out).
    assert "timed peak MB" in printed
    if reset_peak_rss() or torch.cuda.is_available():  # else the OS cannot restart it: None, shown as "-"
        for row in rows.values():
            assert 0 < row["timed_peak_memory_mb"] <= row["peak_memory_mb"], row
    assert memory_label(report) == ("peak MB (cuda max allocated)" if torch.cuda.is_available() else "peak MB (max RSS)")


def test_bad_bench_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["bench", "--recipes", "lora,lora_fast", "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown variant lora_fast" in err[0] and "lora_cached" in err[0]
    if not torch.cuda.is_available():
        assert main(["bench", "--preset", "sd15", "--out", str(tmp_path / "b.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "needs a CUDA GPU" in err[0]
        assert main(["bench", "--preset", "tiny", "--mixed-precision", "fp16", "--out", str(tmp_path / "b.json")]) == 2
        assert "--mixed-precision fp16 needs a GPU" in capsys.readouterr().err
    # Under a launcher each copy ran every variant, and their processes joined the other copies' as one run of several
    # processes, whose images/s counted one process's batch.
    with pytest.MonkeyPatch.context() as launched:
        launched.setenv("WORLD_SIZE", "2")
        assert main(["bench", "--preset", "tiny", "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without accelerate launch or torchrun (WORLD_SIZE is 2)" in err[0]
    # A base that is not there: one line before any variant starts (each failed in its own process).
    assert main(["bench", "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "b.json")]) == 2
    assert f"base model {tmp_path / 'nope'} not found: no such folder or file (check --base)" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_a_resolution_past_the_recipes_bound_is_refused_before_the_model_and_data_are_made(tmp_path, monkeypatch):
    """data.resolution is at most 4096 (finetune/data/image_bounds.py): --resolution 8192 made the model and wrote the data at
    8192 px, then failed in every variant's process with an error naming data.resolution, a key the command has not."""
    import finetune.bench.runner as runner

    monkeypatch.setattr(runner, "prepare_model", lambda *args: pytest.fail("the model was made"))
    with pytest.raises(FinetuneError, match=r"^--resolution 8192 must be at most 4096 "):
        runner.run_benchmark(preset="tiny", resolution=8192, variants=["lora"], workdir=tmp_path)


def test_more_images_than_dreambooth_makes_class_images_are_refused_by_the_benchs_own_check(tmp_path, monkeypatch):
    """The DreamBooth variants make as many class images as --num-images, at most 100,000 (finetune/data/image_bounds.py):
    --num-images 100001 made the model and data, then failed in their processes naming dreambooth.num_class_images."""
    import finetune.bench.runner as runner

    class ModelMade(Exception):
        pass

    def made(*args):
        raise ModelMade

    monkeypatch.setattr(runner, "prepare_model", made)
    with pytest.raises(FinetuneError) as refused:
        runner.run_benchmark(preset="tiny", num_images=100_001, variants=["lora", "dreambooth_lora"], workdir=tmp_path, log=lambda line: None)
    assert str(refused.value) == ("--num-images 100001 must be at most 100,000 with dreambooth_lora (as many class images, numbered in 5 "
                                  "digits): lower it, or leave those out of --recipes")  # fmt: skip
    for num_images, variants in ((100_000, ["dreambooth"]), (100_001, ["lora"])):  # past the check: the model is made next
        with pytest.raises(ModelMade):
            runner.run_benchmark(preset="tiny", num_images=num_images, variants=variants, workdir=tmp_path, log=lambda line: None)


def test_train_reports_every_step_to_the_hook(make_recipe):
    steps = []
    train(make_recipe(train__max_steps=3), on_step=steps.append)
    assert steps == [1, 2, 3]


def test_sd15_preset_has_sd15_architecture():
    """Built on the meta device (no memory): the parameter counts of SD1.5's UNet, VAE and CLIP text encoder."""
    pipeline = build_sd15_pipeline(device="meta")
    count = lambda module: sum(p.numel() for p in module.parameters())
    assert count(pipeline.unet) == 859_520_964
    assert count(pipeline.vae) == 83_653_863
    assert count(pipeline.text_encoder) == 123_060_480
    config = pipeline.unet.config
    assert tuple(config.block_out_channels) == (320, 640, 1280, 1280) and config.cross_attention_dim == 768
    assert config.sample_size == 64 and pipeline.vae.config.sample_size == 512


def test_sd15_pipeline_at_small_width_saves_loads_and_runs(tmp_path):
    pipeline = build_sd15_pipeline(width_divisor=8)
    assert tuple(pipeline.unet.config.block_out_channels) == (40, 80, 160, 160)
    pipeline.save_pretrained(tmp_path / "sd15-small", safe_serialization=True)
    base = load_base_model(ModelConfig(pretrained=str(tmp_path / "sd15-small")))
    with torch.no_grad():
        pixels = torch.rand(1, 3, 64, 64) * 2 - 1
        latents = base.vae.encode(pixels).latent_dist.mean
        assert latents.shape == (1, 4, 8, 8)
        ids = base.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = base.text_encoder(ids)[0]
        assert text.shape == (1, 77, 96)
        out = base.unet(latents, torch.tensor([500]), text).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()
    # Benchmarked as a --base, it runs at its own 512 px, not at the default preset's size.
    assert default_resolution("medium", str(tmp_path / "sd15-small")) == 512 and default_resolution("medium") == 64


def test_peak_flops_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert peak_tflops("NVIDIA H200 NVL", "bf16") == peak_tflops("NVIDIA H100 NVL", "bf16") == 835.5  # not the SXM parts' 989.4
    assert peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert peak_tflops("Some Other GPU", "bf16") is None


def test_repeated_runs_keep_the_median_one():
    from finetune.bench.report import median_run

    runs = [{"sec_per_step": 3.0}, {"sec_per_step": 1.0}, {"sec_per_step": 2.0}]
    assert median_run(runs) == {"sec_per_step": 2.0, "runs_sec_per_step": [3.0, 1.0, 2.0]}
    assert median_run([{"sec_per_step": 1.0}, {"error": "exit 1: boom"}]) == {"error": "exit 1: boom"}
    assert median_run([{"sec_per_step": 1.0}]) == {"sec_per_step": 1.0, "runs_sec_per_step": [1.0]}  # the JSON has it with --repeat 1 too


def test_a_run_cut_short_keeps_the_variants_it_measured(tmp_path, monkeypatch):
    """The report is rewritten after every variant: a stop (here while the second starts) loses none.
    (The variant's process is stood in for: the test above runs real ones.)"""
    from finetune.bench import runner

    def log(line: str) -> None:
        if line.startswith("dreambooth: "):
            raise KeyboardInterrupt

    measured = {"variant": "lora", "sec_per_step": 0.25, "images_per_sec": 8.0, "runs_sec_per_step": [0.25]}
    monkeypatch.setattr(runner, "run_variant_process", lambda name, recipe, settings, path: dict(measured))
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        runner.run_benchmark(preset="tiny", steps=1, warmup=1, batch=2, num_images=2, variants=["lora", "dreambooth"],
                             count_flops=False, workdir=tmp_path / "work", out=out, log=log)  # fmt: skip
    report = json.loads(out.read_text())
    assert [row["variant"] for row in report["results"]] == ["lora"] and report["results"][0]["sec_per_step"] == 0.25


def test_the_report_is_written_before_the_first_variant_runs(tmp_path, monkeypatch):
    """A stop in the first variant keeps a report: its machine (torch's and diffusers' versions) is written before any
    variant runs, not at the stop alone, which a busy host's SIGKILL cut short."""
    from finetune.bench import runner

    out, seen = tmp_path / "bench.json", []

    def first_variant(name, recipe, settings, path):
        seen.append(json.loads(out.read_text()))
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_variant_process", first_variant)
    with pytest.raises(KeyboardInterrupt):
        runner.run_benchmark(preset="tiny", steps=1, warmup=1, batch=2, num_images=2, variants=["lora"], count_flops=False,
                             workdir=tmp_path / "work", out=out, log=lambda line: None)  # fmt: skip
    assert seen[0]["results"] == [] and seen[0]["machine"]["torch"] == torch.__version__


def test_a_failed_variant_is_a_row_and_its_error_a_line_below_the_table(capsys):
    from finetune.bench.report import print_table

    settings = dict(preset="tiny", resolution=64, batch=2, steps=1, warmup=1, mixed_precision="no")
    machine = dict(device="cpu", cpu="test cpu", torch="2.13.0", torch_threads=None)  # no variant ran to measure it
    error = "exit 1: base model /somewhere/that/is/quite/long/and/would/not/fit/in/a/table/cell not found: check --base"
    print_table({"settings": settings, "machine": machine, "results": [{"variant": "lora", "error": error}, {"variant": "lora_gc", "error": error}]})
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "failed" in line and "│" in line]
    assert len(rows) == 2 and "lora " in rows[0] and "lora_gc" in rows[1]
    assert f"lora failed: {error}" in out.replace("\n", " ") and "? threads" in out


@pytest.mark.parametrize("warmup, batch, num_images, note", [
    (1, 2, 4, "--warmup 1 steps of --batch 2 see 2 of the 4 images: lora_cached would time steps that still fill the cache; --warmup 2 fills it first"),
    # 3 x 2 >= 5 said nothing: but an epoch trains whole batches (2 of 2), the fifth image waits for the next epoch's shuffle
    (3, 2, 5, "--warmup 3 steps of --batch 2 see 4 of the 5 images: lora_cached would time steps that still fill the cache; --warmup 4 fills it first"),
    (2, 2, 4, None),
])  # fmt: skip
def test_too_short_a_warmup_for_the_cache_is_said_before_anything_runs(tmp_path, monkeypatch, warmup, batch, num_images, note):
    import finetune.bench.runner as runner

    class ModelMade(Exception):
        pass

    def made(*args):
        raise ModelMade

    monkeypatch.setattr(runner, "prepare_model", made)
    lines = []
    with pytest.raises(ModelMade):
        runner.run_benchmark(preset="tiny", steps=1, warmup=warmup, batch=batch, num_images=num_images, variants=["lora_cached"],
                             workdir=tmp_path / "work", log=lines.append)  # fmt: skip
    assert lines == ([f"note: {note}"] if note else [])


def test_vs_lora_compares_images_per_second():
    """DreamBooth with an odd --batch pushes one image fewer a step: per step it would look faster than it is."""
    from finetune.bench.report import add_speedups

    rows = [{"variant": "lora", "sec_per_step": 1.0, "images_per_sec": 5.0}, {"variant": "dreambooth", "sec_per_step": 0.9, "images_per_sec": 4.44}]
    add_speedups(rows)
    assert [row["speedup_vs_lora"] for row in rows] == [1.0, 0.888]


def test_the_command_of_a_run_of_a_base_names_the_base_and_no_preset():
    """A --base run once recorded `--preset medium` (the default, unused) beside it, as if it had run that model."""
    from types import SimpleNamespace

    from finetune.bench import format_command

    args = SimpleNamespace(preset="medium", base="/models/sd15", steps=5, warmup=1, batch=32, resolution=512, mixed_precision="bf16",
                           num_images=32, repeat=1, recipes="lora_cached", no_flops=False, peak_tflops=None, workdir=None, out="b.json")  # fmt: skip
    assert format_command(args).startswith("finetune bench --base /models/sd15 --steps 5 ")
    assert format_command(SimpleNamespace(**{**vars(args), "base": None})).startswith("finetune bench --preset medium --steps 5 ")


@pytest.mark.parametrize("model", [["--preset", "tiny"], ["--base", "/models/sd15"]])
def test_the_recorded_command_reads_back_as_the_options_of_the_run(model):
    """The report's command, 'every option spelled out', left out --workdir: a run again from it built its model and data
    in a temporary folder, not in the workdir the first run reused."""
    import shlex

    from finetune.bench import format_command
    from finetune.cli.arguments import parse_arguments

    args = parse_arguments(["bench", *model, "--steps", "3", "--warmup", "1", "--batch", "2", "--resolution", "32", "--mixed-precision", "bf16",
                            "--num-images", "4", "--repeat", "2", "--recipes", "lora,lora_gc", "--no-flops", "--peak-tflops", "100.5",
                            "--workdir", "/tmp/bench work", "--out", "b.json"])  # fmt: skip
    assert vars(parse_arguments(shlex.split(format_command(args))[1:])) == vars(args)


def test_on_a_gpu_each_wait_for_it_in_the_timed_window_is_reported_by_step_and_line(make_recipe, monkeypatch):
    """torch's sync debug mode is on between the timed window's ends only: a host read after step 4 (a log step's) is
    reported under 4 with its line, one before the window (the cache filling) and the window's own synchronize are not.
    Other warnings are still shown. Here on a pretend GPU, which warns as torch does; and the untimed steps' ends
    (a compile's minutes) are in the row."""
    import warnings
    from types import SimpleNamespace

    from finetune.bench.measure import measure
    import finetune.training.trainer

    mode = [0]

    def synchronize():
        if mode[0]:
            warnings.warn("called a synchronizing CUDA operation", stacklevel=2)  # at the caller's line, as torch's

    for name, fake in {"is_available": lambda: True, "synchronize": synchronize, "memory_allocated": lambda: 0, "reset_peak_memory_stats": lambda: None,
                       "max_memory_allocated": lambda: 0, "get_device_name": lambda: "pretend GPU",
                       "set_sync_debug_mode": lambda value: mode.__setitem__(0, {"warn": 1}.get(value, value))}.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, fake)

    def fake_train(recipe, on_step, overwrite):
        for step in range(1, 9):
            if step in (1, 5):
                torch.cuda.synchronize()  # a read: before the window, and after step 4 (the line below)
            if step == 6:
                warnings.warn("another library's warning")
            on_step(step)
        return SimpleNamespace(losses=[1.0] * 8)

    monkeypatch.setattr(finetune.training.trainer, "train", fake_train)
    recipe = make_recipe().model_dump(mode="json")
    with pytest.warns(UserWarning, match="another library's warning"):
        row = measure({"name": "lora", "recipe": recipe, "warmup": 2, "steps": 5, "count_flops": False, "images_per_step": 2})
    (line,) = [f"test_bench.py:{n}" for n, text in enumerate(open(__file__).read().splitlines(), 1) if text.strip().startswith("torch.cuda.synchronize()  # a read")]
    assert row["host_syncs_after_step"] == {4: {line: 1}}
    assert mode == [0] and len(row["untimed_step_ends"]) == 2 and row["untimed_step_ends"] == sorted(row["untimed_step_ends"])


def test_the_cudnn_autotuner_variant_sets_it_in_its_process_only(make_recipe, monkeypatch):
    """lora_cached_cudnn_benchmark: the cached LoRA with torch.backends.cudnn.benchmark, which the trainer leaves off;
    a GPU measurement, so not in the default set (on a CPU it is lora_cached)."""
    from finetune.bench.measure import measure
    from finetune.bench.runner import parse_variants
    from finetune.bench.variants import DEFAULT_VARIANTS, VARIANTS

    assert parse_variants("lora_cached,lora_cached_cudnn_benchmark") == ["lora_cached", "lora_cached_cudnn_benchmark"]
    assert "lora_cached_cudnn_benchmark" not in DEFAULT_VARIANTS and "lora_cached" in DEFAULT_VARIANTS
    assert [name for name, variant in VARIANTS.items() if variant.cudnn_benchmark] == ["lora_cached_cudnn_benchmark"]
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # put back after the test: measure() sets it for its process
    recipe = make_recipe(train__max_steps=3).model_dump(mode="json")
    spec = {"name": "lora_cached_cudnn_benchmark", "recipe": recipe, "warmup": 1, "steps": 1, "count_flops": False, "images_per_step": 2}
    assert measure({**spec, "cudnn_benchmark": True})["cudnn_benchmark"] is True
    torch.backends.cudnn.benchmark = False
    assert measure(spec)["cudnn_benchmark"] is False


def test_a_variants_peak_memory_is_its_own_not_that_of_the_bench_that_started_it():
    """Linux keeps getrusage's ru_maxrss across exec: every variant's process reported at least the peak of the bench
    process that started it (which builds the model), hiding a variant that needs less. Here a parent peaks at 512 MB,
    frees it, and starts a process that reads its own peak as the bench's variants do."""
    import subprocess
    import sys

    child = "from finetune.bench.measure import peak_rss_mb; print(peak_rss_mb())"
    parent = ("import subprocess, sys\nbuffer = bytearray(512 << 20)\nbuffer[::4096] = bytes(len(buffer) // 4096)\ndel buffer\n"
              f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, check=True).stdout)")  # fmt: skip
    peak = float(subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout)
    assert 0 < peak < 256, peak


def test_a_workdir_kept_from_a_run_with_other_data_settings_trains_only_this_runs_images(tmp_path):
    """The toy-world folders were one per --workdir, and writing them removed nothing: 3 images at 64 px after a run of
    6 at 128 px trained 6, three of them at 128 px (class images alike)."""
    from PIL import Image

    from finetune.bench.runner import prepare_data
    from finetune.data.sources import folder_images

    prepare_data(tmp_path, 6, 128)
    data, classes = prepare_data(tmp_path, 3, 64)
    for folder in (data, classes):
        assert [Image.open(path).size for path in folder_images(folder)] == [(64, 64)] * 3


def test_only_the_compiled_variants_compile_whatever_the_shell_exported(tmp_path, monkeypatch):
    """ACCELERATE_DYNAMO_BACKEND in the bench's environment (exported, or set by `accelerate launch --dynamo_backend`)
    went to every variant's process: `lora` and `lora_cached` were compiled too."""
    import subprocess

    from finetune.bench import runner
    from finetune.bench.variants import VARIANTS

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", "max-autotune")
    seen = {}

    def started(command, env, **kwargs):
        seen[name] = {key: value for key, value in env.items() if key.startswith("ACCELERATE_DYNAMO_")}
        return subprocess.CompletedProcess(command, 1, "", "stopped here")

    settings = runner.BenchSettings("tiny", 1, 1, 2, 64, "no", 2, False, None)
    monkeypatch.setattr(runner.subprocess, "run", started)
    for name in ("lora", "lora_cached_compiled"):
        runner.run_variant_process(name, {}, settings, tmp_path / f"{name}.json")
    assert seen == {"lora": {}, "lora_cached_compiled": VARIANTS["lora_cached_compiled"].environment}
