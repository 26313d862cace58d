"""Scenes of the procedural world: flat coloured shapes on a plain or gradient background.

A scene is exact ground truth for one training image: every object's shape, colour, size, 3x3 position
cell, centre, extent, depth and rotation. Coordinates are resolution independent: x and y run from 0
(left/top) to 1 (right/bottom), so the same scene renders at 64 or 128 px.

Scene kinds:
  * ``single``: one object in one of the nine cells.
  * ``pair``: two objects in different cells that differ in colour or shape (or both). Objects of
    different colours may overlap (the later one is in front) but each keeps >= 80% of its area
    visible and its visible centroid stays well inside its own cell; objects of the same colour never
    touch, so a detector can always tell them apart.
  * ``count``: 2-4 identical objects (same shape, colour and size) at free, non-overlapping positions
    (``count_layout="free"``, the default) or each in its own 3x3 cell, jittered like single objects
    (``count_layout="grid"``). The caption names no positions either way.

An object never has the background's colour. Centres are jittered within their cell and clamped so
the object stays inside the canvas; the visible centroid is checked to stay in the cell with a margin,
so the position a centroid-based evaluator reads back is unambiguous.

Held-out split (``HELDOUT_PAIRS``): the colour-shape combinations green triangle, purple star, white
heart, orange square and black circle never appear in ``split="train"`` scenes (in any kind, including
counting scenes). Every colour and every shape still occurs in training with other partners, so the
held-out pairs test compositional generalisation. ``split="heldout"`` scenes always contain at least
one held-out pair.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kuas.errors import InvalidInputError

# Exact sRGB values of the colour names. Chosen far apart in CIELAB (closest pair ~45 units) and so
# that the 25% lighter/darker ends of a gradient background still map to their own name.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35),
    "green": (30, 160, 50),
    "blue": (20, 100, 240),
    "yellow": (250, 220, 30),
    "purple": (155, 35, 165),
    "orange": (255, 145, 0),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart")
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUND_STYLES: tuple[str, ...] = ("plain", "gradient")
KINDS: tuple[str, ...] = ("single", "pair", "count")
SPLITS: tuple[str, ...] = ("train", "heldout")

# Position names of the 3x3 grid, indexed [row][col] (row 0 = top, col 0 = left).
POSITIONS: tuple[tuple[str, str, str], ...] = (
    ("in the top left corner", "at the top", "in the top right corner"),
    ("on the left", "in the center", "on the right"),
    ("in the bottom left corner", "at the bottom", "in the bottom right corner"),
)
POSITION_NAMES: tuple[str, ...] = tuple(name for row in POSITIONS for name in row)

# Colour-shape combinations never seen in training (see the module docstring).
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("green", "triangle"), ("purple", "star"), ("white", "heart"), ("orange", "square"), ("black", "circle")}
)

# Nominal extent radius (fraction of the image width) of a size; each shape scales it by SHAPE_SCALE
# so that the five shapes look about equally big. The evaluator's small/large threshold sits at the
# geometric mean of the two sizes.
SIZE_RADIUS: dict[str, float] = {"small": 0.095, "large": 0.165}
SHAPE_SCALE: dict[str, float] = {"circle": 0.9, "square": 0.95, "triangle": 1.15, "star": 1.15, "heart": 1.0}
STAR_INNER_RATIO = 0.48
GRADIENT_AMOUNT = 0.25  # gradient runs from 25% lighter (top) to 25% darker (bottom) than the colour
MAX_ROTATION_DEG = 8.0

_CELL = 1.0 / 3.0
_JITTER = 0.06  # max centre offset from the cell centre
_BORDER = 0.03  # min gap between an object's extent and the canvas edge
_MIN_VISIBLE = 0.8  # pair scenes: min visible fraction of each object's area
_CELL_MARGIN = 0.035  # pair/single scenes: min distance of the visible centroid from its cell's edges
_COUNT_GAP = 0.035  # count scenes: min gap between the extents of two objects
KIND_WEIGHTS = (0.4, 0.35, 0.25)  # default share of single / pair / count scenes
COUNT_LAYOUTS: tuple[str, ...] = ("free", "grid")
_GRADIENT_PROB = 0.25


def shape_outline(shape: str, rotation: float = 0.0, n: int = 96) -> np.ndarray:
    """The closed outline of a unit shape as a (K, 2) array of (x, y) points, y pointing down.

    The shape's area centroid is at the origin and its farthest point is at distance 1 (its extent);
    `rotation` turns it clockwise on screen by that many degrees. Circles use `n` points.
    """
    if shape == "circle":
        t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    elif shape == "square":
        a = np.deg2rad([-135.0, -45.0, 45.0, 135.0])
        pts = np.stack([np.cos(a), np.sin(a)], axis=1)
    elif shape == "triangle":
        a = np.deg2rad([-90.0, 30.0, 150.0])
        pts = np.stack([np.cos(a), np.sin(a)], axis=1)
    elif shape == "star":
        a = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER_RATIO)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
    elif shape == "heart":
        # The classic heart curve, lobes at the top (screen y points down).
        t = np.linspace(0.0, 2 * math.pi, 72, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], axis=1)
        pts = pts - _polygon_centroid(pts)
        pts = pts / np.linalg.norm(pts, axis=1).max()
    else:
        raise InvalidInputError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
    if rotation:
        c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
        pts = pts @ np.array([[c, s], [-s, c]])
    return pts


def _polygon_centroid(pts: np.ndarray) -> np.ndarray:
    x, y = pts[:, 0], pts[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    return np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * area)


def polygon_area(pts: np.ndarray) -> float:
    """Area enclosed by a closed polygon (shoelace formula)."""
    x, y = pts[:, 0], pts[:, 1]
    return float(abs((x * np.roll(y, -1) - np.roll(x, -1) * y).sum()) / 2)


def unit_area(shape: str) -> float:
    """Area of a shape of extent 1 (pi for the circle): area = unit_area * extent**2."""
    return math.pi if shape == "circle" else polygon_area(shape_outline(shape))


def object_radius(shape: str, size: str) -> float:
    """The extent (centroid to farthest point) of a shape of a size, as a fraction of the image width."""
    return SIZE_RADIUS[size] * SHAPE_SCALE[shape]


def position_cell(x: float, y: float) -> tuple[int, int]:
    """The (row, col) of the 3x3 grid cell containing a point in [0, 1]^2 coordinates."""
    return min(2, max(0, int(y * 3))), min(2, max(0, int(x * 3)))


def position_name(row: int, col: int) -> str:
    """The caption phrase of a grid cell, e.g. (1, 0) -> 'on the left'."""
    return POSITIONS[row][col]


def position_of_name(name: str) -> tuple[int, int]:
    """The (row, col) of a canonical position phrase."""
    for r, row in enumerate(POSITIONS):
        if name in row:
            return r, row.index(name)
    raise InvalidInputError(f"unknown position {name!r}; use one of: {', '.join(POSITION_NAMES)}")


@dataclass
class Obj:
    """One flat object. `center` and `radius` are fractions of the image width/height; `radius` is the
    extent (centroid to farthest point). `depth` is the drawing order: higher is in front."""

    shape: str
    color: str
    size: str
    position: str
    center: tuple[float, float]
    radius: float
    depth: int = 0
    rotation: float = 0.0

    @property
    def cell(self) -> tuple[int, int]:
        return position_of_name(self.position)

    def outline(self, width: float = 1.0, height: float | None = None) -> np.ndarray:
        """The object's outline in pixel-space coordinates of a `width` x `height` canvas."""
        height = width if height is None else height
        pts = shape_outline(self.shape, self.rotation) * self.radius
        pts = pts + np.asarray(self.center)
        return pts * np.array([width, height])


@dataclass
class Scene:
    """Ground truth of one image: background colour and style, and objects in drawing order."""

    kind: str
    background: str
    background_style: str = "plain"
    objects: list[Obj] = field(default_factory=list)
    split: str = "train"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        objs = [Obj(**{**o, "center": tuple(o["center"])}) for o in d.get("objects", [])]
        return cls(
            kind=d["kind"],
            background=d["background"],
            background_style=d.get("background_style", "plain"),
            objects=objs,
            split=d.get("split", "train"),
        )

    @classmethod
    def from_json(cls, text: str) -> Scene:
        return cls.from_dict(json.loads(text))

    def pairs(self) -> set[tuple[str, str]]:
        """The (colour, shape) combinations this scene contains."""
        return {(o.color, o.shape) for o in self.objects}

    def has_heldout_pair(self) -> bool:
        return bool(self.pairs() & HELDOUT_PAIRS)


@dataclass
class ObjSpec:
    """What a caption says about one object (or a group of `count` identical ones); None = unsaid."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    position: str | None = None
    count: int = 1


@dataclass
class SceneSpec:
    """The checkable content of a caption: what the evaluator scores an image against.

    `background_style` is "plain" or "gradient" ("on a blue background" means plain); None fields are
    not scored. A counting scene is one `ObjSpec` with `count` >= 2 and no position.
    """

    background: str | None = None
    background_style: str | None = None
    objects: list[ObjSpec] = field(default_factory=list)
    text: str | None = None

    @property
    def kind(self) -> str:
        if any(o.count > 1 for o in self.objects):
            return "count"
        return "pair" if len(self.objects) > 1 else "single"

    @property
    def heldout(self) -> bool:
        """True when the spec asks for a colour-shape combination of `HELDOUT_PAIRS`."""
        return any((o.color, o.shape) in HELDOUT_PAIRS for o in self.objects)

    def num_objects(self) -> int:
        return sum(o.count for o in self.objects)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneSpec:
        return cls(
            background=d.get("background"),
            background_style=d.get("background_style"),
            objects=[ObjSpec(**o) for o in d.get("objects", [])],
            text=d.get("text"),
        )

    @classmethod
    def from_scene(cls, scene: Scene, text: str | None = None) -> SceneSpec:
        """Everything a scene's canonical caption says: counting scenes give one group, no position."""
        if scene.kind == "count" and scene.objects:
            o = scene.objects[0]
            objs = [ObjSpec(o.shape, o.color, o.size, None, len(scene.objects))]
        else:
            objs = [ObjSpec(o.shape, o.color, o.size, o.position, 1) for o in scene.objects]
        return cls(scene.background, scene.background_style, objs, text)


def make_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    """A numpy Generator from a seed (or the generator itself)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    raise InvalidInputError(f"rng must be an int seed or a numpy Generator, not {type(rng).__name__}")


def _choice(rng: np.random.Generator, items: list | tuple) -> Any:
    return items[int(rng.integers(len(items)))]


def _allowed_pairs(split: str) -> list[tuple[str, str]]:
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    if split == "train":
        return [p for p in pairs if p not in HELDOUT_PAIRS]
    return sorted(HELDOUT_PAIRS)


def _sample_pair(rng: np.random.Generator, split: str) -> tuple[str, str]:
    return _choice(rng, _allowed_pairs(split))


def _jittered_center(rng: np.random.Generator, row: int, col: int, radius: float) -> tuple[float, float]:
    lo, hi = radius + _BORDER, 1.0 - radius - _BORDER
    cx = (col + 0.5) * _CELL + rng.uniform(-_JITTER, _JITTER)
    cy = (row + 0.5) * _CELL + rng.uniform(-_JITTER, _JITTER)
    return float(np.clip(cx, lo, hi)), float(np.clip(cy, lo, hi))


def _rotation(rng: np.random.Generator, shape: str) -> float:
    return 0.0 if shape == "circle" else float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))


def _make_obj(rng: np.random.Generator, color: str, shape: str, size: str, row: int, col: int) -> Obj:
    radius = object_radius(shape, size)
    return Obj(
        shape=shape,
        color=color,
        size=size,
        position=position_name(row, col),
        center=_jittered_center(rng, row, col, radius),
        radius=radius,
        rotation=_rotation(rng, shape),
    )


def _masks(objs: list[Obj], res: int = 96) -> np.ndarray:
    """Binary masks (N, res, res) of the objects' full (unoccluded) areas, for overlap checks."""
    from PIL import Image, ImageDraw

    out = np.zeros((len(objs), res, res), dtype=bool)
    for i, o in enumerate(objs):
        im = Image.new("1", (res, res), 0)
        ImageDraw.Draw(im).polygon([tuple(p) for p in o.outline(res) - 0.5], fill=1)
        out[i] = np.asarray(im)
    return out


def _layout_ok(objs: list[Obj]) -> bool:
    """Pair/single scenes: visible area >= 80% and visible centroid inside the own cell with margin;
    same-coloured objects do not touch."""
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            a, b = objs[i], objs[j]
            dist = math.dist(a.center, b.center)
            if a.color == b.color and dist < a.radius + b.radius + _COUNT_GAP:
                return False
    if len(objs) < 2:
        return True
    res = 96
    masks = _masks(objs, res)
    covered = np.zeros((res, res), dtype=bool)
    ys, xs = np.mgrid[0:res, 0:res]
    for i in range(len(objs) - 1, -1, -1):  # front to back
        visible = masks[i] & ~covered
        covered |= masks[i]
        full = masks[i].sum()
        if full == 0 or visible.sum() < _MIN_VISIBLE * full:
            return False
        cx, cy = (xs[visible].mean() + 0.5) / res, (ys[visible].mean() + 0.5) / res
        row, col = objs[i].cell
        for v, k in ((cx, col), (cy, row)):
            if not (k * _CELL + _CELL_MARGIN <= v <= (k + 1) * _CELL - _CELL_MARGIN):
                return False
    return True


def _sample_background(rng: np.random.Generator, used_colors: set[str]) -> tuple[str, str]:
    bg = _choice(rng, [c for c in COLORS if c not in used_colors])
    style = "gradient" if rng.random() < _GRADIENT_PROB else "plain"
    return bg, style


def _sample_single(rng: np.random.Generator, split: str) -> list[Obj]:
    color, shape = _sample_pair(rng, split)
    row, col = int(rng.integers(3)), int(rng.integers(3))
    return [_make_obj(rng, color, shape, _choice(rng, SIZES), row, col)]


def _sample_two(rng: np.random.Generator, split: str) -> list[Obj]:
    for _ in range(1000):
        if split == "heldout":
            first = _sample_pair(rng, "heldout")
            second = _choice(rng, _allowed_pairs("train") + _allowed_pairs("heldout"))
            pairs = [first, second] if rng.random() < 0.5 else [second, first]
        else:
            pairs = [_sample_pair(rng, "train"), _sample_pair(rng, "train")]
        if pairs[0] == pairs[1]:
            continue
        cells = rng.permutation(9)[:2]
        objs = [
            _make_obj(rng, c, s, _choice(rng, SIZES), int(cell) // 3, int(cell) % 3)
            for (c, s), cell in zip(pairs, cells)
        ]
        if _layout_ok(objs):
            for d, o in enumerate(objs):
                o.depth = d
            return objs
    raise RuntimeError("could not place two objects")  # pragma: no cover - never happens in practice


def _grid_centers(rng: np.random.Generator, n: int, radius: float) -> list[tuple[float, float]]:
    """`n` jittered centres in `n` different cells whose objects keep the counting gap. Large objects
    rarely fit side by side (four large stars: only in the corners), so cell draws are repeated."""
    for _ in range(100_000):
        cells = rng.choice(9, size=n, replace=False)
        centers = [_jittered_center(rng, int(c) // 3, int(c) % 3, radius) for c in cells]
        if all(math.dist(a, b) >= 2 * radius + _COUNT_GAP for i, a in enumerate(centers) for b in centers[:i]):
            return centers
    raise RuntimeError(f"could not place {n} objects of radius {radius} in grid cells")  # pragma: no cover


def _free_centers(rng: np.random.Generator, n: int, radius: float) -> list[tuple[float, float]]:
    """`n` uniform centres anywhere on the canvas whose objects keep the counting gap."""
    lo, hi = radius + _BORDER, 1.0 - radius - _BORDER
    while True:
        centers: list[tuple[float, float]] = []
        for _ in range(200):
            c = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
            if all(math.dist(c, o) >= 2 * radius + _COUNT_GAP for o in centers):
                centers.append(c)
                if len(centers) == n:
                    return centers


def _sample_count(rng: np.random.Generator, split: str, layout: str = "free") -> list[Obj]:
    color, shape = _sample_pair(rng, split)
    size = _choice(rng, SIZES)
    n = int(rng.integers(2, 5))
    radius = object_radius(shape, size)
    centers = (_grid_centers if layout == "grid" else _free_centers)(rng, n, radius)
    objs = []
    for d, c in enumerate(centers):
        row, col = position_cell(*c)
        objs.append(
            Obj(
                shape,
                color,
                size,
                position_name(row, col),
                c,
                radius,
                depth=d,
                rotation=_rotation(rng, shape),
            )
        )
    return objs


def normalize_kind_weights(weights) -> tuple[float, float, float]:
    """Shares of single / pair / count scenes summing to 1 (`KIND_WEIGHTS` for None)."""
    if weights is None:
        return KIND_WEIGHTS
    try:
        w = tuple(float(v) for v in weights)
    except (TypeError, ValueError):
        w = ()
    if len(w) != len(KINDS) or not all(math.isfinite(v) and v >= 0 for v in w) or sum(w) <= 0:
        raise InvalidInputError(
            f"kind weights must be three non-negative numbers (single, pair, count) with a positive sum, "
            f"not {weights!r}"
        )
    return tuple(v / sum(w) for v in w)


def check_count_layout(layout: str) -> str:
    """`layout` if it is one of `COUNT_LAYOUTS`, else an error naming them."""
    if layout not in COUNT_LAYOUTS:
        raise InvalidInputError(f"unknown count layout {layout!r}; use one of {', '.join(COUNT_LAYOUTS)}")
    return layout


def sample_scene(
    rng: np.random.Generator | int | None = None,
    *,
    split: str = "train",
    kind: str | None = None,
    kind_weights: tuple[float, float, float] | None = None,
    count_layout: str = "free",
) -> Scene:
    """A random scene, deterministic for a seed.

    `split="train"` never contains a `HELDOUT_PAIRS` combination; `split="heldout"` always contains at
    least one. `kind` is "single", "pair" or "count"; None draws one with `kind_weights` (shares of
    single / pair / count, default `KIND_WEIGHTS`: 40% / 35% / 25%). `count_layout` places the objects
    of counting scenes freely ("free") or one per grid cell ("grid").
    """
    if split not in SPLITS:
        raise InvalidInputError(f"unknown split {split!r}; use 'train' or 'heldout'")
    if kind is not None and kind not in KINDS:
        raise InvalidInputError(f"unknown scene kind {kind!r}; use one of {', '.join(KINDS)}")
    check_count_layout(count_layout)
    rng = make_rng(rng)
    if kind is None:
        kind = KINDS[int(rng.choice(len(KINDS), p=normalize_kind_weights(kind_weights)))]
    if kind == "single":
        objs = _sample_single(rng, split)
    elif kind == "pair":
        objs = _sample_two(rng, split)
    else:
        objs = _sample_count(rng, split, count_layout)
    bg, style = _sample_background(rng, {o.color for o in objs})
    return Scene(kind=kind, background=bg, background_style=style, objects=objs, split=split)
