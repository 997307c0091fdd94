"""Save Nested Subject in the real frontend: after Run, the node shows the file it saved.

The display is web/save_subject.js, the pack's frontend extension.

A small graph is built in the page (tiny CLIP vision from tests/e2e/tiny_pack, the real Load Nested Encoder
on a real tiny encoder file, Load Image, Encode Subject Image(s), Save Nested Subject) and queued with the
frontend's Run button, so the server's `executed` message reaches this page as it reaches a user's.
Screenshot: tests/artifacts/e2e/save-subject.png.
"""

from __future__ import annotations

import pytest
from harness import ARTIFACTS_DIR, FACES_ENCODER

from devtools.workflows import PERSON_IMAGES

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

_BUILD_JS = """
async ([encoderName, imageName]) => {
  const app = window.app, LG = window.LiteGraph;
  await app.extensionManager.command.execute('Comfy.NewBlankWorkflow');
  const add = (type, pos, widgets = {}) => {
    const n = LG.createNode(type);
    if (!n) throw new Error(`the frontend does not know ${type}`);
    app.graph.add(n);
    n.pos = pos;
    for (const [name, value] of Object.entries(widgets)) n.widgets.find((w) => w.name === name).value = value;
    return n;
  };
  const vision = add('NestedAttentionTestTinyCLIPVision', [0, 0]);
  const encoder = add('NestedAttentionLoadEncoder', [0, 120], {encoder_name: encoderName});
  const image = add('LoadImage', [0, 260], {image: imageName});
  const encode = add('NestedAttentionEncodeSubject', [380, 120]);
  const save = add('NestedAttentionSaveSubject', [720, 120]);
  vision.connect(0, encoder, encoder.findInputSlot('clip_vision'));
  encoder.connect(0, encode, encode.findInputSlot('encoder'));
  image.connect(0, encode, encode.findInputSlot('image'));
  encode.connect(0, save, save.findInputSlot('subject'));
  app.canvas.ds.scale = 1; app.canvas.ds.offset = [120, 160];
  app.graph.setDirtyCanvas(true, true);
  return save.id;
}
"""

# The strings the canvas draws in one full redraw (the widget's value is drawn, not in the DOM).
_DRAWN_JS = """
() => {
  const drawn = [], fillText = CanvasRenderingContext2D.prototype.fillText;
  CanvasRenderingContext2D.prototype.fillText = function (text, ...rest) {
    drawn.push(String(text));
    return fillText.call(this, text, ...rest);
  };
  try { window.app.canvas.draw(true, true); } finally { CanvasRenderingContext2D.prototype.fillText = fillText; }
  return drawn;
}
"""

_SAVED_JS = """
(id) => window.app.graph.getNodeById(id).widgets?.find((w) => w.name === 'saved')?.value ?? null
"""


def test_save_nested_subject_shows_the_saved_file_name_on_the_node(comfy, frontend):
    page = frontend.page
    save_id = frontend.evaluate(_BUILD_JS, [FACES_ENCODER, PERSON_IMAGES[0]])
    frontend.press_run()
    page.wait_for_function(f"({_SAVED_JS})({save_id}) !== null", timeout=300_000)
    frontend.settle()
    frontend.screenshot(ARTIFACTS_DIR / "save-subject.png")
    shown = frontend.evaluate(_SAVED_JS, save_id)
    assert shown.startswith("nested_attention_subjects/subject_") and shown.endswith("_.safetensors"), shown
    assert (comfy.base / "output" / shown).is_file(), f"the node shows {shown}, which is not in output/"
    drawn = frontend.evaluate(_DRAWN_JS)
    assert shown in drawn, f"the canvas does not draw the whole name {shown!r}; it draws {drawn}"
    # The display is not an input: the prompt the frontend queues has no 'saved' value.
    prompt = frontend.graph_to_prompt()
    assert "saved" not in prompt[str(save_id)]["inputs"], prompt[str(save_id)]
