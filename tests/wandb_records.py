"""What a run logged to W&B in offline mode (WANDB_MODE=offline), read back from its files under WANDB_DIR: each run's
folder (wandb/offline-run-<time>-<id>) holds its records in run-<id>.wandb, the log format LevelDB writes (blocks of
32 KiB, each record's pieces with a 7-byte header), each record one of wandb's protobuf messages, and its images under
files/. wandb itself ships no reader of these in Python since its core moved to Go, so this is one."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOCK, PIECE_HEADER, FILE_HEADER = 32768, 7, 7  # a file begins with ":W&B", a 2-byte magic and a version byte
FULL, LAST = 1, 4  # a record's piece types that end it (FIRST and MIDDLE pieces go on)


@dataclass
class OfflineRun:
    folder: Path
    run_id: str
    project: str
    name: str
    config: dict = field(default_factory=dict)  # every config update, its values as JSON reads them
    history: list[dict] = field(default_factory=list)  # each logged row: its keys' values as JSON reads them, with "_step"

    def steps_of(self, key: str) -> list[tuple[int, object]]:
        return [(row["_step"], row[key]) for row in self.history if key in row]

    def image_file(self, key: str, step: int) -> Path:
        """The file of image `key` logged at `step` (one image a step)."""
        (names,) = [row[f"{key}/filenames"] for row in self.history if row["_step"] == step and f"{key}/filenames" in row]
        (name,) = names
        return self.folder / "files" / name


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """The runs logged under `wandb_dir` (WANDB_DIR), in the order they started. wandb's service (wandb-core) writes a run's
    records file whole only as it closes it, after `run.finish()` has returned (read at once, it held its header alone, at
    times): it is shut down first, as at the end of a process; the next run starts another."""
    import wandb

    wandb.teardown()
    return [read_run(folder) for folder in sorted((wandb_dir / "wandb").glob("offline-run-*"))]


def read_run(folder: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    (records_file,) = folder.glob("run-*.wandb")
    run = None
    for data in _records(records_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = OfflineRun(folder, record.run.run_id, record.run.project, record.run.display_name)
            run.config.update(_items(record.run.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
    assert run is not None, f"{records_file} holds no run record"
    run.config.pop("_wandb", None)  # wandb's own
    return run


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _records(data: bytes):
    assert data[:4] == b":W&B", f"not a W&B records file: {data[:8]!r}"
    offset, pieces = FILE_HEADER, b""
    while offset + PIECE_HEADER <= len(data):
        if BLOCK - offset % BLOCK < PIECE_HEADER:  # a block's tail too short for a header is padding
            offset += BLOCK - offset % BLOCK
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[offset : offset + PIECE_HEADER])
        if kind == 0:  # zeros: the rest of the block is padding
            offset += BLOCK - offset % BLOCK
            continue
        pieces += data[offset + PIECE_HEADER : offset + PIECE_HEADER + length]
        offset += PIECE_HEADER + length
        if kind in (FULL, LAST):
            yield pieces
            pieces = b""
