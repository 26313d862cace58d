"""Scoring images against what their captions ask for, by pixel analysis alone (no learned model).

`detect` reads an image back into objects; `score` compares that with a `SceneSpec`; `evaluate` does
it for many images and writes `report.json` and a grid PNG. Every image is first resized to 128 x 128
(`ANALYSIS_SIZE`) so that all thresholds are in one pixel scale.

How an image is read (colours and cores from a 3x3 median of the image, which removes pixel noise
but keeps edges; region growth and outlines from the image itself, which keeps the tips of stars):
  1. Background: the 3-px border's pixels vote for their nearest palette colour (CIELAB distance).
     A plane a + b*x + c*y fitted to the winning border pixels models the background; if it changes
     lightness by more than `GRADIENT_MIN_DL` across the image, the background is a gradient.
  2. Foreground: pixels farther than `FOREGROUND_MIN_DE` (CIELAB) from the background model whose
     nearest palette colour is not the background's.
  3. Object cores: a foreground pixel is a core pixel when its colour is flat around it (anti-aliased
     or blurred edges are not: mixed colours there may look like a third palette colour) and it
     survives a 3x3 erosion of its colour's mask. Connected cores of one colour smaller than
     `MIN_CORE_AREA` are specks and dropped.
  4. Regions: each core grows, up to `GROW_STEPS` pixels, into neighbouring pixels that lie near the
     mixing line from the local background colour to the core's measured colour and are at least half
     that colour, so a region's edge sits where a pixel is 50% object and a neighbouring object of
     another colour is not swallowed. Touching regions of one colour merge (a star whose thin arms
     broke its core apart is one star again). A region whose colour hardly steps across its edge
     (`MIN_EDGE_CONTRAST`) is a soft blotch of the background, not an object.
  5. Attributes: colour is the core's palette colour; position is the region centroid's 3x3 cell;
     shape is the nearest template radial profile (distance from the centroid to the region's edge at
     72 angles, divided by its mean, best of all rotations), skipping angles where the edge touches
     another object (occlusion); size compares the extent implied by the area and shape with the
     geometric mean of the two sizes the renderer uses.

Measured on the world's own renders (all-correct, scenes of every kind, half held-out): 1999/2000 at
128 px and at 64 px, clean, Gaussian-blurred 1 px (0.5 px at 64) and with noise sigma 8 (the one miss
is a triangle whose corner the other object hides). Of 400: blur 1.5 px + noise 12: 100%; noise 20:
99.8%; a low-frequency colour blotch field (sigma 12): 100%; colour cast +-15: 100%; JPEG q75: 100%
at 128 px but 88.7% at 64 px (chroma subsampling smears small stars into blobs). Blur 2 px: 99.3%
of 1000.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from kuas.errors import InvalidInputError
from kuas.world.scene import (
    COLORS,
    PALETTE,
    SHAPE_SCALE,
    SHAPES,
    SIZE_RADIUS,
    ObjSpec,
    Scene,
    SceneSpec,
    position_cell,
    position_name,
    shape_outline,
    unit_area,
)

ANALYSIS_SIZE = 128
BORDER_WIDTH = 3
GRADIENT_MIN_DL = 11.0  # CIELAB lightness change across the image that makes a background a gradient
FOREGROUND_MIN_DE = 20.0  # CIELAB distance from the background model that makes a pixel foreground
FLAT_MAX_DE = 22.0  # max CIELAB difference between a core pixel's neighbours 2 px apart
MIN_CORE_AREA = 12  # px (at 128 x 128): smaller cores are specks
GROW_STEPS = 12
MIN_EDGE_CONTRAST = 12.0  # CIELAB step across a region's edge below which it is background
MAX_MIX_OFFSET = 0.3  # max distance from the background-to-colour line (relative) of a grown pixel
PROFILE_ANGLES = 72
# Mean squared profile difference above which a region matches no shape. The world's renders stay
# below 0.008 (64 px, blurred and noisy) and 0.016 (blur 2 px); a 1.6:1 ellipse, a 2:1 rectangle,
# two overlapping discs or a cross are above 0.025.
SHAPE_MAX_DISTANCE = 0.02
UNKNOWN_SHAPE = "unknown"
SIZE_THRESHOLD = math.sqrt(SIZE_RADIUS["small"] * SIZE_RADIUS["large"])

_COLOR_INDEX = {c: i for i, c in enumerate(COLORS)}


# --- colour ---------------------------------------------------------------------------------------------


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in 0..255, any leading shape."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float64)
_PALETTE_LAB = srgb_to_lab(_PALETTE_RGB)


def nearest_color(lab: np.ndarray, exclude: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour of each Lab value and the distance to it."""
    d2 = (lab * lab).sum(-1)[..., None] - 2.0 * lab @ _PALETTE_LAB.T + (_PALETTE_LAB**2).sum(-1)
    d = np.sqrt(np.maximum(d2, 0.0))
    if exclude is not None:
        d[..., exclude] = np.inf
    idx = d.argmin(axis=-1)
    return idx, np.take_along_axis(d, idx[..., None], axis=-1)[..., 0]


def _norm(v: np.ndarray) -> np.ndarray:
    """Euclidean length along the last axis (faster than np.linalg.norm for small last axes)."""
    return np.sqrt(np.einsum("...i,...i->...", v, v))


# --- binary image tools (numpy only) ------------------------------------------------------------------


def _shift(mask: np.ndarray, dy: int, dx: int, fill: bool) -> np.ndarray:
    out = np.full_like(mask, fill)
    h, w = mask.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


_NEIGHBOURS8 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def erode(mask: np.ndarray) -> np.ndarray:
    """3x3 erosion (pixels outside the image count as set, so objects touching the edge keep cores)."""
    out = mask.copy()
    for dy, dx in _NEIGHBOURS8:
        out &= _shift(mask, dy, dx, True)
    return out


def dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 dilation."""
    out = mask.copy()
    for dy, dx in _NEIGHBOURS8:
        out |= _shift(mask, dy, dx, False)
    return out


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask: (labels with 0 = unset and 1..n, n).

    Works on runs of set pixels per row with a union-find, so it costs O(number of runs) in Python.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # exclusive; same row-major order as starts
    n = len(rows)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows, np.arange(h + 1))
    for r in range(1, h):
        a0, a1 = row_first[r - 1], row_first[r]
        b0, b1 = row_first[r], row_first[r + 1]
        i = a0
        for j in range(b0, b1):
            # runs of the previous row touching [starts[j] - 1, ends[j]] (8-connectivity)
            while i < a1 and ends[i] < starts[j]:
                i += 1
            k = i
            while k < a1 and starts[k] <= ends[j]:
                ri, rj = find(k), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
                k += 1
    labels = np.zeros((h, w), dtype=np.int32)
    roots: dict[int, int] = {}
    for j in range(n):
        root = find(j)
        lab = roots.setdefault(root, len(roots) + 1)
        labels[rows[j], starts[j] : ends[j]] = lab
    return labels, len(roots)


# --- shape templates -------------------------------------------------------------------------------------


def _ray_polygon_profile(pts: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Distance from the origin to the farthest crossing of a closed polygon along each angle."""
    a, b = pts, np.roll(pts, -1, axis=0)
    dirs = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (A, 2)
    e = b - a  # (E, 2)
    # Solve t*dir = a + s*e for t >= 0, 0 <= s <= 1.
    den = dirs[:, None, 0] * (-e[None, :, 1]) - dirs[:, None, 1] * (-e[None, :, 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (a[None, :, 0] * (-e[None, :, 1]) - a[None, :, 1] * (-e[None, :, 0])) / den
        s = (dirs[:, None, 0] * a[None, :, 1] - dirs[:, None, 1] * a[None, :, 0]) / den
    ok = (np.abs(den) > 1e-12) & (s >= 0) & (s <= 1) & (t >= 0)
    return np.where(ok, t, 0.0).max(axis=1)


@functools.lru_cache(maxsize=1)
def _template_profiles() -> np.ndarray:
    """(shapes, rotations, angles): each shape's mean-normalised radial profile, for every rotation of
    `360 / PROFILE_ANGLES` degrees (a rotation is a circular shift of the profile)."""
    angles = np.arange(PROFILE_ANGLES) * 2 * math.pi / PROFILE_ANGLES
    out = np.zeros((len(SHAPES), PROFILE_ANGLES, PROFILE_ANGLES))
    for i, shape in enumerate(SHAPES):
        prof = _ray_polygon_profile(shape_outline(shape, n=256), angles)
        prof = prof / prof.mean()
        for r in range(PROFILE_ANGLES):
            out[i, r] = np.roll(prof, r)
    return out


# --- detection ---------------------------------------------------------------------------------------


@dataclass
class Detection:
    """One object read from an image. Coordinates and sizes are fractions of the image width/height."""

    color: str
    shape: str  # one of SHAPES, or "unknown" when no template fits
    size: str
    position: str
    center: tuple[float, float]
    area: float  # fraction of the image
    extent: float  # estimated centroid-to-farthest-point radius, fraction of the width
    contrast: float = 0.0  # CIELAB step across the edge
    shape_distances: dict[str, float] = field(default_factory=dict)


@dataclass
class Analysis:
    """Everything `detect` reads from one image."""

    background: str
    background_style: str
    objects: list[Detection]
    gradient_dl: float = 0.0  # lightness change of the fitted background plane


def _to_image(image: Image.Image | np.ndarray | str | os.PathLike) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            image = im.convert("RGB")
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim != 3 or arr.shape[2] < 3:
            raise InvalidInputError(f"expected an (H, W, 3) image array, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = np.clip(np.round(arr.astype(np.float64)), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr[..., :3], "RGB")
    if not isinstance(image, Image.Image):
        raise InvalidInputError(f"expected a PIL image, an array or a path, not {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != (ANALYSIS_SIZE, ANALYSIS_SIZE):
        image = image.resize((ANALYSIS_SIZE, ANALYSIS_SIZE), Image.BILINEAR)
    return image


def _fit_background(rgb: np.ndarray, lab: np.ndarray) -> tuple[int, np.ndarray, float]:
    """(palette index, per-pixel background RGB model, lightness change) from the image border."""
    h, w, _ = rgb.shape
    b = BORDER_WIDTH
    border = np.zeros((h, w), dtype=bool)
    border[:b], border[-b:], border[:, :b], border[:, -b:] = True, True, True, True
    idx, _ = nearest_color(lab[border])
    bg = int(np.bincount(idx, minlength=len(COLORS)).argmax())
    ys, xs = np.nonzero(border)
    sel = idx == bg
    ys, xs, vals = ys[sel], xs[sel], rgb[border][sel]
    yy, xx = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones_like(ys), xs / w, ys / h], axis=1).astype(np.float64)
    for _ in range(2):  # refit without the outliers of the first fit
        coef, *_ = np.linalg.lstsq(design, vals, rcond=None)
        resid = np.linalg.norm(design @ coef - vals, axis=1)
        keep = resid <= max(3 * np.median(resid), 6.0)
        design, vals = design[keep], vals[keep]
    model = coef[0] + coef[1] * (xx / w)[..., None] + coef[2] * (yy / h)[..., None]
    corners = srgb_to_lab(np.clip(coef[0] + np.array([[0, 0], [1, 0], [0, 1], [1, 1]]) @ coef[1:], 0, 255))
    dl = float(corners[:, 0].max() - corners[:, 0].min())
    return bg, model, dl


def _mix(rgb: np.ndarray, bg: np.ndarray, color: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How much of `color` each pixel is, mixing linearly from the background (sRGB, like the renderer),
    and how far the pixel is from that mixing line, relative to the colour's distance from the
    background (small for true edge pixels, large for pixels of another colour)."""
    v = color - bg
    vv = np.maximum(np.einsum("...i,...i->...", v, v), 1e-6)
    alpha = np.einsum("...i,...i->...", rgb - bg, v) / vv
    off = _norm(rgb - bg - alpha[..., None] * v) / np.sqrt(vv)
    return alpha, off


def _profile(
    region: np.ndarray, others: np.ndarray, cy: float, cx: float, r_eq: float
) -> tuple[np.ndarray, np.ndarray]:
    """Radial profile of a region from its centroid: (distance to the edge, valid) at each angle;
    an angle is invalid where the region's edge touches another object (occluded there)."""
    h, w = region.shape
    angles = np.arange(PROFILE_ANGLES) * 2 * math.pi / PROFILE_ANGLES
    steps = np.arange(0.0, 3.5 * r_eq + 4.0, 0.5)
    ys = cy + np.sin(angles)[:, None] * steps[None, :]
    xs = cx + np.cos(angles)[:, None] * steps[None, :]
    yi = np.clip(np.round(ys).astype(int), 0, h - 1)
    xi = np.clip(np.round(xs).astype(int), 0, w - 1)
    inside = region[yi, xi] & (ys > -0.5) & (ys < h - 0.5) & (xs > -0.5) & (xs < w - 0.5)
    last = np.where(inside.any(axis=1), inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1), 0)
    radius = steps[last] + 0.25
    # Occluded where another object lies within 3 px beyond the edge (mixed pixels may sit between).
    beyond = np.minimum(last[:, None] + np.arange(1, 7)[None, :], len(steps) - 1)
    rows = np.arange(len(angles))[:, None]
    occluded = others[yi[rows, beyond], xi[rows, beyond]].any(axis=1)
    return radius, ~occluded


def _classify_shape(radius: np.ndarray, valid: np.ndarray) -> tuple[str, dict[str, float]]:
    if valid.sum() < PROFILE_ANGLES // 3:
        valid = np.ones_like(valid)
    prof = radius / radius[valid].mean()
    templates = _template_profiles()  # (S, R, A)
    # Scale each template rotation to the observed mean over the valid angles only.
    t = templates * (prof[valid].mean() / templates[..., valid].mean(-1, keepdims=True))
    err = ((t - prof) ** 2)[..., valid].mean(-1).min(-1)
    best = int(err.argmin())
    shape = SHAPES[best] if err[best] <= SHAPE_MAX_DISTANCE else UNKNOWN_SHAPE
    return shape, {s: float(e) for s, e in zip(SHAPES, err)}


def _edge_contrast(lab: np.ndarray, region: np.ndarray, objects: np.ndarray) -> float:
    """CIELAB distance between the mean colours of the 2-px rings just inside and just outside a
    region's edge (away from other objects): high for a shape, low for a soft background blotch."""
    inner = region & ~erode(erode(region))
    outer = dilate(dilate(region)) & ~objects
    if not inner.any() or not outer.any():
        return 0.0
    return float(_norm(lab[inner].mean(0) - lab[outer].mean(0)))


def analyse(image: Image.Image | np.ndarray | str | os.PathLike) -> Analysis:
    """Background and objects of an image (any size; analysed at 128 x 128)."""
    img = _to_image(image)
    rgb = np.asarray(img, dtype=np.float64)
    # Colours and cores come from a 3x3 median (no pixel noise; edges kept); growth and outlines from
    # the image itself (the median would cut the sharp tips of small stars).
    smooth = np.asarray(img.filter(ImageFilter.MedianFilter(3)), dtype=np.float64)
    h, w, _ = rgb.shape
    lab = srgb_to_lab(smooth)
    bg_idx, bg_model, dl = _fit_background(smooth, lab)
    style = "gradient" if dl > GRADIENT_MIN_DL else "plain"
    bg_lab = srgb_to_lab(np.clip(bg_model, 0, 255))
    fg = _norm(lab - bg_lab) > FOREGROUND_MIN_DE
    color_idx, _ = nearest_color(lab)  # a core pixel must be nearer its colour than the background's

    # Flat pixels: the colours 2 px away on both sides (horizontally and vertically) are alike.
    flat = np.ones((h, w), dtype=bool)
    for dy, dx in ((0, 2), (2, 0), (2, 2), (2, -2)):
        a = np.roll(lab, (dy, dx), axis=(0, 1))
        b = np.roll(lab, (-dy, -dx), axis=(0, 1))
        flat &= _norm(a - b) < FLAT_MAX_DE

    # Cores: connected flat, eroded pixels of one palette colour.
    seeds: list[tuple[int, np.ndarray]] = []
    for ci in range(len(COLORS)):
        if ci == bg_idx:
            continue
        mask = fg & (color_idx == ci)
        if mask.sum() < MIN_CORE_AREA:
            continue
        core = erode(mask) & flat
        labels, n = label_components(core)
        if n == 0:
            continue
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        for k in range(1, n + 1):
            if areas[k] >= MIN_CORE_AREA:
                seeds.append((ci, labels == k))

    # Grow the cores to the 50% edges, competing for pixels by how much of each colour they are.
    owner = np.zeros((h, w), dtype=np.int32)  # 0 = nobody, k + 1 = seeds[k]
    fits = []  # per seed: how badly each pixel fits its background-to-colour line (inf: not its pixel)
    for k, (ci, core) in enumerate(seeds):
        owner[core] = k + 1
        alpha, off = _mix(rgb, bg_model, np.median(rgb[core], axis=0))
        fits.append(np.where((alpha >= 0.5) & (off <= MAX_MIX_OFFSET), off, np.inf))
    for _ in range(GROW_STEPS):
        best = np.full((h, w), np.inf)
        claim = np.zeros((h, w), dtype=np.int32)
        free = owner == 0
        for k in range(len(seeds)):
            cand = dilate(owner == k + 1) & free & (fits[k] < best)
            best[cand] = fits[k][cand]
            claim[cand] = k + 1
        if not claim.any():
            break
        owner[claim > 0] = claim[claim > 0]

    # Merge touching regions of one colour.
    group = list(range(len(seeds)))
    for k, (ci, _) in enumerate(seeds):
        touching = np.unique(owner[dilate(owner == k + 1)])
        for j in touching:
            j = int(j) - 1
            if j > k and seeds[j][0] == ci:
                gk, gj = group[k], group[j]
                group = [min(gk, gj) if g in (gk, gj) else g for g in group]
    regions: dict[int, np.ndarray] = {}
    for k, g in enumerate(group):
        m = owner == k + 1
        regions[g] = regions[g] | m if g in regions else m

    yy, xx = np.mgrid[0:h, 0:w]
    detections = []
    any_object = owner > 0
    for g, region in regions.items():
        area = int(region.sum())
        if area < MIN_CORE_AREA:
            continue
        contrast = _edge_contrast(lab, region, any_object)
        if contrast < MIN_EDGE_CONTRAST:
            continue  # a smooth blotch of the background, not an object with an edge
        cy, cx = float(yy[region].mean()), float(xx[region].mean())
        r_eq = math.sqrt(area / math.pi)
        radius, valid = _profile(region, any_object & ~region, cy, cx, r_eq)
        shape, dists = _classify_shape(radius, valid)
        known = shape if shape in SHAPES else "circle"  # an unknown shape is sized like a circle
        extent = math.sqrt(area / unit_area(known)) / w
        nominal = extent / SHAPE_SCALE[known]
        center = ((cx + 0.5) / w, (cy + 0.5) / h)
        row, col = position_cell(*center)
        detections.append(
            Detection(
                color=COLORS[seeds[g][0]],
                shape=shape,
                size="large" if nominal >= SIZE_THRESHOLD else "small",
                position=position_name(row, col),
                center=center,
                area=area / (w * h),
                contrast=contrast,
                extent=extent,
                shape_distances=dists,
            )
        )
    detections.sort(key=lambda d: (d.center[1], d.center[0]))
    return Analysis(COLORS[bg_idx], style, detections, dl)


def detect(image: Image.Image | np.ndarray | str | os.PathLike) -> list[Detection]:
    """The objects in an image (colour, shape, size, position, centre, area), top to bottom."""
    return analyse(image).objects


# --- scoring ---------------------------------------------------------------------------------------------

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position")


def as_spec(target: SceneSpec | Scene | str) -> SceneSpec:
    """A spec from a spec, a scene (its full ground truth) or a caption (parsed)."""
    if isinstance(target, SceneSpec):
        return target
    if isinstance(target, Scene):
        from kuas.world.captions import canonical_caption

        return SceneSpec.from_scene(target, text=canonical_caption(target))
    if isinstance(target, str):
        from kuas.world.captions import parse_caption

        return parse_caption(target)
    raise InvalidInputError(f"expected a SceneSpec, Scene or caption, not {type(target).__name__}")


def _expand(spec: SceneSpec) -> list[ObjSpec]:
    out = []
    for o in spec.objects:
        out.extend(
            [ObjSpec(o.shape, o.color, o.size, o.position if o.count == 1 else None, 1)] * max(o.count, 0)
        )
    return out


def _matches(exp: ObjSpec, det: Detection) -> dict[str, bool | None]:
    return {a: None if getattr(exp, a) is None else getattr(exp, a) == getattr(det, a) for a in ATTRIBUTES}


def _best_assignment(expected: list[ObjSpec], found: list[Detection]) -> list[int | None]:
    """For each expected object, the index of its detection (or None): the assignment that gets the
    most attributes right, colour and shape first."""
    if not expected:
        return []
    weight = {"color": 1.01, "shape": 1.01, "size": 1.0, "position": 1.0}
    gain = np.zeros((len(expected), len(found)))
    for i, e in enumerate(expected):
        for j, d in enumerate(found):
            gain[i, j] = 0.001 + sum(weight[a] for a, ok in _matches(e, d).items() if ok)
    best, best_perm = -1.0, None
    k = min(len(expected), len(found))
    rows = range(len(expected))
    for chosen in itertools.combinations(rows, k):
        for perm in itertools.permutations(range(len(found)), k):
            total = gain[list(chosen), list(perm)].sum() if k else 0.0
            if total > best:
                best, best_perm = total, (chosen, perm)
    out: list[int | None] = [None] * len(expected)
    if best_perm:
        for i, j in zip(*best_perm):
            out[i] = j
    return out


def score(
    image: Image.Image | np.ndarray | str | os.PathLike | Analysis, target: SceneSpec | Scene | str
) -> dict[str, Any]:
    """How well an image shows what a spec (or scene, or caption) asks for.

    Returns a JSON-ready dict: `background`, `background_style`, `count` (exactly as many objects as
    asked), per-attribute fractions `color`, `shape`, `size`, `position` over the expected objects
    (None where the spec says nothing), per-object details and `all_correct` (every scored item right).
    """
    spec = as_spec(target)
    ana = image if isinstance(image, Analysis) else analyse(image)
    found = sorted(ana.objects, key=lambda d: -d.area)[:8]  # the largest eight are plenty to match
    expected = _expand(spec)
    assign = _best_assignment(expected, found)
    objects = []
    for e, j in zip(expected, assign):
        det = found[j] if j is not None else None
        ok = _matches(e, det) if det else {a: (None if getattr(e, a) is None else False) for a in ATTRIBUTES}
        objects.append({"expected": asdict(e), "detected": asdict(det) if det else None, **ok})
    result: dict[str, Any] = {
        "text": spec.text,
        "kind": spec.kind,
        "heldout": spec.heldout,
        "background": None if spec.background is None else ana.background == spec.background,
        "background_style": None
        if spec.background_style is None
        else ana.background_style == spec.background_style,
        "count": len(ana.objects) == len(expected),
        "expected_count": len(expected),
        "detected_count": len(ana.objects),
        "detected_background": ana.background,
        "detected_background_style": ana.background_style,
    }
    for a in ATTRIBUTES:
        vals = [o[a] for o in objects if o[a] is not None]
        result[a] = float(np.mean(vals)) if vals else None
    result["objects"] = objects
    checks = [result["background"], result["background_style"], result["count"]]
    checks += [o[a] for o in objects for a in ATTRIBUTES]
    result["all_correct"] = all(c for c in checks if c is not None)
    return result


# --- reports -------------------------------------------------------------------------------------------

METRICS: tuple[str, ...] = (
    "all_correct",
    "background",
    "background_style",
    "count",
    "color",
    "shape",
    "size",
    "position",
)
_SHORT = {"all_correct": "all", "background": "bg", "background_style": "bg-style"}


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over the results that score it (None where none does), and their number."""
    out: dict[str, Any] = {"n": len(results)}
    for m in METRICS:
        vals = [float(r[m]) for r in results if r.get(m) is not None]
        out[m] = float(np.mean(vals)) if vals else None
    return out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 3)] + "..."
    return lines


def _draw_mark(draw: ImageDraw.ImageDraw, x: int, y: int, ok: bool, s: int = 14) -> None:
    """A check mark (green) or a cross (red) drawn as lines, so no font needs those glyphs."""
    draw.ellipse((x, y, x + s, y + s), fill=(255, 255, 255))
    if ok:
        draw.line(
            [(x + 3, y + s // 2), (x + s // 2 - 1, y + s - 4), (x + s - 3, y + 3)], fill=(0, 150, 0), width=2
        )
    else:
        draw.line([(x + 3, y + 3), (x + s - 3, y + s - 3)], fill=(200, 0, 0), width=2)
        draw.line([(x + 3, y + s - 3), (x + s - 3, y + 3)], fill=(200, 0, 0), width=2)


def make_grid(
    images: Sequence[Image.Image], results: Sequence[dict[str, Any]], columns: int = 8, tile: int = 160
) -> Image.Image:
    """A contact sheet: each image with its prompt, a check mark or cross, and what was wrong."""
    text_h = 58
    rows = max(1, math.ceil(len(images) / columns))
    sheet = Image.new("RGB", (columns * tile, rows * (tile + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    for i, (img, res) in enumerate(zip(images, results)):
        x, y = (i % columns) * tile, (i // columns) * (tile + text_h)
        sheet.paste(img.convert("RGB").resize((tile - 4, tile - 4), Image.BILINEAR), (x + 2, y + 2))
        ok = bool(res.get("all_correct"))
        _draw_mark(draw, x + 5, y + 5, ok)
        wrong = [_SHORT.get(m, m) for m in METRICS[1:] if res.get(m) is not None and res[m] < 1]
        lines = _wrap(draw, res.get("text") or "", font, tile - 6, 3)
        if wrong:
            lines += _wrap(draw, "wrong: " + ", ".join(wrong), font, tile - 6, 1)
        for k, line in enumerate(lines):
            draw.text(
                (x + 3, y + tile + 1 + 13 * k), line, fill=(0, 0, 0) if k < 3 else (190, 0, 0), font=font
            )
    return sheet


def evaluate(
    images: Sequence[Image.Image | np.ndarray | str | os.PathLike],
    specs: Sequence[SceneSpec | Scene | str],
    out_dir: str | os.PathLike | None = None,
    *,
    names: Sequence[str] | None = None,
    grid_size: int = 64,
) -> dict[str, Any]:
    """Score many images and summarise: overall, seen vs held-out combinations, and per scene kind.

    With `out_dir`, writes `report.json` (the summary and every image's score) and `grid.png` (the
    first `grid_size` images with prompts and check marks). Returns the report dict.
    """
    if len(images) != len(specs):
        raise InvalidInputError(
            f"got {len(images)} images but {len(specs)} prompts/specs; give one per image"
        )
    results = []
    for i, (image, target) in enumerate(zip(images, specs)):
        spec = as_spec(target)
        res = score(image, spec)
        res["index"] = i
        if names is not None:
            res["name"] = names[i]
        results.append(res)
    report: dict[str, Any] = {
        "overall": aggregate(results),
        "by_split": {
            "seen": aggregate([r for r in results if not r["heldout"]]),
            "heldout": aggregate([r for r in results if r["heldout"]]),
        },
        "by_kind": {
            k: aggregate([r for r in results if r["kind"] == k]) for k in ("single", "pair", "count")
        },
        "images": results,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(out / "report.json", json.dumps(report, indent=1).encode())
        shown = [_load_rgb(im) for im in images[:grid_size]]
        grid = make_grid(shown, results[:grid_size])
        buf = _png_bytes(grid)
        _atomic_write_bytes(out / "grid.png", buf)
        report["files"] = [str(out / "report.json"), str(out / "grid.png")]
    return report


def _load_rgb(image: Image.Image | np.ndarray | str | os.PathLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)[..., :3], "RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def _png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def format_report(report: dict[str, Any]) -> str:
    """A short text table of a report: one row per group, one column per metric (percent)."""
    rows = [("overall", report["overall"])]
    rows += [(f"split {k}", v) for k, v in report["by_split"].items()]
    rows += [(f"kind {k}", v) for k, v in report["by_kind"].items()]
    head = f"{'group':<14}{'n':>6}" + "".join(f"{_SHORT.get(m, m):>10}" for m in METRICS)
    lines = [head]
    for name, agg in rows:
        cells = "".join(f"{'-':>10}" if agg[m] is None else f"{100 * agg[m]:>9.1f}%" for m in METRICS)
        lines.append(f"{name:<14}{agg['n']:>6}" + cells)
    return "\n".join(lines)
