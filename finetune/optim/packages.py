"""The packages an optimizer.name needs beyond torch: `finetune train` says a missing one before its data check decodes
every image, train() before the base model loads. A missing one is looked up without importing it (nor torch, which it
imports); only an installed bitsandbytes asked for its 8-bit optimizers is imported, to tell a broken build early."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from finetune.console import warn
from finetune.data_check.checked_once import kept_check
from finetune.errors import FinetuneError

if TYPE_CHECKING:  # annotations only: the command line imports this module before any command (no pydantic)
    from finetune.config import OptimizerConfig

# optimizer.name -> its bitsandbytes class (finetune.optim.optimizers builds it).
BITSANDBYTES_OPTIMIZERS = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit", "lion8bit": "Lion8bit"}
_FALLBACK_SAID = "optimizer.name: bitsandbytes fallback said"  # its checked_once key


def check_optimizer_installed(config: OptimizerConfig) -> None:
    """optimizer.name prodigy without its package, refused before the model loads (bitsandbytes' optimizers fall
    back to AdamW with a warning instead: they save memory, where Prodigy's learning rate is another training)."""
    if config.name == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        raise FinetuneError("optimizer.name prodigy needs the prodigyopt package: pip install prodigyopt")
    if config.name in BITSANDBYTES_OPTIMIZERS and (problem := bitsandbytes_import_problem()):
        # No fallback to AdamW then: diffusers imports bitsandbytes wherever it is installed, and its import failed in
        # diffusers' traceback as the trainer loaded, once every image had been decoded.
        raise FinetuneError(f"optimizer.name {config.name}: {broken_bitsandbytes_said(problem)}")


def broken_bitsandbytes_said(problem: str) -> str:
    """The line for a bitsandbytes that is installed and fails to import (`problem`: its error), and what to do."""
    return (f"bitsandbytes is installed but cannot be imported ({problem}), and diffusers imports it wherever it is installed: reinstall it "
            "for this machine (pip install --force-reinstall bitsandbytes), or uninstall it (pip uninstall bitsandbytes; 8-bit optimizers "
            "then fall back to torch AdamW)")  # fmt: skip


@contextlib.contextmanager
def broken_bitsandbytes_as_one_line() -> Iterator[None]:
    """A bitsandbytes import that fails inside diffusers' or transformers' (they import it wherever it is installed, so every
    command that loads a model meets it) as one line, where it was their two tracebacks ("Failed to import
    diffusers.models...", after `finetune train`'s data check). Told by where it was raised: the top level of a module of a
    bitsandbytes package. Any other error goes on as it was."""
    try:
        yield
    except FinetuneError:  # already one line
        raise
    except Exception as err:  # noqa: BLE001  (re-raised unless bitsandbytes' import raised it)
        if (cause := bitsandbytes_import_error(err)) is None:
            raise
        raise FinetuneError(broken_bitsandbytes_said(f"{cause.__class__.__name__}: {' '.join(str(cause).split())[:200]}")) from err


def bitsandbytes_import_error(err: BaseException | None) -> BaseException | None:
    """The error in `err`'s chain (itself, its causes and contexts) raised as a bitsandbytes module was imported; None if none."""
    while err is not None:
        if any(frame.name == "<module>" and "bitsandbytes" in Path(frame.filename).parts for frame in traceback.extract_tb(err.__traceback__)):
            return err
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


def bitsandbytes_import_problem() -> str | None:
    """Why bitsandbytes, installed, fails to import (its error, on one line: a build for another CUDA raised "CUDA Setup
    failed" as it was imported); None where it imports or is not installed. Importing it imports torch (3.5 s to 6 s): it is
    asked for runs of its optimizers alone, which import it with diffusers moments later anyway."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # noqa: BLE001  (whatever a broken build raises: ImportError, RuntimeError, OSError)
        return f"{err.__class__.__name__}: {' '.join(str(err).split())[:200]}"  # (as broken_bitsandbytes_as_one_line says it)
    return None


def warn_bitsandbytes_missing(config: OptimizerConfig) -> None:
    """An 8-bit optimizer.name where bitsandbytes is not installed, or (on a Mac) cannot step on its MPS: its fallback to
    AdamW, said by `finetune train` before its data check (it came once every image was decoded, minutes late on a large
    folder). One installed that cannot run here otherwise (a build for another CUDA) is found only by importing it (and
    torch): train() says that as it builds the optimizer."""
    if config.name not in BITSANDBYTES_OPTIMIZERS:
        return
    if sys.platform == "darwin":  # MPS is macOS's alone: torch (and bitsandbytes, where installed) are imported only there
        from finetune.distributed.processes import trains_on_mps

        if trains_on_mps():  # installing bitsandbytes would not help there: no "pip install" advice
            if missing := eight_bit_step_missing("mps"):
                say_bitsandbytes_fallback(config.name, missing)
            return
    if importlib.util.find_spec("bitsandbytes") is None:
        say_bitsandbytes_fallback(config.name, "is not installed (pip install bitsandbytes for its 8-bit states)")
    elif missing := native_library_missing():
        say_bitsandbytes_fallback(config.name, missing)


def native_library_missing() -> str | None:
    """Why bitsandbytes cannot step its 8-bit optimizers as built here: its native library did not load (a build from source
    never compiled, a wheel's .so files removed or for another platform); None where it loaded, or where bitsandbytes is not
    installed or does not import (said apart). bitsandbytes records it itself as it is imported: `cextension.lib` is its
    `ErrorHandlerMockBNBNativeLibrary`. On a GPU it logs an error and the first step raises, once the model has loaded; on
    the CPU it says nothing and steps in its pure-torch code (bitsandbytes 0.50.2, 8 tensors of 256x256: 8.5 s for the first
    step, then 0.15 s a step, where the library takes 0.02 s). The import (torch's, 3.5 s to 6 s) is
    `check_optimizer_installed`'s, made first for these optimizers anyway: here it is a lookup in sys.modules."""
    try:
        from bitsandbytes import cextension
    except Exception:  # noqa: BLE001  (not installed, or a broken build: bitsandbytes_import_problem says it)
        return None
    if not isinstance(cextension.lib, getattr(cextension, "ErrorHandlerMockBNBNativeLibrary", ())):
        return None
    folder = Path(cextension.__file__).parent
    return (f"has no native library for this machine (none of {folder}/libbitsandbytes_* loaded), so its 8-bit step would fail on a GPU "
            "or run in its pure-torch code on the CPU (seconds to compile at the first step, several times slower after); "
            "reinstall it for its 8-bit states (pip install --force-reinstall bitsandbytes)")


# The kernel that steps bitsandbytes' 8-bit optimizers (AdamW8bit, Lion8bit, their paged forms: block-wise 8-bit states).
EIGHT_BIT_STEP = "bitsandbytes::optimizer_update_8bit_blockwise"


def eight_bit_step_missing(device_type: str) -> str | None:
    """Why bitsandbytes cannot step its 8-bit optimizers on Apple's MPS, in words; None where it can, or on another device.
    It registers that step for the CPU, CUDA and XPU alone (0.50.2; its 32-bit one, for weights under 4096 values, for
    every device): on MPS the optimizer was built and the run failed at its first step, once the model had loaded. Asked
    of torch's dispatcher as a call on an MPS tensor would find its kernel, so a bitsandbytes that adds one is used; not
    installed (pyproject.toml leaves it out on macOS), it has none either."""
    if device_type != "mps":
        return None
    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes  # noqa: F401  (registers its kernels)
        import torch

        try:
            if torch._C._dispatch_has_computed_kernel_for_dispatch_key(EIGHT_BIT_STEP, "MPS"):
                return None
        except RuntimeError:  # "operator ... does not exist": a bitsandbytes from before its torch operators, with no MPS kernels
            pass
    return "has no 8-bit optimizer step for Apple's MPS"


def say_bitsandbytes_fallback(name: str, why: str) -> None:
    """optimizer.name `name` falling back to torch's AdamW because bitsandbytes `why`: said by each machine, once in a
    `finetune train` (finetune/data_check/checked_once.py: its early word stands for train()'s), each time outside one (a test, the benchmark)."""
    kept_check(_FALLBACK_SAID, lambda: warn(f"optimizer.name={name}: bitsandbytes {why}; falling back to torch AdamW (32-bit states)", by="machine"))
