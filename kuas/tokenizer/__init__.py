"""The CLIP BPE tokenizer shared by all Stable Diffusion text encoders (vocabulary shipped as package data).

Importing this package reads no file: the vocabulary loads on the first ``CLIPTokenizer.default()``.
"""

from __future__ import annotations

from kuas.tokenizer.clip import (
    BOS_TOKEN,
    CONTEXT_LENGTH,
    EOS_TOKEN,
    WORD_END,
    CLIPTokenizer,
    byte_alphabet,
    read_merges,
)

__all__ = [
    "BOS_TOKEN",
    "CONTEXT_LENGTH",
    "EOS_TOKEN",
    "WORD_END",
    "CLIPTokenizer",
    "byte_alphabet",
    "read_merges",
]
