"""The procedural world: scenes, rendering, control maps, captions and the training dataset."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from kuas.errors import InvalidInputError
from kuas.world import (
    COLORS,
    HELDOUT_PAIRS,
    PALETTE,
    SHAPES,
    ObjSpec,
    Scene,
    SceneSpec,
    WorldDataset,
    canonical_caption,
    caption,
    parse_caption,
    render,
    render_depth,
    render_edges,
    render_segmentation,
    sample_scene,
    score,
)
from kuas.world.captions import (
    BACKGROUND_TEMPLATES,
    COUNT_TEMPLATES,
    JOINERS,
    LAYOUT_TEMPLATES,
    OBJECT_TEMPLATES,
    POSITION_SYNONYMS,
    CaptionChoice,
    compose_caption,
)
from kuas.world.render import segmentation_labels
from kuas.world.scene import POSITION_NAMES, Obj, object_radius, polygon_area, position_cell, unit_area


def _scenes(n: int, split: str = "train", start: int = 0, kind: str | None = None) -> list[Scene]:
    return [sample_scene(start + i, split=split, kind=kind) for i in range(n)]


# --- scenes --------------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_scene_and_identical_pixels():
    for seed in (0, 7, 123):
        a, b = sample_scene(seed), sample_scene(seed)
        assert a == b
        assert render(a).tobytes() == render(b).tobytes()
        assert render(a, 64).tobytes() == render(b, 64).tobytes()
    assert sample_scene(1) != sample_scene(2)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert [sample_scene(rng_a) for _ in range(3)] == [sample_scene(rng_b) for _ in range(3)]


def test_scene_json_round_trip_renders_identically():
    for scene in _scenes(30, start=40) + _scenes(10, "heldout"):
        back = Scene.from_json(scene.to_json())
        assert back == scene
        assert render(back).tobytes() == render(scene).tobytes()


def test_scene_invariants_hold_for_every_kind():
    counts = {"single": 0, "pair": 0, "count": 0}
    for scene in _scenes(600, start=1000) + _scenes(200, "heldout", start=1000):
        counts[scene.kind] += 1
        assert scene.background not in {o.color for o in scene.objects}
        for o in scene.objects:
            assert o.radius == pytest.approx(object_radius(o.shape, o.size))
            cx, cy = o.center
            assert o.radius < cx < 1 - o.radius and o.radius < cy < 1 - o.radius  # fully inside
            assert position_cell(cx, cy) == o.cell  # the centre lies in the named cell
        if scene.kind == "single":
            assert len(scene.objects) == 1
        elif scene.kind == "pair":
            a, b = scene.objects
            assert a.position != b.position
            assert (a.color, a.shape) != (b.color, b.shape)
            assert [a.depth, b.depth] == [0, 1]
            if a.color == b.color:  # same colours never touch
                assert math.dist(a.center, b.center) > a.radius + b.radius
        else:
            assert 2 <= len(scene.objects) <= 4
            assert len({(o.color, o.shape, o.size) for o in scene.objects}) == 1
            for a, b in itertools.combinations(scene.objects, 2):
                assert math.dist(a.center, b.center) > a.radius + b.radius
    assert min(counts.values()) > 150


def test_heldout_pairs_never_in_train_and_always_in_heldout():
    seen_train: set[tuple[str, str]] = set()
    for scene in _scenes(3000, start=20000):
        assert not scene.pairs() & HELDOUT_PAIRS
        seen_train |= scene.pairs()
    # Every colour and every shape is still trained, only the held-out combinations are not.
    assert {c for c, _ in seen_train} == set(COLORS)
    assert {s for _, s in seen_train} == set(SHAPES)
    assert len(seen_train) == len(COLORS) * len(SHAPES) - len(HELDOUT_PAIRS)
    seen_heldout: set[tuple[str, str]] = set()
    for scene in _scenes(400, "heldout", start=20000):
        assert scene.has_heldout_pair()
        seen_heldout |= scene.pairs() & HELDOUT_PAIRS
    assert seen_heldout == set(HELDOUT_PAIRS)
    for kind in ("single", "pair", "count"):
        assert all(s.has_heldout_pair() for s in _scenes(40, "heldout", kind=kind))


def test_bad_arguments_raise_invalid_input():
    with pytest.raises(InvalidInputError, match="split"):
        sample_scene(0, split="test")
    with pytest.raises(InvalidInputError, match="kind"):
        sample_scene(0, kind="triple")
    with pytest.raises(InvalidInputError, match="size"):
        render(sample_scene(0), size=4)


# --- rendering -----------------------------------------------------------------------------------------


def _scene(objs: list[Obj], background: str = "blue", style: str = "plain", kind: str = "single") -> Scene:
    return Scene(kind=kind, background=background, background_style=style, objects=objs)


def test_render_draws_exact_palette_colours_and_areas():
    red, blue = np.array(PALETTE["red"]), np.array(PALETTE["blue"])
    for shape in SHAPES:
        for size in ("small", "large"):
            obj = Obj(shape, "red", size, "in the center", (0.5, 0.5), object_radius(shape, size))
            img = np.asarray(render(_scene([obj]), 128)).astype(int)
            assert img.shape == (128, 128, 3)
            assert tuple(img[64, 64]) == PALETTE["red"] and tuple(img[2, 2]) == PALETTE["blue"]
            # Anti-aliased coverage sums to the analytic area, within a quarter pixel along the outline.
            cover = ((img - blue) @ (red - blue)) / ((red - blue) @ (red - blue))
            expected = unit_area(shape) * (obj.radius * 128) ** 2
            outline = obj.outline(128)
            perimeter = np.linalg.norm(outline - np.roll(outline, 1, axis=0), axis=1).sum()
            assert abs(cover.sum() - expected) < 0.25 * perimeter
            # Edge pixels are mixtures (anti-aliasing), not only the two pure colours.
            assert ((cover > 0.1) & (cover < 0.9)).sum() > 0.5 * perimeter


def test_gradient_background_runs_lighter_to_darker_in_its_colour():
    img = np.asarray(render(_scene([], "blue", "gradient", "single"), 64)).astype(float)
    blue = np.array(PALETTE["blue"], dtype=float)
    light, dark = blue + (255 - blue) * 0.25, blue * 0.75
    t = (np.arange(64) + 0.5) / 64
    expected_rows = light[None] * (1 - t[:, None]) + dark[None] * t[:, None]
    assert np.abs(img.mean(1) - expected_rows).max() <= 1.0  # linear from 25% lighter to 25% darker
    assert np.ptp(img, axis=1).max() == 0  # constant along each row


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose whole 5x5 neighbourhood is in the mask (away from anti-aliased edges)."""
    out = mask.copy()
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            out &= np.roll(mask, (dy, dx), axis=(0, 1))
    return out


def test_segmentation_labels_match_the_object_pixels():
    for scene in _scenes(40, start=300):
        img = np.asarray(render(scene, 128)).astype(int)
        labels = np.asarray(render_segmentation(scene, 128))
        assert render_segmentation(scene).mode == "P"
        assert np.array_equal(labels, segmentation_labels(scene, 128))
        assert set(np.unique(labels)) == set(range(len(scene.objects) + 1))
        for i, o in enumerate(scene.objects):
            mask = labels == i + 1
            # Interior pixels (away from anti-aliased edges) have exactly the object's colour.
            inner = _interior(mask)
            assert inner.sum() > 0.3 * mask.sum()
            assert np.all(img[inner] == PALETTE[o.color])
            outline = o.outline(128)
            full_area = polygon_area(outline) if o.shape != "circle" else math.pi * (o.radius * 128) ** 2
            slack = 0.3 * np.linalg.norm(outline - np.roll(outline, 1, axis=0), axis=1).sum()
            if scene.kind != "pair":  # nothing overlaps: labelled area is the shape's area
                assert abs(mask.sum() - full_area) < slack
            else:  # the back object may be up to 20% hidden
                assert 0.78 * full_area < mask.sum() < full_area + slack
        if scene.background_style == "plain":
            assert np.all(img[_interior(labels == 0)] == PALETTE[scene.background])


def test_segmentation_labels_are_the_majority_label_of_each_pixels_subpixels():
    """The labels equal a per-label count over each pixel's 4x4 subpixels (lowest label on a tie), computed
    here the slow obvious way from the same supersampled drawing."""
    import importlib

    from PIL import ImageDraw

    rm = importlib.import_module("kuas.world.render")  # the package exports `render`, the function
    s = rm.SUPERSAMPLE
    ties = 0
    for scene in _scenes(60, start=900):
        size = 32
        lab = Image.new("L", (size * s, size * s), 0)
        draw = ImageDraw.Draw(lab)
        for i, obj in rm._ordered(scene):
            rm._draw_object(draw, obj, size * s, i + 1)
        blocks = np.asarray(lab).reshape(size, s, size, s)
        counts = np.stack([(blocks == k).sum(axis=(1, 3)) for k in range(len(scene.objects) + 1)])
        top = np.sort(counts, axis=0)
        ties += int(((top[-1] == top[-2]) & (top[-1] > 0)).sum()) if len(counts) > 1 else 0
        assert np.array_equal(segmentation_labels(scene, size), counts.argmax(axis=0).astype(np.uint8))
    assert ties > 0  # the tie rule was exercised


def test_depth_is_brighter_for_nearer_objects():
    front = Obj(
        "circle", "red", "large", "in the center", (0.5, 0.5), object_radius("circle", "large"), depth=1
    )
    back = Obj(
        "square", "green", "large", "on the left", (0.3, 0.5), object_radius("square", "large"), depth=0
    )
    scene = _scene([back, front], kind="pair")
    depth = np.asarray(render_depth(scene, 128))
    labels = segmentation_labels(scene, 128)
    assert render_depth(scene).mode == "L"
    assert np.all(depth[labels == 0] == 0)
    assert np.all(depth[labels == 2] == 255)
    assert np.all(depth[labels == 1] == 255 - 48)
    assert depth[64, 64] == 255 and depth[64, 30] == 207  # the circle hides the square's right part


def test_edges_trace_label_changes():
    for scene in _scenes(10, start=500):
        edges = np.asarray(render_edges(scene, 128))
        labels = segmentation_labels(scene, 128)
        assert set(np.unique(edges)) <= {0, 255}
        change = np.zeros(labels.shape, dtype=bool)
        change[:, :-1] |= labels[:, :-1] != labels[:, 1:]
        change[:-1] |= labels[:-1] != labels[1:]
        assert np.array_equal(edges == 255, change)
        # A circle-ish outline: edge count is of the order of the perimeters.
        for o in scene.objects:
            assert edges.sum() / 255 > 2 * math.pi * o.radius * 128 * 0.5


def test_render_is_fast_enough_to_feed_training():
    import time

    scenes = _scenes(200, start=700)
    t0 = time.perf_counter()
    for s in scenes:
        render(s, 128)
    per_second = len(scenes) / (time.perf_counter() - t0)
    assert per_second > 200  # measured ~1900/s on one core; generous for a shared CI machine


# --- captions ------------------------------------------------------------------------------------------


def _expected_spec(scene: Scene, with_size: bool = True) -> SceneSpec:
    spec = SceneSpec.from_scene(scene)
    if not with_size:
        for o in spec.objects:
            o.size = None
    return spec


def _same(parsed: SceneSpec, expected: SceneSpec) -> bool:
    return (parsed.background, parsed.background_style, parsed.objects) == (
        expected.background,
        expected.background_style,
        expected.objects,
    )


def test_canonical_caption_form_and_parse():
    obj1 = Obj("circle", "red", "large", "on the left", (0.2, 0.5), 0.15)
    obj2 = Obj("star", "blue", "small", "at the top", (0.5, 0.2), 0.1, depth=1)
    scene = _scene([obj1, obj2], background="yellow", kind="pair")
    text = canonical_caption(scene)
    assert text == "a large red circle on the left and a small blue star at the top, on a yellow background"
    assert _same(parse_caption(text), _expected_spec(scene))
    count = _scene(
        [Obj("heart", "green", "small", "on the left", (0.2, 0.5), 0.1)] * 3, "white", "gradient", "count"
    )
    assert canonical_caption(count) == "three small green hearts, on a white gradient background"
    orange = _scene([obj1], background="orange")
    assert canonical_caption(orange).endswith("on an orange background")
    for scene in _scenes(300, start=900) + _scenes(100, "heldout", start=900):
        assert _same(parse_caption(canonical_caption(scene)), _expected_spec(scene))


def test_every_template_and_synonym_parses_back():
    # Scenes of every kind, with plain and gradient backgrounds, in all nine positions.
    scenes = []
    for k, pos in enumerate(POSITION_NAMES):
        row, col = [(r, c) for r in range(3) for c in range(3)][k]
        a = Obj(
            SHAPES[k % 5],
            COLORS[k % 8],
            "small" if k % 2 else "large",
            pos,
            ((col + 0.5) / 3, (row + 0.5) / 3),
            0.1,
        )
        other = POSITION_NAMES[(k + 4) % 9]
        b = Obj(SHAPES[(k + 2) % 5], COLORS[(k + 3) % 8], "large", other, (0.5, 0.5), 0.1, depth=1)
        bg = next(c for c in COLORS if c not in (a.color, b.color))
        scenes.append(_scene([a], bg, "gradient" if k % 2 else "plain"))
        scenes.append(_scene([a, b], bg, "plain" if k % 2 else "gradient", kind="pair"))
        scenes.append(_scene([a] * (2 + k % 3), bg, "gradient" if k % 3 else "plain", kind="count"))
    checked = 0
    for scene in scenes:
        for ot, ct, bt, lay, jn, syn, sw in itertools.product(
            range(len(OBJECT_TEMPLATES)),
            range(len(COUNT_TEMPLATES)),
            range(len(BACKGROUND_TEMPLATES)),
            range(len(LAYOUT_TEMPLATES)),
            range(len(JOINERS)),
            range(max(len(v) for v in POSITION_SYNONYMS.values())),
            range(2),
        ):
            if scene.kind == "count" and (ot or jn or syn):
                continue
            if scene.kind != "count" and ct:
                continue
            choice = CaptionChoice(ot, ct, bt, lay, jn, syn, sw)
            text = compose_caption(scene, choice)
            if scene.kind == "count":
                with_size = "{size}" in COUNT_TEMPLATES[ct]
            else:
                with_size = "{size}" in OBJECT_TEMPLATES[ot]
            assert _same(parse_caption(text), _expected_spec(scene, with_size)), text
            checked += 1
    assert checked > 5000


def test_random_captions_parse_back_and_stay_short():
    lengths = []
    variants = set()
    for i, scene in enumerate(_scenes(500, start=3000)):
        text = caption(scene, np.random.default_rng(i))
        assert caption(scene, np.random.default_rng(i)) == text  # deterministic for a seed
        variants.add(text)
        parsed = parse_caption(text)
        expected = _expected_spec(scene)
        assert (parsed.background, parsed.background_style) == (
            expected.background,
            expected.background_style,
        )
        assert len(parsed.objects) == len(expected.objects), text
        for p, e in zip(parsed.objects, expected.objects):
            assert (p.shape, p.color, p.position, p.count) == (e.shape, e.color, e.position, e.count), text
            assert p.size in (None, e.size)
        # CLIP BPE gives one token per word of this vocabulary, plus punctuation: well under 60.
        lengths.append(len(re.findall(r"[a-z0-9]+|[^a-z0-9\s]", text)))
    assert len(variants) == 500
    assert max(lengths) <= 40


def test_parse_free_form_prompts():
    spec = parse_caption("A big violet star in the upper right corner against a white background.")
    assert (spec.background, spec.background_style) == ("white", "plain")
    assert spec.objects == [ObjSpec("star", "purple", "large", "in the top right corner", 1)]
    spec = parse_caption("two red circles")
    assert spec.background is None and spec.objects == [ObjSpec("circle", "red", None, None, 2)]
    assert spec.kind == "count"
    spec = parse_caption("4 tiny orange hearts on a black gradient")
    assert (
        spec.objects == [ObjSpec("heart", "orange", "small", None, 4)] and spec.background_style == "gradient"
    )
    assert spec.heldout is False and parse_caption("a white heart").heldout is True
    spec = parse_caption(
        "yellow background with a blue square in the middle and a green circle at the bottom"
    )
    assert spec.background == "yellow"
    assert spec.objects == [
        ObjSpec("square", "blue", None, "in the center", 1),
        ObjSpec("circle", "green", None, "at the bottom", 1),
    ]
    assert parse_caption("a photo of a cat").objects == []


# --- dataset -------------------------------------------------------------------------------------------


def test_world_dataset_is_deterministic_per_index():
    ds = WorldDataset("train", size=64, seed=3, length=50)
    assert len(ds) == 50
    img, text = ds[7]
    assert isinstance(img, torch.Tensor) and img.shape == (3, 64, 64) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1
    img2, text2 = WorldDataset("train", size=64, seed=3, length=50)[7]
    assert text == text2 and torch.equal(img, img2)
    scene, text3 = ds.sample(7)
    assert text3 == text
    expected = torch.from_numpy(np.asarray(render(scene, 64), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(img, expected)
    assert ds[8][1] != text or not torch.equal(ds[8][0], img)
    assert WorldDataset("train", 64, seed=4, length=50).sample(7)[0] != scene
    with pytest.raises(IndexError):
        ds[50]


def test_world_dataset_splits_and_canonical_share():
    train = WorldDataset("train", size=32, seed=0, length=400, canonical_prob=1.0)
    for i in range(400):
        scene, text = train.sample(i)
        assert not scene.has_heldout_pair() and text == canonical_caption(scene)
    held = WorldDataset("heldout", size=32, seed=0, length=50)
    assert all(held.sample(i)[0].has_heldout_pair() for i in range(50))
    mixed = WorldDataset("train", size=32, seed=0, length=400, canonical_prob=0.5)
    share = np.mean([mixed.sample(i)[1] == canonical_caption(mixed.sample(i)[0]) for i in range(400)])
    assert 0.4 < share < 0.7  # half canonical, plus varied captions that happen to equal it
    batch = torch.utils.data.DataLoader(WorldDataset(size=32, length=8), batch_size=4)
    images, texts = next(iter(batch))
    assert images.shape == (4, 3, 32, 32) and len(texts) == 4


def test_world_dataset_kind_weights_set_the_mix():
    default = WorldDataset("train", size=32, seed=0, length=10)
    explicit = WorldDataset("train", size=32, seed=0, length=10, kind_weights=(4, 3.5, 2.5))  # normalised
    assert [default.sample(i) for i in range(10)] == [explicit.sample(i) for i in range(10)]
    counts = WorldDataset("train", size=32, seed=0, length=100, kind_weights=(0, 0, 1))
    assert {counts.sample(i)[0].kind for i in range(100)} == {"count"}
    mix = WorldDataset("train", size=32, seed=0, length=3000, kind_weights=[0.3, 0.35, 0.35])
    kinds = [mix.sample(i)[0].kind for i in range(3000)]
    shares = [kinds.count(k) / len(kinds) for k in ("single", "pair", "count")]
    assert all(abs(a - b) < 0.03 for a, b in zip(shares, (0.3, 0.35, 0.35))), shares


def _near_cell_centre(o: Obj) -> bool:
    """Centre within the jitter of its cell's centre, or clamped to the canvas border."""
    row, col = o.cell
    lo, hi = o.radius + 0.03, 1 - o.radius - 0.03
    return all(abs(v - (k + 0.5) / 3) <= 0.06 + 1e-9 or v in (lo, hi) for v, k in zip(o.center, (col, row)))


def test_grid_count_layout_puts_each_counted_object_in_its_own_cell():
    free = WorldDataset("train", size=32, seed=0, length=200, kind_weights=(0, 0, 1))
    grid = WorldDataset("train", size=32, seed=0, length=200, kind_weights=(0, 0, 1), count_layout="grid")
    # the free layout (the default) draws what it drew before the grid option existed
    old = sample_scene(7, kind="count")
    assert old.background == "white"
    np.testing.assert_allclose([o.center for o in old.objects], [(0.680904275366, 0.771407287206),
                               (0.235612800882, 0.289758803442), (0.752547168819, 0.244394723262),
                               (0.263221085454, 0.730202857882)], atol=1e-12)
    in_cells = {True: 0, False: 0}
    for i in range(200):
        for ds in (free, grid):
            scene, text = ds.sample(i)
            objs = scene.objects
            assert scene.kind == "count" and 2 <= len(objs) <= 4 and len({(o.shape, o.color, o.size) for o in objs}) == 1
            for a in range(len(objs)):  # never touching, whatever the layout
                for b in range(a):
                    assert math.dist(objs[a].center, objs[b].center) >= 2 * objs[a].radius + 0.035 - 1e-9
            cells = [o.cell for o in objs]
            in_cells[ds is grid] += len(set(cells)) == len(cells) and all(map(_near_cell_centre, objs))
            assert parse_caption(text).objects[0].count == len(objs)  # the caption still names no position
            assert parse_caption(text).objects[0].position is None
            if ds is grid:
                assert score(render(scene, 128), text)["all_correct"]
    assert in_cells[True] == 200 and in_cells[False] < 150
    # four of the largest shapes fit in no other cells than the corners
    four_large = [s for s in (sample_scene(i, kind="count", count_layout="grid") for i in range(400))
                  if len(s.objects) == 4 and s.objects[0].size == "large" and s.objects[0].shape in ("star", "triangle")]
    assert four_large and all({o.position for o in s.objects} == {"in the top left corner", "in the top right corner",
                              "in the bottom left corner", "in the bottom right corner"} for s in four_large)
    with pytest.raises(InvalidInputError, match="count layout"):
        WorldDataset(count_layout="spiral")
    with pytest.raises(InvalidInputError, match="count layout"):
        sample_scene(0, count_layout="rows")


def test_world_dataset_rejects_bad_arguments():
    with pytest.raises(InvalidInputError):
        WorldDataset("val")
    with pytest.raises(InvalidInputError):
        WorldDataset(length=0)
    with pytest.raises(InvalidInputError):
        WorldDataset(canonical_prob=2.0)
    for bad in ((1, 1), (1, -1, 1), (0, 0, 0), (1, float("nan"), 1), "abc"):
        with pytest.raises(InvalidInputError, match="kind weights"):
            WorldDataset(kind_weights=bad)


def test_rendered_image_is_a_pil_rgb_image():
    img = render(sample_scene(0), 96)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (96, 96)
