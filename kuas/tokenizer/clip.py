"""CLIP's byte-level BPE tokenizer, run by the `tokenizers` Rust backend.

Every Stable Diffusion text encoder (OpenAI CLIP ViT-L/14 in SD 1.x and SDXL, OpenCLIP ViT-H/14 in SD 2.x,
OpenCLIP ViT-bigG/14 in SDXL) uses the same vocabulary: OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, shipped
next to this module. How the vocabulary is laid out (ids):

    0..255        the 256 bytes, each written as one printable unicode character (the byte-level alphabet)
    256..511      the same 256 characters followed by ``</w>`` (a byte that ends a word)
    512..49405    one token per merge rule, in the file's order (the first 48,894 rules after the header)
    49406, 49407  ``<|startoftext|>`` (BOS) and ``<|endoftext|>`` (EOS)

Text is prepared the way transformers' ``CLIPTokenizer`` does (the reference the tests compare to): NFC
normalisation, every run of whitespace becomes one space, lower-casing; then the text is split into
words (letter runs, single digits, runs of other non-space characters, and the English contractions
``'s 't 're 've 'm 'll 'd``) and each word is byte-pair encoded with ``</w>`` on its last symbol.
The exact strings ``<|startoftext|>`` / ``<|endoftext|>`` typed in a prompt become the special ids.

Known differences from open_clip's ``SimpleTokenizer`` (used by the original SD 2.x / SDXL code), which
first runs ``ftfy.fix_text`` and ``html.unescape`` twice: there ``&amp;`` becomes ``&``, curly quotes
become straight ones, ligatures (``ﬁ``) and full-width letters are unfolded, mojibake and control
characters are repaired or dropped; and open_clip 3 does not treat a typed ``<|endoftext|>`` as special.
Here, as in transformers, the text is taken as typed. Plain prompts (letters, digits, punctuation other
than HTML entities, whitespace, emoji, accented, CJK, Cyrillic, Arabic text) give the same ids in both.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import logging
import os
from collections.abc import Iterable, Sequence

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from kuas.errors import CheckpointError, InvalidInputError

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
WORD_END = "</w>"
CONTEXT_LENGTH = 77
VOCAB_RESOURCE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary has 49,408 entries: 512 byte tokens, this many merges and 2 special tokens.
CLIP_MERGE_COUNT = 49408 - 512 - 2

# Words: the special tokens' text, contractions, letter runs, one digit at a time, runs of anything else
# that is not whitespace. The special alternatives matter when that text arrives in another case
# ("<|ENDOFTEXT|>" lower-cased): it is then one word, which the byte-level step cuts into "<|", the letters
# and "|>", instead of "|>" joining the punctuation after it.
_WORD_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"
)


def byte_alphabet() -> list[str]:
    """The printable character standing for each byte value 0..255 (index = byte).

    Bytes that are visible Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
    themselves; the other 68 bytes, in increasing order, get U+0100, U+0101, ... so that no token
    contains whitespace or control characters.
    """

    def visible(b: int) -> bool:
        return 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF

    alphabet: list[str] = []
    shifted = 0
    for b in range(256):
        if visible(b):
            alphabet.append(chr(b))
        else:
            alphabet.append(chr(0x100 + shifted))
            shifted += 1
    return alphabet


def _vocab_order() -> list[str]:
    """The 256 byte characters in vocabulary order: the visible bytes first, then the shifted ones."""
    alphabet = byte_alphabet()
    return sorted(alphabet, key=ord)


def read_merges(path: str | os.PathLike, count: int = CLIP_MERGE_COUNT) -> list[tuple[str, str]]:
    """The first `count` merge rules of a CLIP merges file (``.txt`` or ``.txt.gz``, header line first)."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return _parse_merges(f, count, path)
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise CheckpointError(path, f"cannot read the BPE merges file ({e}); pass a CLIP merges .txt or "
                                    f".txt.gz such as kuas' own {VOCAB_RESOURCE}") from e


def _parse_merges(lines: Iterable[str], count: int, where: str) -> list[tuple[str, str]]:
    """Read the header line, then `count` lines of two space-separated symbols."""
    it = iter(lines)
    header = next(it, "")
    # OpenAI's file starts '"bpe_simple_vocab_16e6.txt#version: 0.2', a merges.txt '#version: 0.2'.
    if "#version" not in header:
        raise CheckpointError(where, f"not a BPE merges file: the first line is {header[:40]!r}, expected a "
                                     "'#version: ...' header")
    merges: list[tuple[str, str]] = []
    for line in it:
        if len(merges) == count:
            break
        parts = line.split()
        if len(parts) != 2:
            raise CheckpointError(where, f"merge rule {len(merges) + 1} is {line.strip()!r}, expected two "
                                         "symbols separated by a space; the file is damaged")
        merges.append((parts[0], parts[1]))
    if len(merges) < count:
        raise CheckpointError(where, f"only {len(merges)} merge rules, {count} needed; the file is truncated")
    return merges


def _read_packaged_merges() -> list[tuple[str, str]]:
    """The merges of the vocabulary file shipped inside the kuas package."""
    resource = importlib.resources.files(__package__).joinpath(VOCAB_RESOURCE)
    where = str(resource)
    try:
        with resource.open("rb") as raw, gzip.GzipFile(fileobj=raw) as unzipped:
            lines = (line.decode("utf-8") for line in unzipped)
            return _parse_merges(lines, CLIP_MERGE_COUNT, where)
    except (OSError, UnicodeDecodeError, EOFError) as e:
        problem = f"kuas' packaged CLIP vocabulary cannot be read ({e}); reinstall kuas"
        raise CheckpointError(where, problem) from e


class CLIPTokenizer:
    """Text to CLIP token ids (and back), for every Stable Diffusion text encoder.

    ``CLIPTokenizer.default()`` is the tokenizer of all SD families. ``tok.encode(text)`` gives the
    content ids; ``tok(texts)`` gives the ``[batch, 77]`` tensor a text encoder takes:
    BOS, the ids (cut to 75 when `truncation`), EOS, then padding. The families pad differently and the
    caller chooses:

    - SD 1.x, and SDXL's first encoder (CLIP ViT-L): ``pad_with="eos"`` (49407), as transformers does.
    - SD 2.x and SDXL's second encoder (OpenCLIP ViT-H / bigG): ``pad_with="zero"`` (id 0, the token
      ``!``), as ``open_clip.tokenize`` does.
    """

    def __init__(self, merges: Sequence[tuple[str, str]]):
        """Build from BPE merge rules (first rule = highest priority); see `read_merges`."""
        byte_tokens = _vocab_order()
        tokens = byte_tokens + [t + WORD_END for t in byte_tokens]
        tokens += [a + b for a, b in merges]
        tokens += [BOS_TOKEN, EOS_TOKEN]
        ids = {token: i for i, token in enumerate(tokens)}
        if len(ids) != len(tokens):
            raise InvalidInputError(f"the {len(merges)} merge rules produce {len(tokens) - len(ids)} "
                                    "duplicate tokens; pass the rules of one BPE vocabulary, each once")
        self._tokens = tokens
        self._ids = ids
        self._bos = ids[BOS_TOKEN]
        self._eos = ids[EOS_TOKEN]
        self._char_to_byte = {c: b for b, c in enumerate(byte_alphabet())}
        self._backend = self._build_backend(ids, list(merges))

    @staticmethod
    def _build_backend(ids: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
        """The Rust tokenizer: normalise, split into words, byte-level map, BPE with ``</w>`` word ends."""
        backend = Tokenizer(BPE(vocab=ids, merges=merges, end_of_word_suffix=WORD_END, ignore_merges=False))
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                # Keep the matches (the words), drop what lies between them (the spaces).
                pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True),
                # Its GPT-2 split changes only those special-token words (the others are one class each).
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        # Typed exactly, the special tokens' text maps to their ids (before normalisation, like transformers).
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in (BOS_TOKEN, EOS_TOKEN)]
        )
        return backend

    @classmethod
    def default(cls) -> CLIPTokenizer:
        """The tokenizer of the packaged CLIP vocabulary, loaded on first call and shared after."""
        return _default_tokenizer()

    @classmethod
    def from_file(cls, path: str | os.PathLike, merge_count: int = CLIP_MERGE_COUNT) -> CLIPTokenizer:
        """A tokenizer from a CLIP merges file (``bpe_simple_vocab_16e6.txt.gz`` or a ``merges.txt``)."""
        return cls(read_merges(path, merge_count))

    @property
    def bos_token_id(self) -> int:
        """Id of ``<|startoftext|>`` (49406 for CLIP)."""
        return self._bos

    @property
    def eos_token_id(self) -> int:
        """Id of ``<|endoftext|>`` (49407 for CLIP)."""
        return self._eos

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (49408 for CLIP)."""
        return len(self._tokens)

    def token_to_id(self, token: str) -> int:
        """The id of a vocabulary entry, e.g. ``",</w>"`` (a word-final token carries ``</w>``)."""
        try:
            return self._ids[token]
        except KeyError:
            raise InvalidInputError(
                f"{token!r} is not in the vocabulary; tokens are byte-level strings and the last piece of "
                f"a word ends with {WORD_END!r} (e.g. 'cat</w>'); use encode() for ordinary text"
            ) from None

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of an id."""
        if not 0 <= token_id < len(self._tokens):
            last = len(self._tokens) - 1
            raise InvalidInputError(f"token id {token_id} is outside the vocabulary (0..{last})")
        return self._tokens[token_id]

    def encode(self, text: str) -> list[int]:
        """Content ids of one text, without BOS/EOS and never truncated."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of many texts at once (the backend does them in parallel)."""
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        max_length: int = CONTEXT_LENGTH,
        pad_with: str | int = "eos",
        truncation: bool = True,
    ) -> torch.LongTensor:
        """Token ids ``[len(texts), max_length]``: BOS, content, EOS, padding.

        `pad_with` is ``"eos"`` (SD 1.x, SDXL's CLIP ViT-L), ``"zero"`` (SD 2.x, SDXL's OpenCLIP bigG) or
        an id. With `truncation`, content beyond ``max_length - 2`` tokens is dropped and the row still
        ends with EOS; without it, a longer text is an error (split long prompts into chunks instead).
        """
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise InvalidInputError(f"max_length={max_length!r}: it must be an int >= 2 (BOS and EOS need "
                                    f"room); CLIP text encoders take {CONTEXT_LENGTH}")
        pad_id = self._pad_id(pad_with)
        room = max_length - 2
        rows = self.encode_batch(texts)
        out = torch.full((len(rows), max_length), pad_id, dtype=torch.long)
        for i, ids in enumerate(rows):
            if len(ids) > room:
                if not truncation:
                    raise InvalidInputError(
                        f"text {i} has {len(ids)} tokens, more than the {room} that fit in max_length="
                        f"{max_length}; pass truncation=True or encode it in chunks"
                    )
                ids = ids[:room]
            row = [self._bos, *ids, self._eos]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def _pad_id(self, pad_with: str | int) -> int:
        """Resolve `pad_with` ("eos", "zero" or an id) to an id."""
        if pad_with == "eos":
            return self._eos
        if pad_with == "zero":
            return 0
        if isinstance(pad_with, int) and not isinstance(pad_with, bool) and 0 <= pad_with < len(self._tokens):
            return pad_with
        raise InvalidInputError(f"pad_with={pad_with!r}: use 'eos' (SD 1.x, SDXL encoder 1), 'zero' (SD 2.x, "
                                f"SDXL encoder 2) or a token id in 0..{len(self._tokens) - 1}")

    def decode(self, ids: Iterable[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids: word ends become spaces; BOS/EOS are dropped unless asked for.

        Only the text before normalisation is lost (case, whitespace runs, spacing around punctuation):
        ``decode(encode("a photo of a cat")) == "a photo of a cat"``.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise InvalidInputError(f"decode takes one sequence of ids, got a tensor of shape "
                                        f"{tuple(ids.shape)}; decode each row")
            ids = ids.tolist()
        data = bytearray()
        for token_id in ids:
            token_id = int(token_id)
            if skip_special_tokens and token_id in (self._bos, self._eos):
                continue
            token = self.id_to_token(token_id)
            word_end = token.endswith(WORD_END)
            if word_end:
                token = token[: -len(WORD_END)]
            # The special tokens are plain ASCII, which the byte alphabet writes as itself.
            data += bytes(self._char_to_byte[c] for c in token)
            if word_end:
                data += b" "
        return data.decode("utf-8", errors="replace").strip()

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab_size={self.vocab_size})"


@functools.cache
def _default_tokenizer() -> CLIPTokenizer:
    """Load the packaged vocabulary once per process."""
    tokenizer = CLIPTokenizer(_read_packaged_merges())
    logger.debug("loaded the CLIP vocabulary (%d tokens)", tokenizer.vocab_size)
    return tokenizer
