"""Prompt text to U-Net conditioning the way the AUTOMATIC1111 web UI builds it: no 77-token limit.

A text is cut into chunks of 75 tokens; each chunk becomes ``BOS + 75 tokens + EOS`` (short chunks are
filled with EOS, and for the OpenCLIP encoders of SD 2.x / SDXL every position after the first EOS then
becomes the pad id 0), is encoded on its own and the chunks are concatenated along the token axis, so a
prompt of k chunks gives a ``(1, 77 * k, D)`` context. The chunking rules are A1111's ``tokenize_line``:

- ``BREAK`` closes the current chunk (an empty one too: ``"BREAK a"`` has an all-padding first chunk);
- when a chunk is full and the last comma in it is at most ``comma_backtrack`` (20) tokens back, the
  tokens after that comma move to the next chunk, so a phrase is not cut in two;
- a textual-inversion embedding named in the prompt takes ``n_vectors`` positions and is never split: if
  it does not fit in the current chunk the chunk is closed first.

Emphasis weights (``(x:1.3)``) multiply each token's hidden state after the encoder. ``emphasis`` selects
A1111's setting of the same name:

- ``"Original"`` (default): multiply, then rescale so that the mean of the batch of chunks is what it
  was before (``z * (old_mean / new_mean)``);
- ``"No norm"``: multiply only;
- ``"Ignore"``: brackets are parsed (and removed) but the weights are not applied;
- ``"None"``: no emphasis parsing at all; brackets and ``BREAK`` are plain text.

A1111 takes that mean over every chunk encoded in the same call, and it encodes all the scheduled texts
of one sub-prompt (``a [b:c:5]`` -> ``a b``, ``a c``) in one call, padding texts with fewer chunks with the
empty chunk. kuas does the same (``PromptBatch`` groups texts as A1111 does), so prompt editing together
with emphasis gives A1111's numbers; ``encode_text`` is a group of one text.

SDXL: both encoders see the same chunks, each is weighted (and mean-restored) on its own and the two are
concatenated along the feature axis; the pooled vector is the second encoder's for the first chunk. An
empty negative prompt gives zeros for SDXL (context and pooled), as A1111 and diffusers do.

Differences from A1111, on purpose: when the comma rule moves tokens that belong to an embedding to the next
chunk, the embedding's vectors move with them (A1111 leaves them behind in the padding of the previous
chunk, a bug); an embedding with more than 75 vectors or whose width fits no text encoder of the model is
not used (its name stays text, with a note) where A1111 would fail or skip it when loading.

Usage (the pipelines use ``kuas.prompts.guidance.prompt_denoiser``, which calls ``PromptBatch.build``)::

    from kuas.prompts.conditioning import PromptBatch, encode_text

    enc = encode_text(sd, "a (red:1.2) fox, " * 30)   # enc.context: (1, 77 * k, D), enc.token_counts
    batch = PromptBatch.build(sd, ["a [cat:dog:0.5] AND a hat :0.7"], [""], steps=20)
    step = batch.at_step([3])                         # conditioning every image uses at sampler step 3
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kuas.errors import InvalidInputError
from kuas.prompts.parser import (
    BREAK_MARKER,
    EmbeddingRegistry,
    EmbeddingTokenIndex,
    ExtraNetworkRequest,
    ParsedPrompt,
    TextualInversionEmbedding,
    TokenEncoder,
    _attention_with_notes,
    _schedule_with_notes,
    parse_prompt,
)

if TYPE_CHECKING:
    from kuas.stable_diffusion import StableDiffusion, TextEncoderSlot

logger = logging.getLogger(__name__)

__all__ = [
    "CHUNK_LENGTH",
    "COMMA_BACKTRACK",
    "EMPHASIS_MODES",
    "ConditioningPart",
    "EncodedText",
    "PromptBatch",
    "ScheduledConditioning",
    "StepConditioning",
    "TokenChunk",
    "attention_pieces",
    "chunk_tokens",
    "encode_text",
    "usable_embeddings",
]

CHUNK_LENGTH = 75  # prompt tokens per chunk; BOS and EOS make the encoder's 77
COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
COMMA_TOKEN = ",</w>"
MAX_CHUNKS_PER_CALL = 64  # a huge prompt runs through the encoder in batches of this many chunks
_EMBEDDING_PLACEHOLDER_ID = 0  # the id A1111 puts where embedding vectors go (replaced before the encoder)


def _check_emphasis(emphasis: object) -> str:
    if emphasis not in EMPHASIS_MODES:
        raise InvalidInputError(f"emphasis must be one of {EMPHASIS_MODES}, got {emphasis!r}")
    return emphasis  # type: ignore[return-value]


def _check_backtrack(comma_backtrack: object) -> int:
    if isinstance(comma_backtrack, bool) or not isinstance(comma_backtrack, int) or comma_backtrack < 0:
        raise InvalidInputError(
            f"comma_backtrack must be an int >= 0 (0 turns the comma rule off), got {comma_backtrack!r}"
        )
    return comma_backtrack


# ----------------------------------------------------------------------------------------------------
# Chunking (tokenizer only)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenChunk:
    """One 77-token encoder input: ids, per-token emphasis weights and where embedding vectors go.

    ``ids`` is BOS, the chunk's tokens, EOS padding and a final EOS (77 ids; the OpenCLIP pad id is put in
    later, per encoder); embedding positions hold the placeholder id 0. ``weights`` has one weight per id
    (1.0 for BOS, EOS and padding). ``embeddings`` lists ``(index into ids, embedding)`` of the first vector
    of each embedding. ``n_tokens`` counts the prompt's tokens in the chunk (embedding vectors included).
    """

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    embeddings: tuple[tuple[int, TextualInversionEmbedding], ...]
    n_tokens: int


class _ChunkBuilder:
    """A1111's ``tokenize_line`` state machine: fills chunks token by token."""

    def __init__(self, bos: int, eos: int, comma: int, backtrack: int):
        self.bos, self.eos, self.comma, self.backtrack = bos, eos, comma, backtrack
        self.chunks: list[TokenChunk] = []
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.fixes: list[tuple[int, TextualInversionEmbedding]] = []  # (offset in self.ids, embedding)
        self.last_comma = -1

    def close(self) -> None:
        """Pad the current chunk to 75 tokens, add BOS/EOS, store it and start an empty one."""
        n = len(self.ids)
        fill = CHUNK_LENGTH - n
        ids = (self.bos, *self.ids, *([self.eos] * fill), self.eos)
        weights = (1.0, *self.weights, *([1.0] * fill), 1.0)
        fixes = tuple((offset + 1, embedding) for offset, embedding in self.fixes)
        self.chunks.append(TokenChunk(ids, weights, fixes, n))
        self.ids, self.weights, self.fixes = [], [], []
        self.last_comma = -1

    def move_after_last_comma(self) -> None:
        """Close the chunk at its last comma; what followed the comma starts the next chunk."""
        cut = self.last_comma + 1
        moved_ids, moved_weights = self.ids[cut:], self.weights[cut:]
        moved_fixes = [(offset - cut, e) for offset, e in self.fixes if offset >= cut]
        self.ids, self.weights = self.ids[:cut], self.weights[:cut]
        self.fixes = [(offset, e) for offset, e in self.fixes if offset < cut]
        self.close()
        self.ids, self.weights, self.fixes = moved_ids, moved_weights, moved_fixes

    def add_piece(self, tokens: Sequence[int], weight: float, index: EmbeddingTokenIndex | None) -> None:
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == self.comma:
                self.last_comma = len(self.ids)
            elif (
                self.backtrack
                and len(self.ids) == CHUNK_LENGTH
                and self.last_comma != -1
                and CHUNK_LENGTH - self.last_comma <= self.backtrack
            ):
                self.move_after_last_comma()
            if len(self.ids) == CHUNK_LENGTH:
                self.close()

            found = index.match_at(tokens, position) if index is not None else None
            if found is None:
                self.ids.append(token)
                self.weights.append(weight)
                position += 1
                continue
            n_vectors = found.embedding.n_vectors
            if len(self.ids) + n_vectors > CHUNK_LENGTH:
                self.close()
            self.fixes.append((len(self.ids), found.embedding))
            self.ids.extend([_EMBEDDING_PLACEHOLDER_ID] * n_vectors)
            self.weights.extend([weight] * n_vectors)
            position += found.length


def _tokenize_pieces(tokenizer: TokenEncoder, texts: list[str]) -> list[list[int]]:
    encode_batch = getattr(tokenizer, "encode_batch", None)
    if encode_batch is not None:
        return [list(ids) for ids in encode_batch(texts)]
    return [list(tokenizer.encode(text)) for text in texts]


def chunk_tokens(
    pieces: Sequence[tuple[str, float]],
    tokenizer: Any,
    *,
    embeddings: EmbeddingTokenIndex | None = None,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> list[TokenChunk]:
    """Cut emphasis ``pieces`` (``parse_prompt_attention`` output) into 77-token chunks as A1111 does.

    ``tokenizer`` is a ``kuas.tokenizer.CLIPTokenizer`` (``encode``, ``bos_token_id``, ``eos_token_id``,
    ``token_to_id``). Each piece is tokenized on its own; ``("BREAK", -1.0)`` closes the chunk; embedding
    names are looked up in ``embeddings`` within one piece at a time. Always returns at least one chunk.
    """
    backtrack = _check_backtrack(comma_backtrack)
    builder = _ChunkBuilder(
        int(tokenizer.bos_token_id),
        int(tokenizer.eos_token_id),
        int(tokenizer.token_to_id(COMMA_TOKEN)),
        backtrack,
    )
    texts = [text for text, _ in pieces]
    for (text, weight), tokens in zip(pieces, _tokenize_pieces(tokenizer, texts)):
        if text == BREAK_MARKER[0] and weight == BREAK_MARKER[1]:
            builder.close()
            continue
        builder.add_piece(tokens, float(weight), embeddings)
    if builder.ids or not builder.chunks:
        builder.close()
    return builder.chunks


def attention_pieces(text: str, emphasis: str = "Original") -> tuple[list[tuple[str, float]], list[str]]:
    """``(pieces, notes)`` of ``text`` for ``emphasis``: A1111's attention parse, or the text as one piece
    with weight 1 for ``"None"`` (no emphasis syntax, no BREAK)."""
    if not isinstance(text, str):
        raise InvalidInputError(f"text must be a str, got {type(text).__name__}")
    if _check_emphasis(emphasis) == "None":
        return [(text, 1.0)], []
    pieces, notes = _attention_with_notes(text)
    return list(pieces), list(notes)


# ----------------------------------------------------------------------------------------------------
# Embeddings usable with a model
# ----------------------------------------------------------------------------------------------------


def _encoder_key(sd: StableDiffusion, slot: TextEncoderSlot) -> str | None:
    """Which vectors of an SDXL embedding feed this encoder ("clip_l" / "clip_g"); None for SD 1.x / 2.x."""
    if not sd.family.vector_conditioning:
        return None
    return "clip_l" if slot.spec.kind == "clip" else "clip_g"


def usable_embeddings(
    sd: StableDiffusion, registry: EmbeddingRegistry | None, notes: list[str] | None = None
) -> EmbeddingTokenIndex | None:
    """The token index of the embeddings in ``registry`` that fit every text encoder of ``sd``.

    An embedding fits when it has vectors for each encoder (SDXL: ``clip_l`` and/or ``clip_g`` as needed)
    with that encoder's width, and at most 75 of them. The others are left out with a note: their names
    then read as ordinary words, as in A1111, which does not load them for this model.
    """
    if registry is None or len(registry) == 0:
        return None
    if not isinstance(registry, EmbeddingRegistry):
        raise InvalidInputError(
            f"embeddings must be a kuas.prompts.EmbeddingRegistry, got {type(registry).__name__}"
        )
    usable: list[TextualInversionEmbedding] = []
    for name in registry:
        embedding = registry.get(name)
        assert embedding is not None
        problem = None
        if embedding.n_vectors > CHUNK_LENGTH:
            problem = f"it has {embedding.n_vectors} vectors, more than the {CHUNK_LENGTH} a chunk holds"
        for slot in sd.slots:
            if problem:
                break
            key = _encoder_key(sd, slot)
            width = sd.text_encoders[slot.spec.name].config.width
            try:
                vectors = embedding.vectors_for(key)
            except InvalidInputError:
                problem = f"it has no vectors for this model's {key or slot.spec.name} text encoder"
                break
            if int(vectors.shape[1]) != width:
                problem = (
                    f"its vectors are {int(vectors.shape[1])} wide, the {slot.spec.name} encoder is {width} "
                    "wide (an embedding for another model family)"
                )
        if problem:
            if notes is not None:
                notes.append(f"embedding {name!r} not used: {problem}; its name is read as text")
            continue
        usable.append(embedding)
    if not usable:
        return None
    return EmbeddingTokenIndex(usable, sd.tokenizer)


# ----------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------


def _pad_id(tokenizer: Any, pad_with: str | int) -> int:
    if pad_with == "eos":
        return int(tokenizer.eos_token_id)
    if pad_with == "zero":
        return 0
    if isinstance(pad_with, int) and not isinstance(pad_with, bool):
        return pad_with
    raise InvalidInputError(f"unknown text encoder padding {pad_with!r}; expected 'eos', 'zero' or an id")


@dataclass(frozen=True)
class _RawText:
    """One text's encoder outputs before emphasis: per slot ``(k, 77, D)``, first-chunk pooled, weights."""

    chunks: tuple[TokenChunk, ...]
    hidden: tuple[Tensor, ...]
    pooled: Tensor | None  # (1, P) from the first chunk
    weights: Tensor  # (k, 77) float32


class _TextEncoderCache:
    """Runs the text encoder(s) once per distinct text and keeps the unweighted result."""

    def __init__(
        self,
        sd: StableDiffusion,
        *,
        clip_skip: int,
        emphasis: str,
        index: EmbeddingTokenIndex | None,
        comma_backtrack: int,
    ):
        self.sd = sd
        self.emphasis = emphasis
        self.index = index
        self.comma_backtrack = comma_backtrack
        self.layers = [sd.text_layer(slot, clip_skip) for slot in sd.slots]  # validates clip_skip once
        self.pad_ids = [_pad_id(sd.tokenizer, slot.spec.pad_with) for slot in sd.slots]
        self.texts: dict[str, _RawText] = {}
        self.notes: dict[str, list[str]] = {}
        self.embeddings_used: dict[str, None] = {}

    def raw(self, text: str, pieces: Sequence[tuple[str, float]] | None = None) -> _RawText:
        found = self.texts.get(text)
        if found is not None:
            return found
        notes: list[str] = []
        if pieces is None:
            pieces, notes = attention_pieces(text, self.emphasis)
        chunks = tuple(
            chunk_tokens(
                pieces, self.sd.tokenizer, embeddings=self.index, comma_backtrack=self.comma_backtrack
            )
        )
        encoded = self._encode(chunks)
        self.texts[text] = encoded
        self.notes[text] = notes
        for chunk in chunks:
            for _, embedding in chunk.embeddings:
                self.embeddings_used[embedding.name] = None
        return encoded

    @torch.no_grad()
    def _encode(self, chunks: tuple[TokenChunk, ...]) -> _RawText:
        sd = self.sd
        eos = int(sd.tokenizer.eos_token_id)
        hidden: list[Tensor] = []
        pooled = None
        for slot, layer, pad_id in zip(sd.slots, self.layers, self.pad_ids):
            encoder = sd.text_encoders[slot.spec.name]
            rows = []
            for chunk in chunks:
                ids = list(chunk.ids)
                if pad_id != eos:  # everything after the first EOS becomes the pad id (OpenCLIP)
                    first = ids.index(eos)
                    ids[first + 1 :] = [pad_id] * (len(ids) - first - 1)
                rows.append(ids)
            device = encoder.device if hasattr(encoder, "device") else sd.device
            ids_tensor = torch.tensor(rows, dtype=torch.long).to(device)
            embeds = None
            if any(chunk.embeddings for chunk in chunks):
                embeds = encoder.embed_tokens(ids_tensor)
                key = _encoder_key(sd, slot)
                for row, chunk in enumerate(chunks):
                    for start, embedding in chunk.embeddings:
                        vectors = embedding.vectors_for(key)
                        embeds[row, start : start + vectors.shape[0]] = vectors.to(
                            embeds.device, embeds.dtype
                        )
            outputs = [
                encoder(
                    ids_tensor[start : start + MAX_CHUNKS_PER_CALL],
                    inputs_embeds=None if embeds is None else embeds[start : start + MAX_CHUNKS_PER_CALL],
                    layer=layer,
                    final_norm=slot.final_norm,
                    return_pooled=slot.spec.pooled,
                )
                for start in range(0, len(rows), MAX_CHUNKS_PER_CALL)
            ]
            hidden.append(outputs[0].hidden if len(outputs) == 1 else torch.cat([o.hidden for o in outputs]))
            if slot.spec.pooled:
                pooled = outputs[0].pooled[:1]
        weights = torch.tensor([chunk.weights for chunk in chunks], dtype=torch.float32)
        return _RawText(chunks, tuple(hidden), pooled, weights)


def _apply_emphasis(hidden: Tensor, weights: Tensor, emphasis: str) -> Tensor:
    """A1111's emphasis on one batch of chunks ``(m, 77, D)`` with weights ``(m, 77)``."""
    if emphasis in ("Ignore", "None") or bool((weights == 1.0).all()):
        return hidden  # all weights 1: "Original" would multiply by 1 and by old_mean / old_mean == 1
    z = hidden.float()
    weighted = z * weights.to(z.device)[..., None]
    if emphasis == "Original":
        old_mean, new_mean = z.mean(), weighted.mean()
        ratio = old_mean / new_mean
        if bool(torch.isfinite(ratio)):
            weighted = weighted * ratio
        else:  # the weighted mean is 0: A1111 would fill the prompt with nan; keep the weighted states
            logger.warning("emphasis: the weighted hidden states average to 0; mean not restored")
    return weighted.to(hidden.dtype)


def _encode_group(
    raws: Sequence[_RawText], empty: Callable[[], _RawText], emphasis: str
) -> list[tuple[Tensor, Tensor | None]]:
    """Weight the texts of one A1111 encoder call together: ``(context (77 * K, D), pooled (P,) | None)``
    per text, K the most chunks of the group (shorter texts get empty chunks, as in A1111)."""
    n_chunks = max(len(raw.chunks) for raw in raws)
    blank = empty() if any(len(raw.chunks) < n_chunks for raw in raws) else None
    per_slot: list[Tensor] = []  # (m, K, 77, D_slot)
    for slot_index in range(len(raws[0].hidden)):
        columns = []
        for c in range(n_chunks):
            hidden = torch.stack(
                [
                    raw.hidden[slot_index][c] if c < len(raw.chunks) else blank.hidden[slot_index][0]  # type: ignore[union-attr]
                    for raw in raws
                ]
            )
            weights = torch.stack(
                [
                    raw.weights[c] if c < len(raw.chunks) else blank.weights[0]  # type: ignore[union-attr]
                    for raw in raws
                ]
            )
            columns.append(_apply_emphasis(hidden, weights, emphasis))
        per_slot.append(torch.stack(columns, dim=1))
    context = per_slot[0] if len(per_slot) == 1 else torch.cat(per_slot, dim=-1)
    context = context.reshape(len(raws), n_chunks * context.shape[2], context.shape[3])
    return [(context[i], None if raw.pooled is None else raw.pooled[0]) for i, raw in enumerate(raws)]


def _zero_conditioning(sd: StableDiffusion) -> tuple[Tensor, Tensor | None]:
    """All-zero context ``(77, D)`` and pooled ``(P,)``: SDXL's conditioning for an empty negative prompt."""
    width = 0
    pooled = None
    for slot in sd.slots:
        encoder = sd.text_encoders[slot.spec.name]
        width += encoder.config.width
        if slot.spec.pooled:
            pooled_width = encoder.config.projection_dim or encoder.config.width
            pooled = torch.zeros(pooled_width, dtype=encoder.dtype, device=encoder.device)
    first = sd.text_encoders[sd.slots[0].spec.name]
    context = torch.zeros(CHUNK_LENGTH + 2, width, dtype=first.dtype, device=first.device)
    return context, pooled


@dataclass(frozen=True)
class EncodedText:
    """A text encoded in chunks.

    context: ``(1, 77 * k, D)`` U-Net cross-attention input. pooled: SDXL's ``(1, P)`` pooled vector of the
    first chunk, else None. token_counts: the prompt tokens in each chunk (embedding vectors included; BOS,
    EOS and padding not). chunks: the encoder inputs. notes: what the parser or the encoder fell back on.
    embeddings_used: names of the textual-inversion embeddings spliced in.
    """

    context: Tensor
    pooled: Tensor | None
    token_counts: tuple[int, ...]
    chunks: tuple[TokenChunk, ...]
    notes: tuple[str, ...]
    embeddings_used: tuple[str, ...] = ()


def encode_text(
    sd: StableDiffusion,
    text: str,
    *,
    clip_skip: int = 1,
    emphasis: str = "Original",
    embeddings: EmbeddingRegistry | None = None,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> EncodedText:
    """Encode one text of any length with A1111's chunking, emphasis, BREAK and embeddings.

    ``text`` is what the encoder sees: no ``AND`` split, prompt editing or extra-network tags here (see
    ``PromptBatch``). With no emphasis syntax and at most 75 tokens the result equals
    ``sd.encode_prompt(text, clip_skip=clip_skip)``.
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"text must be a str, got {type(text).__name__}")
    emphasis = _check_emphasis(emphasis)
    notes: list[str] = []
    index = usable_embeddings(sd, embeddings, notes)
    cache = _TextEncoderCache(
        sd,
        clip_skip=clip_skip,
        emphasis=emphasis,
        index=index,
        comma_backtrack=_check_backtrack(comma_backtrack),
    )
    raw = cache.raw(text)
    ((context, pooled),) = _encode_group([raw], lambda: cache.raw(""), emphasis)
    return EncodedText(
        context=context[None],
        pooled=None if pooled is None else pooled[None],
        token_counts=tuple(chunk.n_tokens for chunk in raw.chunks),
        chunks=raw.chunks,
        notes=tuple(dict.fromkeys(cache.notes[text] + notes)),
        embeddings_used=tuple(cache.embeddings_used),
    )


# ----------------------------------------------------------------------------------------------------
# A batch of prompts over the sampling steps
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduledConditioning:
    """The conditioning of one text, used up to and including sampler step ``end_at_step``.

    context ``(77 * k, D)``, pooled ``(P,)`` (SDXL) or None.
    """

    end_at_step: int
    text: str
    context: Tensor
    pooled: Tensor | None


@dataclass(frozen=True)
class ConditioningPart:
    """One ``AND`` sub-prompt of an image: its weight and its conditioning over the steps."""

    text: str
    weight: float
    schedule: tuple[ScheduledConditioning, ...]


def _entry_at(schedule: Sequence[ScheduledConditioning], step: int) -> ScheduledConditioning:
    """A1111's rule: the first entry with ``step <= end_at_step``, the first entry past the end."""
    for entry in schedule:
        if step <= entry.end_at_step:
            return entry
    return schedule[0]


@dataclass(frozen=True)
class StepConditioning:
    """What the U-Net sees at one step, cond rows first (image by image, its AND parts in order).

    ``cond_context`` ``(N, L, D)`` with ``N`` the number of AND parts over all images; ``cond_parts[i]`` the
    ``(row, weight)`` pairs of image i; ``uncond_context`` ``(B, L', D)`` or None (no negative prompts).
    ``L == L'`` unless padding was turned off. Pooled tensors are ``(N, P)`` / ``(B, P)`` for SDXL.
    """

    cond_context: Tensor
    cond_pooled: Tensor | None
    cond_parts: tuple[tuple[tuple[int, float], ...], ...]
    uncond_context: Tensor | None
    uncond_pooled: Tensor | None
    texts: tuple[tuple[str, ...], ...]  # the text each AND part of each image uses at this step
    negative_texts: tuple[str, ...] | None


def _pad_with_last_token(contexts: list[Tensor]) -> Tensor:
    """Stack ``(L_i, D)`` tensors, repeating each one's last token vector up to the longest (A1111's rule
    for prompts of one side with different lengths)."""
    length = max(c.shape[0] for c in contexts)
    rows = [
        c if c.shape[0] == length else torch.cat([c, c[-1:].expand(length - c.shape[0], -1)])
        for c in contexts
    ]
    return torch.stack(rows)


def _pad_with_chunks(context: Tensor, length: int, empty: Tensor) -> Tensor:
    """Append copies of the empty prompt's 77-token chunk to ``(n, L, D)`` up to ``length`` tokens."""
    missing = (length - context.shape[1]) // empty.shape[0]
    if missing <= 0:
        return context
    pad = empty.to(context.device, context.dtype).repeat(missing, 1)
    return torch.cat([context, pad.expand(context.shape[0], -1, -1)], dim=1)


@dataclass(eq=False)
class PromptBatch:
    """The conditioning of a batch of A1111 prompts over ``steps`` sampler steps.

    Build it with ``PromptBatch.build``; ``at_step`` gives what the U-Net sees at a step. ``cond[i]`` are the
    AND parts of image i, ``uncond[i]`` the schedule of its negative prompt (None without negatives).
    ``extra_networks[i]`` are the ``<lora:...>`` tags of prompt i (removed from its text; the negative
    prompt keeps tags as text, as A1111 does), ``notes`` every fallback the parser or encoder took.
    """

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None
    steps: int
    parsed: tuple[ParsedPrompt, ...]
    cond: tuple[tuple[ConditioningPart, ...], ...]
    uncond: tuple[tuple[ScheduledConditioning, ...], ...] | None
    empty_context: Tensor | None  # (77, D): the empty prompt's chunk, to pad cond and uncond to one length
    extra_networks: tuple[tuple[ExtraNetworkRequest, ...], ...]
    notes: tuple[str, ...]
    embeddings_used: tuple[str, ...]
    token_counts: dict[str, tuple[int, ...]]
    pad_cond_uncond: bool = True
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_uncond(self) -> bool:
        return self.uncond is not None

    @classmethod
    def build(
        cls,
        sd: StableDiffusion,
        prompts: str | Sequence[str],
        negative_prompts: str | Sequence[str] | None,
        steps: int,
        *,
        clip_skip: int = 1,
        emphasis: str = "Original",
        embeddings: EmbeddingRegistry | None = None,
        hires_steps: int | None = None,
        comma_backtrack: int = COMMA_BACKTRACK,
        pad_cond_uncond: bool = True,
        zero_empty_negative: bool | None = None,
    ) -> PromptBatch:
        """Parse and encode ``prompts`` (one per image) and ``negative_prompts`` (one per image, or one str
        for all; None when no unconditional pass is needed, e.g. guidance scale 1).

        Each distinct text (over all images, AND parts, schedule steps and both sides) runs through the text
        encoder once. ``hires_steps`` gives the schedules of a hires-fix second pass of that many steps
        (see ``kuas.prompts.prompt_schedule``). ``pad_cond_uncond``: at steps where the prompt and the
        negative prompt have different chunk counts, pad the shorter with empty-prompt chunks so both run in
        one U-Net batch (A1111's "Pad prompt/negative prompt" option); False keeps the lengths (the denoiser
        then runs two U-Net calls, A1111's default). ``zero_empty_negative`` (default: True for SDXL) makes
        an empty negative prompt all zeros, context and pooled, as A1111 and diffusers do for SDXL.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError("prompts must be a non-empty list of str (one per image)")
        if negative_prompts is not None:
            if isinstance(negative_prompts, str):
                negative_prompts = [negative_prompts] * len(prompts)
            negative_prompts = list(negative_prompts)
            if len(negative_prompts) == 1 and len(prompts) > 1:
                negative_prompts = negative_prompts * len(prompts)
            if len(negative_prompts) != len(prompts) or not all(isinstance(p, str) for p in negative_prompts):
                raise InvalidInputError(
                    f"negative_prompts must be one str or one str per prompt ({len(prompts)}), "
                    f"got {len(negative_prompts)} items"
                )
        emphasis = _check_emphasis(emphasis)
        if zero_empty_negative is None:
            zero_empty_negative = bool(sd.family.vector_conditioning)

        notes: list[str] = []
        index = usable_embeddings(sd, embeddings, notes)
        cache = _TextEncoderCache(
            sd,
            clip_skip=clip_skip,
            emphasis=emphasis,
            index=index,
            comma_backtrack=_check_backtrack(comma_backtrack),
        )
        groups: dict[tuple[str, ...], list[tuple[Tensor, Tensor | None]]] = {}

        def encode_group(
            texts: list[str], pieces: dict[str, Sequence[tuple[str, float]]]
        ) -> dict[str, tuple[Tensor, Tensor | None]]:
            result = groups.get(tuple(texts))
            if result is None:
                raws = [cache.raw(text, pieces.get(text)) for text in texts]
                result = groups[tuple(texts)] = _encode_group(raws, lambda: cache.raw(""), emphasis)
            return dict(zip(texts, result))

        parsed: list[ParsedPrompt] = []
        cond: list[tuple[ConditioningPart, ...]] = []
        for prompt in prompts:
            prompt_parse = parse_prompt(prompt, steps, hires_steps=hires_steps)
            parsed.append(prompt_parse)
            notes.extend(prompt_parse.notes)
            parts = []
            for part in prompt_parse.parts:
                texts = [entry.text for entry in part.schedule]
                pieces: dict[str, Sequence[tuple[str, float]]] = {}
                if emphasis != "None":
                    pieces = {entry.text: entry.attention for entry in part.schedule}
                encoded = encode_group(texts, pieces)
                schedule = tuple(
                    ScheduledConditioning(entry.end_at_step, entry.text, *encoded[entry.text])
                    for entry in part.schedule
                )
                parts.append(ConditioningPart(part.text, part.weight, schedule))
            cond.append(tuple(parts))

        uncond = None
        if negative_prompts is not None:
            uncond_list = []
            for negative in negative_prompts:
                negative_notes: list[str] = []
                schedule = _schedule_with_notes(negative, steps, hires_steps, False, negative_notes)
                texts = [text for _, text in schedule]
                if zero_empty_negative and all(text == "" for text in texts):
                    context, pooled = _zero_conditioning(sd)
                    encoded = {text: (context, pooled) for text in texts}
                else:
                    pieces = {}
                    for text in dict.fromkeys(texts):
                        pieces[text], attention_notes = attention_pieces(text, emphasis)
                        negative_notes.extend(attention_notes)
                    encoded = encode_group(texts, pieces)
                notes.extend(f"negative prompt: {note}" for note in negative_notes)
                uncond_list.append(
                    tuple(ScheduledConditioning(end, text, *encoded[text]) for end, text in schedule)
                )
            uncond = tuple(uncond_list)

        empty_context = None
        if negative_prompts is not None and pad_cond_uncond:
            lengths = {
                entry.context.shape[0]
                for schedules in [part.schedule for parts in cond for part in parts] + list(uncond or ())
                for entry in schedules
            }
            if len(lengths) > 1:  # some step may pair a prompt and a negative prompt of different lengths
                empty_raw = cache.raw("")
                ((empty_context, _),) = _encode_group([empty_raw], lambda: empty_raw, emphasis)
        token_counts = {
            text: tuple(chunk.n_tokens for chunk in raw.chunks) for text, raw in cache.texts.items()
        }
        return cls(
            prompts=tuple(prompts),
            negative_prompts=None if negative_prompts is None else tuple(negative_prompts),
            steps=steps,
            parsed=tuple(parsed),
            cond=tuple(cond),
            uncond=uncond,
            empty_context=empty_context,
            extra_networks=tuple(p.extra_networks for p in parsed),
            notes=tuple(dict.fromkeys(notes)),
            embeddings_used=tuple(cache.embeddings_used),
            token_counts=token_counts,
            pad_cond_uncond=bool(pad_cond_uncond),
        )

    def at_step(self, steps: int | Sequence[int]) -> StepConditioning:
        """The conditioning at 0-based sampler step ``steps`` (one int, or one per image).

        Each AND part and negative prompt takes its schedule entry for the step (the first with
        ``step <= end_at_step``, as A1111). Within a side, shorter contexts repeat their last token vector
        up to the longest (A1111); between the sides, empty-prompt chunks pad the shorter one when
        ``pad_cond_uncond``.
        """
        if isinstance(steps, int):
            steps = [steps] * len(self.prompts)
        steps = tuple(int(s) for s in steps)
        if len(steps) != len(self.prompts):
            raise InvalidInputError(f"need one step per image ({len(self.prompts)}), got {len(steps)}")
        cond_entries = tuple(
            tuple(_entry_at(part.schedule, step) for part in parts) for parts, step in zip(self.cond, steps)
        )
        uncond_entries = None
        if self.uncond is not None:
            uncond_entries = tuple(_entry_at(schedule, step) for schedule, step in zip(self.uncond, steps))
        key = (
            tuple(tuple(id(e) for e in entries) for entries in cond_entries),
            None if uncond_entries is None else tuple(id(e) for e in uncond_entries),
        )
        found = self._cache.get(key)
        if found is not None:
            return found

        flat = [entry for entries in cond_entries for entry in entries]
        cond_context = _pad_with_last_token([e.context for e in flat])
        cond_pooled = None if flat[0].pooled is None else torch.stack([e.pooled for e in flat])  # type: ignore[misc]
        parts_index = []
        row = 0
        for image, entries in enumerate(cond_entries):
            weights = [part.weight for part in self.cond[image]]
            parts_index.append(tuple((row + k, weights[k]) for k in range(len(entries))))
            row += len(entries)

        uncond_context = uncond_pooled = None
        if uncond_entries is not None:
            uncond_context = _pad_with_last_token([e.context for e in uncond_entries])
            if uncond_entries[0].pooled is not None:
                uncond_pooled = torch.stack([e.pooled for e in uncond_entries])  # type: ignore[misc]
            if (
                self.pad_cond_uncond
                and self.empty_context is not None
                and cond_context.shape[1] != uncond_context.shape[1]
            ):
                length = max(cond_context.shape[1], uncond_context.shape[1])
                cond_context = _pad_with_chunks(cond_context, length, self.empty_context)
                uncond_context = _pad_with_chunks(uncond_context, length, self.empty_context)

        result = StepConditioning(
            cond_context=cond_context,
            cond_pooled=cond_pooled,
            cond_parts=tuple(parts_index),
            uncond_context=uncond_context,
            uncond_pooled=uncond_pooled,
            texts=tuple(tuple(e.text for e in entries) for entries in cond_entries),
            negative_texts=None if uncond_entries is None else tuple(e.text for e in uncond_entries),
        )
        self._cache[key] = result
        return result
