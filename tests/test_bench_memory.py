"""`finetune bench`'s two peaks of memory: the whole run's (what a run needs) and the timed steps' own (what a
step needs once warm: a cached variant's warm-up runs the encoders that fill the cache, which hid its smaller
step). The trainer is stood in for where the test needs to know what each step allocates; the real variants'
processes report both peaks in tests/test_bench.py's run of the bench on the tiny preset. No timing is asserted."""

from types import SimpleNamespace

import pytest
import torch

from finetune.bench.measure import measure, peak_rss_mb, reset_peak_rss
from finetune.bench.report import row_cells

MB = 1 << 20


def current_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def measure_with(make_recipe, fake_train, monkeypatch, warmup: int, steps: int) -> dict:
    import finetune.training.trainer

    monkeypatch.setattr(finetune.training.trainer, "train", fake_train)
    recipe = make_recipe().model_dump(mode="json")
    return measure({"name": "lora_cached", "recipe": recipe, "warmup": warmup, "steps": steps, "count_flops": False, "images_per_step": 2})


@pytest.mark.skipif(not reset_peak_rss(), reason="the kernel cannot restart VmHWM (/proc/self/clear_refs): the timed peak is None")
def test_a_block_freed_in_the_warmup_is_in_the_runs_peak_and_not_in_the_timed_steps(make_recipe, monkeypatch):
    """On a CPU: 512 MB touched and freed (returned to the OS) in the first, untimed step."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU's measure, on any machine

    def fake_train(recipe, on_step, overwrite):
        for step in range(1, 4):
            if step == 1:
                block = bytearray(512 * MB)
                block[::4096] = bytes(len(block) // 4096)  # touched: resident
                del block
            on_step(step)
        return SimpleNamespace(losses=[1.0] * 3)

    reset_peak_rss()  # this test process's earlier peak (other tests) is not the run's
    floor = current_rss_mb()
    row = measure_with(make_recipe, fake_train, monkeypatch, warmup=1, steps=2)
    assert row["peak_memory_mb"] >= floor + 500, (floor, row["peak_memory_mb"])
    assert row["timed_peak_memory_mb"] < floor + 100, (floor, row["timed_peak_memory_mb"])
    assert peak_rss_mb() >= row["timed_peak_memory_mb"]


@pytest.mark.parametrize("warmup_mb, timed_mb", [(1000, 300), (200, 700)])
def test_on_a_gpu_the_timed_peak_is_the_allocators_since_the_window_began(make_recipe, monkeypatch, warmup_mb, timed_mb):
    """A pretend GPU whose allocator counts as torch's does: 100 MB stay allocated (the model); the warm-up's step 1
    and the timed step 4 each allocate a block and free it. The run's peak is the larger of the two."""
    allocator = {"now": 100 * MB, "peak": 100 * MB}

    def allocate(size: int) -> None:
        allocator["now"] += size
        allocator["peak"] = max(allocator["peak"], allocator["now"])
        allocator["now"] -= size

    fakes = {"is_available": lambda: True, "synchronize": lambda: None, "set_sync_debug_mode": lambda mode: None,
             "get_device_name": lambda: "pretend GPU", "memory_allocated": lambda: allocator["now"],
             "max_memory_allocated": lambda: allocator["peak"], "reset_peak_memory_stats": lambda: allocator.update(peak=allocator["now"])}  # fmt: skip
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)

    def fake_train(recipe, on_step, overwrite):
        for step in range(1, 6):
            allocate({1: warmup_mb, 4: timed_mb}.get(step, 10) * MB)
            on_step(step)
        return SimpleNamespace(losses=[1.0] * 5)

    row = measure_with(make_recipe, fake_train, monkeypatch, warmup=2, steps=3)
    assert row["timed_peak_memory_mb"] == 100 + timed_mb
    assert row["peak_memory_mb"] == 100 + max(warmup_mb, timed_mb)
    assert row["memory_kind"] == "cuda max allocated"


def test_a_row_without_a_timed_peak_shows_a_dash():
    """None where the OS could not restart the peak; absent from reports written before the column."""
    row = {"variant": "lora", "sec_per_step": 0.5, "cpu_sec_per_step": 0.5, "images_per_sec": 8.0, "peak_memory_mb": 700.0}
    for timed in ({}, {"timed_peak_memory_mb": None}, {"timed_peak_memory_mb": 650.4}):
        cells = row_cells({**row, **timed})
        assert cells[5:7] == ["700", "650" if timed.get("timed_peak_memory_mb") else "-"]


def test_in_a_log_the_table_keeps_the_longest_variant_and_every_column_whole(capsys):
    """Printed to a file (CI's log), the table was 120 characters wide: with the timed peak's column the longest variant
    name and the headers were cut ("lora_cached_cudnn_benchma…", "s/st…")."""
    from finetune.bench.report import COLUMNS, print_table
    from finetune.bench.variants import VARIANTS

    longest = max(VARIANTS, key=len)
    row = {"variant": longest, "sec_per_step": 12.094, "cpu_sec_per_step": 2.579, "images_per_sec": 0.33, "speedup_vs_lora": 0.25,
           "peak_memory_mb": 11958.0, "timed_peak_memory_mb": 11758.0, "flops_per_step": 14399e9, "achieved_tflops": 62.8, "mfu": 0.063}  # fmt: skip
    settings = dict(preset="sd15", resolution=512, batch=4, steps=10, warmup=3, mixed_precision="bf16")
    machine = dict(device="NVIDIA H200", cpu="test cpu", torch="2.13.0", torch_threads=16)
    print_table({"settings": settings, "machine": machine, "results": [row]})
    out = capsys.readouterr().out
    assert "…" not in out and longest in out and all(column in out for column in COLUMNS)


def test_on_a_macs_gpu_the_window_waits_for_it_and_the_memory_is_its_allocators(make_recipe, monkeypatch):
    """Apple's MPS, simulated: accelerate trains there, asynchronously, as on CUDA. The bench timed it as a CPU (the
    window's ends did not wait for the GPU: it measured the steps queued), named the device "cpu" and reported the
    process's RSS. Now its ends wait, and the peak is MPS's allocated memory read at each step's end (it has no peak)."""
    from finetune.bench.report import memory_label

    allocated, waits = {"now": 100 * MB}, []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: allocated["now"])
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waits.append(allocated["step"]))

    def fake_train(recipe, on_step, overwrite):
        for step in range(1, 6):
            allocated.update(step=step, now=(100 + {1: 900, 4: 300}.get(step, 10)) * MB)  # still allocated at the step's end
            on_step(step)
        return SimpleNamespace(losses=[1.0] * 5)

    row = measure_with(make_recipe, fake_train, monkeypatch, warmup=2, steps=3)
    assert waits == [2, 5]  # the timed window's two ends
    assert (row["device"], row["memory_kind"]) == ("mps", "mps allocated at step ends")
    assert (row["peak_memory_mb"], row["timed_peak_memory_mb"], row["baseline_memory_mb"]) == (1000, 400, 100)
    assert memory_label({"results": [row]}) == "peak MB (mps allocated at step ends)"
