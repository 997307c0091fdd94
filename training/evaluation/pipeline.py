"""One evaluation from start to end: generate the jobs (this process's share), score them, gather, report.

Under accelerate each process generates and scores its share of the job list (`shard`); the rows are
gathered once, at the end, and the main process writes the CSV, the JSON, the plot and the grids.
Images already on disk are not generated again, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from nested_attention.logs import LOG_PREFIX as PREFIX
from training.evaluation import report
from training.evaluation.method_images import (
    Generator,
    Job,
    Method,
    Subject,
    load_png,
    make_jobs,
    save_png,
    shard,
)
from training.evaluation.metrics import Scorers
from training.evaluation.prompts import EvalPrompt

log = logging.getLogger(__name__)


def process_info(accelerator: Any) -> tuple[int, int, bool]:
    if accelerator is None:
        return 0, 1, True
    return accelerator.process_index, accelerator.num_processes, accelerator.is_main_process


def gather_on_main(rows: list, counts: list, accelerator: Any) -> tuple[list, list] | None:
    """Every process's rows and counts, on the main process; None on the others (after waiting for it)."""
    _, world, is_main = process_info(accelerator)
    if world > 1:
        rows, counts = gather_object(rows), gather_object(counts)
    if not is_main:
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return None
    return rows, counts


def axes_for(metrics: Sequence[str]) -> tuple[str | None, str | None]:
    """(x, y) of the trade-off plot: the first CLIP-T space; face identity if measured, else CLIP-I."""
    x = next((m for m in metrics if m.startswith("clip_t[")), None)
    y = next((m for m in metrics if m.startswith("identity[")), None)
    y = y or next((m for m in metrics if m.startswith("clip_i[")), None)
    return x, y


def score_job(
    job: Job,
    image: torch.Tensor,
    scorers: Scorers,
    references: Sequence[Any],
    subjects: Sequence[Subject],
    prompts: Sequence[EvalPrompt],
    token: str,
    relpath: str,
) -> list[dict]:
    """The rows of one generated image: one per subject it is compared with (the prior: every subject)."""
    prompt = prompts[job.prompt]
    base = {
        "method": job.method.kind,
        "parameter": job.method.parameter,
        "value": job.method.value,
        "prompt_index": job.prompt,
        "category": prompt.category,
        "prompt": prompt.render(token),
        "clip_t_text": prompt.without_subject(),
        "seed": job.seed,
        "image": relpath,
    }
    base.update(scorers.prompt_scores(image, prompt.without_subject()))
    rows = []
    for s in range(len(subjects)) if job.subject is None else [job.subject]:
        row = dict(base, subject=subjects[s].name, subject_source=subjects[s].source)
        row.update(scorers.subject_scores(image, references[s]))
        rows.append(row)
    return rows


def make_grids(
    output_dir: Path,
    methods: Sequence[Method],
    subjects: Sequence[Subject],
    prompts: Sequence[EvalPrompt],
    token: str,
    seed: int,
    jobs_relpath,
) -> list[Path]:
    """One labelled grid per method setting: rows subjects (input first), columns prompts, at `seed`."""
    paths = []
    for method in methods:
        who = [None] if method.kind == "prior" else list(range(len(subjects)))
        cells, labels = [], []
        for s in who:
            line = [None if s is None else subjects[s].image.numpy()]
            for p in range(len(prompts)):
                file = output_dir / jobs_relpath(Job(method, s, p, seed))
                line.append(load_png(file).numpy() if file.is_file() else None)
            cells.append(line)
            labels.append("no subject" if s is None else subjects[s].name)
        columns = ["input"] + [p.render(token) for p in prompts]
        path = output_dir / "grids" / f"{method.slug}.png"
        report.image_grid(cells, labels, columns, path, title=f"{method.label}, seed {seed}")
        paths.append(path)
    return paths


def generate_missing(generator: Generator, jobs: Sequence[Job], output_dir: Path, relpath: Any, rank: int,
                     world: int, progress: bool) -> tuple[int, int]:
    """This process's images, those not on disk yet (a resumed run skips the rest); returns (generated,
    skipped)."""
    generated = skipped = 0
    bar = tqdm(
        jobs,
        desc=f"generations (process {rank})" if world > 1 else "generations",
        disable=not progress,
        position=rank if world > 1 else None,
    )
    for job in bar:
        path = output_dir / relpath(job)
        if path.is_file():
            skipped += 1
            continue
        save_png(generator.generate(job), path)
        generated += 1
    bar.close()
    return generated, skipped


def write_report(result: dict, output_dir: Path, summary: list, subjects: Sequence, prompts: Sequence,
                 seeds: Sequence[int]) -> dict:
    """metrics.csv, summary.csv, metrics.json and the trade-off plot (when the figures allow one); returns
    their paths."""
    metrics, settings = result["metrics"], result["settings"]
    x, y = result["plot_axes"]["x"], result["plot_axes"]["y"]
    report.write_csv(result["rows"], metrics, output_dir / "metrics.csv")
    report.write_summary_csv(summary, metrics, output_dir / "summary.csv")
    report.write_json(result, output_dir / "metrics.json")
    paths = {
        "csv": str(output_dir / "metrics.csv"),
        "summary_csv": str(output_dir / "summary.csv"),
        "json": str(output_dir / "metrics.json"),
    }
    if x and y:
        title = (
            f"{settings.get('encoder', '')} · {len(subjects)} subjects × {len(prompts)} prompts × "
            f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
        )
        paths["plot"] = str(report.plot_tradeoff(summary, x, y, output_dir / "tradeoff.png", title=title))
    else:
        log.warning("%s no trade-off plot: it needs a CLIP-T space and an identity or CLIP-I figure", PREFIX)
    return paths


def run_evaluation(
    *,
    generator: Generator,
    scorers: Scorers,
    methods: Sequence[Method],
    seeds: Sequence[int],
    output_dir: Path,
    settings: dict,
    accelerator: Any = None,
    grids: bool = True,
    progress: bool = True,
) -> dict | None:
    """Generate (resuming), score, gather and report. Returns the report (main process) or None."""
    rank, world, is_main = process_info(accelerator)
    subjects, prompts, token = generator.subjects, generator.prompts, generator.token
    jobs = make_jobs(methods, len(subjects), len(prompts), seeds)
    mine = shard(jobs, rank, world)
    relpath = lambda job: job.relpath(subjects)
    # First: a subject photo the metrics cannot use (no face found) stops the run before hours of sampling.
    references = [scorers.reference(s.image, s.source) for s in subjects]
    started = time.perf_counter()
    generated, skipped = generate_missing(generator, mine, output_dir, relpath, rank, world, progress)
    generation_s = time.perf_counter() - started

    rows = []
    for job in tqdm(mine, desc="metrics", disable=not progress or not is_main):
        rows.extend(
            score_job(
                job,
                load_png(output_dir / relpath(job)),
                scorers,
                references,
                subjects,
                prompts,
                token,
                relpath(job),
            )
        )
    counts = [{"process": rank, "generated": generated, "skipped": skipped, "generation_s": generation_s}]
    gathered = gather_on_main(rows, counts, accelerator)
    if gathered is None:
        return None
    rows, counts = gathered

    order = {job: i for i, job in enumerate(jobs)}
    key = {relpath(job): order[job] for job in jobs}
    rows.sort(key=lambda r: (key[r["image"]], r["subject"]))
    metrics = scorers.names
    summary = report.summarize(rows, metrics)
    x, y = axes_for(metrics)
    result = {
        "settings": settings,
        "metrics": metrics,
        "plot_axes": {"x": x, "y": y},
        "processes": counts,
        "generated": sum(c["generated"] for c in counts),
        "skipped": sum(c["skipped"] for c in counts),
        "summary": summary,
        "rows": rows,
    }
    result["files"] = write_report(result, output_dir, summary, subjects, prompts, seeds)
    if grids:
        result["files"]["grids"] = [
            str(p) for p in make_grids(output_dir, methods, subjects, prompts, token, seeds[0], relpath)
        ]
    report.write_json(result, output_dir / "metrics.json")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return result
