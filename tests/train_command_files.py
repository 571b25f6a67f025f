"""The files a test of `finetune train`'s checks gives the command: a recipe file on a base and an image folder, and a
copy of a folder with one corrupt image among good ones (what the data check stops on, were it made too early)."""

import json
import shutil

import yaml
from conftest import SHIPPED_BASE


def write_recipe(tmp_path, method: str, folder, base=SHIPPED_BASE, **sections):
    """tmp_path/recipe.yaml: `method` on `base`, training on `folder` at resolution 64 into tmp_path/run, with no validation
    prompts; `sections` are more of the recipe's sections, or replace these."""
    path = tmp_path / "recipe.yaml"
    data = {"resolution": 64, **({"image_dir": str(folder)} if folder else {})}  # none for DreamBooth: its concepts name theirs
    path.write_text(yaml.safe_dump({"method": method, "model": {"pretrained": str(base)}, "data": data,
                                    "output_dir": str(tmp_path / "run"), "validation": {"prompts": []}, **sections}))  # fmt: skip
    return path


def corrupt_copy(folder, tmp_path, method: str = "lora"):
    """`folder` copied to tmp_path/data with one more image, a corrupt one (zz_corrupt.png, captioned; for a ControlNet's
    folder, a pair of its own whose image is the corrupt file)."""
    data = shutil.copytree(folder, tmp_path / "data")
    (data / "zz_corrupt.png").write_bytes(b"garbage")
    if method == "controlnet":
        shutil.copy(data / json.loads((data / "metadata.jsonl").read_text().splitlines()[0])["conditioning_file_name"], data / "zz_cond.png")
        with (data / "metadata.jsonl").open("a") as rows:
            rows.write(json.dumps({"file_name": "zz_corrupt.png", "conditioning_file_name": "zz_cond.png", "text": "x"}) + "\n")
    else:
        (data / "zz_corrupt.txt").write_text("x")
    return data
