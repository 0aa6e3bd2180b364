"""Is a workflow's layout clean, as the app draws it? Boxes read from the page, rules checked here.

Shared by the browser tests and ``tools/build_workflows.py`` (which refuses to save a layout that breaks them).
A node's box is what the canvas draws for it: its title bar plus its body, at the size the app gives it once
every picture preview has rendered (Load Image grows to show its picture). The rules:

- no two nodes' boxes overlap (groups are frames, not nodes: they may hold nodes);
- a node that touches a group lies wholly inside it, below the group's title bar: no node straddles a frame.
"""

from __future__ import annotations

from dataclasses import dataclass

# Edges that meet are not an overlap; a sub-pixel rounding of the app's sizes is not one either.
TOLERANCE = 0.5


@dataclass(frozen=True)
class Box:
    label: str
    x: float
    y: float
    w: float
    h: float

    @property
    def right(self) -> float:
        return self.x + self.w

    @property
    def bottom(self) -> float:
        return self.y + self.h

    def overlaps(self, other: "Box") -> bool:
        return (
            self.x < other.right - TOLERANCE
            and other.x < self.right - TOLERANCE
            and self.y < other.bottom - TOLERANCE
            and other.y < self.bottom - TOLERANCE
        )

    def inside(self, other: "Box") -> bool:
        return (
            self.x >= other.x - TOLERANCE
            and self.y >= other.y - TOLERANCE
            and self.right <= other.right + TOLERANCE
            and self.bottom <= other.bottom + TOLERANCE
        )

    def __str__(self) -> str:
        return f"{self.label} [x {self.x:.0f}..{self.right:.0f}, y {self.y:.0f}..{self.bottom:.0f}]"


@dataclass(frozen=True)
class Frame:
    """A group: its whole box, and the part below its title bar where nodes belong."""

    box: Box
    body: Box


def boxes_from_page(layout: dict) -> tuple[list[Box], list[Frame]]:
    """Boxes from :func:`browser_harness.layout` (``{"nodes": [...], "groups": [...]}``)."""
    nodes = [Box(f"#{n['id']} {n['title']!r}", n["x"], n["y"], n["w"], n["h"]) for n in layout["nodes"]]
    frames = []
    for g in layout["groups"]:
        box = Box(f"group {g['title']!r}", g["x"], g["y"], g["w"], g["h"])
        body = Box(box.label, g["x"], g["y"] + g["title_height"], g["w"], g["h"] - g["title_height"])
        frames.append(Frame(box, body))
    return nodes, frames


def layout_problems(nodes: list[Box], frames: list[Frame]) -> list[str]:
    """Every broken rule, one line each; empty when the layout is clean."""
    problems = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if a.overlaps(b):
                problems.append(f"{a} overlaps {b}")
    for frame in frames:
        for node in nodes:
            if node.overlaps(frame.box) and not node.inside(frame.body):
                problems.append(f"{node} is not wholly inside {frame.body} (below its title bar)")
    return problems
