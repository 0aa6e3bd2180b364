"""A synthetic world of instruction edits with exact ground truth: coloured shapes on plain backgrounds.

Each triplet is (input image, instruction, edited image), where the edited image is exactly what the
instruction asks for, rendered by the same code. It is the training set of the pack's embedded toy model and
the yardstick of :mod:`evaluation`: because the truth is known exactly, an edit can be scored by PSNR/SSIM and
by a rule check per instruction ("the circle's mean colour is now red and nothing else moved").

The world: a ``size`` x ``size`` canvas (32 by default) split into a 2x2 grid of slots; a scene holds 1-3
shapes of different kinds (circle, square, triangle, star), each in its own slot, jittered a little, on one of
a few plain backgrounds. Instructions (one kind of edit each):

- ``recolor``  "make the circle red"            the shape keeps its place and outline, takes the new colour
- ``morph``    "turn the square into a circle"   same place, size and colour, new outline
- ``remove``   "remove the triangle"             the shape's pixels become background
- ``add``      "add a blue star"                 the new shape goes, at the standard size, to the centre of the
  first empty slot in reading order (so the truth is unique and the model can learn where)
- ``darker``   "make it darker"                  every pixel times 0.5

Everything is a pure function of a seed: triplet ``i`` of split ``s`` is drawn from
``numpy.random.default_rng([seed, SPLIT_IDS[s], i])``, so the train and held-out splits never share a draw and
any triplet can be regenerated alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np

SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.80),
}
# Neutral or dark backgrounds, far from every shape colour, so "which colour is this pixel" is unambiguous.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (0.95, 0.95, 0.95),
    "black": (0.08, 0.08, 0.08),
    "grey": (0.50, 0.50, 0.50),
    "slate": (0.20, 0.28, 0.36),
}
EDIT_KINDS = ("recolor", "morph", "remove", "add", "darker")
DARKER_FACTOR = 0.5
SPLIT_IDS = {"train": 0, "heldout": 1}
BASE_SIZE = 32  # geometry below is given for a 32 px canvas and scaled with the canvas
ADD_RADIUS = 5.0
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    slot: int  # 0..3, reading order: top-left, top-right, bottom-left, bottom-right
    cx: float  # centre in pixels of a BASE_SIZE canvas
    cy: float
    r: float


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]
    darkness: float = 1.0  # 0.5 after "make it darker"

    def find(self, kind: str) -> Shape | None:
        return next((s for s in self.shapes if s.kind == kind), None)


@dataclass
class Triplet:
    input: np.ndarray  # [H, W, 3] float32 in 0..1
    instruction: str
    edited: np.ndarray
    kind: str  # one of EDIT_KINDS
    before: Scene
    after: Scene
    target: Shape | None  # the shape the instruction is about, as it is after the edit (before, for remove)


def slot_centre(slot: int) -> tuple[float, float]:
    q = BASE_SIZE / 4
    return (q if slot % 2 == 0 else 3 * q, q if slot < 2 else 3 * q)


def _polygon(shape: Shape) -> list[tuple[float, float]] | None:
    cx, cy, r = shape.cx, shape.cy, shape.r
    if shape.kind == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape.kind == "triangle":
        big = 1.25 * r
        return [(cx + big * math.cos(a), cy + big * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape.kind == "star":
        outer, inner = 1.25 * r, 0.5 * 1.25 * r
        return [
            (cx + (outer if i % 2 == 0 else inner) * math.cos(-math.pi / 2 + i * math.pi / 5),
             cy + (outer if i % 2 == 0 else inner) * math.sin(-math.pi / 2 + i * math.pi / 5))
            for i in range(10)
        ]
    return None


def coverage(shape: Shape, size: int = BASE_SIZE) -> np.ndarray:
    """Fraction of each pixel the shape covers, ``[size, size]`` float32 (4x4 supersampled)."""
    from PIL import Image, ImageDraw

    k = size / BASE_SIZE * SUPERSAMPLE
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    poly = _polygon(shape)
    if poly is None:  # circle
        draw.ellipse([(shape.cx - shape.r) * k, (shape.cy - shape.r) * k, (shape.cx + shape.r) * k,
                      (shape.cy + shape.r) * k], fill=255)
    else:
        draw.polygon([(x * k, y * k) for x, y in poly], fill=255)
    hi = np.asarray(canvas, dtype=np.float32) / 255.0
    return hi.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, size: int = BASE_SIZE) -> np.ndarray:
    """The scene as an ``[size, size, 3]`` float32 image in 0..1."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for shape in scene.shapes:
        cov = coverage(shape, size)[..., None]
        img = img * (1.0 - cov) + np.asarray(COLOURS[shape.colour], np.float32) * cov
    return (img * scene.darkness).astype(np.float32)


def random_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, 4))
    kinds = rng.choice(len(SHAPES), size=n, replace=False)
    slots = sorted(rng.choice(4, size=n, replace=False).tolist())
    colours = list(COLOURS)
    shapes = []
    for kind, slot in zip(kinds, slots):
        cx, cy = slot_centre(slot)
        shapes.append(Shape(
            SHAPES[int(kind)], colours[int(rng.integers(len(colours)))], slot,
            cx + float(rng.uniform(-1, 1)), cy + float(rng.uniform(-1, 1)), float(rng.uniform(4.5, 5.5)),
        ))
    return Scene(list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))], tuple(shapes))


def random_edit(
    scene: Scene, rng: np.random.Generator, kind: str | None = None
) -> tuple[str, Scene, Shape | None, str]:
    """Pick an edit for ``scene``: returns (instruction, edited scene, target shape, kind)."""
    kind = kind or EDIT_KINDS[int(rng.integers(len(EDIT_KINDS)))]
    shapes = list(scene.shapes)
    present = [s.kind for s in shapes]
    absent = [k for k in SHAPES if k not in present]
    if kind == "darker":
        return "make it darker", replace(scene, darkness=scene.darkness * DARKER_FACTOR), None, kind
    if kind == "add":
        new_kind = absent[int(rng.integers(len(absent)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        slot = min(set(range(4)) - {s.slot for s in shapes})
        new = Shape(new_kind, colour, slot, *slot_centre(slot), ADD_RADIUS)
        after = replace(scene, shapes=tuple(sorted(shapes + [new], key=lambda s: s.slot)))
        return f"add a {colour} {new_kind}", after, new, kind
    i = int(rng.integers(len(shapes)))
    old = shapes[i]
    if kind == "recolor":
        colour = [c for c in COLOURS if c != old.colour][int(rng.integers(len(COLOURS) - 1))]
        shapes[i] = replace(old, colour=colour)
        return f"make the {old.kind} {colour}", replace(scene, shapes=tuple(shapes)), shapes[i], kind
    if kind == "morph":
        new_kind = absent[int(rng.integers(len(absent)))]
        shapes[i] = replace(old, kind=new_kind)
        return f"turn the {old.kind} into a {new_kind}", replace(scene, shapes=tuple(shapes)), shapes[i], kind
    if kind == "remove":
        del shapes[i]
        return f"remove the {old.kind}", replace(scene, shapes=tuple(shapes)), old, kind
    raise ValueError(f"unknown edit kind {kind!r}; one of {EDIT_KINDS}")


def triplet(index: int, seed: int = 0, split: str = "train", size: int = BASE_SIZE, kind: str | None = None) -> Triplet:
    """Triplet ``index`` of ``split``; the same arguments always give the same images and instruction."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; one of {tuple(SPLIT_IDS)}")
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    before = random_scene(rng)
    instruction, after, target, kind = random_edit(before, rng, kind)
    return Triplet(render(before, size), instruction, render(after, size), kind, before, after, target)


def instructed(scene: Scene, instruction: str, size: int = BASE_SIZE) -> Triplet:
    """The exact edit of ``scene`` that ``instruction`` asks for, as a :class:`Triplet` (for rule-checking examples).

    Reads the five instruction templates of :func:`random_edit`; anything else, or an instruction about a shape
    the scene lacks (or a shape to add that it already has), is a ``ValueError``.
    """
    words = instruction.strip().lower().split()
    shapes = list(scene.shapes)

    def present(kind: str) -> int:
        for i, s in enumerate(shapes):
            if s.kind == kind:
                return i
        raise ValueError(f"{instruction!r}: the scene has no {kind}")

    if words == ["make", "it", "darker"]:
        kind, after, target = "darker", replace(scene, darkness=scene.darkness * DARKER_FACTOR), None
    elif len(words) == 4 and words[:2] == ["make", "the"] and words[2] in SHAPES and words[3] in COLOURS:
        i = present(words[2])
        shapes[i] = target = replace(shapes[i], colour=words[3])
        kind, after = "recolor", replace(scene, shapes=tuple(shapes))
    elif (len(words) == 6 and words[:2] == ["turn", "the"] and words[3:5] == ["into", "a"]
          and words[2] in SHAPES and words[5] in SHAPES and scene.find(words[5]) is None):
        i = present(words[2])
        shapes[i] = target = replace(shapes[i], kind=words[5])
        kind, after = "morph", replace(scene, shapes=tuple(shapes))
    elif len(words) == 3 and words[:2] == ["remove", "the"] and words[2] in SHAPES:
        target = shapes.pop(present(words[2]))
        kind, after = "remove", replace(scene, shapes=tuple(shapes))
    elif (len(words) == 4 and words[:2] == ["add", "a"] and words[2] in COLOURS and words[3] in SHAPES
          and scene.find(words[3]) is None and len(shapes) < 4):
        slot = min(set(range(4)) - {s.slot for s in shapes})
        target = Shape(words[3], words[2], slot, *slot_centre(slot), ADD_RADIUS)
        kind, after = "add", replace(scene, shapes=tuple(sorted(shapes + [target], key=lambda s: s.slot)))
    else:
        raise ValueError(f"{instruction!r} is not an edit of this scene in the shapes world's templates")
    return Triplet(render(scene, size), instruction, render(after, size), kind, scene, after, target)


def triplets(n: int, seed: int = 0, split: str = "train", size: int = BASE_SIZE, start: int = 0) -> Iterator[Triplet]:
    for i in range(start, start + n):
        yield triplet(i, seed, split, size)


def balanced_set(per_kind: int, seed: int = 0, split: str = "heldout", size: int = BASE_SIZE) -> list[Triplet]:
    """``per_kind`` triplets of every edit kind (for evaluation: each kind is measured on the same count)."""
    out = []
    for k, kind in enumerate(EDIT_KINDS):
        out += [triplet(1_000_000 * (k + 1) + i, seed, split, size, kind=kind) for i in range(per_kind)]
    return out


def export(folder, n: int, seed: int = 0, split: str = "train", size: int = BASE_SIZE):
    """Write ``n`` triplets as PNGs plus ``manifest.jsonl`` (the trainer's folder format)."""
    import json
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, t in enumerate(triplets(n, seed, split, size)):
        for name, arr in (("input", t.input), ("edited", t.edited)):
            Image.fromarray((arr * 255).round().astype(np.uint8)).save(folder / f"{i:06d}_{name}.png")
        row = {"input": f"{i:06d}_input.png", "edited": f"{i:06d}_edited.png", "instruction": t.instruction}
        lines.append(json.dumps(row))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"
