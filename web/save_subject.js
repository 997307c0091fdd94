// Save Nested Subject shows the file it saved on the node, under its file name prefix.
// ComfyUI's frontend draws only images, video and audio from a node's UI output; this small extension shows
// the names the node returns in `ui.subjects` (subfolder/filename, relative to ComfyUI's output folder).
import { app } from "../../scripts/app.js";

const NODE = "NestedAttentionSaveSubject";
const WIDGET = "saved";

app.registerExtension({
  name: "nested_attention.SaveSubject",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const names = (output?.subjects ?? []).map((s) => (s.subfolder ? `${s.subfolder}/` : "") + s.filename);
      if (!names.length) return;
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) {
        // Not an input: left out of the prompt (serialize: false) and only there once something was saved.
        // (A disabled widget would hide its value, so this one stays enabled; editing it changes nothing.)
        widget = this.addWidget("text", WIDGET, "", () => {}, { serialize: false });
      }
      widget.value = names.join(", ");
      // Wide enough for the whole name: the frontend cuts a widget's value that does not fit.
      const ctx = app.canvas.ctx;
      const text = ctx ? ctx.measureText(`${WIDGET}  ${widget.value}`).width : 7 * widget.value.length;
      this.setSize([Math.max(this.size[0], Math.ceil(text) + 160), this.computeSize()[1]]);
      this.setDirtyCanvas(true, true);
    };
  },
});
