"""The two-subject mode of the evaluation: two people in one image, and how much of each one's identity leaks
into the other (`python -m training.evaluate --two_subjects`).

Subjects are taken in pairs (the 1st and 2nd, the 3rd and 4th, ...). For each pair, prompt and seed, one
image per method: the prior (no subject), and nested attention at each λ with each region method:
- none: both subjects on the whole image (each on its own word of the prompt);
- manual: subject A confined to the left half, B to the right half (the Apply node's MASK; the shipped
  "Nested Attention - two people, left and right" workflow makes the same halves with core mask nodes);
- auto: each subject's region from its own word's cross-attention during the first steps (the Apply node's
  `region: auto`: `SubjectBinding(auto_region=True)`, whose per-run wrapper `host.install_subject` adds).
Both subjects are bound by the same encoder, one word each (`--pair_words`, default "man" "woman" for faces),
installed exactly as two chained Apply nodes install them (`host.install_subject`).

Scores per image: every detected face is embedded; the two largest are matched one to one to the two
subjects (the matching that maximizes the summed similarity; one face goes to the subject it resembles
more). For each subject: `identity_own` = its face's cosine to its own reference photo, `identity_other` =
the same face's cosine to the other subject's photo (leakage). A subject with no face matched is a failure
(`face_found` false), counted, never dropped. Because the matching picks the better assignment, `own` is
at least `other` on average even when the identities blend: compare the gap between region methods, not
its sign. CLIP-T is measured on the prompt without both subject words. CLIP-I is not (one image holds both
subjects).
"""

from __future__ import annotations

import csv
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nested_attention.logs import LOG_PREFIX as PREFIX
from nested_attention.patch import SubjectBinding
from training.evaluation import report
from training.evaluation.method_images import Generator, load_png, sample_image, save_png, shard
from training.evaluation.metrics import Scorers, cosine
from training.evaluation.pipeline import gather_on_main, process_info
from training.evaluation.prompts import PLACEHOLDER, EvalPrompt
from training.models.sampling import prompt_positions
from training.models.sdxl import TextEncoder

log = logging.getLogger(__name__)

REGIONS = ("none", "manual", "auto")
PAIR_WORDS = {"faces": ("man", "woman"), "tiny": ("pet", "toy")}  # subject A's word, subject B's word


# ------------------------------------------------------------------------------------------------
# Prompts, regions, methods, jobs


@dataclass(frozen=True)
class PairPrompt:
    template: str  # {a} and {b} where the two subjects' words go
    category: str = "custom"

    def render(self, words: Sequence[str]) -> str:
        return self.template.replace("{a}", words[0]).replace("{b}", words[1])

    def without_subjects(self) -> str:
        """The text CLIP-T compares with: "a {a} and a {b}" removed as one subject's "a {token}" is."""
        joined = re.sub(
            r"\{a\}\s+and\s+(?:(?:a|an|the)\s+)?\{b\}", PLACEHOLDER, self.template, flags=re.IGNORECASE
        )
        return EvalPrompt(joined.replace("{a}", PLACEHOLDER).replace("{b}", PLACEHOLDER)).without_subject()


PAIR_PROMPTS: tuple[PairPrompt, ...] = (
    PairPrompt("a photo of a {a} and a {b} sitting side by side on a park bench", "scene"),
    PairPrompt("a {a} and a {b} standing next to each other on the beach at sunset", "scene"),
    PairPrompt("a photo of a {a} and a {b} laughing together", "expression"),
    PairPrompt("an oil painting of a {a} and a {b}", "style"),
)
TINY_PAIR_PROMPTS: tuple[PairPrompt, ...] = (
    PairPrompt("a {a} and a {b} side by side", "scene"),
    PairPrompt("an oil painting of a {a} and a {b}", "style"),
)


def manual_regions(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) halves as (height, width) masks in [0, 1], 1 = the subject's region."""
    left = torch.zeros(height, width)
    left[:, : width // 2] = 1.0
    return left, 1.0 - left


@dataclass(frozen=True, order=True)
class PairMethod:
    kind: str  # "prior" (no subject) or "nested"
    region: str = ""  # none / manual / auto for nested
    value: float | None = None  # λ

    @property
    def label(self) -> str:
        return "prior (no subject)" if self.kind == "prior" else f"regions {self.region}, λ={self.value:g}"

    @property
    def slug(self) -> str:
        return "prior" if self.kind == "prior" else f"pair-{self.region}-lambda-{self.value:g}"


def pair_methods(*, prior: bool, lambdas: Sequence[float], regions: Sequence[str]) -> list[PairMethod]:
    return ([PairMethod("prior")] if prior else []) + [
        PairMethod("nested", region, float(value)) for region in regions for value in lambdas
    ]


@dataclass(frozen=True)
class PairJob:
    method: PairMethod
    pair: int
    prompt: int
    seed: int

    def relpath(self, pairs: Sequence[tuple[str, str]]) -> str:
        who = "_no-subject" if self.method.kind == "prior" else "+".join(pairs[self.pair])
        return f"images/{self.method.slug}/{who}/p{self.prompt:02d}-seed{self.seed}.png"


def make_pair_jobs(
    methods: Sequence[PairMethod], pairs: int, prompts: int, seeds: Sequence[int]
) -> list[PairJob]:
    """Every image, in a fixed order; the prior does not depend on the pair (pair 0 stands for all)."""
    return [
        PairJob(method, pair, prompt, int(seed))
        for method in methods
        for pair in ([0] if method.kind == "prior" else range(pairs))
        for prompt in range(prompts)
        for seed in seeds
    ]


def pair_up(count: int) -> list[tuple[int, int]]:
    """The subjects' pairs: (0, 1), (2, 3), ...; an odd last subject has no partner and is left out."""
    if count < 2:
        raise ValueError(f"the two-subject mode needs at least two subjects; found {count}.")
    if count % 2:
        log.warning("%s %d subjects: the last one has no partner and is left out of the pairs", PREFIX, count)
    return [(i, i + 1) for i in range(0, count - 1, 2)]


# ------------------------------------------------------------------------------------------------
# Generation


class PairGenerator:
    """Makes a two-subject job's image; shares the one-subject Generator's models, tokens and conditioning."""

    def __init__(
        self,
        base: Generator,
        pairs: Sequence[tuple[int, int]],
        prompts: Sequence[PairPrompt],
        words: Sequence[str],
    ):
        self.base, self.pairs, self.prompts, self.words = base, list(pairs), list(prompts), tuple(words)
        self.texts = [TextEncoder(base.frozen.clip, word) for word in self.words]

    def bindings(
        self, job: PairJob, masks: Sequence[torch.Tensor | None], auto: bool = False
    ) -> list[SubjectBinding]:
        prompt = self.prompts[job.prompt].render(self.words)
        out = []
        for subject, word, text, mask in zip(self.pairs[job.pair], self.words, self.texts, masks):
            positions, prompt_tokens = prompt_positions(text, prompt)
            if not positions:
                raise ValueError(
                    f"the prompt {prompt!r} does not contain the word {word!r} as a whole word; every "
                    "two-subject prompt needs {a} and {b} once each."
                )
            out.append(
                SubjectBinding(
                    encoder=self.base.encoder,
                    tokens=self.base.tokens(subject),
                    positions=positions,
                    prompt_tokens=prompt_tokens,
                    lam=float(job.method.value),
                    mask=mask,
                    auto_region=auto,
                    name=word,
                )
            )
        return out

    def model(self, job: PairJob) -> Any:
        from nested_attention_comfy.model import install_subject

        frozen, encoder = self.base.frozen, self.base.encoder
        if job.method.kind == "prior":
            return frozen.unet
        region = job.method.region
        side = self.base.settings.resolution // 8
        masks = manual_regions(side, side) if region == "manual" else (None, None)
        model = frozen.unet.clone()
        # As two chained Apply nodes install them: one patch per layer, holding both subjects.
        # auto: install_subject adds the per-run wrapper that finds the regions during the first steps.
        for binding in self.bindings(job, masks, auto=region == "auto"):
            install_subject(model, binding, encoder.layers)
        return model

    def generate(self, job: PairJob) -> torch.Tensor:
        prompt = self.prompts[job.prompt].render(self.words)
        base = self.base
        return sample_image(
            base.frozen,
            self.model(job),
            base.conditioning(prompt),
            base.conditioning(base.settings.negative_prompt),
            job.seed,
            base.settings,
        )


# ------------------------------------------------------------------------------------------------
# Scores


def match_faces(similarity: torch.Tensor) -> dict[int, int]:
    """{subject: face} from a (faces, 2) similarity matrix of at most two faces: the one-to-one matching with
    the larger summed similarity; a single face goes to the subject it resembles more."""
    if similarity.shape[0] == 0:
        return {}
    if similarity.shape[0] == 1:
        return {int(similarity[0].argmax()): 0}
    straight = float(similarity[0, 0] + similarity[1, 1])
    crossed = float(similarity[1, 0] + similarity[0, 1])
    return {0: 0, 1: 1} if straight >= crossed else {0: 1, 1: 0}


def identity_columns(scorers: Scorers) -> tuple[str, str]:
    name = scorers.identity.name
    return f"identity_own[{name}]", f"identity_other[{name}]"


def score_pair_image(image: torch.Tensor, scorers: Scorers, references: Sequence[torch.Tensor]) -> list[dict]:
    """Two dicts, one per subject of the pair: its face's cosine to its own and to the other reference."""
    own, other = identity_columns(scorers)
    faces = scorers.identity.embed_faces(image)[:2]
    rows = [
        {"faces_detected": len(faces), "face_found": False, own: None, other: None, "face_box": ""}
        for _ in references
    ]
    if faces:
        similarity = torch.tensor(
            [[float(cosine(e, r)) for r in references] for _, e in faces], dtype=torch.float64
        )
        for subject, face in match_faces(similarity).items():
            box = faces[face][0]
            rows[subject].update(
                {
                    "face_found": True,
                    own: float(similarity[face, subject]),
                    other: float(similarity[face, 1 - subject]),
                    "face_box": f"{box.left},{box.top},{box.right},{box.bottom}",
                }
            )
    return rows


PAIR_COLUMNS = [
    "method",
    "region",
    "parameter",
    "value",
    "pair",
    "subject",
    "other_subject",
    "word",
    "prompt_index",
    "category",
    "prompt",
    "clip_t_text",
    "seed",
    "image",
    "faces_detected",
    "face_box",
    "face_found",
]


def summarize_pairs(rows: Sequence[dict], metrics: Sequence[str]) -> list[dict]:
    """Means per method setting (prior; nested per region and λ), face failures beside them, and the gap
    own − other (how much more each face resembles its own subject than the other one)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(
            (
                row["method"] != "prior",
                REGIONS.index(row["region"]) if row["region"] else -1,
                row["value"] or 0.0,
            ),
            [],
        ).append(row)
    out = []
    for _, items in sorted(groups.items()):
        first = items[0]
        entry: dict[str, Any] = {k: first[k] for k in ("method", "region", "parameter", "value")}
        entry.update(rows=len(items), images=len({r["image"] for r in items}))
        for name in metrics:
            entry[name] = report.mean([r.get(name) for r in items])
        found = [bool(r["face_found"]) for r in items]
        entry["face_failures"] = found.count(False)
        entry["face_failure_rate"] = found.count(False) / len(found)
        own, other = (
            next(m for m in metrics if m.startswith(p)) for p in ("identity_own[", "identity_other[")
        )
        entry["identity_gap"] = None if entry[own] is None else entry[own] - entry[other]
        out.append(entry)
    return out


def write_pair_csvs(
    rows: Sequence[dict], summary: Sequence[dict], metrics: Sequence[str], output_dir: Path
) -> None:
    columns = PAIR_COLUMNS + list(metrics)
    for path, items, names in (
        (output_dir / "metrics.csv", rows, columns),
        (
            output_dir / "summary.csv",
            summary,
            [
                "method",
                "region",
                "parameter",
                "value",
                "rows",
                "images",
                *metrics,
                "identity_gap",
                "face_failures",
                "face_failure_rate",
            ],
        ),
    ):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
            writer.writeheader()
            for item in items:
                writer.writerow({k: ("" if item.get(k) is None else item.get(k)) for k in names})


def plot_leakage(summary: Sequence[dict], own: str, other: str, path: Path, title: str = "") -> Path:
    """Own-identity against other-identity per method setting: a marker per region method, a point per λ;
    the diagonal is where a face resembles both subjects alike (identities blend)."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    styles = {"none": ("tab:red", "o"), "manual": ("tab:blue", "s"), "auto": ("tab:green", "^")}
    for region, (colour, marker) in styles.items():
        points = [e for e in summary if e["region"] == region and e.get(own) is not None]
        if not points:
            continue
        ax.plot(
            [e[other] for e in points],
            [e[own] for e in points],
            color=colour,
            marker=marker,
            label=f"regions: {region}",
        )
        lift = 4 + 11 * list(styles).index(region)  # each region method's labels on their own line
        for n, e in enumerate(points):
            note = f"λ={e['value']:g}" + (
                f", {e['face_failures']}/{e['rows']} no face" if e["face_failures"] else ""
            )
            offset = (5, lift if n % 2 == 0 else -lift - 7)  # alternating above and below, as in tradeoff.png
            ax.annotate(
                note, (e[other], e[own]), textcoords="offset points", xytext=offset, fontsize=7, color=colour
            )
    for e in summary:
        if e["method"] == "prior" and e.get(own) is not None:
            ax.scatter(
                [e[other]], [e[own]], color="tab:gray", marker="x", s=60, label="prior (no subject)", zorder=3
            )
    points = [(e[other], e[own]) for e in summary if e.get(own) is not None and e.get(other) is not None]
    for axis, values in ((ax.set_xlim, [p[0] for p in points]), (ax.set_ylim, [p[1] for p in points])):
        if values:  # the axes fit the points (the diagonal would stretch them to the origin)
            pad = max(0.15 * (max(values) - min(values)), 0.01)
            axis(min(values) - pad, max(values) + pad)
    # The diagonal where a face resembles both photos alike (out of view when every face is nearer its own).
    ax.axline(
        (0.0, 0.0),
        slope=1.0,
        color="gray",
        linestyle=":",
        linewidth=1,
        label="own = other (identities blend)",
    )
    ax.set_xlabel(f"leakage: the face against the OTHER subject's photo, {other}, cosine", fontsize=8)
    ax.set_ylabel(f"identity: the face against its OWN subject's photo, {own}, cosine", fontsize=8)
    return report.save_figure(fig, ax, path, title)


# ------------------------------------------------------------------------------------------------
# One two-subject evaluation from start to end


def score_pair_job(job: PairJob, output_dir: Path, generator: PairGenerator, scorers: Scorers,
                   references: Sequence[Any], names: Sequence[tuple]) -> list[dict]:
    """The rows of one generated image: CLIP-T once, then each subject of its pair (every pair for the prior,
    which has none) against its own and its partner's photo."""
    subjects, pairs, prompts, words = generator.base.subjects, generator.pairs, generator.prompts, generator.words
    relpath = job.relpath(names)
    image = load_png(output_dir / relpath)
    prompt = prompts[job.prompt]
    common = {
        "method": job.method.kind,
        "region": job.method.region,
        "parameter": "lambda" if job.method.kind == "nested" else None,
        "value": job.method.value,
        "prompt_index": job.prompt,
        "category": prompt.category,
        "prompt": prompt.render(words),
        "clip_t_text": prompt.without_subjects(),
        "seed": job.seed,
        "image": relpath,
    }
    common.update(scorers.prompt_scores(image, prompt.without_subjects()))
    rows = []
    for pair in range(len(pairs)) if job.method.kind == "prior" else [job.pair]:
        a, b = pairs[pair]
        for k, row in enumerate(score_pair_image(image, scorers, [references[a], references[b]])):
            who, partner = (a, b) if k == 0 else (b, a)
            rows.append(
                {
                    **common,
                    **row,
                    "pair": "+".join(names[pair]),
                    "subject": subjects[who].name,
                    "other_subject": subjects[partner].name,
                    "word": words[k],
                }
            )
    return rows


def run_pair_evaluation(
    *,
    generator: PairGenerator,
    scorers: Scorers,
    methods: Sequence[PairMethod],
    seeds: Sequence[int],
    output_dir: Path,
    settings: dict,
    accelerator: Any = None,
    grids: bool = True,
    progress: bool = True,
) -> dict | None:
    """Generate (resuming), score, gather and report, as `pipeline.run_evaluation` does for one subject."""
    if scorers.identity is None:
        raise ValueError("the two-subject mode measures face identity: it needs an identity model.")
    rank, world, is_main = process_info(accelerator)
    base, pairs, prompts, words = generator.base, generator.pairs, generator.prompts, generator.words
    names = [tuple(base.subjects[i].name for i in pair) for pair in pairs]
    jobs = make_pair_jobs(methods, len(pairs), len(prompts), seeds)
    mine = shard(jobs, rank, world)
    references = [scorers.reference(s.image, s.source).identity for s in base.subjects]
    generated = skipped = 0
    started = time.perf_counter()
    for job in tqdm(mine, desc="two-subject generations", disable=not progress):
        path = output_dir / job.relpath(names)
        if path.is_file():
            skipped += 1
            continue
        save_png(generator.generate(job), path)
        generated += 1
    generation_s = time.perf_counter() - started

    rows = []
    for job in tqdm(mine, desc="metrics", disable=not progress or not is_main):
        rows.extend(score_pair_job(job, output_dir, generator, scorers, references, names))
    counts = [{"process": rank, "generated": generated, "skipped": skipped, "generation_s": generation_s}]
    gathered = gather_on_main(rows, counts, accelerator)
    if gathered is None:
        return None
    rows, counts = gathered

    order = {job.relpath(names): i for i, job in enumerate(jobs)}
    rows.sort(key=lambda r: (order[r["image"]], r["pair"], r["word"] != words[0]))
    own, other = identity_columns(scorers)
    metrics = [f"clip_t[{s.name}]" for s in scorers.clip_t] + [own, other]
    summary = summarize_pairs(rows, metrics)
    write_pair_csvs(rows, summary, metrics, output_dir)
    files = {
        "csv": str(output_dir / "metrics.csv"),
        "summary_csv": str(output_dir / "summary.csv"),
        "json": str(output_dir / "metrics.json"),
    }
    title = (
        f"{settings.get('encoder', '')} · {len(pairs)} pair{'s' if len(pairs) != 1 else ''} × "
        f"{len(prompts)} prompts × {len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
    )
    files["plot"] = str(plot_leakage(summary, own, other, output_dir / "leakage.png", title=title))
    if grids:
        files["grids"] = [
            str(p)
            for p in make_pair_grids(
                output_dir, methods, base.subjects, pairs, names, prompts, words, seeds[0]
            )
        ]
    result = {
        "settings": settings,
        "mode": "two_subjects",
        "metrics": metrics,
        "plot_axes": {"x": other, "y": own},
        "processes": counts,
        "generated": sum(c["generated"] for c in counts),
        "skipped": sum(c["skipped"] for c in counts),
        "summary": summary,
        "rows": rows,
        "files": files,
    }
    report.write_json(result, output_dir / "metrics.json")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return result


def make_pair_grids(
    output_dir: Path,
    methods: Sequence[PairMethod],
    subjects: Sequence[Any],
    pairs: Sequence[tuple[int, int]],
    names: Sequence[tuple[str, str]],
    prompts: Sequence[PairPrompt],
    words: Sequence[str],
    seed: int,
) -> list[Path]:
    """One grid per method setting: rows pairs (their two photos first), columns prompts, at `seed`."""
    paths = []
    for method in methods:
        cells, labels = [], []
        for p in [0] if method.kind == "prior" else range(len(pairs)):
            a, b = pairs[p]
            line = (
                [None, None]
                if method.kind == "prior"
                else [subjects[a].image.numpy(), subjects[b].image.numpy()]
            )
            for k in range(len(prompts)):
                file = output_dir / PairJob(method, p, k, seed).relpath(names)
                line.append(load_png(file).numpy() if file.is_file() else None)
            cells.append(line)
            labels.append("no subject" if method.kind == "prior" else f"{names[p][0]} + {names[p][1]}")
        sides = (" (left)", " (right)") if method.region == "manual" else ("", "")
        columns = [words[0] + sides[0], words[1] + sides[1]] + [q.render(words) for q in prompts]
        path = output_dir / "grids" / f"{method.slug}.png"
        report.image_grid(cells, labels, columns, path, title=f"two subjects: {method.label}, seed {seed}")
        paths.append(path)
    return paths
