"""Caching what frozen encoders compute: VAE posteriors and text-encoder hidden states.

An entry is keyed by what went in: for latents the image's content digest and its view (crop, flip,
size; `finetune.data.views.view_key`), for text the caption (`caption_key`). On disk the folder is named by
a fingerprint of the encoder's weights (and for text of the tokenizer). So a changed image, another crop, a
dropped caption or another model can never be served a stale result, and random crops and flips simply fill the cache with one
entry per view. Cached posteriors are (mean, std): the latent is still sampled per step with fresh
noise, exactly as without the cache.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Callable

import psutil
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from finetune.console import warn
from finetune.counts import counted
from finetune.errors import FinetuneError
from finetune.training.device_copy import to_device

# A partial file this old was left by a run that was killed mid-write (a live write takes well under a second): what
# tells one whose writer is on another machine (a cache_dir on a shared disk), or of a finetune that did not name it.
STALE_PARTIAL_SECONDS = 3600
# This machine as a partial file's name says it: a host name's dots would split the name where its parts are read.
HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


def partial_path(folder: Path, key: str, pid: int | None = None) -> Path:
    """Where a process (`pid`, this one by default) writes entry `key` before renaming it: its own file, named with
    its writer (pid@host), so that one its writer left, killed mid-write, is told from one being written."""
    return folder / f".{key}.{os.getpid() if pid is None else pid}@{HOST}.{uuid.uuid4().hex}.partial"


def writer_gone(partial: Path, written: float) -> bool:
    """Whether the process that wrote `partial` (at `written`, its mtime) is one of this machine that has ended: no
    process has its pid, or the one that has it started after the file was written. A partial of another machine,
    or of a finetune whose partials named no writer, cannot be told: False."""
    named = re.fullmatch(r"\.[^.]+\.(\d+)@([A-Za-z0-9_-]+)\.[0-9a-f]{32}\.partial", partial.name)
    if named is None or named.group(2) != HOST:
        return False
    try:
        return psutil.Process(int(named.group(1))).create_time() > written
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, OSError):  # (no permission to see it: a live process of another user)
        return False


def caption_key(caption: str, chunks: int = 1) -> str:
    """A caption's cache key; encoded in `chunks` of 75 tokens (model.max_token_length) it is another entry:
    its own hash domain, so no caption of one setting can take another's key (1: the keys of caches made
    before chunks existed)."""
    domain = b"" if chunks == 1 else f"chunks{chunks}".encode()
    return hashlib.blake2b(caption.encode("utf-8"), digest_size=16, person=domain).hexdigest()


def model_fingerprint(module: torch.nn.Module, tokenizer=None) -> str:
    """A hash of every weight (and its dtype), and of the `tokenizer` that feeds a text encoder: the disk
    cache's namespace for this encoder."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    if tokenizer is not None:
        digest.update(tokenizer_description(tokenizer).encode())
    return digest.hexdigest()


def tokenizer_description(tokenizer) -> str:
    """What turns a caption into token ids: vocabulary, merges, normalisation, added tokens, the padded length
    and the padding token (SD2's pads with "!", SD1's with the end token). Another tokenizer gives other ids,
    so other embeddings, from the same text encoder weights."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    for per_call in ("truncation", "padding"):  # set by the last call (e.g. padding="max_length"), not the tokenizer's own
        state.pop(per_call, None)
    return json.dumps([state, tokenizer.model_max_length, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id], sort_keys=True)


class EncodingCache:
    """Rows of a frozen encoder's output, computed once per distinct input."""

    def __init__(self, folder: Path | None = None):
        self.memory: dict[str, torch.Tensor] = {}
        self.folder = folder
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:  # a file in the way, no permission, a read-only disk
                raise self._unwritable(err) from None
            self._remove_stale_partial_files()

    def _unwritable(self, err: OSError) -> FinetuneError:
        # Each cause its own remedy: space is freed, permissions fixed; a file in the folder's way (a cache_dir naming a
        # file), a read-only disk or anything else needs another path.
        remedy = {errno.ENOSPC: "free space or choose", errno.EDQUOT: "free space or choose",
                  errno.EACCES: "fix the folder's permissions or choose", errno.EPERM: "fix the folder's permissions or choose",
                  errno.ENOTDIR: "a file is in its way: choose", errno.EEXIST: "a file is in its way: choose"}.get(err.errno, "choose")  # fmt: skip
        return FinetuneError(f"train.cache_dir: {self.folder} cannot be written ({err.__class__.__name__}: {err.strerror or err}): "
                             f"{remedy} another train.cache_dir (or remove it to cache in memory)")  # fmt: skip

    def _remove_stale_partial_files(self) -> None:
        """Partial files a killed run left (SIGKILL, power loss; a Ctrl-C leaves none): at once where their writer was a
        process of this machine that has ended; else once old, a young one maybe another live process's write."""
        for partial in self.folder.glob(".*.partial"):
            try:
                written = partial.stat().st_mtime
                if time.time() - written > STALE_PARTIAL_SECONDS or writer_gone(partial, written):
                    partial.unlink()
            except OSError:  # renamed or removed by its writer meanwhile, or a read-only cache (still read from)
                pass

    def disk_line(self, what: str) -> str:
        """What the disk cache holds when the run starts: a run that finds it empty encodes everything anew
        (another base, VAE, tokenizer, dtype or clip skip makes another folder, and the earlier ones stay)."""
        sizes = []
        for entry in self.folder.glob("*.safetensors"):
            try:
                sizes.append(entry.stat().st_size)
            except FileNotFoundError:  # a damaged entry another process removed meanwhile
                pass
        held = f"{counted(len(sizes), 'entry', 'entries')} ({sum(sizes) / 1e6:.1f} MB) from earlier runs" if sizes else "empty: every entry is encoded in this run"
        return f"train.cache_dir: {what} in {self.folder}: {held}"

    def _load(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        path = None if self.folder is None else self.folder / f"{key}.safetensors"
        if path is not None and path.is_file():
            try:
                self.memory[key] = load_file(path)["value"]
            except (SafetensorError, KeyError, OSError):  # cut off or garbled (a full disk, a copy gone wrong)
                try:  # every process may meet the entry (the instance prompt's, at the first step): the one that removes it says so
                    path.unlink()
                except FileNotFoundError:  # another process removed it, and said so
                    return None
                except OSError:  # a read-only cache: writing the new entry says so, in one line
                    pass
                warn(f"cache entry {path} is damaged: encoding it again", by="this process")
                return None
            return self.memory[key]
        return None

    def _store(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().cpu().contiguous()
        self.memory[key] = value
        if self.folder is not None:
            # Its own partial file: several processes may write the same entry at once (every one
            # encodes the DreamBooth instance prompt at the first step), each then renames its own.
            partial = partial_path(self.folder, key)
            try:
                save_file({"value": value}, str(partial))
                with contextlib.suppress(FileNotFoundError):  # taken for a dead writer's by a process that shares this host
                    partial.replace(self.folder / f"{key}.safetensors")  # name but not its pids (a container's): held in memory
            except OSError as err:  # a full disk mid-run, or a read-only cache that misses an entry
                raise self._unwritable(err) from None
            finally:  # a full disk or a second Ctrl-C mid-write leaves no partial file behind
                with contextlib.suppress(OSError):  # a read-only disk refuses even to unlink a file not there (EROFS)
                    partial.unlink(missing_ok=True)

    def stored(self, key: str) -> bool:
        """Whether `key` is cached (a data-loader process sees the disk, and memory as it was when it started)."""
        return key in self.memory or (self.folder is not None and (self.folder / f"{key}.safetensors").is_file())

    def lookup(self, keys: list[str], compute: Callable[[list[int]], torch.Tensor], device: torch.device) -> torch.Tensor:
        """Stacked rows for `keys`; `compute(indices)` encodes only the rows not cached yet.

        Each row is encoded alone: an encoder's output for a batch differs from its output for one input in the
        last float bits (batched kernels sum in another order), so an entry must not depend on which rows
        missed with it. A resumed run, or one on another number of processes, then makes the same entries.
        """
        rows = [self._load(key) for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        for i in missing:
            if keys[i] not in self.memory:  # a key twice in one batch (the dropped caption "") is encoded once
                self._store(keys[i], compute([i])[0])
            rows[i] = self.memory[keys[i]]
        return to_device(torch.stack(rows), device)
