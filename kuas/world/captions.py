"""Captions for world scenes and the parser that reads them (and user prompts) back.

`canonical_caption` is the one fixed form, always understood and used often in training:

    a large red circle on the left and a small blue star at the top, on a yellow background
    three small green hearts, on a white gradient background

`caption` varies it with synonyms (big/little, "in the middle", "in the upper left corner"...), word
orders ("on the left there is ...", "on a yellow background, ..."), optional sizes and other ways of
naming the background. `parse_caption` maps any of these, and free-form prompts written in the same
vocabulary, to a `SceneSpec`: it finds the background phrase ("<colour> [gradient] background" or
"<colour> gradient"), splits the rest into object phrases at "and", "with", commas and semicolons, and
reads each phrase's count, size, colour, shape and position by keywords (position from top/upper,
bottom/lower, left, right, center/centre/middle).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from kuas.world.scene import (
    COLORS,
    POSITIONS,
    SHAPES,
    ObjSpec,
    Scene,
    SceneSpec,
    make_rng,
    position_of_name,
)

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")

# Ways of saying each position; the first is canonical. The parser reads positions by keyword, so
# every phrase here (and many more) parses back to its cell.
POSITION_SYNONYMS: dict[str, tuple[str, ...]] = {
    "on the left": ("on the left", "on the left side", "at the left side", "to the left"),
    "on the right": ("on the right", "on the right side", "at the right side", "to the right"),
    "at the top": ("at the top", "at the top of the image", "near the top", "on the top side"),
    "at the bottom": ("at the bottom", "at the bottom of the image", "near the bottom", "on the bottom side"),
    "in the center": ("in the center", "in the middle", "at the center", "in the centre"),
    "in the top left corner": ("in the top left corner", "in the upper left corner", "at the top left"),
    "in the top right corner": ("in the top right corner", "in the upper right corner", "at the top right"),
    "in the bottom left corner": (
        "in the bottom left corner",
        "in the lower left corner",
        "at the bottom left",
    ),
    "in the bottom right corner": (
        "in the bottom right corner",
        "in the lower right corner",
        "at the bottom right",
    ),
}

# Object phrase templates (count 1). {a} is the article of the word after it.
OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a} {size} {color} {shape} {pos}",
    "{pos} there is {a} {size} {color} {shape}",
    "{a} {color} {shape} {pos}",
    "{pos} there is {a} {color} {shape}",
)
COUNT_TEMPLATES: tuple[str, ...] = (
    "{n} {size} {color} {shapes}",
    "{n} {color} {shapes}",
    "there are {n} {size} {color} {shapes}",
    "{digit} {size} {color} {shapes}",
)
BACKGROUND_TEMPLATES: tuple[str, ...] = (
    "on {a} {bg} background",
    "with {a} {bg} background",
    "against {a} {bg} background",
    "{bg} background",
)
GRADIENT_TEMPLATES: tuple[str, ...] = (
    "on {a} {bg} gradient background",
    "with {a} {bg} gradient background",
    "on {a} {bg} gradient",
    "{bg} gradient background",
)
# How the object phrase(s) and background phrase combine.
LAYOUT_TEMPLATES: tuple[str, ...] = ("{objs}, {bg}", "{objs} {bg}", "{bg}, {objs}")
JOINERS: tuple[str, ...] = (" and ", ", ")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + "s"


def _phrase(template: str, **fields: str) -> str:
    """Fill a template, choosing 'a'/'an' by the word that follows {a}."""
    text = template.format(a="{a}", **fields)
    while "{a}" in text:
        nxt = text.split("{a}", 1)[1].split()[0]
        text = text.replace("{a}", _article(nxt), 1)
    return " ".join(text.split())


def _background_phrase(scene: Scene, template: str) -> str:
    return _phrase(template, bg=scene.background)


def canonical_caption(scene: Scene) -> str:
    """The fixed caption form: objects joined by ' and ', then ', on a/an <colour> [gradient] background'
    ("a large red circle on the left and a small blue star at the top, on a yellow background";
    counting scenes: "three small green hearts, on a white background")."""
    return compose_caption(scene, CaptionChoice())


@dataclass(frozen=True)
class CaptionChoice:
    """Which template and synonym each part of a caption uses (indices wrap around)."""

    object_template: int = 0
    count_template: int = 0
    background_template: int = 0
    layout: int = 0
    joiner: int = 0
    position_synonym: int = 0
    size_word: int = 0


def _at(items: tuple[str, ...], i: int) -> str:
    return items[i % len(items)]


def compose_caption(scene: Scene, choice: CaptionChoice = CaptionChoice()) -> str:
    """The caption of a scene in the given template choice; the all-zero choice is canonical.

    Every object of a pair uses the same templates (`caption` varies them per object)."""
    return _compose(scene, [choice] * max(1, len(scene.objects)), choice)


def _compose(scene: Scene, per_object: list[CaptionChoice], choice: CaptionChoice) -> str:
    if scene.kind == "count":
        o, n = scene.objects[0], len(scene.objects)
        objs = _phrase(
            _at(COUNT_TEMPLATES, choice.count_template),
            n=COUNT_WORDS[n],
            digit=str(n),
            size=_at(SIZE_WORDS[o.size], choice.size_word),
            color=o.color,
            shapes=_plural(o.shape),
        )
    else:
        parts = [
            _phrase(
                _at(OBJECT_TEMPLATES, c.object_template),
                size=_at(SIZE_WORDS[o.size], c.size_word),
                color=o.color,
                shape=o.shape,
                pos=_at(POSITION_SYNONYMS[o.position], c.position_synonym),
            )
            for o, c in zip(scene.objects, per_object)
        ]
        objs = _at(JOINERS, choice.joiner).join(parts)
    bg_templates = GRADIENT_TEMPLATES if scene.background_style == "gradient" else BACKGROUND_TEMPLATES
    bg = _background_phrase(scene, _at(bg_templates, choice.background_template))
    layout = _at(LAYOUT_TEMPLATES, choice.layout)
    if layout.startswith("{bg}") and not bg.startswith(("on", "against")):
        layout = LAYOUT_TEMPLATES[0]  # "with a blue background, ..." reads badly: keep it at the end
    return layout.format(objs=objs, bg=bg)


def _random_choice(rng: np.random.Generator) -> CaptionChoice:
    def pick(n: int) -> int:
        return int(rng.integers(n))

    return CaptionChoice(
        object_template=pick(len(OBJECT_TEMPLATES)),
        count_template=pick(len(COUNT_TEMPLATES)),
        background_template=pick(len(BACKGROUND_TEMPLATES)),
        layout=pick(len(LAYOUT_TEMPLATES)),
        joiner=pick(len(JOINERS)),
        position_synonym=pick(4),
        size_word=pick(2),
    )


def caption(scene: Scene, rng: np.random.Generator | int | None = None) -> str:
    """A randomly varied caption of a scene (templates, synonyms, word order); the same rng state
    gives the same caption. Sizes may be left out; colours, shapes, positions and counts never."""
    rng = make_rng(rng)
    choice = _random_choice(rng)
    per_object = [choice] + [_random_choice(rng) for _ in scene.objects[1:]]
    return _compose(scene, per_object, choice)


# --- parsing -------------------------------------------------------------------------------------------

_WORD_ALIASES = {"violet": "purple", "centre": "center"}
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{_plural(s): s for s in SHAPES}}
_SIZE_LOOKUP = {w: size for size, words in SIZE_WORDS.items() for w in words} | {
    "tiny": "small",
    "huge": "large",
}
_COUNT_LOOKUP = {w: i for i, w in enumerate(COUNT_WORDS)} | {str(i): i for i in range(10)} | {"a": 1, "an": 1}
_COLOR_RE = "|".join(COLORS)
_BG_RE = re.compile(
    rf"\b(?:(?:on|with|against|over)\s+)?(?:(?:a|an|the)\s+)?({_COLOR_RE})\s+"
    rf"(?:(gradient)\s+background|(gradient)|(?:plain\s+)?background)\b"
)
_SPLIT_RE = re.compile(r"\band\b|\bwith\b|,|;|\.")


def _normalise(text: str) -> str:
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^a-z0-9,;.\s]", " ", text)
    text = re.sub(r"([,;.])", r" \1 ", text)
    words = [_WORD_ALIASES.get(w, w) for w in text.split()]
    return " ".join(words)


def _parse_position(words: list[str]) -> str | None:
    row = 0 if {"top", "upper"} & set(words) else 2 if {"bottom", "lower"} & set(words) else None
    col = 0 if "left" in words else 2 if "right" in words else None
    if row is None and col is None:
        return "in the center" if {"center", "middle"} & set(words) else None
    return POSITIONS[1 if row is None else row][1 if col is None else col]


def _parse_object(fragment: str) -> ObjSpec | None:
    words = fragment.split()
    shapes = [i for i, w in enumerate(words) if w in _SHAPE_WORDS]
    position = _parse_position(words)
    if not shapes:
        return ObjSpec(position=position) if position else None
    i = shapes[0]
    count = 1
    for w in words[:i]:
        if w in _COUNT_LOOKUP and w not in ("a", "an"):
            count = _COUNT_LOOKUP[w]
    if words[i].endswith("s") and count == 1 and not any(w in ("a", "an", "one") for w in words[:i]):
        count = 2  # "red circles" without a number: at least two; the best guess is two
    color = next((w for w in words if w in COLORS), None)
    size = next((_SIZE_LOOKUP[w] for w in words if w in _SIZE_LOOKUP), None)
    return ObjSpec(_SHAPE_WORDS[words[i]], color, size, position if count == 1 else None, count)


def parse_caption(text: str) -> SceneSpec:
    """What a caption asks for: background colour and style, and each object's attributes.

    Attributes a caption does not mention stay None (not scored). Understands every template of
    `caption` and similar free-form prompts; words it does not know are ignored.
    """
    norm = _normalise(text)
    background = style = None
    m = _BG_RE.search(norm)
    if m:
        background = m.group(1)
        style = "gradient" if (m.group(2) or m.group(3)) else "plain"
        norm = norm[: m.start()] + " , " + norm[m.end() :]
    objects: list[ObjSpec] = []
    pending_position: str | None = None
    for fragment in _SPLIT_RE.split(norm):
        spec = _parse_object(fragment)
        if spec is None:
            continue
        if spec.shape is None:  # a position on its own: give it to a neighbour that lacks one
            if objects and objects[-1].position is None and objects[-1].count == 1:
                objects[-1].position = spec.position
            else:
                pending_position = spec.position
            continue
        if pending_position and spec.position is None and spec.count == 1:
            spec.position, pending_position = pending_position, None
        objects.append(spec)
    return SceneSpec(background=background, background_style=style, objects=objects, text=text)


def position_phrases(position: str) -> tuple[str, ...]:
    """Every phrase `caption` may use for a canonical position."""
    position_of_name(position)  # validates
    return POSITION_SYNONYMS[position]
