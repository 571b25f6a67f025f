"""What a newcomer following README.md top to bottom checks against the repository (walkthrough readme)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def module_table() -> dict[str, str]:
    """The README's "How it is built" table: each module it names (`finetune/cli/main.py`, and `arguments.py`
    beside it in the same row, read from that row's folder) -> its row's description."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## How it is built", 1)[1]
    table = section[section.index("| module |"):].split("\n\n", 1)[0]
    named = {}
    for row in table.splitlines()[2:]:
        cell, description = row.strip("|").split("|", 1)
        names = re.findall(r"`([^`]+)`", cell)
        folder = names[0].rstrip("/").rpartition("/")[0]
        for name in names:
            named[name.rstrip("/") if "/" in name else f"{folder}/{name}"] = description.strip()
    return named


def test_the_module_table_names_every_module_of_the_package_and_only_those():
    # finetune/counts.py, device_copy.py and step_losses.py landed without a row: a reader of the table looking
    # for where a message's counts, the GPU copies or the logged losses are made found nothing. __main__.py is where
    # `python -m finetune` starts: a newcomer's first file, so it has its row too.
    named = module_table()
    missing_files = sorted(name for name in named if not (ROOT / name).exists())
    assert not missing_files, f"the README's module table names modules that do not exist: {missing_files}"
    # Every module at any depth: named itself, or by a row for its whole package (`finetune/methods/`).
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "finetune").rglob("*.py") if path.stem != "__init__"}
    unlisted = sorted(module for module in modules if not {module, *(parent.as_posix() for parent in Path(module).parents)} & set(named))
    assert not unlisted, f"the README's module table does not list: {unlisted}"


def test_the_readmes_length_line_is_the_one_training_prints():
    # The README showed 'length: 1000 steps of 4 images = 12.3 epochs of 325 images': 325 images do not fill
    # batches of 4, so training says '... of 324 of the 325 images (each epoch leaves 1 out ...)' instead.
    from finetune.config.training import TrainConfig
    from finetune.data.batches import EpochBatchSampler
    from finetune.training.run_length import run_length_line

    # The line moved with README's Data paragraph to docs/data.md's Overview.
    shown = re.search(r"`(length: (\d+) steps of (\d+) images = [^`]* of (\d+) images)`", (ROOT / "docs" / "data.md").read_text())
    line, steps, batch, images = " ".join(shown[1].split()), *map(int, shown.groups()[1:])  # the page wraps it
    sampler = EpochBatchSampler(images, batch, 1, 0, seed=0)
    assert run_length_line(TrainConfig(batch_size=batch, max_steps=steps), steps, sampler, images, 1) == line


@pytest.mark.slow  # starts the real `finetune demo` command (a base load and gradio's start: ~11 s)
def test_finetune_demo_says_where_it_runs_and_offers_no_share_link(tmp_path):
    # The README promises "no share link"; the terminal said gradio's "To create a public link, set `share=True`
    # in `launch()`", a code change the demo (bound to 127.0.0.1, offline) does not offer.
    import os
    import subprocess
    import sys

    from ports import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    demo = subprocess.Popen([sys.executable, "-m", "finetune", "demo", "--adapters", str(tmp_path), "--port", str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        said = []
        for line in demo.stdout:
            said.append(line)
            if f"127.0.0.1:{port}" in line or "error" in line:  # the URL is said once it serves
                break
    finally:
        demo.terminate()
        said += demo.communicate()[0].splitlines(keepends=True)
    text = "".join(said)
    assert f"demo running on http://127.0.0.1:{port}" in text, text
    assert "share=True" not in text and "public link" not in text, text
