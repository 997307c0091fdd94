"""One pass over the training data before any model loads, and one summary of what it found.

Unreadable images are dropped from manifests and folders here, named once, instead of warning on
every draw and shrinking batches; small images, files that are not read, caption files that are not
UTF-8, captions without the subject word and captions that fall back to the template are counted
and named. Tar shards are streamed through once the same way (records that fail stay in the stream
as skipped samples, so resume positions never depend on which images fail).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .data import (
    PREFIX,
    CaptionRule,
    DataReport,
    Record,
    describe_source,
    iter_tar_records,
    read_folder,
    read_manifest,
)
from .images import BadImage, probe_image

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
    no_subject: list[str] = field(default_factory=list)  # keys whose caption lacks the subject word
    template: int = 0  # records without a caption (the template is used)
    report: DataReport = field(default_factory=DataReport)

    @property
    def readable(self) -> int:
        return self.total - len(self.unreadable)

    def summary(self, min_size: int) -> str:
        """One readable block: counts first, then the names behind each problem."""

        def names(items: Sequence[str]) -> str:
            more = f" ... and {len(items) - SHOW} more" if len(items) > SHOW else ""
            return "; ".join(items[:SHOW]) + more

        r = self.report
        lines = [
            f"{PREFIX} training data ({self.kind}): {self.readable} readable, "
            f"{len(self.unreadable)} unreadable "
            f"(skipped), {len(r.ignored)} files ignored, {len(self.small)} smaller than {min_size} px, "
            f"{self.template} captions from the template, "
            f"{len(self.no_subject)} captions without the subject "
            f"word (template put in front), {len(r.text_problems)} caption/manifest files not UTF-8, "
            f"{len(r.bad_lines)} manifest lines skipped."
        ]
        for title, items in (
            ("unreadable", self.unreadable),
            ("ignored (not an image, mask or caption)", r.ignored),
            (f"smaller than --min_image_size {min_size} px (upscaled for training)", self.small),
            ("not UTF-8", r.text_problems),
            ("manifest lines skipped", r.bad_lines),
            ("captions without the subject word", self.no_subject),
        ):
            if items:
                lines.append(f"  {title}: {names(items)}")
        return "\n".join(lines)

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
    kind = captions.kind(record.caption, record.subject)
    if kind == "template":
        result.template += 1
    elif kind == "no subject word":
        result.no_subject.append(record.key)
    return True


def scan_data(
    train_data: str,
    captions: CaptionRule,
    *,
    min_size: int,
    max_samples: Optional[int] = None,
    progress: bool = True,
) -> ScanResult:
    """Read the records of `train_data` and check every image once; logs the summary (when `progress`,
    i.e. on the main process) and returns it."""
    from tqdm.auto import tqdm

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
        (log.warning if result.has_problems else log.info)(result.summary(min_size))
    return result
