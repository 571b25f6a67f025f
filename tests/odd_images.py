"""Images for the data check's tests: noise, captioned files, and a folder of every odd kind of image."""

import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def noise(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def upright_red_on_top(width=64, height=96):
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width, height // 2))
    return image


def save_exif_rotated(path):
    """Stored lying on its side with EXIF orientation 6, as phones save portrait photos."""
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer turns it 90 degrees clockwise
    upright_red_on_top().transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)


def captioned(folder, name, image=None, caption="a thing"):
    folder.mkdir(parents=True, exist_ok=True)
    # crc32, not hash(): str hashes differ per process (PYTHONHASHSEED), and 1 run in 1000 drew another image's seed
    (image or noise(64, 64, seed=zlib.crc32(name.encode()))).save(folder / name)
    (folder / name).with_suffix(".txt").write_text(caption)
    return folder / name


def write_odd_folder(folder: Path) -> Path:
    """One image of every kind the check knows, each with a caption unless said otherwise."""
    captioned(folder, "good.png", noise(64, 64, seed=1))
    (folder / "corrupt.jpg").write_text("this is not a JPEG")
    (folder / "corrupt.txt").write_text("x")
    data = io.BytesIO()
    noise(64, 64, seed=2).save(data, "PNG")
    (folder / "truncated.png").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    (folder / "truncated.txt").write_text("x")
    captioned(folder, "tiny.png", noise(20, 20, seed=3))
    captioned(folder, "small.png", noise(40, 48, seed=4))
    captioned(folder, "cmyk.jpg", Image.new("CMYK", (64, 64), (0, 255, 255, 0)))  # red in CMYK
    captioned(folder, "deep.png", Image.new("I;16", (64, 64), 128 * 257))  # mid grey
    captioned(folder, "alpha.png", Image.new("RGBA", (64, 64), (255, 0, 0, 0)))
    captioned(folder, "palette.png", noise(64, 64, seed=5).convert("P"))
    save_exif_rotated(folder / "rotated.png")
    (folder / "rotated.txt").write_text("x")
    captioned(folder, "copy1.png", noise(64, 64, seed=1))  # the same pixels as good.png
    noise(64, 64, seed=1).save(folder / "copy2.bmp")  # ... in another container
    (folder / "copy2.txt").write_text("x")
    noise(64, 64, seed=6).save(folder / "uncaptioned.png")
    return folder
