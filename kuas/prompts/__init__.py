"""The A1111 prompt language (emphasis, prompt editing, alternation, AND, BREAK, extra-network tags) and
the textual-inversion embedding registry; see ``kuas.prompts.parser``."""

from __future__ import annotations

from kuas.prompts.parser import (
    BREAK_MARKER,
    EmbeddingMatch,
    EmbeddingRegistry,
    EmbeddingTokenIndex,
    ExtraNetworkRequest,
    ParsedPrompt,
    PromptPart,
    ScheduledText,
    TextualInversionEmbedding,
    TokenEncoder,
    extract_extra_networks,
    parse_prompt,
    parse_prompt_attention,
    prompt_schedule,
    split_and,
)

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
