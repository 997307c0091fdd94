"""The ComfyUI nodes of the pack. Loaded as a subpackage of the pack (never as a top-level `nodes`)."""

from .apply import NestedAttentionApply
from .loader import NestedAttentionLoadEncoder
from .maps import NestedAttentionCapture, NestedAttentionMaps, NestedAttentionQueryMaps
from .subject import NestedAttentionEncodeSubject, NestedAttentionLoadSubject, NestedAttentionSaveSubject

# Node ids carry the pack prefix and never change once shipped; display names are what users read.
NODE_CLASS_MAPPINGS = {
    "NestedAttentionLoadEncoder": NestedAttentionLoadEncoder,
    "NestedAttentionEncodeSubject": NestedAttentionEncodeSubject,
    "NestedAttentionApply": NestedAttentionApply,
    "NestedAttentionSaveSubject": NestedAttentionSaveSubject,
    "NestedAttentionLoadSubject": NestedAttentionLoadSubject,
    "NestedAttentionCapture": NestedAttentionCapture,
    "NestedAttentionMaps": NestedAttentionMaps,
    "NestedAttentionQueryMaps": NestedAttentionQueryMaps,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "NestedAttentionLoadEncoder": "Load Nested Encoder",
    "NestedAttentionEncodeSubject": "Encode Subject Image(s)",
    "NestedAttentionApply": "Apply Nested Attention (token, λ)",
    "NestedAttentionSaveSubject": "Save Nested Subject",
    "NestedAttentionLoadSubject": "Load Nested Subject",
    "NestedAttentionCapture": "Capture Nested Attention",
    "NestedAttentionMaps": "Nested Attention Maps",
    "NestedAttentionQueryMaps": "Subject Query Maps",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
