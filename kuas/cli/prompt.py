"""`kuas prompt "TEXT"`: show how kuas (and A1111) reads a prompt, without generating anything.

Prints the AND parts and their weights, each part's schedule (which text is used at which sampler step),
the emphasis spans of every text, the tokens per 75-token chunk, the extra-network tags and the notes about
anything that fell back to literal text. Needs no model (the CLIP tokenizer is built in); with ``--model``
the model's family and the shape of the conditioning are shown too.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

MAX_SHOWN_CHARS = 120  # longer texts are cut in the listing (the full text is still what gets encoded)
MAX_SHOWN_PIECES = 40
MAX_SHOWN_CHUNKS = 12
MAX_SHOWN_ENTRIES = 30


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prompt", help="show how a prompt is parsed: AND parts, schedule, weights, chunks, tags"
    )
    p.add_argument("prompt", help="the prompt, in A1111 syntax")
    p.add_argument("--negative", default=None, metavar="TEXT", help="also show this negative prompt")
    p.add_argument("--steps", type=int, default=20, help="sampling steps the schedule is for (default 20)")
    p.add_argument("--hires-steps", type=int, default=None, help="show the hires-fix pass of this many steps")
    p.add_argument(
        "--emphasis",
        default="Original",
        choices=["Original", "No norm", "Ignore", "None"],
        help="A1111's emphasis mode (default Original)",
    )
    p.add_argument(
        "--model", default=None, metavar="PATH", help="a checkpoint, to show its conditioning shape"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kuas.errors import InvalidInputError

    if args.steps < 1:
        raise InvalidInputError(f"--steps must be 1 or more, got {args.steps}")
    if args.hires_steps is not None and args.hires_steps < 1:
        raise InvalidInputError(f"--hires-steps must be 1 or more, got {args.hires_steps}")
    sd = None
    if args.model:
        import kuas

        sd = kuas.load(args.model)
    print(
        describe_prompt(
            args.prompt,
            args.steps,
            negative=args.negative,
            hires_steps=args.hires_steps,
            emphasis=args.emphasis,
            sd=sd,
        )
    )
    return 0


def _show(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """A quoted, escaped, possibly shortened text (control characters and NUL show as escapes)."""
    if len(text) > limit:
        return repr(text[:limit]) + f"... ({len(text):,} characters)"
    return repr(text)


def _weight(value: float) -> str:
    return f"{value:.4g}"


def _step_ranges(entries: Sequence[tuple[int, str]], steps: int) -> list[tuple[str, str]]:
    """``(1-based sampler steps, text)`` per schedule entry (A1111: step i, counted from 0, uses the first
    entry with i <= end); neighbours with the same text are merged."""
    spans: list[list] = []  # [low, high, text], 0-based steps
    low = 0
    for end, text in entries:
        high = min(end, steps - 1)
        if spans and spans[-1][2] == text and (low > high or spans[-1][1] + 1 >= low):
            spans[-1][1] = max(spans[-1][1], high)
        else:
            spans.append([low, high, text])
        low = max(low, end + 1)
    out = []
    for low, high, text in spans:
        if low > high:
            out.append(("never (earlier entries cover every step)", text))
        elif low == high:
            out.append((f"step {low + 1}", text))
        else:
            out.append((f"steps {low + 1}-{high + 1}", text))
    return out


def _chunk_summary(counts: Sequence[int]) -> str:
    shown = [str(c) for c in counts]
    if len(shown) > MAX_SHOWN_CHUNKS:
        shown = shown[: MAX_SHOWN_CHUNKS - 2] + ["...", shown[-1]]
    total = sum(counts)
    tokens = "token" if total == 1 else "tokens"
    chunks = "chunk" if len(counts) == 1 else "chunks"
    return f"{total} {tokens} in {len(counts)} {chunks} ({', '.join(shown)}); the encoder sees {77 * len(counts)}"


def _pieces_lines(pieces: Sequence[tuple[str, float]], indent: str) -> list[str]:
    from kuas.prompts.parser import BREAK_MARKER

    lines = []
    for text, weight in pieces[:MAX_SHOWN_PIECES]:
        if text == BREAK_MARKER[0] and weight == BREAK_MARKER[1]:
            lines.append(f"{indent}BREAK (next chunk)")
        else:
            lines.append(f"{indent}{_weight(weight):>7} {_show(text)}")
    if len(pieces) > MAX_SHOWN_PIECES:
        lines.append(f"{indent}... and {len(pieces) - MAX_SHOWN_PIECES} more spans")
    return lines


def _text_lines(
    text: str, emphasis: str, tokenizer: Any, indent: str, notes: list[str]
) -> tuple[list[str], int]:
    """Emphasis spans and chunks of one scheduled text, and its chunk count."""
    from kuas.prompts.conditioning import attention_pieces, chunk_tokens

    pieces, attention_notes = attention_pieces(text, emphasis)
    notes.extend(attention_notes)
    lines = []
    if emphasis == "None":
        lines.append(f"{indent}emphasis off: brackets and BREAK are plain text")
    elif any(w != 1.0 for _, w in pieces) or len(pieces) > 1:
        lines.append(f"{indent}weights:")
        lines.extend(_pieces_lines(pieces, indent + "  "))
        if emphasis == "Ignore":
            lines.append(f"{indent}(emphasis Ignore: these weights are not applied)")
    chunks = chunk_tokens(pieces, tokenizer)
    lines.append(f"{indent}tokens: {_chunk_summary([c.n_tokens for c in chunks])}")
    return lines, len(chunks)


def describe_prompt(
    prompt: str,
    steps: int = 20,
    *,
    negative: str | None = None,
    hires_steps: int | None = None,
    emphasis: str = "Original",
    sd: Any = None,
) -> str:
    """The report ``kuas prompt`` prints. Never raises on any str prompt."""
    from kuas.prompts.parser import _schedule_with_notes, parse_prompt

    tokenizer = sd.tokenizer if sd is not None else _default_tokenizer()
    parsed = parse_prompt(prompt, steps, hires_steps=hires_steps)
    run_steps = hires_steps if hires_steps is not None else steps
    notes = list(parsed.notes)
    lines: list[str] = []
    what = f"hires-fix pass of {hires_steps} steps after {steps}" if hires_steps else f"{steps} steps"
    n_parts = len(parsed.parts)
    lines.append(f"prompt: {n_parts} part{'s' if n_parts != 1 else ''} (AND), {what}, emphasis {emphasis}")
    chunk_counts: dict[str, int] = {}
    for number, part in enumerate(parsed.parts, 1):
        lines.append(f"part {number}: weight {_weight(part.weight)}  {_show(part.text)}")
        entries = part.schedule
        ranges = _step_ranges([(e.end_at_step, e.text) for e in entries], run_steps)
        if len(ranges) > 1:
            lines.append(f"  schedule ({len(ranges)} changes over the steps):")
            for covered, text in ranges[:MAX_SHOWN_ENTRIES]:
                lines.append(f"    {covered}: {_show(text)}")
            if len(ranges) > MAX_SHOWN_ENTRIES:
                lines.append(f"    ... and {len(ranges) - MAX_SHOWN_ENTRIES} more")
        seen: set[str] = set()
        for entry in entries:
            if entry.text in seen or len(seen) >= MAX_SHOWN_ENTRIES:
                continue
            seen.add(entry.text)
            label = "text" if len(ranges) == 1 else f"text {_show(entry.text, 40)}"
            lines.append(f"  {label}:")
            text_lines, chunk_counts[entry.text] = _text_lines(entry.text, emphasis, tokenizer, "    ", notes)
            lines.extend(text_lines)

    if negative is not None:
        negative_notes: list[str] = []
        schedule = _schedule_with_notes(negative, steps, hires_steps, False, negative_notes)
        lines.append(f"negative prompt: {_show(negative)} (no AND, tags kept as text, as in A1111)")
        ranges = _step_ranges(schedule, run_steps)
        for covered, text in ranges[:MAX_SHOWN_ENTRIES]:
            if len(ranges) > 1:
                lines.append(f"  {covered}: {_show(text)}")
            indent = "    " if len(ranges) > 1 else "  "
            text_lines, chunk_counts[text] = _text_lines(text, emphasis, tokenizer, indent, negative_notes)
            lines.extend(text_lines)
        notes.extend(f"negative prompt: {note}" for note in negative_notes)

    if parsed.extra_networks:
        lines.append("extra networks (removed from the prompt):")
        for request in parsed.extra_networks:
            extra = f", dyn {request.dyn_dim}" if request.dyn_dim is not None else ""
            lines.append(
                f"  {request.kind} {_show(request.name, 60)}: text encoder {_weight(request.te_multiplier)}, "
                f"U-Net {_weight(request.unet_multiplier)}{extra}"
            )
    else:
        lines.append("extra networks: none")

    if sd is not None:
        width = sum(sd.text_encoders[s.spec.name].config.width for s in sd.slots)
        most = max(chunk_counts.values(), default=1)
        lines.append(
            f"model: {sd.name} ({sd.family.name}); conditioning (batch, 77 x chunks, {width}), "
            f"up to (1, {77 * most}, {width}) here"
            + ("; pooled from each text's first chunk" if sd.family.vector_conditioning else "")
        )

    notes = list(dict.fromkeys(notes))
    if notes:
        lines.append("notes:")
        lines.extend(f"  - {note}" for note in notes)
    else:
        lines.append("notes: none (everything parsed as written)")
    return "\n".join(lines)


def _default_tokenizer() -> Any:
    from kuas.tokenizer import CLIPTokenizer

    return CLIPTokenizer.default()
