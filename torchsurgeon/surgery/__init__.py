"""The functional core: frozen trees, paths, copy-on-write rewrites, the pytree view.

Nothing here knows about selectors or intervention layers; everything above builds on it.
"""

from torchsurgeon.surgery import tree
from torchsurgeon.surgery.errors import (
    FrozenModuleError,
    PathError,
    SelectionError,
    SerializationError,
    SurgeryError,
)
from torchsurgeon.surgery.frozen import is_frozen, original_class, wrap
from torchsurgeon.surgery.lineage import Lineage, RewriteStep, lineage_of
from torchsurgeon.surgery.paths import get_at, iter_nodes
from torchsurgeon.surgery.rewrite import rewrite

__all__ = [
    "FrozenModuleError",
    "Lineage",
    "PathError",
    "RewriteStep",
    "SelectionError",
    "SerializationError",
    "SurgeryError",
    "get_at",
    "is_frozen",
    "iter_nodes",
    "lineage_of",
    "original_class",
    "rewrite",
    "tree",
    "wrap",
]
