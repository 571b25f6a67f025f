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


def test_every_dotted_module_name_written_down_is_one_that_exists():
    """Comments, docstrings, docs and tests name modules as `finetune.<package>.<module>` (and a name in it): the move into
    subpackages rewrote them by a script, and one it could not map (launched_processes, named as a function of
    distributed/processes.py, is process_env's) sent a reader to a module without it. Where such a name names a package or module, a name
    after it is one the module defines or imports. Metadata keys (`finetune.steps`, `finetune.loss_mask`) name no package,
    and are not read (a key may share a module's name: finetune/data/loss_mask.py)."""
    import ast
    import functools
    import re

    def module_file(parts: list[str]) -> Path | None:
        path = ROOT.joinpath(*parts)
        return next((f for f in (path / "__init__.py", path.with_suffix(".py")) if f.is_file()), None)

    @functools.cache  # each module parsed once, however often it is named
    def defined(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names.update(n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name))
        return names

    files = subprocess.run(["git", "ls-files", "finetune", "tests", "docs", "README.md", ".ci", "Makefile", "pyproject.toml"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    wrong = []
    for name in files:
        if not name.endswith((".py", ".md", ".toml", ".yaml", ".sh", "Makefile")) or not (ROOT / name).is_file():
            continue
        for number, line in enumerate((ROOT / name).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for dotted in re.findall(r"(?<![\w/.-])finetune(?:\.[A-Za-z_]\w*)+", line):
                parts = dotted.split(".")
                known = max(k for k in range(1, len(parts) + 1) if k == 1 or module_file(parts[:k]))  # the longest module named
                if 1 < known < len(parts) and parts[known] not in defined(module_file(parts[:known])):
                    wrong.append(f"{name}:{number}: {dotted}")
    assert wrong == [], wrong
