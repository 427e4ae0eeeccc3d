"""Structure-only models: the shape of a model without its weights, and how to ship it.

A researcher writes selectors against a model; a hosted 70B model cannot be downloaded to
write them. :func:`meta` turns any model into a frozen tree on the meta device — the same
paths, classes and tensor shapes, no bytes — and ``ts.run`` on it propagates shapes without
computing (feed it inputs on ``torch.device("meta")``).

:class:`Structure` is that shape as JSON, which a host serves and a client rebuilds:

- ``kind="transformers"``: the ``transformers`` class name and its config dict; the client
  builds the class under ``torch.device("meta")``, so it even runs (shape checks). The
  class is looked up by name in ``transformers``' own exports and must be a
  ``PreTrainedModel``: data, never code.
- ``kind="tree"``: for any other module, every node's path, class name, public scalar
  attributes and tensor shapes; the client builds stand-in modules with those class names
  (selectors, ``ts.attr``, plans all work; it has no ``forward``).

Either way the rebuilt model is *pinned* to the served model's identity, so a plan made
against it carries the hosted weights' fingerprint and applies exactly on the host — and
on a local copy loaded from the same checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from torchsurgeon.plans.errors import IdentityMismatchError, PlanFormatError
from torchsurgeon.plans.identity import BaseIdentity, identity_of, pin_identity
from torchsurgeon.plans.schema import DTYPES
from torchsurgeon.surgery.frozen import original_class, wrap
from torchsurgeon.surgery.lineage import Lineage, with_lineage
from torchsurgeon.surgery.paths import iter_nodes
from torchsurgeon.surgery.tree import map as map_tensors

__all__ = ["Structure", "meta", "structure_of"]

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_CONTAINERS = {
    "torch.nn.modules.container.ModuleList": nn.ModuleList,
    "torch.nn.modules.container.Sequential": nn.Sequential,
    "torch.nn.modules.container.ModuleDict": nn.ModuleDict,
}


def meta(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` on the meta device, pinned to ``model``'s identity."""
    identity = identity_of(model)
    structure_only = map_tensors(lambda t: t.to("meta"), wrap(model))
    structure_only = with_lineage(structure_only, Lineage(structure_only, ()))
    return pin_identity(structure_only, identity)


@dataclass(frozen=True)
class Structure:
    """A model's structure as JSON-able data, with the identity of the model it describes."""

    kind: Literal["transformers", "tree"]
    architecture: str
    identity: BaseIdentity
    config: Mapping[str, Any] | None = None
    nodes: tuple[Mapping[str, Any], ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "architecture": self.architecture,
            "identity": self.identity.to_json(),
            "config": dict(self.config) if self.config is not None else None,
            "nodes": [dict(n) for n in self.nodes],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Structure:
        try:
            return cls(
                kind=data["kind"],
                architecture=str(data["architecture"]),
                identity=BaseIdentity.from_json(dict(data["identity"])),
                config=data.get("config"),
                nodes=tuple(data.get("nodes") or ()),
            )
        except (KeyError, TypeError) as error:
            raise PlanFormatError(f"not a model structure: missing or bad {error}") from None

    def build(self) -> nn.Module:
        """The structure-only model (meta device, frozen), pinned to :attr:`identity`."""
        if self.kind == "transformers":
            model = _build_transformers(self.architecture, dict(self.config or {}))
        elif self.kind == "tree":
            model = _build_tree(self.nodes)
        else:
            raise PlanFormatError(f"unknown structure kind {self.kind!r}", "kind")
        model = wrap(model.eval())
        model = with_lineage(model, Lineage(model, ()))
        try:
            return pin_identity(model, self.identity)
        except IdentityMismatchError:
            raise IdentityMismatchError(
                f"the {self.architecture} built here from the served structure differs from the "
                "served model (a different transformers version here than on the host?)"
            ) from None


def structure_of(model: nn.Module, identity: BaseIdentity | None = None) -> Structure:
    """The :class:`Structure` of ``model`` (its identity computed unless given)."""
    identity = identity or identity_of(model)
    cls = original_class(model)
    config = getattr(model, "config", None)
    if _is_exported_transformers_model(cls) and hasattr(config, "to_dict"):
        return Structure("transformers", cls.__name__, identity, config=config.to_dict())
    nodes = []
    for path, node in iter_nodes(model):
        kind = original_class(node)
        tensors = {
            name: {
                "shape": list(t.shape),
                "dtype": _DTYPE_NAMES.get(t.dtype, "float32"),
                "parameter": name in node._parameters,
            }
            for name, t in [*node._parameters.items(), *node._buffers.items()]
            if t is not None
        }
        attrs = {
            k: v
            for k, v in vars(node).items()
            if not k.startswith("_") and k != "training" and _is_scalar(v)
        }
        nodes.append(
            {
                "path": path,
                "module": kind.__module__,
                "qualname": kind.__qualname__,
                "attrs": attrs,
                "tensors": tensors,
            }
        )
    return Structure("tree", cls.__name__, identity, nodes=tuple(nodes))


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _is_exported_transformers_model(cls: type) -> bool:
    if not cls.__module__.startswith("transformers."):
        return False
    import transformers

    return getattr(transformers, cls.__name__, None) is cls


def _build_transformers(architecture: str, config: dict[str, Any]) -> nn.Module:
    import transformers
    from transformers import CONFIG_MAPPING, PreTrainedModel

    cls = getattr(transformers, architecture, None) if architecture.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise PlanFormatError(
            f"{architecture!r} is not a model class exported by transformers", "architecture"
        )
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise PlanFormatError(f"unknown transformers model_type {model_type!r}", "config")
    hf_config = CONFIG_MAPPING[model_type].from_dict(config)
    dtype = DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or ""))
    with torch.device("meta"):
        model = cls(hf_config)
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
    return model


class _StandIn(nn.Module):
    """A node of a ``tree`` structure: named like the real class, holding meta tensors."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"{type(self).__qualname__} here is a stand-in built from a served structure; it "
            "can be selected and planned against, but not run"
        )


def _build_tree(nodes: tuple[Mapping[str, Any], ...]) -> nn.Module:
    built: dict[str, nn.Module] = {}
    classes: dict[tuple[str, str], type[nn.Module]] = {}
    for node in nodes:
        path, module, qualname = str(node["path"]), str(node["module"]), str(node["qualname"])
        container = _CONTAINERS.get(f"{module}.{qualname}")
        if container is not None:
            instance: nn.Module = container()
        else:
            key = (module, qualname)
            if key not in classes:
                classes[key] = type(
                    qualname.rpartition(".")[2] or "Module",
                    (_StandIn,),
                    {"__module__": module, "__qualname__": qualname},
                )
            instance = classes[key]()
        for name, value in dict(node.get("attrs") or {}).items():
            if _is_scalar(value) and str(name).isidentifier():
                object.__setattr__(instance, str(name), value)
        for name, info in dict(node.get("tensors") or {}).items():
            dtype = DTYPES.get(info.get("dtype"), torch.float32)
            tensor = torch.empty(list(info["shape"]), dtype=dtype, device="meta")
            if info.get("parameter"):
                instance.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            else:
                instance.register_buffer(name, tensor)
        if path:
            parent, _, name = path.rpartition(".")
            if parent not in built:
                raise PlanFormatError(f"node {path!r} comes before its parent", "nodes")
            built[parent].add_module(name, instance)
        built[path] = instance
    if "" not in built:
        raise PlanFormatError("the structure has no root node", "nodes")
    return built[""]
