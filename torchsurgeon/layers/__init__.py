"""Intervention layers: small modules that read or rewrite one tensor, and are data.

Insert them with a selection (``insert_before`` / ``insert_after``); read what the
recording ones kept with ``ts.run``. Every layer here is in the registry, the allow-list a
remote host rebuilds plans from.
"""

from torchsurgeon.layers.base import (
    InterventionLayer,
    Recorder,
    layer_class,
    layer_types,
    register_layer,
)
from torchsurgeon.layers.edit import Add, MeanAblate, Noise, Scale, SetValues, StopGradient, Zero
from torchsurgeon.layers.index import Index, idx
from torchsurgeon.layers.lora import LowRankAdapter
from torchsurgeon.layers.patch import Patch
from torchsurgeon.layers.record import Save, SaveGrad
from torchsurgeon.layers.results import Result, Saved, run

__all__ = [
    "Add",
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
    "SetValues",
    "StopGradient",
    "Zero",
    "idx",
    "layer_class",
    "layer_types",
    "register_layer",
    "run",
]
