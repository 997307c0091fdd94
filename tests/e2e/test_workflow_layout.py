"""The shipped workflows read well as they open, in both of the frontend's node renderers.

Each workflow is opened as the template browser opens it, at the frontend's default settings, once with the
classic canvas renderer and once with "Nodes 2.0" (setting Comfy.VueNodes.Enabled: nodes drawn as HTML, taller
than the classic ones, and in frontend 1.32 notes at 14 px instead of 10). Then
  - at the zoom it opens at: nodes drawn in full (not the low-detail boxes), the notes' body text at least
    MIN_NOTE_FONT_PX on screen, and the notes and the loaders in view;
  - no two nodes overlap, counting what the renderer draws around a node: the classic title bar and the badge
    row above it (the pack's name, "DEPR"), the Nodes 2.0 node as the page lays it out;
  - no note hides text behind a scroll bar, and no classic node is smaller than what it draws.
Screenshots: tests/artifacts/e2e/layout/<renderer>/<name>.png as it opens, <name>.whole.png the whole graph.
"""

from __future__ import annotations

import pytest
from harness import ARTIFACTS_DIR, FRONTEND_SETTINGS, PACK_NAME, WORKFLOWS_DIR

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

WORKFLOW_NAMES = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
RENDERERS = {"classic": False, "nodes-2.0": True}
VUE_NODES = "Comfy.VueNodes.Enabled"
# The part of the 1600 x 1000 window that the sidebar, the tabs, the run button and the zoom controls leave
# free (left, top, right, bottom).
FREE_AREA = (60, 95, 10, 10)
MIN_SCALE = 0.7  # above the low-detail threshold at any devicePixelRatio >= 1 (0.571 at 1), with a margin
MIN_NOTE_FONT_PX = 10.0  # the frontend's own note text at 100 % (10 px; 14 px in 1.32's Nodes 2.0)
ALWAYS_IN_VIEW = ("Read me", "Models: what to download, where to put it", "Load Checkpoint", "Load CLIP Vision")
# The classic renderer draws node badges in a row above the title bar: LGraphBadge's height 20 and a gap of 2.
BADGE_ROW = 22

# Runs in the page: what the user sees, in screen pixels. Each node's box (classic: title bar, body and the
# badge row above; Nodes 2.0: its element), the notes' text size and hidden height, the free part of the canvas.
_LOOK_JS = """
([[left, top, right, bottom], vue, badgeRow]) => {
  const app = window.app, canvas = app.canvas, LG = window.LiteGraph;
  const scale = canvas.ds.scale, [ox, oy] = canvas.ds.offset, dpr = window.devicePixelRatio || 1;
  const frame = canvas.canvas.getBoundingClientRect();
  const width = canvas.canvas.width / dpr, height = canvas.canvas.height / dpr;
  // A side panel open over the canvas (frontend 1.48's right-side panel is a splitter panel on top of the
  // full-width canvas) hides what lies under it: the free area ends at its edge.
  for (const panel of document.querySelectorAll('.p-splitterpanel.pointer-events-auto')) {
    const r = panel.getBoundingClientRect();
    if (r.width < 1 || r.height < height / 2) continue;
    if (r.left > width / 2) right = Math.max(right, width - r.left + 10);
    else if (r.right < width / 2) left = Math.max(left, r.right + 10);
  }
  const boxes = [], small = [], notes = [];
  for (const n of app.graph.nodes) {
    const name = n.title || n.type;
    let box;
    if (vue) {
      const r = document.querySelector(`[data-node-id="${n.id}"]`)?.getBoundingClientRect();
      box = r ? [r.left, r.top, r.right, r.bottom] : null;
    } else {
      const x = frame.left + (n.pos[0] + ox) * scale, y = frame.top + (n.pos[1] + oy) * scale;
      const above = LG.NODE_TITLE_HEIGHT + (n.type === 'MarkdownNote' ? 0 : badgeRow);  // notes have no badges
      box = [x, y - above * scale, x + n.size[0] * scale, y + n.size[1] * scale];
      const [w, h] = n.computeSize();
      if (n.size[0] < w - 0.5 || n.size[1] < h - 0.5) small.push(`${name}: ${n.size} < ${[w, h]}`);
    }
    boxes.push({name, type: n.type, box});
    if (n.type !== 'MarkdownNote') continue;
    const root = vue ? document.querySelector(`[data-node-id="${n.id}"]`) : n.widgets[0].element;
    const p = root?.querySelector('p');
    if (!p) { notes.push({name, fontPx: null, hidden: null}); continue; }
    let scroller = p;  // the note's scrolling box: the nearest ancestor that scrolls
    while (scroller !== root && !['auto', 'scroll', 'hidden'].includes(getComputedStyle(scroller).overflowY))
      scroller = scroller.parentElement;
    const fontPx = parseFloat(getComputedStyle(p).fontSize) * p.getBoundingClientRect().width / p.offsetWidth;
    notes.push({name, fontPx, hidden: scroller.scrollHeight - scroller.clientHeight});
  }
  return {
    scale, dpr, lowQuality: canvas.low_quality,
    lod: app.extensionManager.setting.get('LiteGraph.Canvas.MinFontSizeForLOD'),
    // The frontend's own rule (LGraphCanvas.updateLowQualityThreshold): below it, nodes lose their text.
    threshold: app.extensionManager.setting.get('LiteGraph.Canvas.MinFontSizeForLOD') / (LG.NODE_TEXT_SIZE * Math.sqrt(dpr)),
    free: [frame.left + left, frame.top + top, frame.left + width - right, frame.top + height - bottom],
    boxes, small, notes,
  };
}
"""


@pytest.fixture(params=list(RENDERERS))
def renderer(request, frontend):
    """The renderer a test opens the workflows with (the setting is put back to classic afterwards)."""
    frontend.evaluate(f"(on) => window.app.extensionManager.setting.set('{VUE_NODES}', on)", RENDERERS[request.param])
    yield request.param
    frontend.evaluate(f"() => window.app.extensionManager.setting.set('{VUE_NODES}', false)")


def overlaps(boxes: list[dict]) -> list[str]:
    """Pairs of boxes that share more than a pixel's width, with the size of what they share (w x h px)."""
    found = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["box"], b["box"]
            w, h = min(ax1, bx1) - max(ax0, bx0), min(ay1, by1) - max(ay0, by0)
            if w > 1 and h > 1:
                found.append(f"{a['name']} / {b['name']} ({w:.0f} x {h:.0f})")
    return found


def inside(box: list[float], area: list[float]) -> bool:
    return box[0] >= area[0] - 0.5 and box[1] >= area[1] - 0.5 and box[2] <= area[2] + 0.5 and box[3] <= area[3] + 0.5


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_shipped_workflow_opens_legible_with_nothing_overlapping(name, renderer, frontend):
    assert "LiteGraph.Canvas.MinFontSizeForLOD" not in FRONTEND_SETTINGS  # the user's default
    workflow = frontend.fetch_template(PACK_NAME, name)
    frontend.load_workflow(workflow, name)  # settled: Nodes 2.0 lays the nodes out after the load
    folder = ARTIFACTS_DIR / "layout" / renderer
    frontend.screenshot(folder / f"{name}.png")
    vue = RENDERERS[renderer]
    look = frontend.evaluate(_LOOK_JS, [list(FREE_AREA), vue, BADGE_ROW])

    # Legible as it opens: full-detail nodes, notes big enough to read, the notes and the loaders in view.
    assert look["dpr"] == 1 and look["scale"] == pytest.approx(workflow["extra"]["ds"]["scale"]), look
    if not vue:  # (Nodes 2.0 has no low-detail boxes: 1.32 sets the threshold to 0 with it)
        assert look["lod"] == 8, look  # the frontend's default threshold setting
        assert not look["lowQuality"] and look["scale"] >= max(MIN_SCALE, look["threshold"]), look
    for note in look["notes"]:
        assert note["fontPx"] is not None and note["fontPx"] >= MIN_NOTE_FONT_PX, (name, renderer, look["notes"])
    boxes = {b["name"]: b["box"] for b in look["boxes"]}
    hidden = [n for n in ALWAYS_IN_VIEW if not inside(boxes[n], look["free"])]
    assert not hidden, f"{name} ({renderer}): not in view as it opens: {hidden}; free area {look['free']}"

    # Nothing on top of anything else, no text hidden in a note, nothing drawn outside a node.
    frontend.fit_view()
    frontend.screenshot(folder / f"{name}.whole.png")
    overlapping = overlaps(look["boxes"])
    assert not overlapping, f"{name} ({renderer}) at zoom {look['scale']}: overlapping nodes: {overlapping}"
    clipped = [n for n in look["notes"] if n["hidden"] > 1]
    assert not clipped, f"{name} ({renderer}): notes with text out of sight (px hidden): {clipped}"
    assert not look["small"], f"{name} ({renderer}): nodes smaller than what they draw: {look['small']}"
