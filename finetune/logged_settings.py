"""Whether a run's TensorBoard logs already record its settings. accelerate writes each record (TensorBoard's HParams,
listed as a run of its own beside the curves) with a copy as `<logs>/finetune/<time>/hparams.yml`: a run started afresh
after one killed before its first checkpoint, in the same output_dir with the same recipe, recorded the same settings a
second time. A resume compares with its checkpoint's settings instead (`finetune.trainer`)."""

from __future__ import annotations

from pathlib import Path

import yaml


def settings_on_record(logs: Path, settings: dict) -> bool:
    """Whether a record in `logs` (a run's logs/finetune folder) holds exactly `settings` (`Recipe.flat_settings`)."""
    for record in sorted(logs.glob("*/hparams.yml")):
        try:
            if yaml.safe_load(record.read_text(encoding="utf-8")) == settings:  # written as YAML's ASCII escapes
                return True
        except (OSError, UnicodeDecodeError, yaml.YAMLError):  # cut short by the kill, or not accelerate's: no record of these
            continue
    return False
