"""The AUTOMATIC1111 prompt language: emphasis, prompt editing, alternation, AND, BREAK, extra networks.

Users paste prompts written for the A1111 web UI, so every function here reproduces what A1111 (>= 1.6)
does with the same text, including its fallbacks on malformed input (where A1111 crashes instead, the
choice made here is documented on the function and reported in ``ParsedPrompt.notes``).

The order of the stages is the web UI's:

1. ``extract_extra_networks``: ``<lora:name:0.8>``-style tags are removed from the whole prompt;
2. ``split_and``: the rest is split on ``AND`` into sub-prompts with a ``:weight`` each;
3. ``prompt_schedule``: each sub-prompt becomes a list of ``(end_at_step, text)`` for prompt editing
   ``[from:to:when]`` and alternation ``[a|b]``;
4. ``parse_prompt_attention``: each scheduled text becomes ``(text, weight)`` pieces for ``(x)``/``[x]``
   emphasis, with ``("BREAK", -1.0)`` markers.

``parse_prompt`` runs all four and returns a ``ParsedPrompt``. The scanners are hand-written and
iterative (no backtracking regex on unbounded input, no recursion), so a megabyte of text or ten
thousand nested brackets parse in about a second and never raise.

``EmbeddingRegistry`` keeps textual-inversion vectors by name and finds those names in a token stream
the way A1111 does, for the conditioning code to splice the vectors in.
"""

from __future__ import annotations

import logging
import math
import re
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from kuas.errors import InvalidInputError

logger = logging.getLogger(__name__)

__all__ = [
    "BREAK_MARKER",
    "EmbeddingMatch",
    "EmbeddingRegistry",
    "EmbeddingTokenIndex",
    "ExtraNetworkRequest",
    "ParsedPrompt",
    "PromptPart",
    "ScheduledText",
    "TextualInversionEmbedding",
    "TokenEncoder",
    "extract_extra_networks",
    "parse_prompt",
    "parse_prompt_attention",
    "prompt_schedule",
    "split_and",
]

# The (text, weight) entry that forces the next 75-token chunk (A1111 tests text == "BREAK" and weight == -1).
BREAK_MARKER: tuple[str, float] = ("BREAK", -1.0)

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1  # A1111 multiplies by this constant (it does not divide by 1.1)

# Above this many weight multiplications the exact, reference-order float arithmetic would take too long
# (only deeply nested emphasis with text at every level gets here); weights are then summed in log space.
_EXACT_EMPHASIS_BUDGET = 30_000_000
_MAX_NOTES = 20


def _check_prompt(prompt: object, what: str = "prompt") -> str:
    if not isinstance(prompt, str):
        raise InvalidInputError(f"{what} must be a str, got {type(prompt).__name__}; pass the prompt text")
    return prompt


def _check_steps(steps: object, what: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InvalidInputError(
            f"{what} must be an integer >= 1, got {steps!r}; pass the number of sampling steps"
        )
    return int(steps)


# ----------------------------------------------------------------------------------------------------
# Emphasis: (x) (x:1.3) [x] and BREAK
# ----------------------------------------------------------------------------------------------------

# One token of the emphasis language, tried in this order at each position (the group number says which):
#   1: a backslash and an optional escaped bracket/backslash (a lone backslash stands for nothing),
#   2: an opening bracket, 3: an explicit weight (4: its number) that closes a round bracket,
#   5: a closing bracket, 6: a run of ordinary text or a lone colon.
_EMPHASIS_TOKEN = re.compile(
    r"(\\[()\[\]\\]?)"
    r"|([(\[])"
    r"|(:\s*([+-]?[.\d]+)\s*\))"
    r"|([)\]])"
    r"|([^\\()\[\]:]+|:)"
)
_EMPHASIS_SYNTAX = re.compile(r"[\\()\[\]]|BREAK")
_BREAK_KEYWORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(piece, weight)`` pairs exactly as A1111's ``parse_prompt_attention``.

    ``(x)`` multiplies by 1.1, ``[x]`` by 1/1.1, ``(x:1.3)`` by 1.3; brackets nest; ``\\(`` ``\\)``
    ``\\[`` ``\\]`` ``\\\\`` are literal characters and any other backslash vanishes; brackets left open
    are closed at the end of the text (all round ones, then all square ones); closing brackets with no
    opener are literal text; neighbours with equal weights are merged; ``BREAK`` (a whole word, in
    capitals) becomes the entry ``("BREAK", -1.0)``, which emphasis multiplies like any other entry;
    an empty result is ``[("", 1.0)]``.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]

    Where A1111 raises or produces non-finite weights, this returns instead (see ``parse_prompt`` for
    the notes): a weight that is not a number (``(x:1.2.3)``) is kept as text and its bracket closes with
    the default 1.1; a weight that overflows to inf or nan (a 400-digit weight, 8000 nested ``(``) is
    reset to 1.0 for the pieces concerned.
    """
    _check_prompt(text, "text")
    return _attention_with_notes(text)[0]


def _attention_with_notes(text: str) -> tuple[list[tuple[str, float]], list[str]]:
    if not _EMPHASIS_SYNTAX.search(text):
        return [(text, 1.0)], []  # nothing but text and colons: one piece
    notes: list[str] = []
    pieces: list[str] = []
    weights: list[float] = []
    events: list[tuple[int, int, float]] = []  # (first piece, end piece, multiplier) in the order applied
    round_open: list[int] = []
    square_open: list[int] = []
    stray_closers = 0
    bad_weights: list[str] = []
    literal_colons = 0

    add_piece = pieces.append
    add_weight = weights.append

    def add_text(chunk: str) -> None:
        if "BREAK" not in chunk:
            add_piece(chunk)
            add_weight(1.0)
            return
        for i, part in enumerate(_BREAK_KEYWORD.split(chunk)):
            if i:
                add_piece(BREAK_MARKER[0])
                add_weight(BREAK_MARKER[1])
            add_piece(part)
            add_weight(1.0)

    for m in _EMPHASIS_TOKEN.finditer(text):
        kind = m.lastindex
        if kind == 6:
            chunk = m.group()
            if "BREAK" in chunk:
                add_text(chunk)
            else:
                add_piece(chunk)
                add_weight(1.0)
                if chunk == ":" and round_open:
                    literal_colons += 1
        elif kind == 2:
            (round_open if m.group() == "(" else square_open).append(len(pieces))
        elif kind == 5:
            if m.group() == ")":
                if round_open:
                    events.append((round_open.pop(), len(pieces), ROUND_MULTIPLIER))
                    continue
            elif square_open:
                events.append((square_open.pop(), len(pieces), SQUARE_MULTIPLIER))
                continue
            stray_closers += 1
            add_text(m.group())
        elif kind == 1:
            add_piece(m.group()[1:])
            add_weight(1.0)
        elif round_open:  # kind 3: ":<number>)" closing the innermost round bracket
            weight_text = m.group(4)
            try:
                value = float(weight_text)
            except ValueError:
                # A1111 raises here; keep ":<weight>" as text and close the bracket as a plain ")".
                bad_weights.append(weight_text)
                add_text(m.group()[:-1])
                events.append((round_open.pop(), len(pieces), ROUND_MULTIPLIER))
            else:
                events.append((round_open.pop(), len(pieces), value))
        else:
            stray_closers += 1
            add_text(m.group())

    if round_open or square_open:
        notes.append("unbalanced brackets: '(' or '[' left open were closed at the end of the prompt")
    for start in round_open:
        events.append((start, len(pieces), ROUND_MULTIPLIER))
    for start in square_open:
        events.append((start, len(pieces), SQUARE_MULTIPLIER))
    if stray_closers:
        notes.append("closing brackets without an opening one were kept as text")
    if literal_colons:
        notes.append(
            "':' inside (...) not followed by a number and ')' is text, not a weight (write (text:1.2))"
        )
    if bad_weights:
        shown = ", ".join(repr(w[:20]) for w in bad_weights[:3])
        notes.append(f"emphasis weight(s) {shown} are not numbers: kept as text, bracket closed with 1.1")

    if not pieces:
        return [("", 1.0)], notes

    weights = _apply_emphasis(weights, events, notes)

    bad = [i for i, w in enumerate(weights) if not math.isfinite(w)]
    if bad:
        for i in bad:
            weights[i] = 1.0
        notes.append(
            "emphasis overflowed to inf/nan (weights too large or nested too deep): "
            "those weights reset to 1.0"
        )

    merged: list[tuple[str, float]] = []
    run: list[str] = [pieces[0]]
    run_weight = weights[0]
    for piece, weight in zip(pieces[1:], weights[1:]):
        if weight == run_weight:
            run.append(piece)
        else:
            merged.append(("".join(run), run_weight))
            run, run_weight = [piece], weight
    merged.append(("".join(run), run_weight))
    return merged, notes


def _apply_emphasis(
    weights: list[float], events: list[tuple[int, int, float]], notes: list[str]
) -> list[float]:
    """Multiply each range of pieces by its multiplier, in order, with the reference's float rounding."""
    work = sum(end - start for start, end, _ in events)
    if work <= 4 * len(events) + 200_000:
        for start, end, multiplier in events:
            if end - start == 1:
                weights[start] *= multiplier
            elif end > start:
                weights[start:end] = [w * multiplier for w in weights[start:end]]
        return weights
    if work <= _EXACT_EMPHASIS_BUDGET:
        array = np.array(weights, dtype=np.float64)  # IEEE products, bit-identical to Python floats
        with np.errstate(all="ignore"):
            for start, end, multiplier in events:
                if end > start:
                    array[start:end] *= multiplier
        return array.tolist()

    # Exact order would cost `work` multiplications: combine the multipliers in log space instead.
    notes.append(
        "emphasis nesting too deep for exact arithmetic: "
        "weights computed in log space (last-digit differences)"
    )
    n = len(weights)
    starts = np.array([e[0] for e in events], dtype=np.int64)
    ends = np.array([e[1] for e in events], dtype=np.int64)
    mult = np.array([e[2] for e in events], dtype=np.float64)
    with np.errstate(all="ignore"):
        magnitude = np.abs(mult)
        zero = magnitude == 0
        infinite = np.isinf(magnitude)
        logs = np.where(zero | infinite, 0.0, np.log(np.where(zero | infinite, 1.0, magnitude)))

        def covered(values: np.ndarray) -> np.ndarray:
            diff = np.bincount(starts, values, n + 1) - np.bincount(ends, values, n + 1)
            return np.cumsum(diff)[:n]

        log_sum = covered(logs)
        negatives = np.rint(covered((mult < 0).astype(np.float64)))
        zeros = np.rint(covered(zero.astype(np.float64)))
        infs = np.rint(covered(infinite.astype(np.float64)))
        base = np.array(weights, dtype=np.float64)
        result = base * np.exp(log_sum) * np.where(negatives % 2 == 1, -1.0, 1.0)
        result = np.where(zeros > 0, np.where(infs > 0, np.nan, 0.0), np.where(infs > 0, np.inf, result))
    return result.tolist()


# ----------------------------------------------------------------------------------------------------
# Prompt editing [from:to:when] and alternation [a|b]
# ----------------------------------------------------------------------------------------------------
#
# A1111 parses with a lark grammar in which, at the top level only, any of "[ ] ( ) :" may also stand
# alone as literal text, and which fails as a whole (prompt used literally) on a "|" outside an
# alternation or on a backslash that escapes nothing. Inside a bracket everything must be well formed.
# Equivalent rule used here: an opening bracket is a structure exactly when the text up to its matching
# closing bracket is balanced and well formed; otherwise it and its closer are literal text. Valid
# structures never partly overlap, and a valid "[...]" is always read as structure, never as text.
# (Where a valid "[x:3]" is directly followed by a literal "]", ")", "(" or ":", as in "[x:3](", lark's
# choice between the two readings depends on the process's hash seed, so A1111 itself gives either
# result from one launch to the next; the structure reading is one of them.)

_TEXT, _OPEN_SQUARE, _CLOSE_SQUARE, _OPEN_ROUND, _CLOSE_ROUND, _COLON, _PIPE, _LONE_BACKSLASH = range(8)
_SPECIAL_KIND = {
    "[": _OPEN_SQUARE, "]": _CLOSE_SQUARE, "(": _OPEN_ROUND, ")": _CLOSE_ROUND, ":": _COLON, "|": _PIPE,
    "\\": _LONE_BACKSLASH,
}
# Plain text (a backslash escapes any character but a line break), one special character, or a backslash
# that escapes nothing (at the end of the text or before a line break: the grammar rejects the prompt).
_SCHEDULE_TOKEN = re.compile(r"(?:[^\\\[\]():|]+|\\.)+|[\[\]():|]|\\")
# A step number: optional sign, digits with optional fraction, or a fraction, optional exponent (ASCII only).
_STEP_NUMBER = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*")

_EMPHASIS, _SCHEDULED, _ALTERNATE = range(3)


class _Scheduled:
    """``[before:after:when]`` (``before`` is None for ``[after:when]``)."""

    __slots__ = ("after", "before", "when")

    def __init__(self, before: list | None, after: list, when: int):
        self.before = before
        self.after = after
        self.when = when


class _Alternate:
    """``[a|b|...]``: option ``(step - 1) % len(options)`` at each step."""

    __slots__ = ("options",)

    def __init__(self, options: list[list]):
        self.options = options


@dataclass
class _StepRule:
    """How a ``when`` number becomes a step: A1111's current rule, its hires-fix variant, or the old one."""

    steps: int
    int_offset: int = 0
    float_offset: float = 0.0
    old: bool = False
    overflowed: list[str] = field(default_factory=list)

    def when(self, number: str) -> int:
        value = float(number)
        if self.old:
            value = value * self.steps if value < 1 else value
        elif "." in number:
            value = (value - self.float_offset) * self.steps
        else:
            value = value - self.int_offset
        if math.isinf(value):  # A1111 raises OverflowError here
            self.overflowed.append(number)
            return self.steps if value > 0 else -1
        return min(self.steps, int(value))


class _ScheduleProgram:
    """A prompt compiled for rendering at any step: literal strings and switch nodes, plus its steps."""

    def __init__(self, root: list, boundaries: list[int]):
        self.root = root
        self.boundaries = boundaries

    def render(self, step: int) -> str:
        out: list[str] = []
        stack: list[Iterator] = [iter(self.root)]
        while stack:
            for item in stack[-1]:
                if type(item) is str:
                    out.append(item)
                elif type(item) is _Scheduled:
                    chosen = item.before if step <= item.when else item.after
                    if chosen:
                        stack.append(iter(chosen))
                        break
                else:
                    stack.append(iter(item.options[(step - 1) % len(item.options)]))
                    break
            else:
                stack.pop()
        return "".join(out)


def _compile_schedule(prompt: str, rule: _StepRule, notes: list[str]) -> _ScheduleProgram | None:
    """Compile ``prompt``; None when A1111's grammar rejects it (the prompt is then used as written)."""
    texts = _SCHEDULE_TOKEN.findall(prompt)
    kinds = [_SPECIAL_KIND.get(chunk, _TEXT) if len(chunk) == 1 else _TEXT for chunk in texts]
    if "\\" in texts:
        notes.append(
            "prompt editing ignored: a '\\' at the end of the prompt or before a line break escapes nothing; "
            "the prompt is used as written"
        )
        return None

    # Pass 1: find the valid structures with a bracket stack. Each open bracket records where its
    # separators start in `separators`; a nested bracket removes its own when it closes.
    structure: dict[int, tuple[int, int]] = {}  # opener index -> (closer index, kind)
    separator_of: dict[int, int] = {}  # ":" or "|" index -> opener index of its scheduled/alternate
    number_tokens: set[int] = set()
    open_at: list[int] = []
    first_separator: list[int] = []
    well_formed: list[bool] = []  # False once something inside the bracket is not a structure
    separators: list[int] = []
    literal_editing = 0
    for i, kind in enumerate(kinds):
        if kind == _TEXT:
            continue
        if kind == _OPEN_SQUARE or kind == _OPEN_ROUND:
            open_at.append(i)
            first_separator.append(len(separators))
            well_formed.append(True)
        elif kind == _COLON or kind == _PIPE:
            if open_at:
                separators.append(i)
        elif open_at:
            opener = open_at[-1]
            square = kinds[opener] == _OPEN_SQUARE
            if square != (kind == _CLOSE_SQUARE):
                # Every open bracket contains this mismatch: none of them can be a structure.
                for pending_list in (open_at, first_separator, well_formed, separators):
                    pending_list.clear()
                continue
            open_at.pop()
            start = first_separator.pop()
            own = separators[start:]
            del separators[start:]
            colons = [j for j in own if kinds[j] == _COLON]
            has_pipes = len(colons) < len(own)
            found = _classify(square, well_formed.pop(), colons, has_pipes, i, kinds, texts)
            if found is None:
                if square and colons and not has_pipes:
                    literal_editing += 1
                if well_formed:
                    well_formed[-1] = False
                continue
            structure[opener] = (i, found)
            if found == _SCHEDULED:
                number_tokens.add(colons[-1] + 1)
            if found != _EMPHASIS:
                for j in own:
                    separator_of[j] = opener

    stray_pipes = sum(1 for i, kind in enumerate(kinds) if kind == _PIPE and i not in separator_of)
    if stray_pipes:
        notes.append(
            "prompt editing ignored: '|' outside a well-formed [a|b] alternation; "
            "the prompt is used as written"
        )
        return None
    if literal_editing:
        notes.append(
            f"{literal_editing} '[...:...]' group(s) are not valid prompt editing [from:to:when] "
            "(the last part must be a step number): kept as text"
        )

    if all(kind == _EMPHASIS for _, kind in structure.values()):
        return _ScheduleProgram([prompt], [rule.steps])  # the same text at every step

    # Pass 2: build the program; emphasis brackets and literal brackets are just text here.
    root: list = []
    boundaries = {rule.steps}
    has_alternate = False
    # Each open switch: (opener index, closer index, kind, parts, current part's pending strings)
    switches: list[tuple[int, int, int, list[list], list[str]]] = []
    pending: list[str] = []
    current: list = root

    def flush() -> None:
        if pending:
            current.append("".join(pending))
            pending.clear()

    for i, kind in enumerate(kinds):
        if i in number_tokens:
            continue
        info = structure.get(i)
        if info is not None and info[1] != _EMPHASIS:
            flush()
            parts: list[list] = [[]]
            switches.append((i, info[0], info[1], parts, pending))
            current, pending = parts[0], []
            continue
        if switches and separator_of.get(i) == switches[-1][0]:
            flush()
            parts = switches[-1][3]
            parts.append([])
            current = parts[-1]
            continue
        if switches and i == switches[-1][1]:
            flush()
            opener, _, switch_kind, parts, outer_pending = switches.pop()
            if switch_kind == _SCHEDULED:
                when = rule.when(texts[i - 1].strip())
                if len(parts) == 3:  # [before:after:when], the number's part is empty
                    node = _Scheduled(parts[0], parts[1], when)
                else:
                    node = _Scheduled(None, parts[0], when)
                if when >= 1:
                    boundaries.add(when)
            else:
                node = _Alternate(parts)
                has_alternate = True
            current = switches[-1][3][-1] if switches else root
            pending = outer_pending
            current.append(node)
            continue
        pending.append(texts[i])
    flush()

    if rule.overflowed:
        notes.append(
            f"step number(s) {', '.join(rule.overflowed[:3])} overflow a float: "
            "treated as the last step (positive) or before the first (negative)"
        )
    if has_alternate:
        boundaries.update(range(1, rule.steps + 1))
    return _ScheduleProgram(root, sorted(boundaries))


def _classify(
    square: bool, well_formed: bool, colons: list[int], has_pipes: bool, closer: int,
    kinds: list[int], texts: list[str],
) -> int | None:
    """Which structure a balanced bracket pair is, or None when the grammar does not accept it."""
    if not well_formed:
        return None
    if not square:
        return _EMPHASIS if not has_pipes and len(colons) <= 1 else None
    if has_pipes:
        return _ALTERNATE if not colons else None
    if not colons:
        return _EMPHASIS
    last = colons[-1]
    if len(colons) > 2 or last + 2 != closer or kinds[last + 1] != _TEXT:
        return None
    return _SCHEDULED if _STEP_NUMBER.fullmatch(texts[last + 1]) else None


def prompt_schedule(
    prompt: str, steps: int, *, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """The texts to condition on over ``steps`` steps (A1111's ``get_learned_conditioning_prompt_schedules``).

    Returns ``[(end_at_step, text), ...]`` sorted by step, the last ``end_at_step`` being the step count.
    ``[from:to:when]`` uses ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds ``to``
    after ``when``; ``[from::when]`` removes ``from`` after ``when``. ``when`` with a decimal point is a
    fraction of the steps (``0.5``, ``.5``), otherwise a step number (``5``); A1111 >= 1.6 rule. ``[a|b|c]``
    switches at every step (so every step is listed). Brackets nest. Emphasis brackets and escapes are
    kept in the texts for ``parse_prompt_attention``.

    >>> prompt_schedule("a [b:.5] c", 10)
    [(5, 'a  c'), (10, 'a b c')]

    ``hires_steps`` gives the schedule of a hires-fix second pass of that many steps, where integer
    ``when`` values count on from the first pass's ``steps`` and fractions above 1 cover the second pass
    (``[a:b:1.5]`` switches half-way through it); ``use_old_scheduling`` selects the pre-1.6 rule (``when``
    below 1 is a fraction, otherwise a step number, over ``steps`` only) as A1111's compatibility setting.

    When A1111's grammar rejects the prompt (a ``|`` outside an alternation, a backslash before nothing)
    the result is ``[(steps, prompt)]``, the prompt as written. Where A1111 raises (a step number such as
    ``1e400`` that overflows a float) a positive number means the last step, a negative one the first.
    """
    return _schedule_with_notes(prompt, steps, hires_steps, use_old_scheduling, [])


def _schedule_with_notes(
    prompt: str, steps: int, hires_steps: int | None, use_old_scheduling: bool, notes: list[str]
) -> list[tuple[int, str]]:
    _check_prompt(prompt)
    steps = _check_steps(steps)
    if hires_steps is None or use_old_scheduling:
        rule = _StepRule(steps=steps, old=bool(use_old_scheduling))
    else:
        rule = _StepRule(steps=_check_steps(hires_steps, "hires_steps"), int_offset=steps, float_offset=1.0)
    if "[" not in prompt or (":" not in prompt and "|" not in prompt):
        # No "[...:...]" or "[...|...]" can exist: the text is the same at every step, parsed or not.
        return [(rule.steps, prompt)]
    program = _compile_schedule(prompt, rule, notes)
    if program is None:
        return [(rule.steps, prompt)]
    return [(step, program.render(step)) for step in program.boundaries]


# ----------------------------------------------------------------------------------------------------
# AND (composable diffusion)
# ----------------------------------------------------------------------------------------------------

_AND_KEYWORD = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def _split_weight(sub_prompt: str) -> tuple[str, str | None]:
    """``"a cat :1.2 "`` -> ``("a cat", "1.2")``; without a trailing ``:number``: (text, None).

    Trailing whitespace is dropped either way (``str.isspace`` is the same set as A1111's regex class).
    """
    text = sub_prompt.rstrip()
    colon = text.rfind(":")
    if colon >= 0:
        number = text[colon + 1:].lstrip()
        if _AND_WEIGHT.fullmatch(number):
            return text[:colon].rstrip(), number
    return text, None


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split on the word ``AND`` into ``(sub_prompt, weight)`` as A1111's composable diffusion does.

    Each sub-prompt may end with ``:weight`` (a plain decimal number with optional sign, spaces allowed
    around the colon); the default weight is 1.0. Trailing whitespace is dropped, leading whitespace kept.

    >>> split_and("a cat :1.2 AND a dog :0.8")
    [('a cat', 1.2), (' a dog', 0.8)]
    """
    _check_prompt(prompt)
    out = []
    for sub_prompt in _AND_KEYWORD.split(prompt):
        text, number = _split_weight(sub_prompt)
        out.append((text, 1.0 if number is None else float(number)))
    return out


# ----------------------------------------------------------------------------------------------------
# Extra networks <kind:name:...>
# ----------------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class ExtraNetworkRequest:
    """One ``<kind:arg:arg...>`` tag, e.g. ``<lora:name:0.8>``, with its multipliers resolved.

    ``items`` are the colon-separated arguments as written; an item ``key=value`` is a named parameter
    (``te=``, ``unet=``, ``dyn=``), the others are ``positional``. For ``hypernet`` the multiplier is the
    second item; for every other kind (``lora``, ``lyco``, unknown ones) the LoRA rule applies:
    ``name:te:unet:dyn`` positionally, overridden by ``te=``/``unet=``/``dyn=``, ``unet`` defaulting to
    ``te`` and ``te`` to 1.0. ``name`` is data exactly as typed (never a path): the loader validates it.
    """

    kind: str
    name: str
    te_multiplier: float
    unet_multiplier: float
    dyn_dim: int | None
    items: tuple[str, ...]
    positional: tuple[str, ...]
    named: tuple[tuple[str, str], ...]

    @property
    def named_params(self) -> dict[str, str]:
        """The named parameters as a dict (a repeated key keeps its last value, as in A1111)."""
        return dict(self.named)


def _find_extra_network_tags(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """Remove every ``<word:args>`` (args: one or more characters up to the first ``>``); linear time."""
    kept: list[str] = []
    tags: list[tuple[str, str]] = []
    done = 0  # prompt[:done] has been handled
    search = 0
    while True:
        lt = prompt.find("<", search)
        if lt < 0:
            break
        word = _WORD.match(prompt, lt + 1)
        if word is None or word.end() >= len(prompt) or prompt[word.end()] != ":":
            search = lt + 1
            continue
        gt = prompt.find(">", word.end() + 1)
        if gt < 0:
            break  # no ">" anywhere after: no later tag can close either
        if gt == word.end() + 1:
            search = lt + 1
            continue
        kept.append(prompt[done:lt])
        tags.append((word.group(0), prompt[word.end() + 1:gt]))
        done = search = gt + 1
    kept.append(prompt[done:])
    return "".join(kept), tags


def _finite_float(value: str, what: str) -> float:
    """``float(value)`` as A1111 parses it, refusing what it cannot parse and inf/nan (ValueError)."""
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{what} {value[:20]!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} {value[:20]!r} is not finite")
    return number


def _integer(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what} {value[:20]!r} is not an integer") from None


def _extra_network_request(kind: str, args: str) -> ExtraNetworkRequest:
    items = args.split(":")
    positional: list[str] = []
    named: list[tuple[str, str]] = []
    for item in items:
        parts = item.split("=", 2)
        if len(parts) == 2:
            named.append((parts[0], parts[1]))
        else:
            positional.append(item)
    named_map = dict(named)
    if kind == "hypernet":
        name = items[0]
        te = unet = _finite_float(items[1], "multiplier") if len(items) > 1 else 1.0
        dyn = None
    else:
        if not positional:
            raise ValueError("it has no name (only key=value items)")
        name = positional[0]
        te = _finite_float(positional[1], "multiplier") if len(positional) > 1 else 1.0
        if "te" in named_map:
            te = _finite_float(named_map["te"], "te multiplier")
        unet = _finite_float(positional[2], "unet multiplier") if len(positional) > 2 else te
        if "unet" in named_map:
            unet = _finite_float(named_map["unet"], "unet multiplier")
        dyn = _integer(positional[3], "dyn") if len(positional) > 3 else None
        if "dyn" in named_map:
            dyn = _integer(named_map["dyn"], "dyn")
    return ExtraNetworkRequest(kind, name, te, unet, dyn, tuple(items), tuple(positional), tuple(named))


def _extract_with_notes(prompt: str, notes: list[str]) -> tuple[str, list[ExtraNetworkRequest]]:
    text, tags = _find_extra_network_tags(prompt)
    requests = []
    for kind, args in tags:
        try:
            requests.append(_extra_network_request(kind, args))
        except ValueError as error:
            shown = args if len(args) <= 60 else args[:57] + "..."
            notes.append(f"extra network tag <{kind}:{shown}> ignored: {error}")
    return text, requests


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkRequest]]:
    """Remove ``<kind:args>`` tags from ``prompt`` and return ``(text, requests)`` in order of appearance.

    The tags are found and removed exactly as A1111's ``extra_networks.parse_prompt`` does (``kind`` is a
    word, ``args`` one or more characters up to the next ``>``); the text keeps everything else, including
    the spaces around a removed tag. A tag whose multiplier is not a finite number (``<lora:x:abc>``,
    ``<lora:x:nan>``) or whose ``dyn`` is not an integer is removed but not returned (A1111 would fail to
    apply every network of the prompt); ``parse_prompt`` reports it in its notes.

    >>> text, (lora,) = extract_extra_networks("a cat <lora:cute:0.8>")
    >>> text, lora.name, lora.te_multiplier
    ('a cat ', 'cute', 0.8)
    """
    _check_prompt(prompt)
    return _extract_with_notes(prompt, [])


# ----------------------------------------------------------------------------------------------------
# Everything together
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduledText:
    """The text of a sub-prompt up to and including sampler step ``end_at_step``, and its emphasis pieces."""

    end_at_step: int
    text: str
    attention: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class PromptPart:
    """One ``AND`` sub-prompt: its weight and the texts it takes over the steps."""

    text: str
    weight: float
    schedule: tuple[ScheduledText, ...]

    def at_step(self, step: int) -> ScheduledText:
        """The entry for 0-based sampler step ``step``: the first with ``step <= end_at_step`` (as A1111)."""
        for entry in self.schedule:
            if step <= entry.end_at_step:
                return entry
        return self.schedule[0]  # A1111 falls back to the first entry past the end


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt read as A1111 reads it.

    ``parts`` are the ``AND`` sub-prompts (one for a plain prompt), ``extra_networks`` the ``<...>`` tags
    in order, ``notes`` human-readable messages about every fallback taken on malformed input.
    """

    prompt: str
    steps: int
    parts: tuple[PromptPart, ...]
    extra_networks: tuple[ExtraNetworkRequest, ...]
    notes: tuple[str, ...]

    @property
    def texts(self) -> list[str]:
        """Every distinct text to encode, in first-use order (what the text encoder has to run on)."""
        return list(dict.fromkeys(entry.text for part in self.parts for entry in part.schedule))


def parse_prompt(
    prompt: str, steps: int, *, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> ParsedPrompt:
    """Read ``prompt`` for a run of ``steps`` sampling steps: tags, AND parts, schedules, emphasis, notes.

    The stages and their order are A1111's (see the module docstring); the arguments ``hires_steps`` and
    ``use_old_scheduling`` are those of ``prompt_schedule``. Never raises on any ``str`` prompt.
    One choice differs from ``split_and``: an ``AND`` weight that overflows a float (a 400-digit number)
    is not a weight here; the sub-prompt keeps it as text with weight 1.0 and a note.
    """
    _check_prompt(prompt)
    steps = _check_steps(steps)
    notes: list[str] = []
    text, requests = _extract_with_notes(prompt, notes)

    parts = []
    # A1111 encodes each distinct text once; caching here also keeps "x AND x AND ..." linear.
    schedules: dict[str, tuple[ScheduledText, ...]] = {}
    attentions: dict[str, tuple[tuple[str, float], ...]] = {}
    for sub_prompt in _AND_KEYWORD.split(text):
        sub_text, number = _split_weight(sub_prompt)
        weight = 1.0
        if number is not None:
            weight = float(number)
            if not math.isfinite(weight):
                notes.append(f"AND weight {number[:20]!r}... overflows a float: kept as text, weight 1.0")
                sub_text, weight = sub_prompt.rstrip(), 1.0
        schedule = schedules.get(sub_text)
        if schedule is None:
            entries = []
            scheduled_texts = _schedule_with_notes(sub_text, steps, hires_steps, use_old_scheduling, notes)
            for end_at_step, scheduled in scheduled_texts:
                attention = attentions.get(scheduled)
                if attention is None:
                    pieces, attention_notes = _attention_with_notes(scheduled)
                    attention = attentions[scheduled] = tuple(pieces)
                    notes.extend(attention_notes)
                entries.append(ScheduledText(end_at_step, scheduled, attention))
            schedule = schedules[sub_text] = tuple(entries)
        parts.append(PromptPart(sub_text, weight, schedule))

    notes = list(dict.fromkeys(notes))
    if len(notes) > _MAX_NOTES:
        notes = notes[:_MAX_NOTES] + [f"... and {len(notes) - _MAX_NOTES} more notes"]
    for note in notes:
        logger.debug("prompt: %s", note)
    return ParsedPrompt(prompt, steps, tuple(parts), tuple(requests), tuple(notes))


# ----------------------------------------------------------------------------------------------------
# Textual-inversion embeddings
# ----------------------------------------------------------------------------------------------------

SDXL_ENCODERS = ("clip_l", "clip_g")


class TokenEncoder(Protocol):
    """What the registry needs from a tokenizer: ``encode(text)`` -> token ids without BOS/EOS."""

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True, eq=False)
class TextualInversionEmbedding:
    """Vectors that replace the name ``name`` in a prompt.

    ``vectors`` is ``(n_vectors, width)`` for one text encoder, or for SDXL a read-only mapping
    ``{"clip_l": (n, 768), "clip_g": (n, 1280)}`` (either key may be missing).
    """

    name: str
    vectors: torch.Tensor | Mapping[str, torch.Tensor]

    @property
    def n_vectors(self) -> int:
        """How many token positions the embedding occupies in the prompt."""
        if isinstance(self.vectors, torch.Tensor):
            return int(self.vectors.shape[0])
        return int(next(iter(self.vectors.values())).shape[0])

    def vectors_for(self, encoder: str | None = None) -> torch.Tensor:
        """The ``(n_vectors, width)`` tensor for ``encoder`` (``"clip_l"``/``"clip_g"``; None for SD1/SD2)."""
        if isinstance(self.vectors, torch.Tensor):
            return self.vectors
        if encoder is None or encoder not in self.vectors:
            raise InvalidInputError(
                f"embedding {self.name!r} has vectors for {sorted(self.vectors)}, not for {encoder!r}; "
                "use an embedding trained for this model"
            )
        return self.vectors[encoder]


@dataclass(frozen=True, eq=False)
class EmbeddingMatch:
    """An embedding name found in a token list: ``token_ids[position:position + length]``."""

    position: int
    length: int
    embedding: TextualInversionEmbedding


def _check_vectors(name: str, vectors: torch.Tensor, what: str) -> None:
    if not isinstance(vectors, torch.Tensor):
        raise InvalidInputError(
            f"embedding {name!r}: {what} must be a torch.Tensor, got {type(vectors).__name__}"
        )
    if vectors.ndim != 2 or vectors.shape[0] < 1 or vectors.shape[1] < 1:
        raise InvalidInputError(
            f"embedding {name!r}: {what} has shape {tuple(vectors.shape)}, expected (n_vectors, width) "
            "with n_vectors >= 1"
        )
    if not vectors.is_floating_point():
        raise InvalidInputError(
            f"embedding {name!r}: {what} has dtype {vectors.dtype}, expected a float tensor"
        )
    if not bool(torch.isfinite(vectors).all()):
        raise InvalidInputError(f"embedding {name!r}: {what} contains inf or nan; the file is damaged")


class EmbeddingRegistry:
    """Textual-inversion embeddings by name (the file stem users type in prompts); no file loading here.

    Names are matched in the token stream, as A1111 does: each name is tokenized and, at each position of a
    prompt's tokens, the longest registered id sequence starting there wins (equal lengths: the embedding
    added first). Adding a name again replaces the old embedding.
    """

    def __init__(self) -> None:
        self._embeddings: dict[str, TextualInversionEmbedding] = {}

    def add(self, name: str, vectors: torch.Tensor | Mapping[str, torch.Tensor]) -> TextualInversionEmbedding:
        """Register ``vectors``, ``(n, width)`` or SDXL ``{"clip_l": ..., "clip_g": ...}``, as ``name``."""
        if not isinstance(name, str) or not name.strip():
            raise InvalidInputError(
                f"embedding name must be a non-empty str, got {name!r}; use the file's stem"
            )
        if isinstance(vectors, Mapping):
            unknown = sorted(set(vectors) - set(SDXL_ENCODERS))
            if unknown or not vectors:
                raise InvalidInputError(
                    f"embedding {name!r}: keys {sorted(vectors)} are not SDXL encoders; "
                    f"expected some of {SDXL_ENCODERS}"
                )
            for key, tensor in vectors.items():
                _check_vectors(name, tensor, key)
            counts = {key: int(tensor.shape[0]) for key, tensor in vectors.items()}
            if len(set(counts.values())) != 1:
                raise InvalidInputError(
                    f"embedding {name!r}: the encoders have different vector counts {counts}; "
                    "the file is damaged"
                )
            stored: torch.Tensor | Mapping[str, torch.Tensor] = types.MappingProxyType(dict(vectors))
        else:
            _check_vectors(name, vectors, "vectors")
            stored = vectors
        embedding = TextualInversionEmbedding(name, stored)
        self._embeddings.pop(name, None)
        self._embeddings[name] = embedding
        return embedding

    def remove(self, name: str) -> None:
        """Forget ``name`` (no error if it is not registered)."""
        self._embeddings.pop(name, None)

    def get(self, name: str) -> TextualInversionEmbedding | None:
        return self._embeddings.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._embeddings

    def __len__(self) -> int:
        return len(self._embeddings)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._embeddings))

    def token_index(self, tokenizer: TokenEncoder) -> EmbeddingTokenIndex:
        """Tokenize every name once; use the index for all prompts encoded with ``tokenizer``."""
        return EmbeddingTokenIndex(list(self._embeddings.values()), tokenizer)

    def find_in_tokens(self, token_ids: Sequence[int], tokenizer: TokenEncoder) -> list[EmbeddingMatch]:
        """Every embedding name in ``token_ids`` (no BOS/EOS), left to right, non-overlapping."""
        return self.token_index(tokenizer).find_all(token_ids)


class EmbeddingTokenIndex:
    """Registered names as token-id sequences, grouped by first id and sorted longest first."""

    def __init__(self, embeddings: Sequence[TextualInversionEmbedding], tokenizer: TokenEncoder):
        by_first: dict[int, list[tuple[tuple[int, ...], TextualInversionEmbedding]]] = {}
        for embedding in embeddings:
            ids = tuple(int(i) for i in tokenizer.encode(embedding.name))
            if not ids:
                logger.warning("embedding %r tokenizes to nothing: it can never match", embedding.name)
                continue
            by_first.setdefault(ids[0], []).append((ids, embedding))
        for candidates in by_first.values():
            candidates.sort(key=lambda pair: len(pair[0]), reverse=True)  # stable: first added wins ties
        self._by_first = by_first

    def match_at(self, token_ids: Sequence[int], position: int) -> EmbeddingMatch | None:
        """The embedding whose name starts at ``token_ids[position]``, longest name first; None if none."""
        candidates = self._by_first.get(int(token_ids[position]))
        if not candidates:
            return None
        for ids, embedding in candidates:
            end = position + len(ids)
            if end <= len(token_ids) and tuple(int(t) for t in token_ids[position:end]) == ids:
                return EmbeddingMatch(position, len(ids), embedding)
        return None

    def find_all(self, token_ids: Sequence[int]) -> list[EmbeddingMatch]:
        """Scan left to right; a match skips past its tokens, otherwise move on by one token."""
        matches = []
        position = 0
        while position < len(token_ids):
            found = self.match_at(token_ids, position)
            if found is None:
                position += 1
            else:
                matches.append(found)
                position += found.length
        return matches
