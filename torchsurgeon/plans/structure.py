"""Structure-only models: the shape of a model without its weights, and how to ship it.

A researcher writes selectors against a model; a hosted 70B model cannot be downloaded to
write them. :func:`meta` turns any model into a frozen tree on the meta device — the same
paths, classes and tensor shapes, no bytes — and ``ts.run`` on it propagates shapes without
computing (feed it inputs on ``torch.device("meta")``).

:class:`Structure` is that shape as JSON, which a host serves and a client rebuilds:

- ``kind="transformers"``: the ``transformers`` class name and its config dict; the client
  builds the class under ``torch.device("meta")``, so it even runs (shape checks).
- ``kind="tree"``: for any other module, every node's path, class name, public scalar
  attributes and tensor shapes; the client builds stand-in modules with those class names
  (selectors, ``ts.attr``, plans all work; it has no ``forward``).

What a host serves is data, and the client builds from it only what an allow-list permits:
a ``transformers`` class is accepted only if ``transformers``' own auto-class tables list it
for the config's ``model_type`` (or its modeling module defines it next to one they list)
and its ``config_class`` is that model type's config class; the config loses every key
that could make building the model load code or kernels (``attn_implementation``,
``auto_map``, private ``_...`` keys). A ``tree`` node is a real class only for the
``torch.nn`` containers; every other node is a stand-in whose class *names* the host's
class and imports nothing. Nothing named by the host is imported. In the other direction
:func:`structure_of` serves no host-local facts: ``_name_or_path`` and any string that is a
filesystem path (absolute, ``~``, ``file:``) are left out.

Either way the rebuilt model is *pinned* to the served model's identity, so a plan made
against it carries the hosted weights' fingerprint and applies exactly on the host — and
on a local copy loaded from the same checkpoint.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from torchsurgeon.plans.errors import IdentityMismatchError, PlanFormatError
from torchsurgeon.plans.identity import BaseIdentity, identity_of, pin_identity
from torchsurgeon.plans.schema import DTYPES
from torchsurgeon.surgery.errors import ArgumentTypeError
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
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
"""The attention implementations built into ``transformers`` (none loads a kernel or code):
what a host may serve and a structure-only model may be built with."""
# Config keys that say where the host keeps its files (never served).
_HOST_LOCAL_KEYS = frozenset({"_name_or_path", "name_or_path", "_commit_hash"})
# Config keys a client never builds from: they choose code to load (attention kernels from
# the Hub, remote code), quantizers, or are private bookkeeping (every ``_...`` key).
_UNSAFE_CONFIG_KEYS = frozenset(
    {
        "attn_implementation",
        "experts_implementation",
        "auto_map",
        "trust_remote_code",
        "quantization_config",
        "name_or_path",
    }
)
_LOCAL_PATH = re.compile(r"^(/|~|\\\\|file:|[A-Za-z]:[\\/])")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z_][A-Za-z0-9_]*|<locals>))*$")


def meta(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` on the meta device, pinned to ``model``'s identity."""
    identity = identity_of(model)
    structure_only = without_value_warnings(map_tensors(lambda t: t.to("meta"), wrap(model)))
    structure_only = with_lineage(structure_only, Lineage(structure_only, ()))
    return pin_identity(structure_only, identity)


def without_value_warnings(model: nn.Module) -> nn.Module:
    """``model`` (a structure-only copy of our own) with ``transformers``' padding warning off.

    ``PreTrainedModel.warn_if_padding_and_no_attention_mask`` reads token values
    (``pad_token_id in input_ids[:, [-1, 0]]``) only to log a warning; on meta tensors that
    read fails, and a meta run of GPT-2, BERT, ... with a ``pad_token_id`` and no attention
    mask would crash or be refused as value-dependent. The check is switched off on each
    node of this copy — an instance attribute of nodes nobody else holds, never the class —
    and changes nothing the model computes.
    """
    for _, node in iter_nodes(model):
        if callable(getattr(type(node), "warn_if_padding_and_no_attention_mask", None)):
            node.__dict__["warn_if_padding_and_no_attention_mask"] = _no_warning
    return model


def _no_warning(input_ids: Any, attention_mask: Any) -> None:
    return None


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

    def build(self, attn_implementation: str | None = None) -> nn.Module:
        """The structure-only model (meta device, frozen), pinned to :attr:`identity`.

        ``attn_implementation`` (``"eager"`` or ``"sdpa"``, the two built into
        ``transformers``; None for its default) picks a ``transformers`` model's attention,
        as the served model's was picked: the masks its layers receive depend on it (eager
        attention is given a 4-D mask, SDPA often none), so a stand-in that estimates a plan
        reading ``attention_mask`` must use the host's. Any other value is refused.

        :class:`PlanFormatError` when the structure names a class outside the allow-list
        (see the module docstring) or is malformed.
        """
        if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise PlanFormatError(
                f"attn_implementation must be {' or '.join(map(repr, ATTN_IMPLEMENTATIONS))} "
                f"(or None), got {attn_implementation!r}",
                "attn_implementation",
            )
        try:
            if self.kind == "transformers":
                if not isinstance(self.config, Mapping):
                    raise PlanFormatError(
                        "a transformers structure needs a config object", "config"
                    )
                model = _build_transformers(
                    self.architecture, dict(self.config), attn_implementation
                )
            elif self.kind == "tree":
                model = _build_tree(self.nodes)
            else:
                raise PlanFormatError(f"unknown structure kind {self.kind!r}", "kind")
        except PlanFormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
            raise PlanFormatError(f"malformed structure: {error!r}", "nodes") from None
        model = without_value_warnings(wrap(model.eval()))
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
    model_type = getattr(config, "model_type", None)
    if (
        hasattr(config, "to_dict")
        and cls.__module__.startswith("transformers.")
        and _transformers_class(cls.__name__, model_type) is cls
    ):
        served = _without_local_paths(config.to_dict())
        return Structure("transformers", cls.__name__, identity, config=served)
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
            if not k.startswith("_") and k != "training" and _is_scalar(v) and not _is_path(v)
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


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and _LOCAL_PATH.match(value) is not None


def _without_local_paths(value: Any) -> Any:
    """``value`` (a config's JSON) without host-local keys and strings that are file paths."""
    if isinstance(value, Mapping):
        return {
            k: _without_local_paths(v)
            for k, v in value.items()
            if k not in _HOST_LOCAL_KEYS and not _is_path(v)
        }
    if isinstance(value, (list, tuple)):
        return [_without_local_paths(v) for v in value if not _is_path(v)]
    return value


def _buildable_config(value: Any) -> Any:
    """A served config without the keys a client never builds from (see the module doc)."""
    if isinstance(value, Mapping):
        return {
            k: _buildable_config(v)
            for k, v in value.items()
            if isinstance(k, str) and not k.startswith("_") and k not in _UNSAFE_CONFIG_KEYS
        }
    if isinstance(value, list):
        return [_buildable_config(v) for v in value]
    return value


def _architectures(model_type: str) -> list[str]:
    """The model class names ``transformers``' auto-class tables list for ``model_type``."""
    from transformers.models.auto import modeling_auto

    names: list[str] = []
    for table_name, table in vars(modeling_auto).items():
        if not table_name.endswith("_MAPPING_NAMES") or table_name == "CONFIG_MAPPING_NAMES":
            continue
        if not isinstance(table, Mapping):
            continue
        entry = table.get(model_type)
        for name in (entry,) if isinstance(entry, str) else entry or ():
            if isinstance(name, str) and name not in names:
                names.append(name)
    return names


def _transformers_class(architecture: str, model_type: Any) -> type | None:
    """The allow-listed ``transformers`` model class ``architecture`` of ``model_type``, or None.

    Allowed: a class the auto-class tables list for ``model_type``, or a ``PreTrainedModel``
    defined in the same modeling module as one of those (``GPT2DoubleHeadsModel``), whose
    ``config_class`` is ``model_type``'s config class. Only names taken from those tables are
    looked up on ``transformers``; ``architecture`` itself is only compared with them and
    looked up in an already imported module's own namespace.
    """
    from transformers import CONFIG_MAPPING, PreTrainedModel

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return None
    import transformers

    listed = _architectures(model_type)
    if not listed:
        return None
    if architecture in listed:
        cls = getattr(transformers, architecture, None)
    else:
        anchor = getattr(transformers, listed[0], None)
        module = sys.modules.get(getattr(anchor, "__module__", ""))
        cls = vars(module).get(architecture) if module is not None else None
        if not (isinstance(cls, type) and cls.__module__ == getattr(module, "__name__", None)):
            return None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        return None
    config_class = CONFIG_MAPPING[model_type]
    wanted = getattr(cls, "config_class", None)
    if not (isinstance(wanted, type) and issubclass(config_class, wanted)):
        return None
    return cls


def _build_transformers(
    architecture: str, config: dict[str, Any], attn_implementation: str | None
) -> nn.Module:
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise PlanFormatError(f"unknown transformers model_type {model_type!r}", "config")
    cls = _transformers_class(architecture, model_type)
    if cls is None:
        listed = ", ".join(_architectures(model_type)) or "none"
        raise PlanFormatError(
            f"{architecture!r} is not a transformers model class for model_type "
            f"{model_type!r}; allowed: {listed}",
            "architecture",
        )
    try:
        hf_config = CONFIG_MAPPING[model_type].from_dict(_buildable_config(config))
        if attn_implementation is not None:  # built in: loads no code
            hf_config._attn_implementation = attn_implementation
        dtype = DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or ""))
        with torch.device("meta"):
            model = cls(hf_config)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as error:
        raise PlanFormatError(
            f"the served {model_type} config does not build a {architecture}: {error}", "config"
        ) from None
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
    return model


class _StandIn(nn.Module):
    """A node of a ``tree`` structure: named like the real class, holding meta tensors."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise ArgumentTypeError(
            f"{type(self).__qualname__} here is a stand-in built from a served structure; it "
            "can be selected and planned against, but not run: run the plan on the host "
            "(client.run(plan, ...)) or on the real model"
        )


def _build_tree(nodes: tuple[Mapping[str, Any], ...]) -> nn.Module:
    built: dict[str, nn.Module] = {}
    classes: dict[tuple[str, str], type[nn.Module]] = {}
    for node in nodes:
        path, module, qualname = str(node["path"]), str(node["module"]), str(node["qualname"])
        if not (_DOTTED.match(module) and _DOTTED.match(qualname)):
            raise PlanFormatError(
                f"node {path!r}: class {module}.{qualname} is not a dotted Python name", "nodes"
            )
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
