"""The repository's shape: sample data without Python, and nothing shadowing the `datasets` package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_datasets_folder_holds_no_python():
    assert (ROOT / "datasets").is_dir()
    assert not list((ROOT / "datasets").rglob("*.py"))


def test_import_datasets_from_repo_root_is_the_installed_package():
    code = "import datasets, sys; print(datasets.__file__); print(hasattr(datasets, 'load_dataset'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert "site-packages" in out[0] and not out[0].startswith(str(ROOT / "datasets"))
    assert out[1] == "True"


def test_sample_data_is_what_the_generator_writes(tmp_path):
    from finetune.toyworld.sample_data import make_sample_data

    files = lambda root: sorted(path.relative_to(root) for path in root.rglob("*") if path.is_file())  # noqa: E731
    folders = make_sample_data(tmp_path)
    assert sorted(folder.name for folder in folders) == sorted(path.name for path in (ROOT / "datasets").iterdir())
    for folder in folders:  # the same files both ways: none missing from the generator, none left over in datasets/
        shipped = ROOT / "datasets" / folder.name
        assert files(folder) == files(shipped), folder.name
        for name in files(folder):
            assert (shipped / name).read_bytes() == (folder / name).read_bytes(), name
