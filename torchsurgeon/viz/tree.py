"""Drawing a module tree: the treescope rendering of a :class:`~torchsurgeon.viz.view.View`.

Each module is one foldable node — its class name, its settings (``extra_repr``), its
parameters and buffers as one-line tensor summaries, then its child modules under their
names — the layout of ``print(model)``, but foldable, with copy-path buttons that copy the
torchsurgeon path (``transformer.h.0.mlp``, ready for ``.at(...)``).

On top of that the view decides what stands out:

- *selected* nodes sit in an orange outlined box, tagged ``◆n`` with their position in the
  selection (what ``pick_nth_selected(n)`` keeps); everything that neither holds nor lies
  inside a selected node is faded and folded, so the selection reads at a glance;
- *inserted* intervention layers (children of a ``ts_before``/``ts_after`` list) are drawn
  as violet blocks listing their type, site, ``on``, ``index``, config values and tensors;
- in a *diff*, added subtrees are outlined green and tagged ``+``, changed nodes amber
  ``~``, removed children listed in red ``-``; unchanged subtrees (shared with the base)
  are faded and folded;
- in a run of same-class siblings (the 32 blocks of a ``ModuleList``) only the first is
  unfolded; the others fold to one line unless something highlighted sits inside.

Folding uses treescope's expand states: what the view cares about is set strongly, the rest
is left to treescope's layout algorithm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import treescope
from torch import nn
from treescope import renderers, rendering_parts

from torchsurgeon.layers.base import InterventionLayer
from torchsurgeon.surgery.frozen import original_class
from torchsurgeon.surgery.paths import child_path, iter_nodes, split
from torchsurgeon.surgery.sites import AFTER, BEFORE
from torchsurgeon.viz import styles
from torchsurgeon.viz.diff import Change, TreeDiff, diff_trees
from torchsurgeon.viz.tensors import render_tensor
from torchsurgeon.viz.view import View

__all__ = ["MAX_UNFOLDED_LINES", "default_layout", "render_view"]

Rendering = rendering_parts.RenderableAndLineAnnotations
Part = rendering_parts.RenderableTreePart
ExpandState = rendering_parts.ExpandState
_SITE_LISTS = (BEFORE, AFTER)
_INSERTED_BLOCK = "#d0bfff"
_SITE_BLOCK = "#eee8ff"

MAX_UNFOLDED_LINES = 200
"""How many lines ``show``/``to_html`` unfold before leaving the rest folded."""


@contextlib.contextmanager
def default_layout() -> Iterator[None]:
    """treescope's layout for ``show``/``to_html``: room for the top levels and a first block.

    Nodes the view decides about (highlights, repeated blocks, faded subtrees) keep their
    fold state; treescope's balanced layout settles the rest within
    :data:`MAX_UNFOLDED_LINES`.
    """
    with treescope.using_expansion_strategy(max_height=MAX_UNFOLDED_LINES):
        yield


@dataclass(frozen=True)
class _Scene:
    """Facts about the whole view, computed once before drawing."""

    view: View
    renderer: renderers.TreescopeSubtreeRenderer
    selected: dict[str, int]
    inserted: frozenset[str]
    diff: TreeDiff | None
    hot: frozenset[str]
    emphasis: bool


@dataclass(frozen=True)
class _Context:
    """What a node inherits from its ancestors while drawing."""

    change: Change | None = None  # an ADDED or SHARED ancestor's mark covers its subtree
    lit: bool = False  # inside a selected, added or changed node: never faded
    faded: bool = False  # an ancestor is already faded (fading twice would compound)
    inserted: bool = False  # inside an inserted layer


def render_view(
    view: View, path: str | None, subtree_renderer: renderers.TreescopeSubtreeRenderer
) -> Rendering:
    """The treescope rendering of ``view`` (a treescope handler's result)."""
    del path  # node paths in the picture are torchsurgeon paths from the view's root
    scene = _scene(view, subtree_renderer)
    return _node(scene, view.model, "", _Context(), repeat=0, summary=_summary(scene))


# ----------------------------------------------------------------------------- facts


def _scene(view: View, renderer: renderers.TreescopeSubtreeRenderer) -> _Scene:
    nodes = list(iter_nodes(view.model))
    selected = {p: i for i, p in enumerate(view.selected or ())}
    inserted = frozenset(p for p, _ in nodes if _is_inserted(p))
    diff = diff_trees(view.base, view.model) if view.base is not None else None
    marked: set[str] = set(selected) | set(inserted)
    if diff is not None:
        marked |= {p for p, c in diff.changes.items() if c in (Change.ADDED, Change.CHANGED)}
        marked |= set(diff.removed)
    hot = frozenset(prefix for p in marked for prefix in _prefixes(p))
    emphasis = view.selected is not None or (diff is not None and not diff.is_empty())
    return _Scene(view, renderer, selected, inserted, diff, hot, emphasis)


def _is_inserted(path: str) -> bool:
    parts = split(path)
    return len(parts) >= 2 and parts[-2] in _SITE_LISTS


def _prefixes(path: str) -> Iterable[str]:
    parts = split(path)
    return (".".join(parts[:n]) for n in range(len(parts) + 1))


def _summary(scene: _Scene) -> Part | None:
    """The comment on the root's first line: what the picture shows, in words."""
    parts = [scene.view.title] if scene.view.title else []
    if scene.view.selected is not None:
        parts.append(f"{len(scene.selected)} selected (◆n: n-th in selection order)")
    layers = len(scene.inserted)
    if layers:
        parts.append(f"{layers} inserted layer{'s' if layers != 1 else ''}")
    if scene.diff is not None:
        counts = scene.diff.counts()
        if scene.diff.is_empty():
            parts.append("no changes from the base")
        else:
            parts.append(
                f"vs base: +{counts['added']} added, ~{counts['changed']} changed, "
                f"-{counts['removed']} removed"
            )
    if not parts:
        return None
    return rendering_parts.comment_color(rendering_parts.text("  # " + " · ".join(parts)))


# ----------------------------------------------------------------------------- nodes


def _node(
    scene: _Scene,
    module: nn.Module,
    path: str,
    context: _Context,
    *,
    repeat: int,
    summary: Part | None = None,
) -> Rendering:
    """One module and its subtree (the line's key and box are added by the parent)."""
    change = context.change
    if change is None and scene.diff is not None:
        change = scene.diff.changes.get(path)
    inserted = context.inserted or path in scene.inserted
    lit = context.lit or path in scene.selected or change in (Change.ADDED, Change.CHANGED)
    fade = scene.emphasis and not lit and path not in scene.hot and not context.faded
    inherited = _Context(
        change=change if change in (Change.ADDED, Change.SHARED) else None,
        lit=lit,
        faded=context.faded or fade,
        inserted=inserted,
    )

    children: list[_Line] = []
    if isinstance(module, InterventionLayer):
        children.extend(_layer_fields(scene, module, path))
    else:
        children.extend(_settings(module))
    children.extend(_tensors(scene, module, path))
    children.extend(_submodules(scene, module, path, inherited))
    if scene.diff is not None and change not in (Change.ADDED, Change.SHARED):
        children.extend(_removed(scene.diff.removed.get(path, ())))

    has_submodules = any(c is not None for c in module._modules.values())
    is_layer = isinstance(module, InterventionLayer)
    if path == "" or is_layer or (has_submodules and (path in scene.hot or inserted)):
        state = ExpandState.EXPANDED
    elif fade or (repeat > 0 and scene.view.fold_repeats):
        state = ExpandState.COLLAPSED
    else:
        state = ExpandState.WEAKLY_EXPANDED

    background = None
    site_list = bool(path) and split(path)[-1] in _SITE_LISTS
    if path in scene.inserted:
        background = _INSERTED_BLOCK
    elif site_list:
        background = _SITE_BLOCK
        summary = _site_note(path)

    prefix = rendering_parts.siblings(
        rendering_parts.maybe_qualified_type_name(original_class(module)), "("
    )
    if has_submodules or is_layer or path == "":
        lines = _assemble(children)
        if has_submodules and not is_layer:
            lines = [_folded_as_count(module, lines)]
        rendering = rendering_parts.build_foldable_tree_node_from_children(
            prefix=prefix,
            children=lines,
            suffix=")",
            path=path or None,
            background_color=background,
            first_line_annotation=summary,
            expand_state=state,
            child_type_single_and_plural=("child", "children"),
        )
    else:  # a leaf module reads best as one line, like ``print(model)`` shows it
        rendering = _one_line(prefix, children, path, background)
    if path in scene.inserted:
        rendering = _styled(rendering, styles.INSERTED.mark_css)
    elif site_list:
        rendering = _styled(rendering, styles.SITE.mark_css)
    if fade:
        rendering = _styled(rendering, styles.DIM_CSS)
    if path == "" and path in scene.selected:
        rendering = _boxed(rendering, styles.SELECTED)
    return rendering


def _folded_as_count(module: nn.Module, lines: list[Part]) -> Part:
    """The lines when unfolded; ``<4 submodules>`` when folded (a folded block is short)."""
    submodules = sum(1 for m in module._modules.values() if m is not None)
    tensors = sum(
        1 for t in (*module._parameters.values(), *module._buffers.values()) if t is not None
    )
    counts = [f"{tensors} tensor{'s' if tensors != 1 else ''}"] if tensors else []
    counts.append(f"{submodules} submodule{'s' if submodules != 1 else ''}")
    summary = rendering_parts.comment_color(rendering_parts.text(f"<{', '.join(counts)}>"))
    return rendering_parts.fold_condition(
        expanded=rendering_parts.on_separate_lines(lines), collapsed=summary
    )


def _one_line(prefix: Part, lines: list[_Line], path: str, background: str | None) -> Rendering:
    items: list[Rendering | Part | str] = [prefix]
    for n, line in enumerate(lines):
        items.extend([", "] if n else [])
        items.append(line.content)
    line = rendering_parts.siblings_with_annotations(*items, ")")
    return rendering_parts.build_one_line_tree_node(line, path=path, background_color=background)


def _submodules(scene: _Scene, module: nn.Module, path: str, context: _Context) -> list[_Line]:
    lines: list[_Line] = []
    previous: type | None = None
    repeat = 0
    for name, child in module._modules.items():
        if child is None:
            continue
        cls = original_class(child)
        repeat = repeat + 1 if cls is previous and child._modules else 0
        previous = cls
        here = child_path(path, name)
        rendering = _node(scene, child, here, context, repeat=repeat)
        lines.append(_child_line(scene, name, here, rendering, context))
    return lines


def _child_line(
    scene: _Scene, name: str, path: str, rendering: Rendering, context: _Context
) -> _Line:
    """``name=Class(...)`` with its tags (``◆n``, ``+``, ``~``) and box."""
    tags: list[Part] = []
    box: styles.Style | None = None
    notes: list[Part] = []
    change = scene.diff.changes.get(path) if scene.diff is not None else None
    if context.change is None and change is Change.ADDED:
        tags.append(_tag("+ ", styles.ADDED))
        box = styles.ADDED
    elif change is Change.CHANGED:
        tags.append(_tag("~ ", styles.CHANGED))
        box = styles.CHANGED
    elif context.change is None and change is Change.SHARED:
        notes.append(rendering_parts.comment_color(rendering_parts.text("  # shared with base")))
    if path in scene.selected:
        tags.append(_tag(f"◆{scene.selected[path]} ", styles.SELECTED))
        box = styles.SELECTED
    line = rendering_parts.siblings_with_annotations(
        *tags, _key(name), rendering, extra_annotations=notes
    )
    return _Line(line, box)


@dataclass(frozen=True)
class _Line:
    """One line inside a node's parentheses, and the box (if any) drawn around it."""

    content: Rendering | Part
    box: styles.Style | None = None


def _assemble(lines: list[_Line]) -> list[Part]:
    """The lines with their commas (inside any box) and their comments at the end."""
    parts: list[Part] = []
    for n, line in enumerate(lines):
        if n < len(lines) - 1:
            comma = rendering_parts.siblings(
                ",", rendering_parts.fold_condition(collapsed=rendering_parts.text(" "))
            )
        else:
            comma = rendering_parts.fold_condition(expanded=rendering_parts.text(","))
        part = rendering_parts.build_full_line_with_annotations(line.content, comma)
        if line.box is not None:
            part = rendering_parts.in_outlined_box(part, line.box.box_css())
        parts.append(part)
    return parts


def _key(name: str) -> str:
    return f"{name}=" if name.isidentifier() else f"({name}): "


def _tag(text: str, style: styles.Style) -> Part:
    return rendering_parts.custom_style(rendering_parts.text(text), style.text_css())


def _styled(rendering: Rendering, css: str) -> Rendering:
    return Rendering(
        renderable=rendering_parts.custom_style(rendering.renderable, css),
        annotations=rendering.annotations,
    )


def _boxed(rendering: Rendering, style: styles.Style) -> Rendering:
    return Rendering(
        renderable=rendering_parts.in_outlined_box(rendering.renderable, style.box_css()),
        annotations=rendering.annotations,
    )


# ----------------------------------------------------------------------------- contents


def _settings(module: nn.Module) -> list[_Line]:
    """The module's ``extra_repr`` (what ``print(model)`` shows in the parentheses)."""
    try:
        extra = module.extra_repr()
    except Exception:  # a broken third-party extra_repr must not break the picture
        return []
    if not extra:
        return []
    lines = [line.rstrip().removesuffix(",") for line in extra.split("\n")]
    return [_Line(rendering_parts.text(line)) for line in lines if line]


def _tensors(scene: _Scene, module: nn.Module, path: str) -> list[_Line]:
    """Parameters, then buffers (a layer's spec tensors are listed with its fields)."""
    skip = set(module.tensor_fields) if isinstance(module, InterventionLayer) else set()
    lines: list[_Line] = []
    for group in (module._parameters, module._buffers):
        for name, tensor in group.items():
            if tensor is None or name in skip:
                continue
            lines.append(
                _field(name, render_tensor(tensor, child_path(path, name), scene.renderer))
            )
    return lines


def _layer_fields(scene: _Scene, layer: InterventionLayer, path: str) -> list[_Line]:
    """An intervention layer's spec: where it sits, its config, its tensors."""
    site = layer.__dict__.get("site", "")
    lines = [_field("site", scene.renderer(site, path=None))]
    try:
        config: dict[str, Any] = layer.config()
        tensors = layer.tensors()
    except Exception as error:  # a half-built custom layer: say so instead of failing
        note = f"# spec unavailable: {type(error).__name__}: {error}"
        return [*lines, _Line(rendering_parts.error_color(rendering_parts.text(note)))]
    for key, value in config.items():
        if key == "index" and layer.index is not None:
            lines.append(_field(key, rendering_parts.text(f"ts.idx{layer.index}")))
        else:
            lines.append(_field(key, scene.renderer(value, path=None)))
    for key, tensor in tensors.items():
        lines.append(_field(key, render_tensor(tensor, child_path(path, key), scene.renderer)))
    return lines


def _site_note(path: str) -> Part:
    where = "input" if split(path)[-1] == BEFORE else "output"
    text = f"  # inserted layers: run on the module's {where}, in this order"
    return rendering_parts.comment_color(rendering_parts.text(text))


def _removed(children: Iterable[tuple[str, str]]) -> list[_Line]:
    lines: list[_Line] = []
    for name, class_name in children:
        text = rendering_parts.text(f"- {_key(name)}{class_name}(...)")
        css = f"{styles.REMOVED.text_css()} text-decoration: line-through;"
        lines.append(_Line(rendering_parts.custom_style(text, css)))
    return lines


def _field(name: str, value: Rendering | Part) -> _Line:
    return _Line(rendering_parts.siblings_with_annotations(f"{name}=", value))
