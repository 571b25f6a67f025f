"""finetune/distributed/launch_options.py reads an `accelerate launch` command line as accelerate 1.16 does: a --cpu launch never reads
the default config file and always starts one process (launch_command's simple launcher), and refuses --multi_gpu."""

import pytest

import finetune.distributed.launch_options as launch_options
from finetune.errors import FinetuneError

LAUNCHER = ["/venv/bin/python", "/venv/bin/accelerate", "launch"]
SCRIPT = ["-m", "finetune", "train", "recipes/lora.yaml"]


def test_a_cpu_launch_is_not_refused_for_the_default_config_files_processes_it_does_not_read(monkeypatch, tmp_path):
    import accelerate.commands.config as accelerate_config

    default = tmp_path / "default_config.yaml"  # as `accelerate config` writes it for two GPUs
    default.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\n")
    monkeypatch.setattr(accelerate_config, "default_config_file", str(default))
    assert launch_options.processes_asked([*LAUNCHER, *SCRIPT]) == (2, f"{default}'s num_processes: 2")  # read without --cpu
    assert launch_options.processes_asked([*LAUNCHER, "--cpu", *SCRIPT]) is None
    given = tmp_path / "given.yaml"
    given.write_text("distributed_type: MULTI_GPU\nnum_processes: 3\n")  # --config_file is read with --cpu too
    assert launch_options.processes_asked([*LAUNCHER, "--cpu", "--config_file", str(given), *SCRIPT]) == (3, f"{given}'s num_processes: 3")

    monkeypatch.setattr(launch_options, "launcher_command_line", lambda: [*LAUNCHER, "--cpu", *SCRIPT])
    launch_options.check_processes_started(1)  # not refused


def test_a_cpu_launch_asking_for_two_processes_is_not_told_to_add_multi_gpu_which_accelerate_refuses_beside_cpu(monkeypatch):
    monkeypatch.setattr(launch_options, "launcher_command_line", lambda: [*LAUNCHER, "--cpu", "--num_processes", "2", *SCRIPT])
    with pytest.raises(FinetuneError, match=r"^accelerate launch --cpu starts one process, whatever --num_processes 2 asks: to train on several, "
                                            r"launch with --multi_gpu --num_processes 2 in place of --cpu .*, or with --num_processes 1 for one$"):  # fmt: skip
        launch_options.check_processes_started(1)


@pytest.mark.parametrize("launch", ["two processes asked", "deepspeed config not found"])
def test_finetune_train_refuses_its_launch_before_the_data_check_decodes_every_image(launch, image_folder, tmp_path, monkeypatch, capsys):
    """finetune/distributed/deepspeed_checks.py's refusals are made "before anything loads (the data check, ...)": since the command
    checks the data before train() (finetune/data_check/checked_once.py), a corrupt image (after every image decoded) was said in their place."""
    from train_command_files import corrupt_copy, write_recipe

    from finetune.cli.main import main
    import finetune.cli.train_command

    folder = corrupt_copy(image_folder, tmp_path)
    monkeypatch.setattr(finetune.cli.train_command, "_run_training", lambda *args: pytest.fail("the training stack was loaded"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if launch == "two processes asked":
        monkeypatch.setattr(launch_options, "launcher_command_line", lambda: [*LAUNCHER, "--num_processes", "2", *SCRIPT])
        said = "accelerate launch --num_processes 2 started this run as 1 process"
    else:
        monkeypatch.setattr(launch_options, "launcher_command_line", lambda: [])
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "no-such-zero2.json"))
        said = f"DeepSpeed config {tmp_path / 'no-such-zero2.json'} not found"
    assert main(["train", str(write_recipe(tmp_path, "lora", folder))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0], err
    assert not (tmp_path / "run").exists()  # nothing made for a launch refused


def test_the_launchers_command_line_is_read_without_proc_as_on_macos_and_windows(monkeypatch):
    """Read from /proc alone (missing on macOS and Windows), the launcher's command line was empty there: `accelerate launch
    --num_processes 2` that started one process (no --multi_gpu) trained on at half the global batch asked, unsaid. psutil
    reads it on every platform (here a stand-in for macOS's)."""
    import os
    from types import SimpleNamespace

    import psutil

    parents = {os.getppid(): [*LAUNCHER, "--num_processes", "2", *SCRIPT]}
    monkeypatch.setattr(psutil, "Process", lambda pid: SimpleNamespace(cmdline=lambda: parents[pid]))
    assert launch_options.launcher_command_line() == [*LAUNCHER, "--num_processes", "2", *SCRIPT]
    with pytest.raises(FinetuneError, match=r"^accelerate launch --num_processes 2 started this run as 1 process"):
        launch_options.check_processes_started(1)

    def gone(pid):
        raise psutil.NoSuchProcess(pid)

    monkeypatch.setattr(psutil, "Process", gone)
    assert launch_options.launcher_command_line() == []
