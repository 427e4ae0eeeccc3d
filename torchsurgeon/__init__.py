"""torchsurgeon: functional model surgery for PyTorch.

Take any model, select submodules with a selector expression, insert intervention layers,
and get a *new* model back — the original untouched, every parameter shared. Each rewrite
is recorded as data (a plan) that can replay on another copy of the model, locally or on a
remote host.

    import torchsurgeon as ts

    model = ts.wrap(hf_model)
    probe = (
        ts.select(model)
        .at_instances_of("LlamaMLP")
        .where(ts.layer_index.isin([12, 13]))
        .at("down_proj")
        .insert_before(ts.layers.SetValues(ts.idx[3:, -1, [7171, 2519]], 5.0))
    )
    result = ts.run(probe, input_ids)
"""

# Subpackages that build on the core above: plans (rewrites as data), pictures, converted
# models and research methods. ``remote`` imports its web stack lazily, and
# ``ts.distributed`` (DTensor and torch._dynamo: ~2 CPU-seconds) is imported on first use.
from torchsurgeon import layers, methods, models, plans, remote, viz
from torchsurgeon.layers import (
    Index,
    Result,
    Session,
    call,
    here,
    idx,
    input,
    ops,
    optim,
    out,
    run,
    saved,
    session,
    train,
    trained,
    training,
)
from torchsurgeon.methods import run_saving
from torchsurgeon.models import convert, generate, load
from torchsurgeon.models.families.paths import paths
from torchsurgeon.plans import Plan, apply, meta, plan
from torchsurgeon.selectors import Selection, attr, instance_of, layer_index, path, select
from torchsurgeon.surgery import (
    FrozenModuleError,
    PathError,
    SelectionError,
    SerializationError,
    SurgeryError,
    is_frozen,
    tree,
    wrap,
)
from torchsurgeon.surgery.errors import (
    ArgumentError,
    ArgumentTypeError,
    KeyNotFoundError,
    OutOfRangeError,
    SiteError,
)
from torchsurgeon.surgery.tree import functional
from torchsurgeon.viz import save_html, show, show_diff, to_html

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "FrozenModuleError",
    "Index",
    "KeyNotFoundError",
    "OutOfRangeError",
    "PathError",
    "Plan",
    "Result",
    "Selection",
    "SelectionError",
    "SerializationError",
    "Session",
    "SiteError",
    "SurgeryError",
    "__version__",
    "apply",
    "attr",
    "call",
    "convert",
    "distributed",
    "functional",
    "generate",
    "here",
    "idx",
    "input",
    "instance_of",
    "is_frozen",
    "layer_index",
    "layers",
    "load",
    "meta",
    "methods",
    "models",
    "ops",
    "optim",
    "out",
    "path",
    "paths",
    "plan",
    "plans",
    "remote",
    "run",
    "run_saving",
    "save_html",
    "saved",
    "select",
    "session",
    "show",
    "show_diff",
    "to_html",
    "train",
    "trained",
    "training",
    "tree",
    "viz",
    "wrap",
]


def __getattr__(name: str) -> object:
    """``ts.distributed``, imported when first used (it pulls in DTensor and dynamo)."""
    if name == "distributed":
        import importlib

        module = importlib.import_module("torchsurgeon.distributed")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'torchsurgeon' has no attribute {name!r}")
