"""One pass over the training data before any model loads, and one summary of what it found.

Unreadable images are dropped from manifests and folders here, named once, instead of warning on
every draw and shrinking batches; small images, files that are not read, caption files that are not
UTF-8 are counted and named, and the readable records' captions are counted by kind (training.data.captions:
rewritten, already the token, template, no subject word, plural only): the summary is the one place
these counts are reported. Tar shards are streamed through once the same way (records that fail stay
in the stream as skipped samples, so resume positions never depend on which images fail).

`read_training_data` is the run's data step (training.run): tiny's generated data, the caption rule,
this scan, and a refusal when nothing is readable, all before any model loads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from training.data.captions import CAPTION_KINDS, CaptionRule, caption_report
from training.data.dataset import (
    PREFIX,
    DataReport,
    Record,
    SampleConfig,
    describe_source,
    read_folder,
    read_manifest,
)
from training.data.images import IMAGE_EXTENSIONS, BadImage, probe_image
from training.data.shards import iter_tar_records
from training.tiny.models import make_tiny_dataset

log = logging.getLogger(__name__)
SHOW = 10  # names listed per kind of problem; the rest are counted


@dataclass
class ScanResult:
    kind: str  # "manifest" | "folder" | "shards"
    source: object  # the manifest path, the folder, or the list of shards
    records: list[Record]  # the readable records (manifests and folders), in order
    total: int = 0  # records seen
    unreadable: list[str] = field(default_factory=list)  # "key: reason"
    small: list[str] = field(default_factory=list)  # "key (W x H)"
    # keys of the readable records per caption kind (training.data.captions.CAPTION_KINDS)
    captions: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind in CAPTION_KINDS})
    report: DataReport = field(default_factory=DataReport)

    @property
    def readable(self) -> int:
        return self.total - len(self.unreadable)

    @property
    def template(self) -> int:
        """Readable records without a caption (the template is used)."""
        return len(self.captions["template"])

    @property
    def no_subject(self) -> list[str]:
        """Keys of readable records whose caption has no subject word (the template is put in front)."""
        return self.captions["no_subject"]

    def summary(self, min_size: int, rule: CaptionRule) -> str:
        """One readable block: counts first, then the names behind each problem."""

        def names(items: Sequence[str]) -> str:
            more = f" ... and {len(items) - SHOW} more" if len(items) > SHOW else ""
            return "; ".join(items[:SHOW]) + more

        r = self.report
        lines = [
            (
                f"{PREFIX} training data ({self.kind}): {self.readable} readable, "
                f"{len(self.unreadable)} unreadable "
                f"(skipped), {len(r.ignored)} files ignored, {len(self.small)} smaller than {min_size} px, "
                f"{len(r.text_problems)} caption/manifest files not UTF-8, "
                f"{len(r.bad_lines)} manifest lines skipped."
            ),
            caption_report(rule, self.captions, self.what, examples=SHOW),
        ]
        for title, items in (
            ("unreadable", self.unreadable),
            ("ignored (not an image, mask or caption)", r.ignored),
            (f"smaller than --min_image_size {min_size} px (upscaled for training)", self.small),
            ("not UTF-8", r.text_problems),
            ("manifest lines skipped", r.bad_lines),
        ):
            if items:
                lines.append(f"  {title}: {names(items)}")
        return "\n".join(lines)

    @property
    def what(self) -> str:
        """Which records the caption counts cover (the readable ones)."""
        return f"{self.readable} " + ("samples of the shards" if self.kind == "shards" else "records")

    @property
    def has_problems(self) -> bool:
        r = self.report
        return bool(self.unreadable or self.small or r.ignored or r.text_problems or r.bad_lines)


def _check(record: Record, captions: CaptionRule, min_size: int, result: ScanResult) -> bool:
    result.total += 1
    try:
        sizes = [probe_image(record.input, record.mask)]
        if record.target is not None:
            sizes.append(probe_image(record.target))
    except BadImage as e:
        result.unreadable.append(f"{record.key}: {e}")
        return False
    if min(min(size) for size in sizes) < min_size:
        result.small.append(f"{record.key} ({' / '.join(f'{w}x{h}' for w, h in sizes)})")
    result.captions[captions.classify(record.caption, record.subject)].append(record.key)
    return True


def scan_data(
    train_data: str,
    captions: CaptionRule,
    *,
    min_size: int,
    max_samples: int | None = None,
    progress: bool = True,
) -> ScanResult:
    """Read the records of `train_data` and check every image once; logs the summary (when `progress`,
    i.e. on the main process) and returns it."""
    kind, source = describe_source(train_data)
    report = DataReport()
    if kind == "shards":
        result = ScanResult(kind=kind, source=source, records=[], report=report)
        bar = tqdm(desc="scanning shards", unit="sample", disable=not progress)
        for shard in source:
            for record in iter_tar_records(shard):
                if record is None:  # no input image: counted as unreadable under the shard's name
                    result.total += 1
                    result.unreadable.append(f"{Path(shard).name}: a sample without an input image")
                else:
                    _check(record, captions, min_size, result)
                bar.update(1)
        bar.close()
    else:
        records = read_manifest(source, report) if kind == "manifest" else read_folder(source, report)
        if max_samples is not None:
            records = records[:max_samples]
        result = ScanResult(kind=kind, source=source, records=[], report=report)
        for record in tqdm(records, desc="scanning images", unit="image", disable=not progress):
            if _check(record, captions, min_size, result):
                result.records.append(record)
    if progress:
        (log.warning if result.has_problems else log.info)(result.summary(min_size, captions))
    return result


# ------------------------------------------------------------------------------------------------
# The run's data step


@dataclass(frozen=True)
class TrainingData:
    """The data found: its kind, where it is, its readable records (none for streamed shards), how captions
    are made, and the scan's result."""

    kind: str  # "manifest", "folder" or "shards"
    path: str  # what --train_data named (or the generated tiny data)
    source: Any  # describe_source's answer: a manifest path, a folder, or shard paths
    records: list  # data.Record, in order (empty for shards); unreadable images already dropped
    captions: CaptionRule  # the subject words that become the token, the template
    scan: ScanResult  # what the one pass over the data found

    def sample_config(self, config: Any, clip_size: int):
        """data.SampleConfig: how samples are made (resolution, crops, captions, seed) for this CLIP size."""
        return SampleConfig(
            resolution=config.resolution,
            clip_size=clip_size,
            center_crop=config.center_crop,
            random_flip=config.random_flip,
            captions=self.captions,
            seed=config.seed,
        )


def read_training_data(config: Any, accelerator) -> TrainingData:
    """Read and check the run's data once, before any model loads (one summary, caption counts included;
    unreadable images dropped). --domain tiny without --train_data generates its data first."""
    path = config.train_data
    if path is None:  # only --domain tiny gets here (resolve_inputs defaulted the others)

        path = str(Path(config.output_dir) / "tiny-data")
        if accelerator.is_main_process:
            make_tiny_dataset(path, size=max(config.resolution, 64))
        accelerator.wait_for_everyone()
    captions = CaptionRule(
        token=config.token,
        subject_words=tuple(config.subject_words) + (config.token,),
        template=config.caption_template,
    )
    found = scan_data(
        path,
        captions,
        min_size=config.min_image_size,
        max_samples=config.max_train_samples,
        progress=accelerator.is_main_process,
    )
    if found.kind != "shards" and not found.records:
        raise SystemExit(
            f"{PREFIX} no readable training images in {path} ({found.kind}); expected "
            f"{', '.join(IMAGE_EXTENSIONS)} files or manifest lines."
        )
    return TrainingData(
        kind=found.kind, path=path, source=found.source, records=found.records, captions=captions, scan=found
    )
