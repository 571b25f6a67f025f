"""Several processes as a user runs them (2 CPU processes over gloo, see tests/test_distributed.py): what each
process says, and how a run continues at --resume with another number of processes or another length."""

from pathlib import Path

from ports import free_port
from test_distributed import launch, write


def test_only_the_main_process_says_the_checkpoints_it_saved(make_recipe, tmp_path):
    """Two machines of one process each: the second machine's first process (LOCAL_RANK 0, rank 1) said
    'saved .../checkpoint-1' for a folder the main machine wrote, which need not be on its own disk."""
    recipe = make_recipe(output_dir=str(tmp_path / "machines"), train__batch_size=1, train__max_steps=2, checkpoint__every_n_steps=1)
    path = write(recipe, tmp_path / "machines.yaml")
    common = ["--num_processes", "2", "--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    machines = [launch([*common, "--machine_rank", str(rank)], path) for rank in (0, 1)]
    main_out, other_out = [machine.communicate(timeout=300)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0]
    checkpoint = Path(recipe.output_dir) / "checkpoints" / "checkpoint-1"
    assert f"saved {checkpoint} (step 1" in main_out
    assert "saved" not in other_out, other_out
