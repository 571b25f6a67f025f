"""What runs in the child process: train one variant's recipe and measure its steps (`python -m finetune.bench --worker`)."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

from finetune.bench.sd15 import peak_tflops

# ---------------------------------------------------------------------------------------------------
# The worker: one variant, in its own process


def flop_counter():
    """`FlopCounterMode` as the bench counts a step's model FLOPs: torch's formulas (matmuls, convolutions,
    attention), with two changes to attention. The CPU's fused kernel, which torch's table lacks, is counted
    (without it a CPU step's attention counted 0 FLOPs). Attention's backward is its four matmuls (the
    gradients of the scores, the values, the queries and the keys): torch adds the scores' recomputation that
    the flash kernels do instead of keeping them, work of the kernel, not of the model, which would raise MFU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, bmm_flop, sdpa_backward_flop_count, sdpa_flop_count

    def attention(query, key, value, *args, out_shape=None, **kwargs) -> int:  # shapes: (batch, heads, tokens, width)
        return sdpa_flop_count(query, key, value)

    def attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        (batch, heads, queries, width), keys = query, key[2]
        return sdpa_backward_flop_count(grad_out, query, key, value) - bmm_flop((batch * heads, queries, width), (batch * heads, width, keys))

    aten = torch.ops.aten
    kernels = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    formulas = {"_scaled_dot_product_flash_attention_for_cpu": attention, "_scaled_dot_product_flash_attention_for_cpu_backward": attention_backward}
    formulas |= {f"{kernel}_backward": attention_backward for kernel in kernels}
    return FlopCounterMode(display=False, custom_mapping={getattr(aten, name): f for name, f in formulas.items() if hasattr(aten, name)})


def peak_rss_mb() -> float:
    """This process's peak resident set size. On Linux the high-water mark of its own memory (VmHWM): `getrusage`'s
    ru_maxrss is kept across exec, so a variant's process started by the bench reported at least the bench's own peak
    (building the model, writing the data), which hid any variant that needs less (gradient checkpointing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource  # Unix only: imported at the top, it stopped every variant's process on Windows
    except ImportError:
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20  # Windows' peak working set, in bytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Start this process's VmHWM again from its current resident set (Linux 4.0+: "5" written to
    /proc/self/clear_refs), so that `peak_rss_mb` then reads the peak since this call. False where the kernel
    cannot (another OS, an older kernel: EINVAL): the peak since then is not known."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


MPS_MEMORY = "mps allocated at step ends"  # a row's memory_kind on a Mac's GPU (see measure)

# What torch says (`torch.cuda.set_sync_debug_mode("warn")`) when the host waits for the GPU.
SYNC_WARNING = "called a synchronizing CUDA operation"


def measure(spec: dict) -> dict:
    """Train the spec's recipe, timing steps warmup+1 .. warmup+steps; count FLOPs of one more step.
    The untimed steps' ends go to the spec's `progress` file: a run stopped in them (a compile that outlasts
    a deadline) says how far it got. On CUDA, torch reports every wait of the host for the GPU in the timed
    window (`host_syncs_after_step`): the CPU tests of the loop (tests/test_step_syncs.py) checked on the GPU."""
    started = time.perf_counter()
    import torch

    from finetune.bench.compiled_check import CompiledCheck  # torch: here, as above (tests/test_bench's peak of a bare process)
    from finetune.config.recipe_loading import recipe_from_dict
    from finetune.distributed.processes import trains_on_mps
    from finetune.training.trainer import train

    recipe = recipe_from_dict(spec["recipe"], source=f"bench variant {spec['name']}")
    warmup, steps = spec["warmup"], spec["steps"]
    cuda = torch.cuda.is_available()
    # A Mac's GPU, where accelerate trains: asynchronous as CUDA is (the window's ends wait for it), and its allocator has
    # no peak to read, so its allocated memory is read at each step's end (a step's own activations, freed within it, are
    # not seen). Timed as the CPU's, the window measured the steps queued, and the memory was the process's RSS.
    mps = not cuda and trains_on_mps()
    marks: dict = {"ends": [], "untimed_ends": [], "syncs": {}, "step": 0, "mps_peak": 0}
    checker = CompiledCheck() if spec.get("check_compiled") else None  # a compiled variant: are its gradients eager's?
    if spec.get("cudnn_benchmark"):  # cuDNN times its algorithms for each new convolution shape and keeps the fastest
        torch.backends.cudnn.benchmark = True
    baseline = torch.cuda.memory_allocated() / 2**20 if cuda else torch.mps.current_allocated_memory() / 2**20 if mps else peak_rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def peak_mb() -> float:
        if mps:
            marks["mps_peak"] = max(marks["mps_peak"], torch.mps.current_allocated_memory())
            return marks["mps_peak"] / 2**20
        return torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()

    def restart_mps_peak() -> bool:
        marks["mps_peak"] = torch.mps.current_allocated_memory()
        return True

    def restart_peak() -> bool:
        """The peak from here on: the timed steps' own. The warm-up's peak can be higher (a cached variant's
        first steps run the encoders that fill the cache): read it first, it is part of the whole run's."""
        marks["peak_before_window_mb"] = peak_mb()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            return True
        return restart_mps_peak() if mps else reset_peak_rss()

    def mark_untimed(step: int, now: float) -> None:
        marks["untimed_ends"].append(round(now - started, 1))
        if spec.get("progress"):
            with open(spec["progress"], "a") as progress:
                progress.write(f"{step} {now - started:.1f}\n")

    def check_compiled() -> None:
        """After the first step (the compile's): its gradients compiled against eager (finetune.bench.compiled_check), before
        the timed window. The check's eager step is left out of the run's peak where the peak can be restarted."""
        before = peak_mb()
        try:
            check = checker.run(recipe.train.mixed_precision)
        except Exception as error:  # noqa: BLE001 - the row says why (an eager step out of memory), the timing goes on
            check = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
        after = peak_mb()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        restarted = cuda or (restart_mps_peak() if mps else reset_peak_rss())  # else the OS keeps the check's peak in the run's
        marks["peak_before_check_mb"] = before if restarted else after
        marks["compiled_check"] = check
        if spec.get("check_file"):  # for the bench, should a deadline stop this process before it writes its row
            Path(spec["check_file"]).write_text(json.dumps(check))

    def on_step(step: int) -> None:
        # The GPU's work is waited for at the timed window's two ends only: a wait at every step is a host sync
        # per step, which the training loop avoids so that the CPU queues a step's kernels while the GPU runs the
        # last ones; waiting each step here measured a loop that could never overlap them.
        marks["step"] = step
        if mps:
            peak_mb()  # this step's end, read into the peak
        if step == 1 and checker is not None:
            mark_untimed(step, time.perf_counter())  # the compile's end, before the check
            check_compiled()
        if cuda and step == warmup + steps:
            torch.cuda.set_sync_debug_mode(0)  # the window's end: the wait below is the benchmark's own
        if cuda and step in (warmup, warmup + steps):
            torch.cuda.synchronize()
        if mps and step in (warmup, warmup + steps):
            torch.mps.synchronize()
        if step == warmup:
            marks["window_peak_restarted"] = restart_peak()
        if cuda and step == warmup:
            torch.cuda.set_sync_debug_mode("warn")
        now = time.perf_counter()
        if step <= warmup and not (step == 1 and checker is not None):
            mark_untimed(step, now)
        if warmup <= step <= warmup + steps:
            marks["ends"].append(now)
        if step == warmup:
            marks["start"], marks["cpu_start"] = now, time.process_time()
        elif step == warmup + steps:
            marks["end"], marks["cpu_end"] = now, time.process_time()
            window_peak = peak_mb()
            marks["timed_peak_mb"] = window_peak if marks["window_peak_restarted"] else None
            marks["peak_mb"] = max(marks["peak_before_window_mb"], window_peak, marks.get("peak_before_check_mb", 0))
            if spec["count_flops"]:
                marks["counter"] = flop_counter()
                marks["counter"].__enter__()
        elif step == warmup + steps + 1 and "counter" in marks:
            marks["counter"].__exit__(None, None, None)
            marks["flops"] = marks.pop("counter").get_total_flops()

    def sync_or_shown(message, category, filename, lineno, file=None, line=None) -> None:
        if SYNC_WARNING not in str(message):
            return shown(message, category, filename, lineno, file, line)
        where = f"{Path(filename).name}:{lineno}"  # the Python line that waited
        syncs = marks["syncs"].setdefault(marks["step"], {})  # keyed by the last step that ended: a log step's reads follow it
        syncs[where] = syncs.get(where, 0) + 1

    with warnings.catch_warnings(), checker.installed() if checker is not None else contextlib.nullcontext():
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")  # every wait, not the first of each line
        shown, warnings.showwarning = warnings.showwarning, sync_or_shown
        result = train(recipe, on_step=on_step, overwrite=True)  # --repeat runs a variant again in its folder
    sec_per_step = (marks["end"] - marks["start"]) / steps
    step_seconds = [round(b - a, 6) for a, b in zip(marks["ends"], marks["ends"][1:])]
    row = {
        "method": recipe.method,
        "sec_per_step": sec_per_step,
        # Each measured step's seconds: a spike is another process taking the CPU (compare the median). On CUDA,
        # between the window's ends, when the host finished queueing each step (the GPU may still be on it).
        "step_seconds": step_seconds,
        "sec_per_step_median": statistics.median(step_seconds),
        "images_per_step": spec["images_per_step"],
        "images_per_sec": spec["images_per_step"] / sec_per_step,
        # The whole run's peak (the memory a run needs: model loading and the warm-up steps too) and the timed
        # steps' own (None where the OS cannot restart the count). Both end with the timed window: the FLOP-counted
        # step and the final save are not in them.
        "peak_memory_mb": marks["peak_mb"],
        "timed_peak_memory_mb": marks["timed_peak_mb"],
        "baseline_memory_mb": baseline,
        "memory_kind": "cuda max allocated" if cuda else MPS_MEMORY if mps else "max RSS",
        # CPU seconds of all this process's threads: per step, and per wall second (well under the thread
        # count: the process waited, for other processes on a shared machine or for a GPU). With one thread
        # on a busy CPU, CPU seconds per step are close to the wall time the step takes on an idle one.
        "cpu_sec_per_step": (marks["cpu_end"] - marks["cpu_start"]) / steps,
        "cpu_busy": (marks["cpu_end"] - marks["cpu_start"]) / (marks["end"] - marks["start"]),
        "final_loss": result.losses[warmup + steps - 1],
        # Seconds from the process's start to the end of each untimed step: the first step's compile shows here.
        "untimed_step_ends": marks["untimed_ends"],
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "device": torch.cuda.get_device_name() if cuda else "mps" if mps else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    if "compiled_check" in marks:  # the compiled module's gradients against eager's, on the first step's inputs
        row["compiled_check"] = marks["compiled_check"]
    if cuda:  # each wait of the host for the GPU in the timed window, by the step after which it came and the line
        row["host_syncs_after_step"] = marks["syncs"]
    if "flops" in marks:
        row["flops_per_step"] = marks["flops"]
        row["achieved_tflops"] = marks["flops"] / sec_per_step / 1e12
        if cuda:
            mp = recipe.train.mixed_precision
            precision = mp if mp != "no" else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
            peak = spec.get("peak_tflops") or peak_tflops(row["device"], precision)
            row["precision"], row["peak_tflops"] = precision, peak
            row["mfu"] = row["achieved_tflops"] / peak if peak else None
    return row


def _worker(argv: list[str]) -> int:
    spec_path, result_path = argv
    import logging

    # Libraries' warnings shown, bitsandbytes' too (a CUDA build it cannot find, in an 8-bit optimizer's variant), but its
    # CPU-kernel line, which `import finetune` quiets (library_noise.quiet_bitsandbytes_cpu_kernel_note).
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    row = measure(json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(row))
    return 0
