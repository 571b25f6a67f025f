"""The report: the median of repeated runs, speedups, the machine, and the results as a table."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

from finetune.bench.measure import MPS_MEMORY


def median_run(runs: list[dict]) -> dict:
    """Of several fresh-process runs of one variant, the one with the median seconds per step (a failure wins), with
    every run's seconds per step (`runs_sec_per_step`, as docs/benchmarks.md lists it: with --repeat 1 too)."""
    failed = [run for run in runs if "error" in run]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda run: run["sec_per_step"])
    return {**ordered[(len(ordered) - 1) // 2], "runs_sec_per_step": [run["sec_per_step"] for run in runs]}


def add_speedups(rows: list[dict]) -> None:
    """`speedup_vs_lora`: this row's images per second / the plain LoRA row's (the seconds-per-step ratio
    where both push --batch images a step; DreamBooth with an odd --batch pushes one fewer)."""
    reference = next((row for row in rows if row["variant"] == "lora" and "error" not in row), None)
    for row in rows:
        if reference is not None and "error" not in row:
            row["speedup_vs_lora"] = round(row["images_per_sec"] / reference["images_per_sec"], 3)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(rows: list[dict]) -> dict:
    """The machine the rows were measured on, imported nothing for: the report is rewritten after every variant and at a
    stop, where importing torch and diffusers took seconds on a busy host that a deadline's SIGKILL did not give.
    The versions are their installed packages'; torch's CUDA and device are asked of torch only where the bench's checks
    imported it (a variant's own row names its device)."""
    torch = sys.modules.get("torch")
    measured = next((row for row in rows if "error" not in row), {})
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": measured.get("torch_threads"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,  # at the end
        "memory_gb": _total_memory_gb(),
        "device": measured.get("device", None if torch is None else "cuda" if torch.cuda.is_available() else "cpu"),
        "cuda": None if torch is None else torch.version.cuda,
        "torch": _installed_version("torch"),
        "diffusers": _installed_version("diffusers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _installed_version(package: str) -> str | None:
    """The package's version as installed (torch's is torch.__version__, "2.13.0+cpu"), read without importing it."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _total_memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


# peak MB: the whole run's (model loading and warm-up included: what a run needs); timed peak MB: the timed steps' own.
COLUMNS = ("variant", "s/step", "CPU s/step", "images/s", "vs lora", "peak MB", "timed peak MB", "GFLOP/step", "TFLOP/s", "MFU")


def gradients_off(row: dict) -> bool:
    """A compiled variant whose gradients differ from eager's (finetune.bench.compiled_check): its speed is that of a wrong
    computation, and its MFU must not be quoted."""
    return row.get("compiled_check", {}).get("gradients_agree") is False


def mfu_cell(row: dict) -> str:
    """MFU, replaced by "grads off" where the compiled gradients are wrong, marked "unchecked" where the check did not run."""
    if gradients_off(row):
        return "grads off"
    mfu = row.get("mfu")
    shown = f"{100 * mfu:.1f}%" if mfu is not None else "-"
    return f"{shown} unchecked" if "error" in row.get("compiled_check", {}) else shown


def check_line(row: dict) -> str | None:
    """What a compiled variant's gradient check found, for the line below the table."""
    check = row.get("compiled_check")
    if check is None:
        return None
    if "error" in check:
        return f"{row['variant']}: compiled gradients NOT CHECKED ({check['error']}): do not quote its speed as a compiled step's"
    found = (f"largest relative difference {check['largest_relative_difference']:.2g}, median {check['median_relative_difference']:.2g}, "
             f"outputs {check['output_relative_difference']:.2g}; {check['backend']}, {check['precision']}, {check['seconds']} s")  # fmt: skip
    if check["gradients_agree"]:
        return f"{row['variant']}: compiled gradients agree with eager's: {check['tensors']} tensors within {check['tolerance']:g} ({found})"
    mfu = f" (measured MFU {100 * row['mfu']:.1f}%)" if row.get("mfu") is not None else ""
    return (f"{row['variant']}: compiled gradients WRONG: {check['tensors_off']} of {check['tensors']} tensors differ from eager's by more "
            f"than {check['tolerance']:g} ({found}; worst: {', '.join(check['worst_tensors'][:3])}): do not quote its speed{mfu}")  # fmt: skip


def row_cells(row: dict) -> list[str]:
    """One result row as the table's cells ("-" where a number does not apply)."""
    if "error" in row:  # the message itself goes below the table: in a cell it broke the layout
        return [row["variant"], "failed", *["-"] * (len(COLUMNS) - 3), "grads off" if gradients_off(row) else "-"]
    flops, speedup = row.get("flops_per_step"), row.get("speedup_vs_lora")
    timed_peak = row.get("timed_peak_memory_mb")  # None where the OS could not restart the peak; absent from older reports
    return [
        row["variant"],
        f"{row['sec_per_step']:.3f}",
        f"{row['cpu_sec_per_step']:.3f}",
        f"{row['images_per_sec']:.2f}",
        f"{speedup:.2f}x" if speedup else "-",
        f"{row['peak_memory_mb']:.0f}",
        f"{timed_peak:.0f}" if timed_peak is not None else "-",
        f"{flops / 1e9:.1f}" if flops else "-",
        f"{row['achieved_tflops']:.3f}" if flops else "-",
        mfu_cell(row),
    ]


def memory_label(report: dict) -> str:
    kinds = [row.get("memory_kind") for row in report["results"]]
    kind = next((gpu for gpu in ("cuda max allocated", MPS_MEMORY) if gpu in kinds), "max RSS")
    return f"peak MB ({kind})"


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    settings, machine = report["settings"], report["machine"]
    title = (
        f"finetune bench: {settings.get('base') or settings['preset']} at {settings['resolution']} px, batch {settings['batch']}, "
        f"{settings['steps']} steps after {settings['warmup']} warmup, precision {settings['mixed_precision']}"
    )
    threads = machine.get("torch_threads") or "?"  # measured by a variant: unknown when none ran
    caption = f"{machine['device'] or '?'} | {machine['cpu']} | torch {machine['torch']}, {threads} threads | {memory_label(report)}"
    table = Table(title=title, caption=caption)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    for row in report["results"]:
        table.add_row(*row_cells(row), style="red" if "error" in row or gradients_off(row) else None)
    console = Console()
    console = console if console.is_terminal else Console(width=140)  # a log: the longest variant name and every column, whole
    console.print(table)
    for row in report["results"]:
        if "error" in row:
            console.print(f"{row['variant']} failed: {row['error']}", style="red", soft_wrap=True)
        if (line := check_line(row)) is not None:
            console.print(line, style=None if row["compiled_check"].get("gradients_agree") else "red", soft_wrap=True, markup=False)
