"""The visual vocabulary of torchsurgeon pictures: one named style per thing we point at.

A picture of a module tree answers a few questions at a glance — which nodes does this
selection hold, which layers did a rewrite insert, what differs from the base model — and
each answer has one colour, used everywhere (the tree, the legend of an HTML page, the
docs). Every style also carries a *marker*: a CSS custom property (``--ts-mark: ts-selected``)
written into the element's inline style. Browsers ignore it; tests, scripts and user
stylesheets can find highlighted nodes by it without parsing colours.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ADDED",
    "CHANGED",
    "DIMMED",
    "DIM_CSS",
    "INSERTED",
    "LEGEND",
    "REMOVED",
    "SELECTED",
    "SITE",
    "Style",
]


@dataclass(frozen=True)
class Style:
    """A named highlight: its marker, its colours, and what it means (for the legend)."""

    marker: str
    color: str
    background: str
    meaning: str

    @property
    def mark_css(self) -> str:
        """The inline-CSS marker that tags an element with this style."""
        return f"--ts-mark: {self.marker};"

    def box_css(self) -> str:
        """Inline CSS for an outlined box around a node (selections, diff changes)."""
        return (
            f"{self.mark_css} outline: 2px solid {self.color}; "
            f"background-color: {self.background}; border-radius: 3px;"
        )

    def text_css(self) -> str:
        """Inline CSS for a short text tag (a sign or a label) in this style."""
        return f"{self.mark_css} color: {self.color}; font-weight: bold;"


SELECTED = Style(
    marker="ts-selected",
    color="#e8590c",
    background="#fff4e6",
    meaning="selected by the selection (numbered in selection order)",
)
INSERTED = Style(
    marker="ts-inserted",
    color="#7048e8",
    background="#e5dbff",
    meaning="intervention layer inserted by a rewrite",
)
SITE = Style(
    marker="ts-site",
    color="#9775fa",
    background="#f3f0ff",
    meaning="list of intervention layers run before/after its module",
)
ADDED = Style(
    marker="ts-added",
    color="#2b8a3e",
    background="#ebfbee",
    meaning="diff: added by the rewrite (absent from the base)",
)
CHANGED = Style(
    marker="ts-changed",
    color="#e67700",
    background="#fff9db",
    meaning="diff: changed by the rewrite (new class, tensors or settings)",
)
REMOVED = Style(
    marker="ts-removed",
    color="#c92a2a",
    background="#fff5f5",
    meaning="diff: in the base, removed by the rewrite",
)
DIMMED = Style(
    marker="ts-dimmed",
    color="#868e96",
    background="transparent",
    meaning="outside the selection / unchanged and shared with the base (folded)",
)

LEGEND: tuple[Style, ...] = (SELECTED, INSERTED, SITE, ADDED, CHANGED, REMOVED, DIMMED)
"""Every style, in the order a legend lists them."""

DIM_CSS = f"{DIMMED.mark_css} opacity: 0.5;"
"""Inline CSS that fades a node the picture is not about."""
