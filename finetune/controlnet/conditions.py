"""`finetune make-conditions`: conditioning images for ControlNet, computed with numpy and PIL (and scipy's labelling of connected pixels).

Three kinds, each an RGB image of the same size as its source, as ControlNet reads them:

- ``canny``: Canny edges (white on black): Gaussian blur, Sobel gradients, non-maximum suppression,
  double threshold and hysteresis. Gradients are taken on every colour channel and the strongest
  channel wins at each pixel, so edges between colours of equal brightness (red on green) are found
  too; on a gray image this is plain Canny. Thresholds are in colour levels (0-255): a straight sharp
  step of 40 levels has magnitude 40, whatever the blur.
- ``luminance``: a grayscale, depth-like map (ITU-R BT.601 luma, ``0.299 R + 0.587 G + 0.114 B``).
- ``mask``: a segmentation for the toy world: pixels whose colour is farther than ``threshold`` from
  the median colour of the image border (the background) are the shape (white on black).

`make_condition_folders` turns a folder of images into a training folder for ``method: controlnet``: the
images (copied), ``conditioning/<name>.png`` and a ``metadata.jsonl`` with ``file_name``,
``conditioning_file_name`` and ``text`` (from the input's ``metadata.jsonl``, ``metadata.csv`` or ``.txt`` sidecars).
"""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from finetune.captions.captions import image_caption
from finetune.captions.file_names import loose_name_key, name_key, row_image_key
from finetune.captions.metadata_files import metadata_file, metadata_partner_files, read_csv_captions, read_metadata_captions
from finetune.captions.metadata_lines import csv_rows, metadata_lines
from finetune.controlnet.condition_kinds import CANNY_HIGH, CANNY_LOW, CANNY_SIGMA, KINDS, MASK_THRESHOLD, MAX_CANNY_SIGMA
from finetune.counts import counted
from finetune.errors import FinetuneError, looked_for_here

# Beside metadata.jsonl: how the conditioning images were made. A ControlNet trained on the folder records it
# (finetune.conditioning), so `finetune sample` can say what kind of image it wants.
RECORD_FILE = "conditioning.json"
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)
MAX_RGB_DISTANCE = 255 * 3**0.5  # black to white: no pixel is farther than this from the border's colour


# ---------------------------------------------------------------------------------------------------
# Filters


def _correlate_1d(array: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Correlate along `axis` with a centred odd-length kernel; borders mirrored (no edge at the frame)."""
    radius = len(kernel) // 2
    pad = [(0, 0)] * array.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(array, pad, mode="symmetric")
    length = array.shape[axis]
    out, term = np.zeros(array.shape, dtype=np.float64), np.empty(array.shape, dtype=np.float64)
    for offset, weight in enumerate(kernel):
        if weight:
            window = [slice(None)] * array.ndim
            window[axis] = slice(offset, offset + length)
            # A view and one buffer reused: no copy of a photo's pixels (nor a new array) per tap.
            out += np.multiply(padded[tuple(window)], weight, out=term)
    return out


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(array: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W) or (H, W, C) array; sigma 0 returns a float copy."""
    array = np.asarray(array, dtype=np.float64)
    if sigma <= 0:
        return array.copy()
    kernel = _gaussian_kernel(sigma)
    return _correlate_1d(_correlate_1d(array, kernel, 0), kernel, 1)


SOBEL_SMOOTH, SOBEL_DIFF = np.array([1.0, 2.0, 1.0]), np.array([-1.0, 0.0, 1.0])


def sobel(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gx, gy): 3x3 Sobel derivatives along x (columns, rightwards) and y (rows, downwards)."""
    gx = _correlate_1d(_correlate_1d(array, SOBEL_SMOOTH, 0), SOBEL_DIFF, 1)
    gy = _correlate_1d(_correlate_1d(array, SOBEL_DIFF, 0), SOBEL_SMOOTH, 1)
    return gx, gy


def _step_response(sigma: float) -> float:
    """Sobel magnitude at a straight unit step after the blur: dividing by it puts thresholds in levels."""
    step = np.repeat(np.array([0.0] * 16 + [1.0] * 16)[None, :], 3, axis=0)
    gx, _ = sobel(gaussian_blur(step, sigma))
    return float(np.abs(gx[1]).max())


def canny(image: Image.Image, low: float = CANNY_LOW, high: float = CANNY_HIGH, sigma: float = CANNY_SIGMA) -> np.ndarray:
    """bool (H, W) edge map of `image` (see the module docstring); `low` <= `high`, in levels 0-255."""
    if not 0 <= low <= high:
        raise FinetuneError(f"canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    # float64, not float32 (2x faster): float32's rounding breaks NMS ties otherwise (a flat colour's step): 46 of one sample
    # image's 264 edge pixels moved, 3,718 of 10M pixels over datasets/ and photos, and a ControlNet is sampled with these maps.
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    gx, gy = sobel(gaussian_blur(pixels, sigma))
    strength = gx**2 + gy**2
    channel = strength.argmax(axis=2)[..., None]  # the strongest channel's gradient at each pixel
    gx, gy = np.take_along_axis(gx, channel, 2)[..., 0], np.take_along_axis(gy, channel, 2)[..., 0]
    magnitude = np.hypot(gx, gy) / _step_response(sigma)
    thin = _non_maximum_suppression(magnitude, gx, gy)
    return _hysteresis(thin >= high, thin >= low)


def _non_maximum_suppression(magnitude: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Keep pixels that are the maximum along their gradient direction (quantised to 4 directions).

    Ties (a sharp step gives two equal pixels) go to the pixel on the negative side, so edges are
    one pixel wide: a pixel must beat its neighbour behind it and at least equal the one ahead.
    """
    h, w = magnitude.shape
    padded = np.pad(magnitude, 1, mode="constant")
    angle = np.rad2deg(np.arctan2(gy, gx)) % 180.0
    bins = (((angle + 22.5) // 45.0) % 4).astype(int)  # 0: along x, 1: 45 deg, 2: along y, 3: 135 deg
    # (dy, dx) of the neighbour ahead along the gradient, per bin (rows grow downwards).
    steps = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
    tolerance = 1e-9 * float(magnitude.max())  # float rounding must not break a tie at random
    keep = np.zeros((h, w), dtype=bool)
    for b, (dy, dx) in steps.items():
        ahead = padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        behind = padded[1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
        keep |= (bins == b) & (magnitude >= ahead - tolerance) & (magnitude > behind + tolerance)
    return np.where(keep & (magnitude > 0), magnitude, 0.0)


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Weak pixels survive when 8-connected (through weak pixels) to a strong one: the weak regions that hold a
    strong pixel, found by scipy's labelling (a flood fill in Python took 10 s of a 12-megapixel photo's edges)."""
    from scipy import ndimage

    regions, count = ndimage.label(weak, structure=np.ones((3, 3), dtype=bool))
    holds_strong = np.zeros(count + 1, dtype=bool)
    holds_strong[regions[strong]] = True
    holds_strong[0] = False  # label 0 is every pixel outside the weak regions
    return holds_strong[regions] | strong


def luminance(image: Image.Image) -> np.ndarray:
    """uint8 (H, W) BT.601 luma."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    return np.clip(np.rint(pixels @ LUMA_WEIGHTS), 0, 255).astype(np.uint8)


def border_mask(image: Image.Image, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """bool (H, W): pixels farther than `threshold` (RGB distance, 0-255) from the border's median colour."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    return np.linalg.norm(pixels - background, axis=2) > threshold


def make_condition(image: Image.Image, kind: str, **options) -> Image.Image:
    """The conditioning image of `kind` for `image`, as an RGB image of the same size."""
    if kind == "canny":
        array = np.where(canny(image, **options), 255, 0).astype(np.uint8)
    elif kind == "luminance":
        array = luminance(image)
    elif kind == "mask":
        array = np.where(border_mask(image, **options), 255, 0).astype(np.uint8)
    else:
        raise FinetuneError(f"unknown conditioning kind '{kind}': use one of {', '.join(KINDS)}")
    return Image.fromarray(array, "L").convert("RGB")


def check_options(kind: str, **options) -> None:
    """Refuse thresholds that make degenerate images, before any is written: a negative mask threshold counts
    every pixel as shape (all white), a negative blur is no blur recorded as one."""
    if kind == "canny" and not 0 <= options.get("sigma", CANNY_SIGMA) <= MAX_CANNY_SIGMA:
        raise FinetuneError(f"canny --sigma must be 0 to {MAX_CANNY_SIGMA:g} (pixels of blur), got {options['sigma']}")
    if kind == "mask" and not options.get("threshold", MASK_THRESHOLD) >= 0:
        raise FinetuneError(f"mask --threshold must be 0 or more (an RGB distance; below 0 every pixel is shape), got {options['threshold']}")
    if kind == "canny" and not 0 <= options.get("low", CANNY_LOW) <= options.get("high", CANNY_HIGH):
        raise FinetuneError(f"canny thresholds must satisfy 0 <= low <= high, got low={options.get('low', CANNY_LOW)}, high={options.get('high', CANNY_HIGH)}")
    # Past what any image reaches, every conditioning image came out black, written without a word.
    if kind == "canny" and options.get("high", CANNY_HIGH) > 255:
        raise FinetuneError(f"canny --high {options['high']} is past the colour levels 0-255 (a black-to-white edge is 255): "
                            "almost no edge would be found, every conditioning image black; give 255 or less")  # fmt: skip
    if kind == "mask" and options.get("threshold", MASK_THRESHOLD) >= MAX_RGB_DISTANCE:
        raise FinetuneError(f"mask --threshold {options['threshold']} is at or past the largest RGB distance ({MAX_RGB_DISTANCE:.1f}, black to white): "
                            "no pixel would be shape, every mask black; give less")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Folders


def make_condition_folders(input_dir: str | Path, output_dir: str | Path, kind: str, overwrite: bool = False, **options) -> list[tuple[Path, int, int]]:
    """Write a ControlNet training folder from a folder of images, and one from each of its subfolders that hold images
    (sd-scripts' `10_name` folders, trained as data.folders entries, each with its own metadata.jsonl): a subfolder is
    written to the output's subfolder of its name. Returns (folder, images, uncaptioned) per folder written.

    Images are copied to the output folder (unless it is the input folder), conditioning images written to
    `<output>/conditioning/<stem>.png`, and `metadata.jsonl` lists all three columns, beside any other
    columns (and rows) of the input's metadata file. Captions come from the input's metadata.jsonl or
    metadata.csv, else a .txt beside the image; an image with none gets "".
    Conditioning images already there (a ControlNet may have trained on them), and another folder's metadata.jsonl and
    files of the images' names, are replaced only with `overwrite`.
    """
    from finetune.config import DataConfig
    from finetune.data.sources import IMAGE_SUFFIXES, folder_images, image_subfolders

    source, target = Path(input_dir), Path(output_dir)
    _check_asked(source, kind, options)
    subfolders = [sub for sub in image_subfolders(source, DataConfig()) if sub.resolve() != target.resolve()]  # not a rerun's output
    pairs = ([(source, target)] if folder_images(source) else []) + [(sub, target / sub.name) for sub in subfolders]
    if not pairs:
        raise FinetuneError(f"input folder {source} has no images ({', '.join(IMAGE_SUFFIXES)})")
    # Every folder is checked before any is written: a clash found halfway would leave half the data behind.
    checked = [(folder, written, *_checked_input(folder, written, overwrite)) for folder, written in pairs]
    if subfolders:  # written again last: a stop while the subfolders are rewritten must not leave the old kind's record
        (target / RECORD_FILE).unlink(missing_ok=True)
    made = []
    for folder, written, images, captions in checked:  # each told whether the folders before it were written
        made.append(_write_conditions(folder, written, images, captions, kind, others_written=bool(made), **options))
    if subfolders:  # where a ControlNet trained on data.image_dir (with data.folders) looks for how its conditioning was made
        from finetune.outputs.atomic_files import atomic_write_text

        target.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target / RECORD_FILE, json.dumps({"kind": kind, **options}))
    return made


def _check_asked(source: Path, kind: str, options: dict) -> None:
    """What make-conditions is asked, before any folder is read: the input folder, the kind and its thresholds."""
    require_input_folder(source)
    if kind not in KINDS:
        raise FinetuneError(f"unknown conditioning kind '{kind}': use one of {', '.join(KINDS)}")
    check_options(kind, **options)


def require_input_folder(source: Path) -> None:
    """One line, saying what to give, where `source` is no folder ("input folder X not found" said neither)."""
    if source.is_file():  # a photo given for its folder
        raise FinetuneError(f"input folder {source} is a file: give the folder of photos that holds it ({source.parent})")
    if not source.is_dir():
        raise FinetuneError(f"input folder {source} not found: give the folder of photos to make conditioning images from{looked_for_here(source)}")


def images_left_out(input_dir: str | Path, output_dir: str | Path, made: list[Path]) -> list[str]:
    """The warnings for images under `input_dir` that got no conditioning image, `made` being the output folders
    `make_condition_folders` wrote: files of kinds training does not read (.gif, .heic), and images in subfolders below
    the folders it reads (a phone's `2023/jan`), of any kind. The data check of the output cannot say them: they are not there."""
    from finetune.config import DataConfig
    from finetune.data.sources import SAID_SUBFOLDER_DEPTH, convert_unread, folder_images, image_subfolders, subfolder_names, unread_image_files

    source, target, lines = Path(input_dir), Path(output_dir).resolve(), []
    written = [source / folder.relative_to(output_dir) for folder in made]
    # Not the output, written into the input folder. A subfolder holding only unread kinds is not written, nor listed in `made`.
    left = [sub for sub in image_subfolders(source, DataConfig(), SAID_SUBFOLDER_DEPTH, holding=lambda sub: folder_images(sub) or unread_image_files(sub))
            if sub not in written and target not in (sub.resolve(), *sub.resolve().parents)]  # fmt: skip
    deeper = [sub for sub in left if sub.parent != source]
    # The input folder too where only its subfolders hold photos it reads; a subfolder just below it that holds only unread kinds.
    for folder in dict.fromkeys([source, *written, *(sub for sub in left if sub.parent == source)]):
        if files := unread_image_files(folder):
            lines.append(f"{counted(len(files), 'image')} in {folder} got no conditioning image {convert_unread(files)} and run make-conditions again with --overwrite")
    if deeper:
        line = (f"images in subfolders of subfolders of {source} ({subfolder_names(source, deeper)}) got no conditioning images (make-conditions reads the "
                f"folder and the subfolders just below it): run make-conditions on {deeper[0].parent} too, or move them up")  # fmt: skip
        # Their .gif (.heic) files need converting as well: a folder of those alone was not said at all.
        if unread := [file for sub in deeper for file in unread_image_files(sub)]:
            line += f"; of them, training does not read {counted(len(unread), 'image')} {convert_unread(unread)} first"
        lines.append(line)
    return lines


def _checked_input(source: Path, target: Path, overwrite: bool) -> tuple[list[Path], dict[str, str]]:
    """(images, captions from the metadata file) of one input folder, once nothing stops writing `target` from it."""
    from finetune.data.sources import IMAGE_SUFFIXES, folder_images

    # Conditioning images kept beside their images (a hand-made 0001_edges.png its row names) are no photos to make one from.
    partners = metadata_partner_files(source)
    images = [path for path in folder_images(source) if name_key(path.name) not in partners]
    if not images:
        raise FinetuneError(f"input folder {source} has no images ({', '.join(IMAGE_SUFFIXES)})")
    beside = sorted(path.name for path in folder_images(source) if name_key(path.name) in partners)
    if beside and target.is_dir() and source.resolve() == target.resolve():  # the rows renamed, these would train as images without conditioning
        raise FinetuneError(f"{metadata_file(source)} names conditioning images beside the images ({beside[0]}), which rewriting it in place "
                            "would leave as images without a conditioning image: write to another folder")  # fmt: skip
    # By the stem as a file system that ignores letter case and Unicode form finds it (macOS, Windows): there
    # IMG_1.JPG's conditioning/IMG_1.png and img_1.png's conditioning/img_1.png are one file, the second written over the first.
    stems: dict[str, str] = {}
    for path in images:
        if (stem := loose_name_key(path.stem)) in stems:
            other = stems[stem].rsplit(".", 1)[0]
            where = "" if other == path.stem else " on macOS or Windows, which ignore letter case" if other.casefold() == path.stem.casefold() else " on macOS, which ignores Unicode form"
            raise FinetuneError(f"images {stems[stem]} and {path.name} would share conditioning/{path.stem}.png{where}: rename one")
        stems[stem] = path.name
    # Not hidden files: a `.NAME.partial` a kill (SIGKILL) left mid-write (atomic_write), Finder's .DS_Store: no conditioning image of a run.
    existing = [p for p in (target / "conditioning").iterdir() if p.is_file() and not p.name.startswith(".")] if (target / "conditioning").is_dir() else []
    if existing and not overwrite:
        raise FinetuneError(f"{target / 'conditioning'} already holds {len(existing)} conditioning images: write to another folder, or pass --overwrite")
    if not overwrite and target.is_dir() and source.resolve() != target.resolve():
        # Another folder's metadata.jsonl, and its files of the images' names, would be replaced by this run's.
        replaced = [target / "metadata.jsonl"] if (target / "metadata.jsonl").is_file() else []
        replaced += [target / p.name for p in images if (target / p.name).is_file() and not filecmp.cmp(p, target / p.name, shallow=False)]
        if replaced:
            more = f" and {counted(len(replaced) - 1, 'other file')}" if len(replaced) > 1 else ""
            raise FinetuneError(f"{target} already holds {replaced[0].name}{more}, which this would replace: write to another folder, or pass --overwrite")
    jsonl, table = source / "metadata.jsonl", source / "metadata.csv"
    if target.is_dir() and source.resolve() == target.resolve() and table.is_file():
        raise FinetuneError(f"{table} would sit beside the metadata.jsonl this writes (a folder must have one): write to another folder")
    if jsonl.is_file():
        captions = read_metadata_captions(jsonl, require_text=False)
        _refuse_captions_under_another_key(jsonl)
        return images, captions
    return images, read_csv_captions(table)


def _refuse_captions_under_another_key(jsonl: Path) -> None:
    """Rows whose captions are under another key than `text` (sd-scripts' `caption`, a dataset's `prompt`) would
    leave every image uncaptioned, said only as 'had no caption'."""
    keys: set[str] = set()
    for line in metadata_lines(jsonl):
        keys.update(json.loads(line) if line.strip() else {})  # each row a JSON object: read_metadata_captions checked
    if "text" not in keys and keys - {"file_name", "conditioning_file_name", "conditioning_image"}:
        raise FinetuneError(f"{jsonl} has no 'text' captions (its rows have {', '.join(repr(key) for key in sorted(keys))}): "
                            "rename the key that holds the captions to text, as make-conditions reads them")  # fmt: skip


def _input_rows(source: Path) -> dict[str, dict]:
    """The input metadata file's rows by the image they name (`row_image_key`, as their captions are read: a
    `Cat.PNG` row is `cat.png`'s, not a row naming no image beside one without its columns), with all their columns: written
    back with the conditioning column set, so that no column of the user's (a source, tags, another kind's
    conditioning images) is lost, least of all where the folder's own metadata.jsonl is rewritten."""
    jsonl, table = source / "metadata.jsonl", source / "metadata.csv"
    if jsonl.is_file():
        rows = [json.loads(line) for line in metadata_lines(jsonl) if line.strip()]  # read_metadata_captions checked each
    elif table.is_file():
        rows = [row for row in csv_rows(metadata_lines(table), table) if row["file_name"]]
    else:
        return {}
    return {row_image_key(row["file_name"], source): row for row in rows}


def _write_conditions(source: Path, target: Path, images: list[Path], captions: dict[str, str], kind: str, others_written: bool = False,
                      **options) -> tuple[Path, int, int]:  # fmt: skip
    """One folder's writing, for the images and captions `_checked_input` gave for `source` (`others_written`: other
    folders were written before it in this run). Each file is written whole or not at all (`atomic_write`): a stop
    (Ctrl-C) mid-way left a truncated conditioning image or copy under its final name, and a half-written conditioning.json
    or a hidden .metadata.jsonl.partial."""
    from finetune.data.images import open_rgb
    from finetune.data.sources import IMAGE_SUFFIXES, Example
    from finetune.outputs.atomic_files import atomic_write, atomic_write_text, remove_leftover_partials

    same_folder = target.is_dir() and source.resolve() == target.resolve()
    # A killed run's (SIGKILL) hidden partial files, of an image this run may not make again: only names this writes.
    remove_leftover_partials(target / "conditioning", lambda name: name.endswith(".png"))
    copies = () if same_folder else IMAGE_SUFFIXES  # in the input folder itself a partial image is none of ours
    remove_leftover_partials(target, lambda name: name in ("metadata.jsonl", RECORD_FILE) or name.lower().endswith(copies))
    (target / "conditioning").mkdir(parents=True, exist_ok=True)
    # Written again once every image is: a stop in a rerun of another kind (--overwrite) left the old kind's record over a
    # mix of both, and a ControlNet trained on it recorded the old kind for `finetune sample` and the demo to make.
    (target / RECORD_FILE).unlink(missing_ok=True)
    own_rows = _input_rows(source)
    rows, uncaptioned = [], 0
    for path in images:
        conditioning_name = f"conditioning/{path.stem}.png"
        try:
            image = open_rgb(Example(str(path), "", lambda p=path: Image.open(p)))
        except FinetuneError as err:
            if not (rows or others_written):
                raise
            # The images before it have their conditioning images, which the next run finds and will not replace without
            # --overwrite: "already holds N conditioning images" read as an earlier, finished run's.
            raise FinetuneError(f"{err}; make-conditions stopped there, the images before it given their conditioning images: "
                                "run it again with --overwrite once that image is fixed or removed") from None  # fmt: skip
        condition = make_condition(image, kind, **options)
        atomic_write(target / conditioning_name, lambda partial: condition.save(partial, format="PNG"), durable=False)
        if not same_folder:
            atomic_write(target / path.name, lambda partial, path=path: shutil.copyfile(path, partial), durable=False)
        text = image_caption(path, captions)
        if text is None:
            text, uncaptioned = "", uncaptioned + 1
        own = own_rows.pop(name_key(path.name), {})
        rows.append({**own, "file_name": path.name, "conditioning_file_name": conditioning_name, "text": text})
    rows += own_rows.values()  # rows naming no image here (a typo, a moved file): kept, and reported by the data check as before
    atomic_write_text(target / "metadata.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    atomic_write_text(target / RECORD_FILE, json.dumps({"kind": kind, **options}))
    return target, len(rows), uncaptioned
