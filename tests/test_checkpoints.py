"""Nothing a user made is lost: atomic checkpoints, rotation, and a clean stop on Ctrl-C."""

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from forked import start_forked

from finetune.__main__ import run as finetune_command
from finetune.checkpoints.run_files import STATE_FILE, list_checkpoints, resolve_resume
from finetune.errors import FinetuneError
from finetune.training.trainer import train
import finetune.training.trainer as trainer_module


def test_latest_ignores_partial_and_incomplete_folders(tmp_path):
    folder = tmp_path / "checkpoints"
    for name, complete in [("checkpoint-5", True), ("checkpoint-10", True), ("checkpoint-20", False), (".partial-checkpoint-30", False),
                           (".checkpoint-10.old", True)]:  # a checkpoint set aside as it was replaced (replace_folder), a kill after both renames left
        (folder / name).mkdir(parents=True)
        if complete:
            (folder / name / STATE_FILE).write_text('{"step": 0}')
    assert resolve_resume("latest", folder).name == "checkpoint-10"
    assert resolve_resume("latest", tmp_path / "none") is None
    # A path is a checkpoint, or said to be missing (with the newest there is), or said to be incomplete.
    with pytest.raises(FinetuneError, match=rf"^--resume {folder}/checkpoint-99: no such folder \(the newest in {folder} is checkpoint-10\); use 'latest'"):
        resolve_resume(str(folder / "checkpoint-99"), folder)
    with pytest.raises(FinetuneError, match=rf"no such folder \({tmp_path}/none holds none yet\)"):
        resolve_resume(str(tmp_path / "none" / "checkpoint-1"), tmp_path / "none")
    with pytest.raises(FinetuneError, match=r"checkpoint-20: not a complete checkpoint folder \(no trainer_state.json\)"):
        resolve_resume(str(folder / "checkpoint-20"), folder)


def test_rotation_keeps_the_last_n(make_recipe):
    result = train(make_recipe(train__max_steps=5, checkpoint__every_n_steps=1, checkpoint__keep_last=2))
    assert [p.name for p in list_checkpoints(result.output_dir / "checkpoints")] == ["checkpoint-4", "checkpoint-5"]
    assert not [p for p in (result.output_dir / "checkpoints").iterdir() if p.name.startswith(".partial")]


def test_a_new_run_does_not_mix_with_an_earlier_one_in_its_output_dir(make_recipe, monkeypatch):
    import finetune.training.trainer as trainer

    earlier = train(make_recipe(train__max_steps=3, checkpoint__every_n_steps=1))
    monkeypatch.setattr(trainer, "load_base_model", lambda *a, **k: pytest.fail("loaded the model"))
    # Its rotation would delete the earlier run's checkpoints, and --resume latest would pick checkpoint-3.
    with pytest.raises(FinetuneError, match=r"output_dir .*run holds an earlier run \(checkpoint-3\): continue it with --resume latest, replace it with --overwrite"):
        train(make_recipe(train__max_steps=2, optimizer__lr=5e-4))
    assert [p.name for p in list_checkpoints(earlier.output_dir / "checkpoints")] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]

    monkeypatch.undo()
    replaced = train(make_recipe(train__max_steps=2, optimizer__lr=5e-4), overwrite=True)
    assert [p.name for p in list_checkpoints(replaced.output_dir / "checkpoints")] == ["checkpoint-2"]
    resumed = train(make_recipe(train__max_steps=3, optimizer__lr=5e-4), resume="latest")  # continuing needs no --overwrite
    assert resumed.final_step == 3 and len(resumed.losses) == 1


def test_an_optimizer_not_installed_is_refused_before_the_model_loads_and_leaves_the_earlier_run(make_recipe, monkeypatch):
    """optimizer.name prodigy without prodigyopt: refused with the cheap checks, before the base model loads, and the
    earlier run that --overwrite replaces is kept (it was once refused after the clear, and the refused run lost it)."""
    earlier = train(make_recipe(train__max_steps=2, checkpoint__every_n_steps=1))
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # its import fails, as where it is not installed
    monkeypatch.setattr(trainer_module, "load_base_model", lambda *a, **k: pytest.fail("the base model loaded"))
    with pytest.raises(FinetuneError, match=r"^optimizer.name prodigy needs the prodigyopt package"):
        train(make_recipe(train__max_steps=2, optimizer__name="prodigy", optimizer__lr=1.0), overwrite=True)
    assert [p.name for p in list_checkpoints(earlier.output_dir / "checkpoints")] == ["checkpoint-1", "checkpoint-2"]


def wait_for_a_trained_step(process: subprocess.Popen, log: Path) -> None:
    """Until the training bar in `log` shows a step done: the loop's stop handler is set by then. A signal earlier (while the
    model loads) is a stop with no checkpoint. A fixed 3 s after recipe_as_run.yaml was written stood in for this, and a
    busy host can take longer than that to reach the loop. Bounded for a hang only; a run that ends first fails at once."""
    deadline = time.monotonic() + 300
    while not re.search(r"training:.*\| [1-9]\d*/100000 ", log.read_text()):
        assert process.poll() is None, f"the run ended before its first step: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no step trained in 300 s: {log.read_text()[-2000:]}"
        time.sleep(0.1)


@pytest.mark.parametrize(
    "stop,num_workers,forked",
    # Ctrl-C: `finetune train` in a fork of this process (tests/forked.py), the command less the interpreter's start and
    # imports (about 10 CPU seconds); SIGTERM: the command itself, `python -m finetune train`, with its data-loader workers.
    [(signal.SIGINT, 0, True), (signal.SIGTERM, 2, False)],  # exit 130 for SIGINT, 143 for SIGTERM: 128 + the signal's number, as a shell reports it
    ids=["ctrl-c", "sigterm-to-the-process-group-with-loader-workers"],  # how timeout, systemd and SLURM stop a job
)
def test_a_stop_signal_writes_a_checkpoint_and_resume_finishes(make_recipe, tmp_path, stop, num_workers, forked):
    recipe = make_recipe(train__max_steps=100_000, checkpoint__every_n_steps=0, data__num_workers=num_workers)
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    said, log = tmp_path / "stdout.log", tmp_path / "stderr.log"  # stderr: each redraw of the training bar a line of its own (finetune.progress_lines)
    quiet = {"FINETUNE_PROGRESS_EVERY": "0"}
    if forked:
        def command() -> int:
            sys.argv = ["finetune", "train", str(path)]
            return finetune_command()

        process = start_forked(command, said, log, quiet)
    else:
        with said.open("w") as stdout_file, log.open("w") as stderr_file:
            process = subprocess.Popen([sys.executable, "-m", "finetune", "train", str(path)], stdout=stdout_file, stderr=stderr_file,
                                       start_new_session=True, env={**os.environ, **quiet})  # fmt: skip
    output_dir = tmp_path / "run"
    try:
        wait_for_a_trained_step(process, log)
        os.killpg(process.pid, stop)  # the trainer and its data-loader workers, as a terminal or `timeout` does
        process.wait(timeout=300)
    finally:
        if process.poll() is None:  # a failed wait: not left training on
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    stdout, stderr = said.read_text(), log.read_text()
    assert process.returncode == 128 + stop, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "continue with --resume latest" in stdout
    saved = list_checkpoints(output_dir / "checkpoints")
    assert len(saved) == 1
    stopped_at = int(saved[0].name.split("-")[1])
    assert stopped_at >= 1

    resumed = train(make_recipe(train__max_steps=stopped_at + 2, data__num_workers=num_workers), resume="latest")
    assert resumed.final_step == stopped_at + 2 and len(resumed.losses) == 2


def test_a_run_that_fails_with_loader_workers_exits(make_recipe, tmp_path):
    """The workers ignore SIGTERM (so a stop signal reaches only the trainer); left running after an error,
    the interpreter's exit would wait on them forever."""
    recipe = make_recipe(train__max_steps=100, data__num_workers=2)
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    script = (
        "import sys, finetune.training.training_run as training_run\n"
        "def failing(*args, **kwargs):\n"
        "    raise RuntimeError('the third step failed')\n"
        "real = training_run.BatchRandomness\n"
        "calls = []\n"
        "training_run.BatchRandomness = lambda *a, **k: calls.append(1) or (failing() if len(calls) == 3 else real(*a, **k))\n"
        "from finetune.cli.main import main\n"
        f"sys.exit(main(['train', {str(path)!r}]))\n"
    )
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)  # a hang would never end; 60 s was too little on a loaded host
    assert process.returncode == 1 and "RuntimeError: the third step failed" in process.stderr, process.stderr[-2000:]


def _tensors_under(path: Path) -> dict:
    from safetensors.torch import load_file

    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    return {(f.relative_to(path).as_posix() if path.is_dir() else f.name, key): value for f in files for key, value in load_file(f).items()}


@pytest.mark.parametrize("method", ["lora", "controlnet", "full"])
def test_each_checkpoint_holds_the_outputs_of_its_step(make_recipe, pairs_folder, tmp_path, method):
    """checkpoint-2 of a 4-step run holds what a 2-step run saves, bit for bit, and the demo and `sample`
    find it there; the last checkpoint holds the run's own outputs (a resumed, longer run replaces those in
    output_dir); checkpoint.save_outputs=false leaves them out. The outputs are readable by other users like any new file."""
    import os

    from finetune.checkpoints.run_files import resolve_lora_file
    from finetune.demo.adapter_scan import scan_adapters

    data = {} if method == "lora" else {"data__image_dir": str(pairs_folder)}
    long = train(make_recipe(method=method, output_dir=str(tmp_path / "long"), train__max_steps=4, checkpoint__every_n_steps=2, **data))
    short = train(make_recipe(method=method, output_dir=str(tmp_path / "short"), train__max_steps=2, checkpoint__every_n_steps=1,
                              checkpoint__save_outputs=False, **data))  # fmt: skip
    at_step_2 = long.output_dir / "checkpoints" / "checkpoint-2"
    [output] = short.saved_files
    held = at_step_2 / output.name
    expected, in_checkpoint = _tensors_under(output), _tensors_under(held)
    assert expected and set(in_checkpoint) == set(expected)
    assert all(torch.equal(in_checkpoint[key], value) for key, value in expected.items())
    in_last, final = _tensors_under(long.output_dir / "checkpoints" / "checkpoint-4" / output.name), _tensors_under(long.saved_files[0])
    assert in_last.keys() == final.keys() and all(torch.equal(in_last[key], value) for key, value in final.items())
    assert not (short.output_dir / "checkpoints" / "checkpoint-1" / output.name).exists()
    # safetensors alone writes 0600 files; the adapter, a ControlNet folder and a pipeline get the umask's mode (their
    # own test once, with three 1-step runs of their own).
    mask = os.umask(0)
    os.umask(mask)
    files = [path for path in ([output] if output.is_file() else output.rglob("*")) if path.is_file()]
    assert any(path.suffix == ".safetensors" for path in files)
    assert {path: oct(path.stat().st_mode & 0o777) for path in files} == {path: oct(0o666 & ~mask) for path in files}

    shutil.copytree(at_step_2, tmp_path / "picked" / "step-2")  # a step copied out to keep, as sd-scripts users do
    adapters = scan_adapters(tmp_path)  # the resumable state beside the outputs (trainable_0, optimizer) is no adapter
    # A run's LoRA file, pipeline and ControlNet are listed by their run; checkpoint-4 holds what "long" does: listed once.
    assert sorted(adapters) == ["long", "long/checkpoints/checkpoint-2", "picked/step-2", "short"]
    assert adapters["long/checkpoints/checkpoint-2"].metadata["finetune.steps"] == "2"
    assert adapters["long"].metadata["finetune.steps"] == "4"
    if method == "lora":
        assert resolve_lora_file(str(at_step_2)) == held
        # The demo compares the run with its step 2, one column each (together they would add up).
        from finetune.demo.engine import DemoEngine, Request

        engine = DemoEngine(str(make_recipe().model.pretrained), tmp_path)
        request = dict(prompt="a red circle", steps=2, include_base=False)
        images, labels, _, _ = engine.render(Request(**request, loras=[("long", 1.0), ("long/checkpoints/checkpoint-2", 1.0)], separate=True))
        assert labels == ["long x1", "long, step 2 x1"]
        alone, _, _, _ = engine.render(Request(**request, loras=[("long/checkpoints/checkpoint-2", 1.0)]))
        assert images[0][1].tobytes() == alone[0][0].tobytes() and images[0][0].tobytes() != alone[0][0].tobytes()
        from finetune.formats.lora_export import export_lora

        exported, *_ = export_lora(at_step_2, tmp_path / "webui", "kohya")  # sd-scripts' name for a step: webui lists it apart
        assert exported.name == "long-step00000002.safetensors"
        with pytest.raises(FinetuneError, match=r"checkpoint .*checkpoint-1 holds no LoRA file: its run had checkpoint.save_outputs: false"):
            resolve_lora_file(str(short.output_dir / "checkpoints" / "checkpoint-1"))  # not its trainable_0.safetensors


def test_an_fp16_run_resumes_a_checkpoint_written_without_a_loss_scaler(tmp_path):
    """fp16 on a GPU keeps a loss scaler; a bf16 run moved to a GPU without bf16 resumes as fp16 from a
    checkpoint that has no scaler.pt, which accelerate failed on. The scale starts afresh. On the CPU a
    scaler is added by hand, as accelerate adds one for fp16 on CUDA."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from finetune.checkpoints import checkpoint as ckpt

    accelerator = Accelerator(mixed_precision="bf16")
    try:
        model, optimizer = accelerator.prepare(torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()))
        accelerator.save_state(str(tmp_path))
        (tmp_path / STATE_FILE).write_text(json.dumps({"step": 1}))
        accelerator.scaler = scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        assert ckpt.load_checkpoint(accelerator, tmp_path, {})["step"] == 1
        assert accelerator.scaler is scaler and scaler.get_scale() == 1024.0
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()




def test_a_stop_mid_run_names_the_command_that_continues_it(make_recipe, tmp_path, capsys):
    """A first Ctrl-C said "continue with --resume latest" alone, where a second one and a stop at the end name the command
    (a run launched as `accelerate launch ... recipes/lora.yaml data.image_dir=...` is continued from its recipe_as_run.yaml)."""
    recipe = make_recipe(train__max_steps=4, checkpoint__every_n_steps=0)
    stopped = train(recipe, on_step=lambda step: os.kill(os.getpid(), signal.SIGINT) if step == 1 else None)
    assert stopped.interrupted and stopped.final_step == 1
    run = tmp_path / "run"
    assert (f"stopped at step 1; checkpoint saved in {run / 'checkpoints'}; continue with --resume latest "
            f"(finetune train {run / 'recipe_as_run.yaml'} --resume latest)") in capsys.readouterr().out
