"""Intervention layers: small modules that read or rewrite one tensor, and are data.

Insert them with a selection (``insert_before`` / ``insert_after``); read what the
recording ones kept with ``ts.run``. Every layer here is in the registry, the allow-list a
remote host rebuilds plans from.
"""

from torchsurgeon.layers import ops, optim
from torchsurgeon.layers.allowed import ExpressionError
from torchsurgeon.layers.base import (
    InterventionLayer,
    Recorder,
    layer_class,
    layer_types,
    register_layer,
)
from torchsurgeon.layers.compute import Compute, ComputeGrad, Stop, StopRun
from torchsurgeon.layers.edit import Add, MeanAblate, Noise, Scale, SetValues, StopGradient, Zero
from torchsurgeon.layers.expr import Expr, call, here, input, out, saved
from torchsurgeon.layers.index import Index, idx
from torchsurgeon.layers.lora import LowRankAdapter
from torchsurgeon.layers.patch import Patch
from torchsurgeon.layers.record import Save, SaveGrad
from torchsurgeon.layers.results import Result, Saved, run
from torchsurgeon.layers.session import Session, session
from torchsurgeon.layers.training import TrainResult, train, trained, training

__all__ = [
    "Add",
    "Compute",
    "ComputeGrad",
    "Expr",
    "ExpressionError",
    "Index",
    "InterventionLayer",
    "LowRankAdapter",
    "MeanAblate",
    "Noise",
    "Patch",
    "Recorder",
    "Result",
    "Save",
    "SaveGrad",
    "Saved",
    "Scale",
    "Session",
    "SetValues",
    "Stop",
    "StopGradient",
    "StopRun",
    "TrainResult",
    "Zero",
    "call",
    "here",
    "idx",
    "input",
    "layer_class",
    "layer_types",
    "ops",
    "optim",
    "out",
    "register_layer",
    "run",
    "saved",
    "session",
    "train",
    "trained",
    "training",
]
