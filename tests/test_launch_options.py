"""finetune/launch_options.py reads an `accelerate launch` command line as accelerate 1.16 does: a --cpu launch never reads
the default config file and always starts one process (launch_command's simple launcher), and refuses --multi_gpu."""

import pytest

import finetune.launch_options as launch_options
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
