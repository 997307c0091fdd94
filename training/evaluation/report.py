"""The evaluation's outputs: every figure as CSV and JSON, per-method means, the trade-off plot, image grids.

The plot follows the paper's Figure 10: identity against prompt alignment (CLIP-T), one curve per
method, one point per λ (nested) or scale (decoupled), the prior as a single point.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

BASE_COLUMNS = [
    "method",
    "parameter",
    "value",
    "subject",
    "subject_source",
    "prompt_index",
    "category",
    "prompt",
    "clip_t_text",
    "seed",
    "image",
]


def mean(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(present)) if present else None


def summarize(rows: Sequence[dict], metrics: Sequence[str]) -> list[dict]:
    """One entry per method setting: image count, the mean of each figure, and face detection failures.

    Identity means are over images with a detected face; `face_failures` says how many had none (they
    are failures of the method, reported next to the mean, never dropped silently).
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["value"] if row["value"] is not None else -1.0), []).append(row)
    order = {"prior": 0, "nested": 1, "decoupled": 2}
    out = []
    for (method, _), items in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):
        entry: dict[str, Any] = {
            "method": method,
            "parameter": items[0]["parameter"],
            "value": items[0]["value"],
            "rows": len(items),
            "images": len({r["image"] for r in items}),
        }
        for name in metrics:
            entry[name] = mean([r.get(name) for r in items])
        if any("face_found" in r for r in items):
            found = [bool(r.get("face_found")) for r in items]
            entry["face_failures"] = found.count(False)
            entry["face_failure_rate"] = found.count(False) / len(found)
        out.append(entry)
    return out


def write_csv(rows: Sequence[dict], metrics: Sequence[str], path: Path) -> Path:
    columns = BASE_COLUMNS + list(metrics) + (["face_found"] if any("face_found" in r for r in rows) else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return path


def write_summary_csv(summary: Sequence[dict], metrics: Sequence[str], path: Path) -> Path:
    """The per-method means, one line per method setting."""
    columns = ["method", "parameter", "value", "rows", "images"] + list(metrics)
    columns += [c for c in ("face_failures", "face_failure_rate") if any(c in e for e in summary)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for entry in summary:
            writer.writerow({k: ("" if entry.get(k) is None else entry.get(k)) for k in columns})
    return path


def write_json(payload: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    tmp.replace(path)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(summary: Sequence[dict], x: str, y: str, path: Path, title: str = "") -> Path:
    """Identity (y) against CLIP-T (x): a curve per method, a point per λ / scale, labelled with its value."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    styles = {
        "nested": ("tab:blue", "o", "nested attention, λ"),
        "decoupled": ("tab:orange", "s", "decoupled (IP-Adapter), scale"),
    }
    notes = []
    for method, (colour, marker, label) in styles.items():
        points = [
            e for e in summary if e["method"] == method and e.get(x) is not None and e.get(y) is not None
        ]
        if not points:
            continue
        xs, ys = [e[x] for e in points], [e[y] for e in points]
        ax.plot(xs, ys, color=colour, marker=marker, label=label)
        for e in points:
            note = f"{e['value']:g}"
            if e.get("face_failures"):
                note += f" ({e['face_failures']}/{e['rows']} no face)"
            notes.append((e[x], e[y], note, colour))
    for e in summary:
        if e["method"] == "prior" and e.get(x) is not None and e.get(y) is not None:
            ax.scatter(
                [e[x]], [e[y]], color="tab:gray", marker="x", s=60, label="prior (no subject)", zorder=3
            )
    ax.set_xlabel(f"prompt alignment: {x}, cosine")
    ax.set_ylabel(f"identity: {y}, cosine")
    return save_figure(fig, ax, path, title, notes)


def save_figure(fig: Any, ax: Any, path: Path, title: str = "", notes: Sequence[tuple] = ()) -> Path:
    """A plot's grid, legend, title and point labels (`notes`, see `place_labels`) on `ax`, then `fig` written
    to `path` and closed."""
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    place_labels(fig, ax, notes)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    pyplot().close(fig)
    return path


def place_labels(fig, ax, notes: Sequence[tuple]) -> list:
    """Label each point (x, y, text, colour) where the label covers no other label, no point and no legend:
    the nearest free spot of a ring of places around the point, farther out when all are taken, with a thin
    line back to the point once it is not right beside it. Returns the labels' display boxes."""
    renderer = fig.canvas.get_renderer()
    to_display = ax.transData.transform
    taken = []  # display boxes no label may cover: the points, the legend, the labels placed
    for px, py, *_ in notes:
        cx, cy = to_display((px, py))
        taken.append(_box(cx - 5, cy - 5, cx + 5, cy + 5))
    legend = ax.get_legend()
    if legend is not None:
        taken.append(legend.get_window_extent(renderer))
    area = ax.get_window_extent(renderer)
    ring = [(1.0, 0.4), (1.0, -1.2), (-1.0, 0.4), (-1.0, -1.2), (0.0, 1.0), (0.0, -1.6), (1.4, -0.4), (-1.4, -0.4)]
    places = [(r * dx, r * dy) for r in (7, 14, 24, 36, 50) for dx, dy in ring]
    boxes = []
    for px, py, text, colour in notes:
        note = ax.annotate(text, (px, py), textcoords="offset points", xytext=places[0], fontsize=8, color=colour,
                           arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.5, "shrinkA": 0, "shrinkB": 4})
        chosen = None
        for dx, dy in places:
            note.set_position((dx, dy))
            note.set_horizontalalignment("left" if dx > 0 else "right" if dx < 0 else "center")
            box = _text_box(note, renderer)
            inside = area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1
            if inside and not any(box.overlaps(other) for other in taken):
                chosen = box
                break
        if chosen is None:  # nowhere free: the first place, overlapping (never seen with the shipped settings)
            note.set_position(places[0])
            note.set_horizontalalignment("left")
            chosen = _text_box(note, renderer)
        note.arrow_patch.set_visible(max(abs(v) for v in note.get_position()) > 10)
        taken.append(chosen)
        boxes.append(chosen)
    return boxes


def _text_box(note, renderer):
    """The display box of an annotation's text alone (its line to the point left out)."""
    from matplotlib.text import Text

    note.update_positions(renderer)
    return Text.get_window_extent(note, renderer)


def _box(x0, y0, x1, y1):
    from matplotlib.transforms import Bbox

    return Bbox([[x0, y0], [x1, y1]])


def image_grid(
    cells: Sequence[Sequence[Optional[np.ndarray]]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: Path,
    title: str = "",
    cell_inches: float = 1.6,
) -> Path:
    """A labelled PNG grid: cells[r][c] (H, W, 3) float in [0, 1] or None (blank), labels on both axes."""
    plt = pyplot()
    rows, cols = len(cells), max(len(r) for r in cells)
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * cell_inches + 0.6, rows * cell_inches + 0.9), dpi=100, squeeze=False
    )
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            cell = cells[r][c] if c < len(cells[r]) else None
            if cell is not None:
                ax.imshow(np.clip(cell, 0, 1), interpolation="nearest")
            elif c == 0:  # no input photo (the prior's row): say so instead of an empty frame
                ax.text(0.5, 0.5, "(none)", ha="center", va="center", fontsize=8, color="gray")
            else:
                ax.axis("off")
            if r == 0:
                ax.set_title("\n".join(textwrap.wrap(col_labels[c], 22)), fontsize=7)
            if c == 0:
                ax.set_ylabel("\n".join(textwrap.wrap(row_labels[r], 16)), fontsize=7)
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
