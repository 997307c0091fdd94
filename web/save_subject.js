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
        widget = this.addWidget("text", WIDGET, "", () => {}, { serialize: false });
        widget.disabled = true;
      }
      widget.value = names.join(", ");
      this.setSize([Math.max(this.size[0], this.computeSize()[0]), this.computeSize()[1]]);
      this.setDirtyCanvas(true, true);
    };
  },
});
