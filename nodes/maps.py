"""Seeing inside nested attention: Capture Nested Attention, Nested Attention Maps and Subject Query Maps.

- Capture Nested Attention (on the MODEL path, after the Apply nodes): every sampling run of the model it
  returns records, per subject, where the subject word's attention went (placement) and which encoder tokens
  the nested attention read (sources), as running means (nested_attention.capture). Sampling is unchanged.
- Nested Attention Maps: the captured run as IMAGEs: the placement map over the generated image, one colour
  per subject; the source map (the paper's Fig. 5): for points of the image, the tokens read there and where
  they come from in the subject's photo.
- Subject Query Maps (the paper's Fig. 6): from an encoded subject alone, where each Q-Former query looks in
  the photo.

The maps are computed in the core (nested_attention.capture); this module draws them (PIL), and holds the
nodes.
"""

from __future__ import annotations

import math

import comfy.model_management
import torch
import torch.nn.functional as F
from comfy_api.latest import io
from PIL import Image, ImageDraw, ImageFont

from nested_attention.capture import (
    CaptureResult,
    CaptureSink,
    SubjectCapture,
    query_maps,
    strongest_points,
    weights_at,
)
from nested_attention.images import from_pil, to_pil
from nested_attention.patch import NestedAttentionPatch
from nested_attention_comfy.model import NestedApplyError, attn2_replacements
from nested_attention_comfy.sampling import add_capture, sigma_window

from .wires import CATEGORY, NESTED_SUBJECT, Subject

NESTED_CAPTURE = "NESTED_CAPTURE"
Capture = io.Custom(NESTED_CAPTURE)
SubjectType = io.Custom(NESTED_SUBJECT)

SUBJECT_COLOURS = [(255, 70, 60), (40, 150, 255), (60, 210, 90), (255, 190, 0), (190, 90, 255)]
POINT_COLOURS = [(255, 140, 0), (0, 220, 230), (255, 60, 200), (170, 255, 40), (255, 255, 255)]
PANEL = 256  # side of the photo panels in the source map (pixels)
CELL = 160  # side of one query map in the query grid (pixels)


class NestedMapsError(ValueError):
    """The capture or the subject cannot be drawn; the message says what to do."""


# ------------------------------------------------------------------------------------------------
# Drawing


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(10, int(size)))


def resize_map(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A map (h, w) to an image's (H, W), bilinear."""
    return F.interpolate(heat[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def stretch(heat: torch.Tensor) -> torch.Tensor:
    """A map scaled to [0, 1] between its lowest and highest value: where it is high, relative to the rest."""
    low, high = heat.min(), heat.max()
    return (heat - low) / (high - low).clamp_min(1e-12)


def overlay(image: torch.Tensor, heat: torch.Tensor, colour: tuple, opacity: float) -> torch.Tensor:
    """`image` (H, W, 3) tinted with `colour` where `heat` (H, W) in [0, 1] is high."""
    a = (opacity * heat.clamp(0, 1))[..., None]
    return image * (1 - a) + torch.tensor(colour, dtype=torch.float32) / 255.0 * a


def outline(image: torch.Tensor, region: torch.Tensor, colour: tuple) -> torch.Tensor:
    """Draw the inner edge of a bool region (h, w), upsampled (nearest) to the image, in `colour`: two regions
    that touch show both their colours side by side."""
    h, w = image.shape[:2]
    mask = F.interpolate(region[None, None].float(), size=(h, w), mode="nearest")[0, 0]
    width = max(1, min(h, w) // 200)
    # 1 where a pixel outside the region lies within `width` pixels
    outside = F.max_pool2d((1 - mask)[None, None], 2 * width + 1, stride=1, padding=width)[0, 0]
    edge = (mask > 0.5) & (outside > 0.5)
    image = image.clone()
    image[edge] = torch.tensor(colour, dtype=torch.float32) / 255.0
    return image


def clip_view(photo: torch.Tensor, crop: bool, side: int) -> torch.Tensor:
    """The part of a photo (H, W, 3) the CLIP vision model saw (the centre square when `crop`, else the whole
    photo squashed), as a side x side image."""
    h, w = photo.shape[:2]
    if crop:
        s = min(h, w)
        photo = photo[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return (
        F.interpolate(
            photo.movedim(-1, 0)[None].float(),
            size=(side, side),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0]
        .movedim(0, -1)
        .clamp(0, 1)
    )


def _label(draw: ImageDraw.ImageDraw, xy: tuple, text: str, size: int, fill=(255, 255, 255)) -> None:
    draw.text(xy, text, font=_font(size), fill=fill, stroke_width=max(1, size // 8), stroke_fill=(0, 0, 0))


def _marker(
    draw: ImageDraw.ImageDraw, xy: tuple, colour: tuple, radius: int, text: str = "", width: int | None = None
) -> None:
    """A ring at xy; its label to the right, or to the left where it would leave an image `width` wide."""
    x, y = xy
    draw.ellipse(
        (x - radius, y - radius, x + radius, y + radius), outline=(0, 0, 0), width=max(2, radius // 3)
    )
    draw.ellipse(
        (x - radius + 2, y - radius + 2, x + radius - 2, y + radius - 2),
        outline=colour,
        width=max(1, radius // 4),
    )
    if text:
        size = int(radius * 1.6)
        length = draw.textlength(text, font=_font(size))
        left = width is not None and x + radius + 2 + length > width
        _label(draw, (x - radius - 2 - length if left else x + radius + 2, y - radius), text, size, colour)


def _stack(rows: list[Image.Image], background=(24, 24, 24)) -> Image.Image:
    width = max(r.width for r in rows)
    canvas = Image.new("RGB", (width, sum(r.height for r in rows)), background)
    y = 0
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height
    return canvas


def _batch(pictures: list[Image.Image], background=(24, 24, 24)) -> torch.Tensor:
    """Pictures as one IMAGE batch (n, H, W, 3), each padded to the largest at its bottom and right."""
    width, height = max(p.width for p in pictures), max(p.height for p in pictures)
    padded = []
    for p in pictures:
        canvas = Image.new("RGB", (width, height), background)
        canvas.paste(p, (0, 0))
        padded.append(from_pil(canvas))
    return torch.stack(padded)


def _text_row(text: str, width: int, size: int = 16) -> Image.Image:
    """`text` on a dark band `width` wide, wrapped at spaces to fit."""
    font, lines = _font(size), [""]
    for word in text.split(" "):
        joined = f"{lines[-1]} {word}".strip()
        if lines[-1] and font.getlength(joined) > width - 16:
            lines.append(word)
        else:
            lines[-1] = joined
    line = int(size * 1.3)
    row = Image.new("RGB", (width, line * len(lines) + int(size * 0.6)), (24, 24, 24))
    draw = ImageDraw.Draw(row)
    for i, text_line in enumerate(lines):
        _label(draw, (8, int(size * 0.3) + i * line), text_line, size)
    return row


# ------------------------------------------------------------------------------------------------
# The maps as images


def placement_images(
    result: CaptureResult, images: torch.Tensor, normalize: str = "peak", opacity: float = 0.65
) -> torch.Tensor:
    """Each generated image with each subject's placement map over it, one colour per subject: (B, H, W, 3).

    normalize "peak": each map stretched between its own lowest value and its peak (where the subject goes
    most, relative to elsewhere); "probability": the probability itself (0 to 1), so that runs with another
    λ compare. The legend gives each subject's peak and mean probability.
    """
    out = []
    for b, image in enumerate(images):
        h, w = image.shape[:2]
        canvas = image.float().cpu()
        legend = []
        for i, s in enumerate(result.subjects):
            colour = SUBJECT_COLOURS[i % len(SUBJECT_COLOURS)]
            heat = s.placement_map()[b]
            peak, mean = float(heat.max()), float(heat.mean())
            shown = stretch(heat) if normalize == "peak" else heat
            canvas = overlay(canvas, resize_map(shown, (h, w)), colour, opacity)
            if s.region is not None:
                canvas = outline(canvas, s.region[b], colour)
            legend.append(
                (
                    colour,
                    f"{s.name}: peak {peak:.2f}, mean {mean:.3f}"
                    + (" (auto region outlined)" if s.region is not None else ""),
                )
            )
        picture = to_pil(canvas)
        draw = ImageDraw.Draw(picture)
        size = max(8, min(h, w) // 40)
        for row, (colour, text) in enumerate(legend):
            y = 4 + row * int(size * 1.5)
            draw.rectangle((4, y + 2, 4 + size, y + 2 + size), fill=colour, outline=(0, 0, 0))
            _label(draw, (10 + size, y), text, size)
        out.append(from_pil(picture))
    return torch.stack(out)


def subject_query_maps(subject: Subject) -> torch.Tensor:
    """Where each Q-Former query of an encoded subject looks in each photo: (n, M, s, s), CPU float32.

    Runs the subject's Q-Former again on the CLIP tokens it read, asking it for its attention weights (the
    same forward as encoding, NestedEncoder.encode(..., return_attention=True)).
    """
    if subject.clip_tokens is None or subject.photos is None:
        raise NestedMapsError(
            f"{subject.describe()} carries no photos (it was loaded from a file): its query maps cannot be "
            "drawn. Connect the subject output of Encode Subject Image(s) instead."
        )
    handle = subject.encoder
    comfy.model_management.load_model_gpu(handle.patcher)
    weight = next(handle.encoder.parameters())
    with torch.no_grad():
        _, attention = handle.encoder.encode(
            subject.clip_tokens.to(weight.device, weight.dtype), return_attention=True
        )
    return query_maps(attention, subject.clip_tokens.shape[1]).to("cpu", torch.float32)


def _focused(maps: torch.Tensor, count: int) -> list[int]:
    """The `count` queries whose maps are the most concentrated (lowest entropy), most concentrated first."""
    p = maps.flatten(1) / maps.flatten(1).sum(dim=1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1)
    return [int(j) for j in torch.argsort(entropy, stable=True)[:count]]


def query_grid(subject: Subject, count: int, opacity: float = 0.7) -> torch.Tensor:
    """Per photo, a grid of the `count` most concentrated queries' maps over the photo: (n, H, W, 3)."""
    maps = subject_query_maps(subject)  # (n, M, s, s)
    n, m = maps.shape[:2]
    count = max(1, min(count, m))
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grids = []
    for i in range(n):
        photo = clip_view(subject.photos[i], subject.crop, CELL)
        title = _text_row(
            f"{subject.name}, photo {i + 1}: where {count} of its {m} queries look, the most focused first",
            columns * CELL,
            15,
        )
        canvas = Image.new("RGB", (columns * CELL, rows * CELL), (24, 24, 24))
        for cell, j in enumerate(_focused(maps[i], count)):
            heat = resize_map(stretch(maps[i, j]), (CELL, CELL))
            tile = to_pil(overlay(photo, heat, SUBJECT_COLOURS[0], opacity))
            _label(ImageDraw.Draw(tile), (4, 2), f"q{j}", 14)
            canvas.paste(tile, ((cell % columns) * CELL, (cell // columns) * CELL))
        grids.append(_stack([title, canvas]))
    return _batch(grids)


def parse_points(text: str) -> list[tuple[float, float]]:
    """'x,y; x,y' (fractions of the image width and height, 0 to 1) -> [(x, y)]; empty -> []."""
    points = []
    for part in [p for p in text.replace("\n", ";").split(";") if p.strip()]:
        try:
            x, y = (float(v) for v in part.split(","))
        except ValueError:
            raise NestedMapsError(
                f"points: {part.strip()!r} is not 'x,y'. Give points as x,y fractions of the image's "
                "width and height separated by ';' (e.g. '0.5,0.3; 0.25,0.7'), or leave it empty for the 3 "
                "strongest places of each subject."
            ) from None
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise NestedMapsError(f"points: {part.strip()!r} lies outside the image; x and y go from 0 to 1.")
        points.append((x, y))
    return points


def read_at(
    s: SubjectCapture, b: int, point: tuple[float, float], top: int, query: torch.Tensor | None
) -> tuple[list[tuple[int, float]], torch.Tensor | None]:
    """What subject `s` read at an (x, y) point of image b: the `top` tokens [(index, weight)], most read
    first, and where all the tokens read there come from in each photo, sum_j w_j * query_map_j: (n, s, s),
    or None without the photos' query maps. Token j is query j % M of photo j // M (several photos: their
    tokens concatenated).
    """
    weights = weights_at(s.tokens[b], point)  # (M_total,) at the cell of the point
    found = torch.topk(weights, min(top, weights.numel()))
    best = [(int(j), float(v)) for j, v in zip(found.indices, found.values)]
    if query is None:
        return best, None
    return best, torch.einsum("nm,nmhw->nhw", weights.reshape(query.shape[0], -1), query)


def _source_rows(
    s: SubjectCapture,
    b: int,
    image: torch.Tensor,
    points: list,
    top: int,
    query: torch.Tensor | None,
    opacity: float,
) -> list[Image.Image]:
    """One subject's part of the source map for image b: a heading, then one row per point."""
    subject = s.source if isinstance(s.source, Subject) else None
    photos = 0 if query is None else query.shape[0]
    h, w = image.shape[:2]
    thumb_w = round(PANEL * w / h)
    width = thumb_w + max(1, photos) * PANEL
    rows = [
        _text_row(
            f"{s.name}: the subject tokens read at each point, and where they come from in the photo", width
        )
    ]
    if s.tokens is None:
        return rows + [_text_row("(not recorded: switch sources on in Capture Nested Attention)", width, 14)]
    if query is None:
        rows.append(
            _text_row(
                "(loaded from a file, no photo: connect Encode Subject Image(s) to Apply to see "
                "where its tokens come from)",
                width,
                14,
            )
        )
    for p, point in enumerate(points):
        colour = POINT_COLOURS[p % len(POINT_COLOURS)]
        best, heats = read_at(s, b, point, top, query)
        row = Image.new("RGB", (width, PANEL), (24, 24, 24))
        thumb = to_pil(image.float().cpu()).resize((thumb_w, PANEL))
        draw = ImageDraw.Draw(thumb)
        _marker(draw, (point[0] * thumb_w, point[1] * PANEL), colour, 10, str(p + 1), thumb_w)
        row.paste(thumb, (0, 0))
        for i in range(photos):
            heat = resize_map(stretch(heats[i]), (PANEL, PANEL))
            panel = to_pil(overlay(clip_view(subject.photos[i], subject.crop, PANEL), heat, colour, opacity))
            draw = ImageDraw.Draw(panel)
            side = query.shape[-1]
            for j, v in best:
                if j // s.num_tokens != i or v < 0.1 * best[0][1]:  # another photo's token, or barely read
                    continue
                y, x = divmod(int(query[i, j % s.num_tokens].flatten().argmax()), side)
                _marker(
                    draw,
                    ((x + 0.5) * PANEL / side, (y + 0.5) * PANEL / side),
                    colour,
                    8,
                    f"#{j} {v:.2f}",
                    PANEL,
                )
            row.paste(panel, (thumb_w + i * PANEL, 0))
        text = ", ".join(f"#{j} {v:.2f}" for j, v in best)
        rows += [
            row,
            _text_row(f"point {p + 1} at ({point[0]:.2f}, {point[1]:.2f}) reads tokens {text}", width, 14),
        ]
    return rows


def source_images(
    result: CaptureResult, images: torch.Tensor, points: list, top: int = 5, opacity: float = 0.65
) -> torch.Tensor:
    """The source map (the paper's Fig. 5) per generated image: (B, H', W', 3), one section per subject.

    points: (x, y) fractions; empty: the 3 strongest places of each subject's placement map. For each point,
    the `top` tokens the nested attention reads there (weights averaged over heads, layers and steps), and on
    each photo the token weights carried through the Q-Former's query maps: sum_j w_j * map_j.
    """
    queries = {}
    for s in result.subjects:
        subject = s.source if isinstance(s.source, Subject) else None
        drawable = subject is not None and subject.photos is not None and s.tokens is not None
        queries[id(s)] = subject_query_maps(subject) if drawable else None
    out = []
    for b, image in enumerate(images):
        rows = []
        for s in result.subjects:
            chosen = points or strongest_points(s.placement_map()[b], 3)
            rows += _source_rows(s, b, image, chosen, top, queries[id(s)], opacity)
        out.append(_stack(rows))
    return _batch(out)


def captured(sink: CaptureSink, images: torch.Tensor) -> CaptureResult:
    """The capture's latest run, checked against the images it is drawn on."""
    result = sink.latest
    if result is None:
        raise NestedMapsError(
            "Nested Attention Maps: nothing was captured. Connect the MODEL output of Capture Nested "
            "Attention to the sampler that makes this image (its capture output to this node), and run the "
            "graph."
        )
    if not result.subjects:
        raise NestedMapsError(
            "Nested Attention Maps: the sampling run had no step in the capture's start/end percent range in "
            "which a subject was active; widen the range (0 to 1 captures every step)."
        )
    if images.shape[0] != result.batch:
        raise NestedMapsError(
            f"Nested Attention Maps: the image batch has {images.shape[0]} images, but the captured run "
            f"sampled {result.batch}. Connect the images decoded from that sampler's LATENT."
        )
    return result


def check_nested(model) -> None:
    """Refuse a model without nested attention (nothing to capture)."""
    if not any(isinstance(p, NestedAttentionPatch) for p in attn2_replacements(model).values()):
        raise NestedApplyError(
            "Capture Nested Attention: this model carries no nested attention, so there is nothing to "
            "capture. Put the capture node after the last Apply Nested Attention node (its MODEL output into "
            "the capture, the capture's MODEL output into the sampler)."
        )


# ------------------------------------------------------------------------------------------------
# Nodes


class NestedAttentionCapture(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionCapture",
            display_name="Capture Nested Attention",
            category=CATEGORY,
            description="Records where each subject goes and what its nested attention reads, while the "
            "sampler runs, for Nested Attention Maps. The sampled image is exactly the same as without it.",
            inputs=[
                io.Model.Input("model", tooltip="The model from the last Apply Nested Attention node."),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Fraction of sampling from which steps are recorded.",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Fraction of sampling after which steps are no longer recorded.",
                ),
                io.Boolean.Input(
                    "sources",
                    default=True,
                    tooltip="Also record which subject tokens are read "
                    "where, for the source map. This slows sampling (the cross-attention calls "
                    "took 2.9x as long on a CPU); the placement map alone costs almost nothing.",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="model", tooltip="The same model, recording; connect it to the sampler."
                ),
                Capture.Output(
                    display_name="capture",
                    tooltip="What the sampler's run recorded, for Nested Attention Maps.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls, model, start_percent: float = 0.0, end_percent: float = 1.0, sources: bool = True
    ) -> io.NodeOutput:
        check_nested(model)
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise NestedApplyError(
                f"start_percent {start_percent} and end_percent {end_percent}: expected 0 <= start_percent "
                "<= end_percent <= 1 (the part of sampling recorded)."
            )
        m = model.clone()
        sink = CaptureSink()
        add_capture(m, sink, sigma_window(m, start_percent, end_percent), sources)
        return io.NodeOutput(m, sink)


class NestedAttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionMaps",
            display_name="Nested Attention Maps",
            category=CATEGORY,
            description="Draws what Capture Nested Attention recorded: where each subject went in the "
            "image (placement) and, for points of the image, which subject tokens were read there and where "
            "they come from in the subject's photo (sources).",
            inputs=[
                Capture.Input("capture", tooltip="From Capture Nested Attention."),
                io.Image.Input("image", tooltip="The image decoded from that sampler's LATENT."),
                io.String.Input(
                    "points",
                    default="",
                    tooltip="Points of the image for the source map, as x,y "
                    "fractions of width and height separated by ';' (e.g. '0.5,0.3; 0.3,0.6'). "
                    "Empty: the 3 strongest places of each subject.",
                ),
                io.Int.Input(
                    "top_tokens",
                    default=5,
                    min=1,
                    max=64,
                    tooltip="How many of the most-read subject tokens to name per point.",
                ),
                io.Combo.Input(
                    "normalize",
                    options=["peak", "probability"],
                    default="peak",
                    tooltip="peak: each subject's map scaled to its own peak. probability: the "
                    "attention probability itself (0 to 1), to compare runs, e.g. two λ.",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="placement",
                    tooltip="The image with each subject's placement map over it (one colour per subject).",
                ),
                io.Image.Output(
                    display_name="sources",
                    tooltip="Per point: the tokens read there and where "
                    "they come from in the subject's photo.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        capture: CaptureSink,
        image: torch.Tensor,
        points: str = "",
        top_tokens: int = 5,
        normalize: str = "peak",
    ) -> io.NodeOutput:
        result = captured(capture, image)
        chosen = parse_points(points)
        return io.NodeOutput(
            placement_images(result, image, normalize), source_images(result, image, chosen, top_tokens)
        )


class NestedAttentionQueryMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionQueryMaps",
            display_name="Subject Query Maps",
            category=CATEGORY,
            description="Where each query of the subject encoder (its Q-Former) looks in the photo: one "
            "small map per query, the most focused first. Needs no sampling.",
            inputs=[
                SubjectType.Input("subject", tooltip="From Encode Subject Image(s)."),
                io.Int.Input(
                    "count", default=16, min=1, max=1024, tooltip="How many queries to show per photo."
                ),
            ],
            outputs=[io.Image.Output(display_name="query_maps", tooltip="One grid per photo.")],
        )

    @classmethod
    def execute(cls, subject: Subject, count: int = 16) -> io.NodeOutput:
        return io.NodeOutput(query_grid(subject, count))
