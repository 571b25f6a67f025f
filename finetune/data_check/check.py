"""Check a dataset the way training reads it, before any model is loaded: `finetune check-data`.

Every image is decoded once. Findings come in three levels:

- fatal: training would stop (unreadable or truncated file, image too small, no caption). Training
  stops on the first one with a one-line error naming the file, unless `data.skip_bad_images` is
  set: then such images are left out and listed.
- warning: training runs, but the data may not be what you meant (upscaled images, duplicates, an
  empty caption).
- converted: handled on the fly (EXIF rotation, CMYK, 16-bit, transparency, palette): said so that
  nothing happens unseen.

Training runs the same check (`checked_examples`) and prints the same summary at its start; the
command that prints it is finetune/data_check/command.py. A file unchanged since the last check is not decoded again:
what was read from it comes from the check's record (finetune/data_check/check_record.py), the rest is worked out anew.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from finetune.captions.captions import caption_alternative, caption_lines, dataset_of_row, empty_caption_message, missing_caption_message
from finetune.captions.overrides import unread_captions_line
from finetune.captions.cells import list_text_message
from finetune.config import DataConfig
from finetune.counts import counted
from finetune.data.buckets import Size, assign_buckets, bucket_counts_line, no_upscale_advice
from finetune.data.epoch_uses import expand_repeats
from finetune.data.image_folder_datasets import image_dir_advice
from finetune.data.image_warnings import pillow_warning_line, pillow_warnings
from finetune.data.images import decode, file_stamp, float_levels_problem, has_alpha, pixel_digest, turned_on_its_side, upright_rgb
from finetune.data.loss_mask import alpha_mask, mask_area, mask_digest, opaque_images, opaque_images_warning
from finetune.data.sources import Example, data_folders, read_examples
from finetune.data.views import cut, plan_cover_crop
from finetune.data_check.check_record import CheckRecord, ImageFacts
from finetune.data_check.checked_once import kept_check
from finetune.data_check.conversions import TURNED_NAMED, conversions, is_turn, turns_line
from finetune.data_check.folder_warnings import folder_warnings
from finetune.data_check.mask_check import inspect_loss_mask
from finetune.data_check.threads import each_on_threads
from finetune.errors import FinetuneError

FATAL, WARNING, CONVERTED = "fatal", "warning", "converted"
SKIP_HINT = "or set data.skip_bad_images: true to skip bad images"


@dataclass(frozen=True)
class Finding:
    level: str  # FATAL, WARNING or CONVERTED
    source: str  # the image it is about
    message: str  # one line naming the image, what is wrong, and what to do (or what is done)


@dataclass
class DataReport:
    label: str  # what was checked, e.g. "data folder my_photos"
    config: DataConfig
    found: int = 0
    usable: list[Example] = field(default_factory=list)  # each once, with its size; repeats not expanded
    findings: list[Finding] = field(default_factory=list)
    skipped: list[Finding] = field(default_factory=list)  # fatal findings left out by data.skip_bad_images
    skipping: bool = False  # data.skip_bad_images: every image not `usable` is skipped (its finding may be said by another report)
    notes: list[str] = field(default_factory=list)  # lines of what training does with the data, said beside the counts
    unchanged: int = 0  # images whose facts came from the check's record (check_record.py), not decoded again
    unchanged_conditioning: int = 0  # a ControlNet's conditioning images alike (finetune/controlnet/pairs.py)

    def of_level(self, level: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.level == level]

    @property
    def bucket_of(self) -> list[Size] | None:
        return assign_buckets([example.size for example in self.usable], self.config)

    def lines(self, limit: int | None = None, held_out: frozenset[str] = frozenset()) -> list[str]:
        """The summary: counts, sizes, buckets, then every finding (at most `limit` of each level). `held_out`:
        the sources validation.loss_images keeps out of training, which an epoch does not use."""
        config, uses = self.config, sum(example.repeats for example in self.usable if example.source not in held_out)
        skipped = self.found - len(self.usable) if self.skipping else 0  # images, not findings (one may have two)
        files = len({example.source for example in self.usable})  # data.folders may list a folder under two templates
        found = counted(self.found, "image") + (f" ({files} files, some under two templates)" if files < len(self.usable) else "")
        held = len({example.source for example in self.usable} & held_out)
        lines = [f"{self.label}: {found}, {len(self.usable)} used, {skipped} skipped; {counted(uses, 'use')} per epoch"
                 + (f" ({held} held out by validation.loss_images)" if held else "")
                 + (f"; {self._unchanged_files()} unchanged since the last check, not decoded again" if self.unchanged or self.unchanged_conditioning else "")]  # fmt: skip
        sizes = [example.size for example in self.usable]
        if sizes:
            shapes = Counter("landscape" if w > h else "portrait" if h > w else "square" for w, h in sizes)
            short = sorted(min(size) for size in sizes)
            lines.append(f"sizes: short side {short[0]}-{short[-1]} px; " + ", ".join(f"{n} {shape}" for shape, n in sorted(shapes.items())))
            if config.bucketing.enabled:
                lines.append(bucket_counts_line(self.bucket_of))
            else:
                lines.append(f"training size: {config.resolution}x{config.resolution}, {config.crop} crops (data.bucketing keeps aspect ratios)")
        lines += self.notes
        if len(config.folders) > 1:
            lines.append(folder_shares_line([example for example in self.usable if example.source not in held_out], config))
        if config.loss_mask.enabled and self.usable:
            lines.append(loss_mask_line(self.usable, config))
        for level, entries in ((FATAL, self.of_level(FATAL)), ("skipped", self.skipped), (WARNING, self.of_level(WARNING)), (CONVERTED, self.of_level(CONVERTED))):
            shown = entries if limit is None else entries[:limit]
            lines += [f"{level}: {finding.message}" for finding in shown]
            if len(entries) > len(shown):
                lines.append(f"{level}: ... and {len(entries) - len(shown)} more (finetune check-data lists them all)")
        return lines

    def _unchanged_files(self) -> str:
        """'118' (of the images the line counts), or with a ControlNet's conditioning images '118 images and 120 conditioning images'."""
        if not self.unchanged_conditioning:
            return str(self.unchanged)
        return f"{counted(self.unchanged, 'image')} and {counted(self.unchanged_conditioning, 'conditioning image')}"


def loss_mask_line(usable: list[Example], config: DataConfig) -> str:
    """How many images are masked and how much of them trains: a mask that is nearly all white or black shows."""
    settings = config.loss_mask
    where = "their transparency" if settings.source == "alpha" else f"files in each folder's {settings.folder}/"
    areas = sorted(example.mask_area for example in usable if example.mask_area is not None)
    unmasked = [folder.path for folder in config.folders if not folder.loss_mask]
    line = f"loss masks ({where}): {len(areas)} of {counted(len(usable), 'image')} masked" + (f" (unmasked folders: {', '.join(unmasked)})" if unmasked else "")
    if areas:
        low, high, mean = (f"{100 * share:.0f}" for share in (areas[0], areas[-1], sum(areas) / len(areas)))
        line += f", trained area {low}%" if low == high else f", trained area {low}-{high}% (mean {mean}%)"  # not "28-28% (mean 28%)"
    return line + f"; background weight {settings.unmasked_weight:g}"


def folder_shares_line(usable: list[Example], config: DataConfig) -> str:
    """How much each data.folders entry weighs in an epoch: the balance its repeats are there to set."""
    images, uses = [0] * len(config.folders), [0] * len(config.folders)
    for example in usable:
        images[example.folder_index] += 1
        uses[example.folder_index] += example.repeats
    total = max(sum(uses), 1)
    paths = [folder.path for folder in config.folders]
    labels = [f"'{f.path}'" + (f" ({f.template or 'captions'})" if paths.count(f.path) > 1 else "") for f in config.folders]
    shares = [f"{label} {n} x{folder.repeats} = {u} ({100 * u / total:.0f}%)" for label, folder, n, u in zip(labels, config.folders, images, uses)]
    return "uses per epoch by folder: " + ", ".join(shares)


# ---------------------------------------------------------------------------------------------------
# One image


def inspect(example: Example, config: DataConfig, record: CheckRecord | None = None) -> tuple[Example | None, list[Finding], str | None]:
    """(the example with its size, or None if unusable; findings; a hash of its decoded pixels). `record`: the files' facts kept
    from an earlier check, taken for a file whose stamp is as kept instead of decoding it (finetune/data_check/check_record.py)."""
    source, findings = example.source, []
    # Said once the file decodes: a text file named .jpg is told it is no image, not to get a caption as well.
    no_caption = [Finding(FATAL, source, missing_caption_message(source, caption_alternative(config, example.folder_index)))] if example.caption is None else []
    if example.caption is not None:
        if message := empty_caption_message(source, example.caption, config, example.folder_index) or list_text_message(source, example.caption):
            findings.append(Finding(WARNING, source, message))
        elif len(lines := caption_lines(example.caption)) > 1:
            message = (f"image {source}: caption of {len(lines)} lines" + (" (or list entries)" if dataset_of_row(source) else "") + ", each a caption of "
                       "its own: one line trains each epoch (to train them together, join them with commas on one line)")  # fmt: skip
            findings.append(Finding(CONVERTED, source, message))
    stamp = file_stamp(source)  # before decoding: an edit while it decodes shows as a changed file
    with_alpha = config.loss_mask.enabled and config.loss_mask.source == "alpha"
    if (facts := record.facts(source, stamp, ImageFacts, with_alpha) if record is not None else None) is None:
        try:
            with pillow_warnings() as heard:  # said in the summary, naming the image (Pillow's own lines name none)
                raw = decode(example)
                if message := float_levels_problem(raw, f"image {source}"):
                    return None, no_caption + findings + [Finding(FATAL, source, message)], None  # it decodes: both are said
                image = upright_rgb(raw)  # reads its EXIF and converts its palette: the warnings are of these
        except FinetuneError as err:
            return None, findings + [Finding(FATAL, source, str(err))], None
        except Exception as err:  # a file that decodes but cannot be converted
            message = f"image {source} cannot be converted to RGB ({err.__class__.__name__}: {err}): re-save it as PNG or JPEG"
            return None, no_caption + findings + [Finding(FATAL, source, message)], None
        facts = image_facts(raw, image, heard, with_alpha)
        if record is not None:
            record.keep(source, stamp, facts)
    findings = no_caption + findings
    if facts.heard:
        findings.append(Finding(WARNING, source, pillow_warning_line(source, list(facts.heard))))
    width, height = facts.size
    if (message := too_small_problem(source, width, height, config)) is not None:
        findings.append(Finding(FATAL, source, message))
    example = replace(example, size=(width, height), digest=facts.digest, file_stamp=stamp)
    if config.loss_mask.enabled:
        example, mask_findings = inspect_loss_mask(example, facts, config, record)
        findings += mask_findings
    alpha_is_mask = config.loss_mask.source == "alpha" and example.load_mask is not None  # some of it is transparent, and that masks
    findings += [Finding(CONVERTED, source, f"image {source}: {what}") for what in (facts.conversions_as_mask if alpha_is_mask else facts.conversions)]
    usable = None if any(f.level == FATAL for f in findings) else example
    return usable, findings, facts.digest


def image_facts(raw, image, heard: list[str], with_alpha: bool) -> ImageFacts:
    """What the check reads from an image, decoded (`raw`) and upright RGB (`image`), which its record keeps;
    `with_alpha`: its transparency is read too (data.loss_mask.source alpha)."""
    alpha = None
    if with_alpha and has_alpha(raw) and (mask := alpha_mask(raw)).getextrema()[0] < 255:  # one opaque everywhere masks nothing
        alpha = (mask_area(mask), mask_digest(mask))
    plain = tuple(conversions(raw))
    return ImageFacts(size=image.size, digest=pixel_digest(image), heard=tuple(heard), conversions=plain,
                      conversions_as_mask=tuple(conversions(raw, alpha_is_mask=True)) if has_alpha(raw) else plain,
                      turned=turned_on_its_side(raw), alpha_read=with_alpha, alpha=alpha)  # fmt: skip


def too_small_problem(source: str, width: int, height: int, config: DataConfig) -> str | None:
    """Why an image is too small to train, or None. Every way out is named (an upscaled file passes too; with the
    default limit, half of data.resolution, so does a lower resolution), not only a lower data.min_image_size."""
    min_size = config.min_image_size or config.resolution // 2
    if min(width, height) >= min_size:
        return None
    limit, lower = ("data.min_image_size", "or lower data.min_image_size") if config.min_image_size else (
        f"half of data.resolution {config.resolution}", "lower data.min_image_size, or train at a lower data.resolution")
    return f"image {source} is {width}x{height}, smaller than {min_size} px on its short side ({limit}): remove it, upscale it to {min_size} px or more, {lower}"


# ---------------------------------------------------------------------------------------------------
# A dataset


def inspect_examples(examples: list[Example], config: DataConfig, label: str, record: CheckRecord | None = None) -> DataReport:
    """Check every example; never raises for a bad image (see `check_examples`). `record`: see `inspect`."""
    report = DataReport(label=label, config=config, found=len(examples))
    by_hash: dict[str, list[str]] = {}
    taken_before = record.taken[ImageFacts] if record is not None else 0
    checked = each_on_threads(lambda e: inspect(e, config, record), examples, f"checking {label}")
    report.unchanged = record.taken[ImageFacts] - taken_before if record is not None else 0
    for example, (usable, findings, digest) in zip(examples, checked):
        report.findings += findings
        if usable is not None:
            report.usable.append(usable)
        if digest is not None and example.source not in by_hash.get(digest, []):  # one file in two data.folders entries is no copy
            by_hash.setdefault(digest, []).append(example.source)
    targets = report.bucket_of or [(config.resolution, config.resolution)] * len(report.usable)
    for example, (width, height) in zip(report.usable, targets):
        scale = max(width / example.size[0], height / example.size[1])
        if scale > 1.0:
            message = (
                f"image {example.source} is {example.size[0]}x{example.size[1]}, upscaled {scale:.2f}x to cover "
                f"{width}x{height}: it may train soft"
            ) + (f" ({no_upscale_advice(example.size, config)})" if config.bucketing.enabled and config.bucketing.no_upscale else "")
            report.findings.append(Finding(WARNING, example.source, message))
        kept = (width / scale) * (height / scale) / (example.size[0] * example.size[1])  # the crop's share of the image
        if kept < 0.5:
            message = (f"image {example.source} is {example.size[0]}x{example.size[1]}: its {width}x{height} {config.crop} crop keeps {kept:.0%} of it"
                       + ("" if config.bucketing.enabled else "; data.bucketing.enabled: true trains it near its own shape"))  # fmt: skip
            report.findings.append(Finding(WARNING, example.source, message))
    report.findings += masks_out_of_view(report, targets)
    report.findings = turns_together(report.findings, report.label)
    # Copies among the images that train: not a skipped one, nor one the masks' check took out.
    trained = {example.source for example in report.usable}
    for sources in by_hash.values():
        sources = [source for source in sources if source in trained]
        if len(sources) > 1:
            others = ", ".join(sources[1:6]) + (f" and {len(sources) - 6} more" if len(sources) > 6 else "")
            message = f"image {sources[0]} has the same pixels as {others}: each copy trains as its own image ({_copies_remedy(config)})"
            report.findings.append(Finding(WARNING, sources[0], message))
    report.findings += [Finding(WARNING, str(folder), message) for folder, message in folder_warnings(config)]
    report.notes += [line for folder in data_folders(config) if (line := unread_captions_line(folder, config))]
    if message := image_dir_advice(config):
        report.findings.append(Finding(WARNING, report.label, message))
    if config.skip_bad_images:
        skip_fatal(report)
    return report


def turns_together(findings: list[Finding], label: str) -> list[Finding]:
    """The images turned by their EXIF orientation, past TURNED_NAMED, said in one line where the first was."""
    turns = [finding for finding in findings if finding.level == CONVERTED and is_turn(finding.source, finding.message)]
    if len(turns) <= TURNED_NAMED:
        return findings
    turned = {id(turn) for turn in turns}
    at = findings.index(turns[0])
    rest = [finding for finding in findings if id(finding) not in turned]
    return rest[:at] + [Finding(CONVERTED, label, turns_line([turn.source for turn in turns]))] + rest[at:]


def _copies_remedy(config: DataConfig) -> str:
    """What to do about copies of an image: data.folders repeats only where there are folders to list."""
    if config.dataset is not None:
        return "remove the copies' rows"
    concept = config.dreambooth_concept  # a DreamBooth concept has repeats of its own
    return f"remove copies, or raise {concept}.repeats" if concept else "remove copies, or use data.folders repeats"


def masks_out_of_view(report: DataReport, targets: list[Size]) -> list[Finding]:
    """Findings for masks that train nothing as the data is read: a centre crop (or bucket) that leaves the whole
    mask out (a random crop finds it at times), or source alpha with no transparency at all (fatal), or in some images
    (one warning for them all).
    The images whose crop leaves their mask out are taken out of `report.usable` too."""
    config, findings = report.config, []
    if not config.loss_mask.enabled:
        return []
    opaque = opaque_images(report.usable, config)
    whole = [Finding(WARNING, report.label, opaque_images_warning(opaque))] if opaque else []
    if config.loss_mask.unmasked_weight > 0.0:
        return whole
    if config.loss_mask.source == "alpha" and report.usable and all(example.mask_area is None for example in report.usable):
        concept = config.dreambooth_concept
        message = (f"{report.label}: data.loss_mask.source alpha, and {f'none of its {len(report.usable)} images has' if len(report.usable) > 1 else 'its one image has no'} transparency, so none is "
                   "masked: save cut-outs with an alpha channel, or use source files"
                   + (f", or set {concept}.loss_mask: false to train this concept whole" if concept else ""))  # fmt: skip
        return [Finding(FATAL, report.label, message)]
    if config.crop == "random":
        return whole
    findings, blind = whole, []
    for example, target in zip(report.usable, targets):
        if example.load_mask is not None:
            resized, top_left = plan_cover_crop(example.size, target, "center", None)
            if mask_area(cut(example.load_mask(), resized, top_left, target)) == 0.0:
                blind.append(example)
                message = (f"image {example.source}: its loss mask is black everywhere in its centre crop to {target[0]}x{target[1]}, so it would "
                           "train nothing: set data.crop: random, or widen the mask")  # fmt: skip
                findings.append(Finding(FATAL, example.source, message))
    report.usable = [example for example in report.usable if not any(example is other for other in blind)]
    return findings


def skip_fatal(report: DataReport) -> None:
    """data.skip_bad_images: fatal findings become the skipped list (their images are not in `usable`)."""
    skipped = [finding for finding in report.of_level(FATAL) if finding.source != report.label]  # findings about the whole dataset stay
    report.skipped += skipped
    report.skipping = True
    report.findings = [finding for finding in report.findings if not any(finding is other for other in skipped)]


def check_examples(examples: list[Example], config: DataConfig, label: str = "data", record: CheckRecord | None = None) -> DataReport:
    """Inspect, then stop on the first fatal problem with a one-line error (unless bad images are skipped)."""
    return stop_unless_trainable(inspect_examples(examples, config, label, record))


def stop_unless_trainable(report: DataReport) -> DataReport:
    """Raise a one-line error for the first fatal finding, or when every image was skipped."""
    label = report.label
    fatal = report.of_level(FATAL)
    if fatal:
        others = len(fatal) - 1
        more = f" ({others} more problem{'s' if others > 1 else ''}: finetune check-data lists {'them' if others > 1 else 'it'})" if others else ""
        hint = "" if fatal[0].source == label else f", {SKIP_HINT}"  # about the whole dataset: skipping images is no fix
        raise FinetuneError(f"{fatal[0].message}{hint}{more}")
    if not report.usable:
        raise FinetuneError(f"{label}: no image is usable ({counted(report.found, 'image')} skipped as bad: {report.skipped[0].message}): fix them")
    return report


def data_label(config: DataConfig) -> str:
    return f"data folder {config.image_dir}" if config.image_dir else f"dataset {config.dataset}"


def checked_report(config: DataConfig, record: CheckRecord | None = None) -> DataReport:
    """The data's report, as training prints it at its start, after a one-line stop on the first fatal problem (made once
    in a `finetune train`: its command checks before torch loads, train() takes that, finetune/data_check/checked_once.py).
    `record`: the command's record of the files checked before (`inspect`); the report is the same with or without it."""
    key = f"{config.model_dump_json()} {config._image_dir_key} {config._caption_alternative} {config._repeats} {config._class_dirs}"  # and what names it
    return kept_check(key, lambda: check_examples(read_examples(config), config, data_label(config), record))


def checked_examples(config: DataConfig) -> tuple[list[Example], DataReport]:
    """The training examples (repeats expanded) and the report training prints at its start."""
    report = checked_report(config)
    return expand_repeats(report.usable), report

