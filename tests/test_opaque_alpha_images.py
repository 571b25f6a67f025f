"""data.loss_mask.source alpha with images that have no transparency (JPEGs, opaque PNGs): they train whole, said in one
warning for them all with the first few names, not one line per image (a folder of 7 JPEGs said it 7 times)."""

from finetune.config import DataConfig
from finetune.data_check.check import WARNING, inspect_examples
from finetune.data.sources import read_examples
from odd_images import noise
from test_loss_mask import half_mask


def opaque_warnings(folder, **loss_mask) -> list[str]:
    config = DataConfig(image_dir=str(folder), resolution=64, loss_mask={"source": "alpha", **loss_mask})
    report = inspect_examples(read_examples(config), config, "data")
    return [finding.message for finding in report.findings if finding.level == WARNING and "transparency" in finding.message]


def test_opaque_images_are_one_warning_with_their_count_and_first_names(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    cut_out = noise(64, 64).convert("RGBA")
    cut_out.putalpha(half_mask(64, 64))
    cut_out.save(folder / "cut-out.png")
    names = [f"photo{i}.jpg" for i in range(7)]
    for seed, name in enumerate(names, start=1):
        noise(64, 64, seed=seed).save(folder / name)
    for name in ["cut-out.png", *names]:
        (folder / name).with_suffix(".txt").write_text("a photo")
    listed = sorted(names)[:3]
    expected = (f"7 images have no transparency ({', '.join(listed)}, ...): their loss is unmasked, they train whole "
                "(data.loss_mask.source alpha); add an alpha channel to mask them")  # fmt: skip
    assert opaque_warnings(folder) == [expected]
    assert opaque_warnings(folder, unmasked_weight=0.1) == [expected]  # a background weight keeps them said
    for name in names[1:]:
        (folder / name).unlink()
    assert opaque_warnings(folder) == [f"image {folder / names[0]} has no transparency: it trains whole (data.loss_mask.source alpha); "
                                       "add an alpha channel to mask it"]  # fmt: skip
