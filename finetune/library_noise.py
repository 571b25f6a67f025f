"""Library warnings that every run would print and that say nothing about the user's run: filtered
once per process by the command line (a library imported from Python keeps its own warnings, but for the lines
`import finetune` quiets: see quiet_bitsandbytes_cpu_kernel_note and quiet_torchvision_fallback_notes)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import os
import sys
import warnings


def quiet_bitsandbytes_cpu_kernel_note() -> None:
    """bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (a CPU with AVX512-BF16, without
    the `kernels` package): said as bitsandbytes is imported, which diffusers does whenever it is installed (its
    quantizers), so every finetune module that loads a model printed it, from Python too (the demo's engine). It is
    about a 4-bit matrix product that finetune never runs. Only that line: bitsandbytes' other warnings and errors (a
    CUDA build it cannot find, in a run with an 8-bit optimizer) are said as ever. Called by `finetune/__init__.py`,
    before anything imports bitsandbytes."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "Failed to load CPU gemm_4bit_forward" not in record.getMessage()
    )


def quiet_torchvision_fallback_notes() -> None:
    """transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
    (and SiglipImageProcessor's), said as diffusers' Stable Diffusion pipeline module imports them (for a safety checker's
    and IP-Adapters' images, which finetune never makes): importing any finetune module that loads a model printed both,
    from Python too (the demo's engine). Only where a finetune module is on the stack, so finetune's own imports: a
    user's own import of an image processor says it as ever. Called by `finetune/__init__.py`, before anything imports
    transformers."""

    def not_by_finetune(record: logging.LogRecord) -> bool:
        if "requires torchvision (not installed)" not in record.getMessage():
            return True
        frame = sys._getframe(1)
        while frame is not None:
            module = frame.f_globals.get("__name__", "")
            if module.startswith("finetune.") and module != __name__:
                return False
            frame = frame.f_back
        return True

    logging.getLogger("transformers.utils.import_utils").addFilter(not_by_finetune)


@functools.cache  # once per process: main() may run many times in one (tests, notebooks)
def quiet_third_party_warnings() -> None:
    """Warnings libraries print on every run that say nothing about the user's run."""

    def drop(loggers: str | tuple[str, ...], text: str) -> None:
        for logger in (loggers,) if isinstance(loggers, str) else loggers:
            logging.getLogger(logger).addFilter(lambda record: text not in record.getMessage())

    # huggingface_hub prints its warnings with a handler of its own and passes them on to the root logger's too, which
    # said each twice (a download's retries: eight lines a try); diffusers and transformers keep theirs to themselves.
    logging.getLogger("huggingface_hub").propagate = False
    # diffusers warns on every cast of a model whose list of float32-only modules is empty (nothing to keep).
    drop("diffusers.models.modeling_utils", "kept in float32: [].")
    # ... and for every part a LoRA file does not adapt (most LoRAs leave the text encoder alone).
    drop(("diffusers.loaders.peft", "diffusers.loaders.lora_base", "diffusers.loaders.lora_pipeline"), "No LoRA keys associated to")
    # diffusers, reading a single-file base without configs: offline our one line follows, saying to give its configs
    # (--base-config, model.single_file_config); online the configs just download.
    drop("diffusers.loaders.single_file", "no local configs were found for this checkpoint")
    # transformers: CLIP's image processor (which Stable Diffusion pipelines never use) without torchvision.
    drop("transformers.utils.import_utils", "requires torchvision (not installed)")
    # DeepSpeed, imported by accelerate, on a machine without a GPU (where it is not used unless asked for).
    drop("DeepSpeed", "Setting accelerator to CPU")
    # peft, saving a text-encoder LoRA of a local base: it looks for a hub config to see if the vocabulary
    # grew (it never does here).
    warnings.filterwarnings("ignore", message="Could not find a config file in", category=UserWarning)
    # DeepSpeed's ZeRO calls torch.distributed collectives that torch deprecates (a FutureWarning from every process at
    # the first step, naming torch's source line); the calls are DeepSpeed's to change.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", category=FutureWarning
    )
    # DDP, at a ControlNet's first backward (4 lines from every process): a 1x1 convolution's weight gradient whose strides
    # differ from its bucket's only in the kernel's two dimensions of size 1, where a stride moves nothing: the same memory
    # order, a copy of a few KB. Only 1x1 kernels: another mismatch (a layout changed after DDP wrapped the model) is said.
    warnings.filterwarnings("ignore", message=DDP_ONE_BY_ONE_STRIDES, category=UserWarning)


# re.match from the message's start (warnings compiles it with re.I): torch's text, then its next line's sizes.
DDP_ONE_BY_ONE_STRIDES = r"Grad strides do not match bucket view strides\.[^\n]*\ngrad\.sizes\(\) = \[\d+, \d+, 1, 1\],"


@contextlib.contextmanager
def quiet_deepspeed_shm_build():
    """DeepSpeed on CPUs prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" (print, not a
    log, so no filter reaches it) from every process of a launch as `Accelerator()` joins them. Only that call's print
    is quieted, and only under a DeepSpeed launch; a build that fails still raises."""
    from finetune.distributed.processes import deepspeed_requested

    try:  # the attribute deepspeed.comm.torch is torch itself
        comm_torch = importlib.import_module("deepspeed.comm.torch") if deepspeed_requested() else None
    except ImportError:  # DeepSpeed missing or broken: accelerate says so in its own words
        comm_torch = None
    if comm_torch is None:
        yield
        return
    build = comm_torch.build_shm_op

    def build_quietly():
        with contextlib.redirect_stdout(io.StringIO()):
            return build()

    comm_torch.build_shm_op = build_quietly  # TorchBackend() looks it up in its module when the processes join
    try:
        yield
    finally:
        comm_torch.build_shm_op = build


def quiet_paged_optimizer_on_cpu() -> None:
    """bitsandbytes' "Paged optimizers are not supported on CPU" (a Python warning with its source line, from every
    process at the first step): called where the run has said it once in its own words (`finetune.optim.optimizers`)."""
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)


@contextlib.contextmanager
def quiet_local_dataset_bars():
    """datasets' "Generating train split" bar while it reads a local folder or data file (data.dataset) into its cache:
    done in a blink, before the data check's own bar, and drawn again by every process of a launch. Bars only: its
    errors and warnings are said as ever. Not for a hub dataset, whose download bars may run for minutes; nor where
    HF_DATASETS_DISABLE_PROGRESS_BARS says what the user wants."""
    import datasets

    if "HF_DATASETS_DISABLE_PROGRESS_BARS" in os.environ or datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


@contextlib.contextmanager
def quiet_data_file_read_errors(builder: str):
    """datasets' own ERROR line as it fails to read a data file (its csv builder's "Failed to read file ... ParserError" for a
    row of too many fields, its json builder's "Failed to load JSON from file ...", parquet's), logged just before it raises
    what finetune says in its one line (`dataset_source`): printed twice above that line (by datasets' handler and the root
    logger's). Only `builder`'s ERROR records, and only while the caller reads the file: its warnings (a bad parquet file
    skipped) are said as ever."""
    logger = logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}")  # each builder's module logs by its name

    def below_error(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR

    logger.addFilter(below_error)
    try:
        yield
    finally:
        logger.removeFilter(below_error)


def quiet_weight_progress_bars() -> None:
    """transformers' bars loading and writing the text encoder ('Loading weights', 'Writing model shards'), and
    diffusers' loading a whole pipeline ('Loading pipeline components', export-base's): done in a blink, drawn by
    every process of a launch at once (two bars on one line), and mid-run into the training bar's line; before
    `sample`'s, `merge`'s and the demo's own first lines (the README quotes them). Called by each command that loads a
    model, after its checks that need no torch; downloads keep their bars."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # its own switch: the hub's download bars stay as they are

    downloads_quiet = are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # which quiets the hub's download bars too: given back
    if not downloads_quiet:
        enable_progress_bars()
