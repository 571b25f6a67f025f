"""The GPU checks (.ci/gpu-check, .ci/gpu-profile, .ci/gpu_profile.py) run where a GPU is lent for minutes: what
breaks there is lost device time, so their flow is checked here, without a GPU and without training."""

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from finetune.bench.runner import default_resolution, parse_variants
from finetune.distributed.launch_options import processes_asked

CI = Path(__file__).parents[1] / ".ci"


def load_gpu_profile():
    spec = importlib.util.spec_from_file_location("gpu_profile", CI / "gpu_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeProfile:
    """torch.profiler.profile's part the script uses, without a profiler (and with CUDA asked for on a CPU)."""

    def __init__(self, activities):
        self.activities = activities

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def key_averages(self):
        class Events(list):
            def table(self, **kwargs):
                return "(table)"

        return Events()


def test_the_profile_runs_its_variant_as_the_bench_does_at_the_models_resolution(tiny_model, tmp_path, monkeypatch):
    """The variant's environment (torch.compile through accelerate) and cuDNN's autotuner are applied, the data is at
    the model's own resolution (512 was fixed: a medium-preset dry run trained at 512 px), and on CUDA the GPU is
    waited for at the profiled window's two ends only (a wait every step kept the CPU from running ahead)."""
    gpu_profile = load_gpu_profile()
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # put back after the test: the script sets its variant's
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", "default")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    seen, synced_after = {}, []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synced_after.append(seen["step"]))

    def fake_train(recipe, on_step, overwrite):
        seen["resolution"], seen["cudnn_benchmark"] = recipe.data.resolution, torch.backends.cudnn.benchmark
        seen["environment"] = {key: os.environ[key] for key in ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE")}
        for step in range(1, recipe.train.max_steps + 1):
            seen["step"] = step
            on_step(step)

    monkeypatch.setattr(gpu_profile, "train", fake_train)
    out = tmp_path / "profile.txt"
    gpu_profile.main(str(tiny_model), tmp_path / "work", out, 2, "lora_cached_cudagraphs")
    assert seen["resolution"] == default_resolution("sd15", str(tiny_model)) != 512
    assert seen["environment"] == {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR", "ACCELERATE_DYNAMO_MODE": "reduce-overhead"}
    assert synced_after == [3, 7]  # 3 untimed steps, then 4 profiled
    assert out.read_text().startswith(f"lora_cached_cudagraphs, batch 2, {tiny_model} at {seen['resolution']} px")

    gpu_profile.main(str(tiny_model), tmp_path / "work", out, 2, "lora_cached_cudnn_benchmark")
    assert seen["cudnn_benchmark"] is True


def test_a_profile_stopped_before_its_last_step_says_so_in_its_file(tiny_model, tmp_path, monkeypatch):
    """A deadline's SIGTERM ends the training at a step boundary; the script said so with a KeyError traceback."""
    gpu_profile = load_gpu_profile()
    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(gpu_profile, "train", lambda recipe, on_step, overwrite: [on_step(step) for step in range(1, 5)])
    out = tmp_path / "profile.txt"
    with pytest.raises(SystemExit, match="^lora_cached: stopped after step 4 of 3 untimed and 4 profiled steps: no profile$"):
        gpu_profile.main(str(tiny_model), tmp_path / "work", out, 2, "lora_cached")
    assert out.read_text() == "lora_cached: stopped after step 4 of 3 untimed and 4 profiled steps: no profile\n"


def test_the_gpu_scripts_name_variants_the_bench_has():
    """A variant renamed in finetune/bench/variants.py would fail a GPU stage only on the device."""
    named = []
    for script in ("gpu-check", "gpu-profile"):
        text = (CI / script).read_text()
        named += re.findall(r"--recipes ([\w,]+)", text) + re.findall(r"for variant in ([\w ]+); do", text)
    assert len(named) == 5
    for names in named:
        parse_variants(names.replace(" ", ","))


def stage_seconds(script: str) -> list[int]:
    """Each stage's wanted seconds on the GPU (a DRY_RUN alternative is left out)."""
    lines = [line for line in (CI / script).read_text().splitlines() if line.startswith(("stage ", "  stage "))]
    return [int(re.findall(r"(\d+)\)?\"?$", line)[0]) for line in lines]


def test_gpu_check_stages_fit_its_deadline():
    """The stages' wanted times, the ~20 s that installing the wheels and printing the versions took on the H200
    (docs/gpu-results/h200-gpu-check-bench.log: its first stage began at 21 s) and the 10 s margin that `limit`
    keeps fit in DEADLINE: when they did not, the last stage (the GPU tests) was cut short by design."""
    deadline = int(re.search(r"DEADLINE=\$\{DEADLINE:-(\d+)\}", (CI / "gpu-check").read_text())[1])
    wanted = stage_seconds("gpu-check")
    assert len(wanted) == 4 and 20 + sum(wanted) + 10 <= deadline == 540


def test_gpu_profile_stages_fit_its_deadline():
    """Its first stage began at 2 s on the H200 (no versions printed); the profile stage runs once per variant."""
    deadline = int(re.search(r"DEADLINE=\$\{DEADLINE:-(\d+)\}", (CI / "gpu-profile").read_text())[1])
    bench, profile = stage_seconds("gpu-profile")
    assert 2 + bench + 2 * profile + 10 <= deadline == 210


def run_with_fake_python(tmp_path: Path, script: str, **env) -> tuple[str, str]:
    """Run a copy of the script with PYTHON a stand-in that records its arguments: (the records, the stage log)."""
    repo = tmp_path / "repo"
    shutil.copytree(CI, repo / ".ci", ignore=shutil.ignore_patterns("*.whl"))
    fake, record, out = tmp_path / "python", tmp_path / "calls.txt", tmp_path / "out"
    # The bench's first stage builds the model the later stages use (`built`): the stand-in leaves its model_index.json.
    builds = 'a=("$@"); for i in "${!a[@]}"; do case "${a[i]}" in --workdir) w=${a[i+1]};; --preset) p=${a[i+1]};; esac; done\n'
    builds += '[ -n "${w:-}" ] && [ -n "${p:-}" ] && mkdir -p "$w/models/$p" && touch "$w/models/$p/model_index.json"\nexit 0\n'
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {record}\n' + builds)
    fake.chmod(0o755)
    environment = {"PATH": os.environ["PATH"], "PYTHON": str(fake), "OUT": str(out), **env}
    done = subprocess.run(["bash", str(repo / ".ci" / script)], env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return record.read_text(), done.stdout


def zero_launches(calls: str) -> list[str]:
    return [line for line in calls.splitlines() if "accelerate.commands.launch --use_deepspeed" in line]


def test_gpu_check_dry_run_uses_the_medium_preset_short_zero_runs_and_collects_the_tests(tmp_path):
    calls, _ = run_with_fake_python(tmp_path / "dry", "gpu-check", DRY_RUN="1")
    assert "bench --mixed-precision bf16 --steps 10 --batch 32 --num-images 32 --preset medium" in calls
    # ZeRO-2's and ZeRO-3's launches run side by side: their records interleave
    assert sorted(re.search(r"train.max_steps=\d+( --resume latest)?$", line)[0] for line in zero_launches(calls)) == [
        "train.max_steps=12"] * 2 + ["train.max_steps=14 --resume latest"] * 2  # above quickstart's 10 warm-up steps
    assert "-m pytest -v -p no:cacheprovider --durations=5 --collect-only tests/" in calls

    calls, _ = run_with_fake_python(tmp_path / "gpu", "gpu-check")
    assert "--preset sd15" in calls and "--collect-only" not in calls
    assert sorted(re.search(r"train.max_steps=\d+( --resume latest)?$", line)[0] for line in zero_launches(calls)) == [
        "train.max_steps=20"] * 2 + ["train.max_steps=40 --resume latest"] * 2
    assert "-m pytest -v -p no:cacheprovider --durations=5 tests/" in calls  # a line per test: a cut run says which passed


def test_gpu_check_measures_full_and_controlnet_and_launches_zero_2_and_3_as_one_process(tmp_path):
    """Issue 6's open goals: full fine-tuning and ControlNet at batch 32 on the model the first stage built, and DeepSpeed
    ZeRO-2 and ZeRO-3 on the GPU with a resume, sampled after. The one GPU takes one process: accelerate_config.yaml
    asks for 2, and the trainer refuses a launch that asks for more processes than it starts (launch_options)."""
    calls, _ = run_with_fake_python(tmp_path, "gpu-check")
    assert re.search(r"-m finetune bench .* --batch 32 .* --base \S+/bench/models/sd15 --warmup 2 --recipes dreambooth,controlnet ", calls)
    launches = zero_launches(calls)
    assert sorted(re.search(r"zero\d.json", line)[0] for line in launches) == ["zero2.json"] * 2 + ["zero3.json"] * 2
    for line in launches:
        assert processes_asked(line.split()) is None  # one process asked: check_processes_started(1) lets it run
        assert "train.mixed_precision=bf16" in line and "--mixed_precision bf16" in line
    assert re.search(r"-m finetune sample --lora \S+/adapters/zero2 ", calls)


def test_gpu_check_writes_at_most_the_eight_files_a_device_call_brings_back():
    written = set(re.findall(r'"\$OUT/([\w.-]+)"', (CI / "gpu-check").read_text()))
    written |= set(re.findall(r"/ '([\w.-]+\.png)'", (CI / "gpu-check").read_text()))  # the demo's grid, saved by Python
    assert written == {"bench.log", "bench-b32.json", "bench-compiled.json", "bench-full-b32.json", "runs.log", "sample.png",
                       "demo.png", "tests.log"}


def test_a_stage_too_near_the_deadline_is_skipped_and_the_log_says_so(tmp_path):
    calls, stdout = run_with_fake_python(tmp_path, "gpu-check", DEADLINE="25")
    assert "-m finetune" not in calls and "pytest" not in calls
    log = (tmp_path / "out" / "bench.log").read_text()
    assert log.count("skipped at") == 4 and "too near DEADLINE (25 s)" in log and "done at" in log



def test_gpu_profile_runs_at_gpu_checks_batch():
    """gpu-check measures at batch 32 (where eager came nearest the MFU goal); the profile is of that step, not batch 4's."""
    check, profile = (CI / "gpu-check").read_text(), (CI / "gpu-profile").read_text()
    batch = re.search(r"BATCH=\$\{BATCH:-(\d+)\}", profile)[1]
    assert set(re.findall(r"--batch (\S+)", check)) == {batch} == {"32"}
    assert set(re.findall(r"--batch (\S+)", profile)) == {'"$BATCH"'} and '"$OUT/profile-b$BATCH$suffix.txt" "$BATCH"' in profile
