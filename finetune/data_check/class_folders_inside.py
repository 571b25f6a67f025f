"""DreamBooth class folders that lie inside an instance folder (`class_dir: my_subject/class`): training reads only the
images directly in an instance folder, so its class images do not train as the subject, but the data check's advice for
a subfolder of images ("add each as a concept of its own") would have them trained as the subject. Each is said as what it
is, naming both folders, with the one fix: move the class folder out of the instance folder."""

from __future__ import annotations

from pathlib import Path

from finetune.config import DataConfig

# The key of a concept's class folder where its class_dir is null: the run's own, <output_dir>/class_images/concept-<n>,
# which only another output_dir (or a class_dir) moves out of an instance folder.
RUNS_OWN = "output_dir"


def class_folders_inside(folder: Path, config: DataConfig) -> list[tuple[str, Path]]:
    """(key, class folder) of each DreamBooth class folder inside `folder`, at any depth (one with no images yet too: its
    generated images are written there)."""
    if not config._class_dirs:
        return []
    inside = folder.resolve()
    return [(key, Path(path)) for key, path in config._class_dirs if inside in Path(path).resolve().parents]


def outside_class_folders(subfolders: list[Path], class_folders: list[tuple[str, Path]]) -> list[Path]:
    """`subfolders` but those that are a class folder or lie in one."""
    within = [path.resolve() for _, path in class_folders]
    return [sub for sub in subfolders if not any(sub.resolve() == path or path in sub.resolve().parents for path in within)]


def class_folder_inside_message(folder: Path, config: DataConfig, key: str, class_folder: Path) -> str:
    if key == RUNS_OWN:  # "class_dir: null for the run's own" is what made it: the run's output_dir lies in the instance folder
        return (f"the run's class folder {class_folder} (class_dir: null: under output_dir) lies inside {config._image_dir_key} {folder}: "
                f"set output_dir outside the instance folder, or class_dir to a folder outside it, so that its class images are never "
                f"taken for the subject's (training reads only the images directly in {folder})")
    return (f"{key} {class_folder} lies inside {config._image_dir_key} {folder}: move the class folder out of the instance folder "
            f"(e.g. beside it, or class_dir: null for the run's own), so that its class images are never taken for the subject's "
            f"(training reads only the images directly in {folder})")
