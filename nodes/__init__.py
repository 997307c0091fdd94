"""The ComfyUI nodes of the pack, on ComfyUI's V3 node schema (`comfy_api.latest`), registered through
`comfy_entrypoint`. Loaded as a subpackage of the pack (never as a top-level `nodes`)."""

from comfy_api.latest import ComfyExtension, io

from .apply import NestedAttentionApply
from .loader import NestedAttentionLoadEncoder
from .maps import NestedAttentionCapture, NestedAttentionMaps, NestedAttentionQueryMaps
from .subject import NestedAttentionEncodeSubject, NestedAttentionLoadSubject, NestedAttentionSaveSubject

# Every node of the pack; adding a node is one line here. Each schema holds its node id (the pack prefix;
# never changed once shipped: saved workflows name it) and its display name.
NODES: list[type[io.ComfyNode]] = [
    NestedAttentionLoadEncoder,
    NestedAttentionEncodeSubject,
    NestedAttentionApply,
    NestedAttentionSaveSubject,
    NestedAttentionLoadSubject,
    NestedAttentionCapture,
    NestedAttentionMaps,
    NestedAttentionQueryMaps,
]

class NestedAttentionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> NestedAttentionExtension:
    """What ComfyUI's load_custom_node calls when a pack exports no NODE_CLASS_MAPPINGS."""
    return NestedAttentionExtension()


__all__ = ["NODES", "comfy_entrypoint"]
