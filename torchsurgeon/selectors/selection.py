"""Selections: which nodes of a frozen tree a rewrite will touch, as an immutable value.

``ts.select(model)`` starts at the root; each refinement (``at``, ``at_instances_of``,
``where``, ...) returns a new :class:`Selection` holding the same root, the selected paths
(in tree order) and the *expression* that produced them — the tuple of
:class:`SelectorStep` values, which is what a plan ships and a host replays. Rewrites
(``insert_before``, ``insert_after``, ``replace``, ``apply``, ``remove_from_parent``)
return a new frozen model; the model the selection was made from is never changed, even
when a rewrite fails half way.

The vocabulary is Penzai's, adapted to module trees: paths instead of pytree keys, classes
and class names instead of pytree node types.
"""

from __future__ import annotations

import fnmatch
import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from torchsurgeon.selectors.expression import SelectorStep
from torchsurgeon.selectors.predicates import Predicate, as_predicate, class_names, instance_of
from torchsurgeon.surgery.display import TreescopeRepr
from torchsurgeon.surgery.errors import (
    ArgumentTypeError,
    OutOfRangeError,
    PathError,
    SelectionError,
    closest,
)
from torchsurgeon.surgery.frozen import wrap
from torchsurgeon.surgery.lineage import Lineage, RewriteStep, lineage_of, with_lineage
from torchsurgeon.surgery.paths import (
    SITE_LISTS,
    child_path,
    describe,
    get_at,
    iter_nodes,
    nearest_paths,
    resolve_segment,
    split,
)
from torchsurgeon.surgery.rewrite import Edit, rewrite
from torchsurgeon.surgery.sites import add_layers, check_widths, is_container

__all__ = ["Selection", "replay", "select"]

_GLOB_CHARS = frozenset("*?[")
_BELOW_ROOT: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = (
    weakref.WeakKeyDictionary()
)


class _Index(Mapping[str, nn.Module]):
    """``{path: module}`` of a frozen tree in pre-order (``""`` is the root).

    The paths below the root are cached per tree (a frozen tree never changes shape) in a
    weak-keyed table whose values never hold the root itself — a value that held its own key
    would keep every tree, and every tensor of every plan, alive forever.
    """

    __slots__ = ("_below", "_root")

    def __init__(self, root: nn.Module) -> None:
        below = _BELOW_ROOT.get(root)
        if below is None:
            nodes = iter_nodes(root)
            next(nodes)
            below = dict(nodes)
            _BELOW_ROOT[root] = below
        self._root, self._below = root, below

    def __getitem__(self, path: str) -> nn.Module:
        return self._root if path == "" else self._below[path]

    def __iter__(self) -> Iterator[str]:
        yield ""
        yield from self._below

    def __len__(self) -> int:
        return len(self._below) + 1

    def __contains__(self, path: object) -> bool:
        return path == "" or path in self._below


def _index(model: nn.Module) -> _Index:
    return _Index(model)


def select(model: nn.Module) -> Selection:
    """Select the root of ``model`` (wrapped into a frozen tree if it is not one)."""
    return Selection(wrap(model), ("",), ())


def replay(model: nn.Module, steps: tuple[SelectorStep, ...]) -> Selection:
    """Run the selector expression ``steps`` on ``model`` from its root."""
    selection = select(model)
    for step in steps:
        method = getattr(selection, step.op)
        selection = method() if step.arg is None else method(step.arg)
    return selection


@dataclass(frozen=True)
class Selection(TreescopeRepr):
    """A frozen model, the paths selected in it, and the steps that selected them."""

    model: nn.Module
    paths: tuple[str, ...]
    steps: tuple[SelectorStep, ...]

    # ----------------------------------------------------------------- refining

    def _then(self, step: SelectorStep, paths: Sequence[str]) -> Selection:
        wanted = set(paths)
        ordered = [p for p in _index(self.model) if p in wanted] if len(wanted) > 1 else paths
        return Selection(self.model, tuple(ordered), (*self.steps, step))

    def at(self, *path: str | int) -> Selection:
        """The node(s) at ``path`` below each selected node.

        ``path`` is dotted (``"mlp.down_proj"``) or given as parts (``at("layers", -1)``);
        integer segments index sequences, negative from the end; ``*`` matches one segment
        and ``**`` any number of them (``at("**.down_proj")``). Wildcards never enter the
        lists of inserted intervention layers (``ts_before`` / ``ts_after``): name them to
        reach those layers (``at("**.ts_after.*")``), so a plan's later steps never
        multiply over what its earlier steps inserted.
        """
        pattern = ".".join(str(p) for p in path)
        parts = split(pattern)
        if any(not part for part in parts):
            raise PathError(f"at({pattern!r}): empty segment in path")
        found: list[str] = []
        for base in self.paths:
            found.extend(_match(_index(self.model)[base], base, parts))
        if not found and self.paths:
            base = self.paths[0]
            full = child_path(base, pattern) if base else pattern
            from torchsurgeon.models.families.paths import counterpart_hint  # models use us

            hint = counterpart_hint(self.model, full, _match)
            if not any(set(part) & _GLOB_CHARS for part in parts):
                try:
                    get_at(self.model, full)  # raises
                except PathError as error:
                    raise PathError(error.args[0] + hint) from None
            guesses = nearest_paths(_index(self.model)[base], pattern)
            raise PathError(
                f"at({pattern!r}) matched nothing below the {len(self.paths)} selected node(s) "
                f"(first: {describe(base)}). Nearest valid paths: "
                + ", ".join(repr(g) for g in guesses)
                + hint
            )
        return self._then(SelectorStep("at", pattern), found)

    def at_instances_of(self, cls: type[nn.Module] | str) -> Selection:
        """The outermost nodes under each selected node (itself included) of class ``cls``.

        ``cls`` is a class or a class name (bare, ``"LlamaMLP"``, or fully qualified).
        """
        if isinstance(cls, type) and not issubclass(cls, nn.Module):
            raise ArgumentTypeError(
                f"at_instances_of expects an nn.Module class, got {cls.__name__}"
            )
        predicate = instance_of(cls)
        found = self._outermost(predicate)
        if not found and self.paths:
            one_of_each = {type(m): m for m in _index(self.model).values()}.values()
            present = set().union(*map(class_names, one_of_each))
            if isinstance(cls, type):
                cls = f"{cls.__module__}.{cls.__qualname__}"
            if cls not in present:
                guesses = closest(cls, {n for n in present if "." not in n})
                raise SelectionError(
                    f"at_instances_of({cls!r}): no module of that class anywhere in this "
                    f"{type(self.model).__name__}; did you mean one of: {', '.join(guesses)}?"
                )
        name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        return self._then(SelectorStep("at_instances_of", name), found)

    def at_subtrees_where(self, predicate: Predicate | Callable[..., bool]) -> Selection:
        """The outermost nodes under each selected node (itself included) where it holds."""
        pred = as_predicate(predicate)
        return self._then(SelectorStep("at_subtrees_where", pred), self._outermost(pred))

    def at_children(self) -> Selection:
        """The direct children of each selected node."""
        index = _index(self.model)
        found = [
            child_path(p, name)
            for p in self.paths
            for name, child in index[p]._modules.items()
            if child is not None
        ]
        return self._then(SelectorStep("at_children", None), found)

    def where(self, predicate: Predicate | Callable[..., bool]) -> Selection:
        """Keep the selected nodes for which ``predicate`` holds."""
        pred = as_predicate(predicate)
        index = _index(self.model)
        return self._then(SelectorStep("where", pred), [p for p in self.paths if pred(p, index[p])])

    def pick_nth_selected(self, n: int | Sequence[int]) -> Selection:
        """Keep the ``n``-th selected node(s) in tree order (negative counts from the end)."""
        wanted = [n] if isinstance(n, int) else list(n)
        count = len(self.paths)
        for i in wanted:
            if not isinstance(i, int) or not -count <= i < count:
                raise OutOfRangeError(
                    f"pick_nth_selected({n!r}): the selection has {count} node(s), so valid "
                    f"positions are {-count}..{count - 1}"
                    if count
                    else f"pick_nth_selected({n!r}): the selection is empty"
                )
        return self._then(
            SelectorStep("pick_nth_selected", tuple(wanted)), [self.paths[i] for i in wanted]
        )

    def invert(self) -> Selection:
        """The largest subtrees that neither hold nor lie inside a selected node."""
        chosen = set(self.paths)
        # every proper ancestor of a selected node (the root's ancestor set includes "")
        holding = {".".join(split(p)[:i]) for p in chosen for i in range(len(split(p)))}
        found: list[str] = []

        def visit(node: nn.Module, path: str) -> None:
            if path in chosen:
                return
            if path not in holding:
                found.append(path)
                return
            for name, child in node._modules.items():
                if child is not None:
                    visit(child, child_path(path, name))

        visit(self.model, "")
        return self._then(SelectorStep("invert", None), found)

    def _outermost(self, pred: Predicate) -> list[str]:
        found: list[str] = []

        def visit(node: nn.Module, path: str) -> None:
            if pred(path, node):
                found.append(path)
                return
            for name, child in node._modules.items():
                if child is not None:
                    visit(child, child_path(path, name))

        index = _index(self.model)
        for base in self.paths:
            visit(index[base], base)
        return found

    # ----------------------------------------------------------------- inspecting

    def count(self) -> int:
        """How many nodes are selected."""
        return len(self.paths)

    def get(self) -> nn.Module:
        """The selected module, when exactly one is selected."""
        if len(self.paths) != 1:
            listing = ", ".join(repr(p) for p in self.paths[:5])
            raise SelectionError(
                f"get() needs exactly one selected node; this selection has {len(self.paths)}"
                + (f": {listing}{', ...' if len(self.paths) > 5 else ''}" if self.paths else "")
                + ". Use get_all(), or narrow it with pick_nth_selected(n)."
            )
        return _index(self.model)[self.paths[0]]

    def get_all(self) -> tuple[nn.Module, ...]:
        """The selected modules, in tree order."""
        index = _index(self.model)
        return tuple(index[p] for p in self.paths)

    def show(self) -> Any:
        """Render the tree with this selection outlined (treescope; see ``ts.show``)."""
        import treescope

        return treescope.show(self)

    def __repr__(self) -> str:
        shown = ", ".join(repr(p) for p in self.paths[:4])
        more = f", ... ({len(self.paths)} in all)" if len(self.paths) > 4 else ""
        expression = "".join(f".{s}" for s in self.steps)
        return f"Selection(select({type(self.model).__name__}){expression} -> [{shown}{more}])"

    # ----------------------------------------------------------------- rewriting

    def insert_before(self, layer: nn.Module) -> nn.Module:
        """A new model with ``layer`` run on each selected node's input (see sites)."""
        return self._insert("insert_before", layer)

    def insert_after(self, layer: nn.Module) -> nn.Module:
        """A new model with ``layer`` run on each selected node's output (see sites)."""
        return self._insert("insert_after", layer)

    def replace(self, module: nn.Module) -> nn.Module:
        """A new model with each selected node replaced by ``module``."""
        _check_module(module, "replace")
        return self._rewrite(
            "replace", module, lambda n, path: lambda node, _: _for_site(module, path, n)
        )

    def apply(self, fn: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """A new model with each selected node replaced by ``fn(node)`` (local-only)."""
        if not callable(fn):
            raise ArgumentTypeError(
                f"apply expects a callable module -> module, got {type(fn).__name__}"
            )

        def make(n: int, path: str) -> Edit:
            def edit(node: nn.Module, _: str) -> nn.Module:
                result = fn(node)
                if not isinstance(result, nn.Module):
                    raise ArgumentTypeError(
                        f"apply: the function returned {type(result).__name__} for "
                        f"{describe(path)}; it must return an nn.Module"
                    )
                return result

            return edit

        return self._rewrite("apply", fn, make)

    def remove_from_parent(self) -> nn.Module:
        """A new model without the selected nodes; each parent must be a sequence.

        Later siblings move up (a ``ModuleList`` is renumbered, as ``del list[i]`` would).
        """
        self._require_nonempty("remove_from_parent")
        index = _index(self.model)
        doomed: dict[str, set[str]] = {}
        for path in self.paths:
            if not path:
                raise SelectionError("remove_from_parent: the root has no parent")
            parent_path, _, name = path.rpartition(".")
            parent = index[parent_path]
            if not isinstance(parent, (nn.ModuleList, nn.Sequential)):
                raise SelectionError(
                    f"remove_from_parent: the parent of {describe(path)} is a "
                    f"{type(parent).__name__}, not a ModuleList or Sequential, so removing "
                    "the child would leave its forward() calling a missing module. Use "
                    "replace(torch.nn.Identity()) there instead."
                )
            doomed.setdefault(parent_path, set()).add(name)

        def make(parent_path: str) -> Edit:
            def edit(node: nn.Module, _: str) -> nn.Module:
                kept = [m for k, m in node._modules.items() if k not in doomed[parent_path]]
                node._modules.clear()
                node._modules.update({str(i): m for i, m in enumerate(kept)})
                return node

            return edit

        new = rewrite(self.model, {p: make(p) for p in doomed})
        return self._record(new, "remove_from_parent", None)

    def _insert(self, operation: str, layer: nn.Module) -> nn.Module:
        _check_module(layer, operation)
        self._require_nonempty(operation)
        containers = [
            path
            for path, node in zip(self.paths, self.get_all(), strict=True)
            if is_container(node)
        ]
        if containers:
            shown = ", ".join(describe(p) for p in containers[:3])
            more = f" (and {len(containers) - 3} more)" if len(containers) > 3 else ""
            raise SelectionError(
                f"{operation}: {shown}{more} is a container (Sequential, ModuleList or "
                "ModuleDict), whose children are its contents: a layer sitting on it would be "
                "run as one more element. Insert on a child instead (before the first, after "
                "the last), or leave containers out of the selection with "
                ".where(~ts.instance_of('ModuleList')) (or 'Sequential')"
            )
        before = operation == "insert_before"
        check_widths(operation, layer, before, self.paths, self.get_all())
        placed = {path: _for_site(layer, path, n) for n, path in enumerate(self.paths)}
        if getattr(type(layer), "ts_records", False):
            self._check_record_keys(operation, placed)

        def make(n: int, path: str) -> Edit:
            def edit(node: nn.Module, _: str) -> nn.Module:
                site_layer = placed[path]
                add_layers(node, [site_layer] if before else [], [] if before else [site_layer])
                return node

            return edit

        return self._rewrite(operation, layer, make)

    def _check_record_keys(self, operation: str, placed: Mapping[str, nn.Module]) -> None:
        """Refuse recording layers whose keys collide (with each other or the model's)."""
        taken = {
            m.key: m.site
            for m in _index(self.model).values()
            if getattr(type(m), "ts_records", False)
        }
        for path, site_layer in placed.items():
            key = site_layer.key
            if key in taken:
                raise SelectionError(
                    f"{operation}: {type(site_layer).__name__} at {describe(path)} would record "
                    f"under the key {key!r}, which the recording layer at "
                    f"{describe(taken[key])} already uses. Give each site its own key: a "
                    "template such as Save('resid{layer}') or Save('x{n}'), or Save() to key "
                    "each by its path."
                )
            taken[key] = path

    def _rewrite(self, operation: str, payload: Any, make: Callable[[int, str], Edit]) -> nn.Module:
        self._require_nonempty(operation)
        new = rewrite(self.model, {path: make(n, path) for n, path in enumerate(self.paths)})
        return self._record(new, operation, payload)

    def _record(self, new: nn.Module, operation: str, payload: Any) -> nn.Module:
        old = lineage_of(self.model)
        step = RewriteStep(self.steps, operation, payload)
        return with_lineage(new, Lineage(old.base, (*old.steps, step)))

    def _require_nonempty(self, operation: str) -> None:
        if not self.paths:
            expression = "".join(f".{s}" for s in self.steps) or "(root)"
            raise SelectionError(
                f"{operation}: the selection is empty, so there is nothing to rewrite. It was "
                f"made by select(model){expression}; check it with .count() / .paths first."
            )


def _check_module(value: Any, operation: str) -> None:
    if not isinstance(value, nn.Module):
        raise ArgumentTypeError(
            f"{operation} expects an nn.Module (e.g. a ts.layers layer), got {type(value).__name__}"
        )


def _for_site(layer: nn.Module, path: str, n: int) -> nn.Module:
    """The copy of ``layer`` that sits at ``path`` (layers that know sites make their own)."""
    for_site = getattr(layer, "for_site", None)
    return for_site(path, n) if callable(for_site) else layer


_MAX_DEEP_GLOBS = 8


def _match(node: nn.Module, path: str, parts: list[str]) -> list[str]:
    """Paths below ``node`` (at ``path``) matching the segment pattern ``parts``.

    A walk over (node, pattern position) states, each visited once, so the cost is bounded
    by nodes x segments whatever the pattern (consecutive ``**`` mean one ``**``).
    """
    parts = [p for i, p in enumerate(parts) if not (p == "**" and i and parts[i - 1] == "**")]
    if parts.count("**") > _MAX_DEEP_GLOBS:
        raise PathError(
            f"at({'.'.join(parts)!r}): more than {_MAX_DEEP_GLOBS} '**' segments in one path"
        )
    found: dict[str, None] = {}
    seen: set[tuple[str, int]] = set()
    # compiled here, not through fnmatch's process-wide cache of 32768 patterns, which user
    # path segments (from plans a host receives) would otherwise fill
    globs: dict[str, Callable[[str], Any]] = {}

    def visit(node: nn.Module, path: str, i: int) -> None:
        if (path, i) in seen:
            return
        seen.add((path, i))
        if i == len(parts):
            found[path] = None
            return
        head = parts[i]
        if head == "**":
            visit(node, path, i + 1)
            for name, child in node._modules.items():
                if child is not None and name not in SITE_LISTS:
                    visit(child, child_path(path, name), i)
            return
        if set(head) & _GLOB_CHARS:
            matches = globs.setdefault(head, re.compile(fnmatch.translate(head)).fullmatch)
            names = [
                k
                for k, c in node._modules.items()
                if c is not None and k not in SITE_LISTS and matches(k)
            ]
        else:
            resolved = resolve_segment(node, head)
            names = [resolved] if resolved is not None else []
        for name in names:
            visit(node._modules[name], child_path(path, name), i + 1)

    visit(node, path, 0)
    return list(found)
