"""kuas.tokenizer: ids equal transformers' CLIPTokenizer built from the same vocabulary file."""

from __future__ import annotations

import gzip
import random
import subprocess
import sys
import unicodedata
from importlib.resources import files

import pytest
import torch

from kuas.errors import CheckpointError, InvalidInputError
from kuas.tokenizer import CLIPTokenizer

VOCAB_GZ = files("kuas.tokenizer").joinpath("bpe_simple_vocab_16e6.txt.gz")


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.default()


def _reference_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary rebuilt here from the file, independently of kuas' code."""
    visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    hidden = [b for b in range(256) if b not in visible]
    chars = [chr(b) for b in visible] + [chr(256 + i) for i in range(len(hidden))]
    lines = gzip.decompress(VOCAB_GZ.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + 49152 - 256 - 2]]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    vocab, merges = _reference_vocab()
    ref = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    # transformers 5 silently ignores vocab_file/merges_file; make sure this one really tokenizes.
    assert ref("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    return ref


def _varied_texts() -> list[str]:
    """>= 1,000 deterministic strings covering the inputs users type (and some they should not)."""
    rng = random.Random(1234)
    words = ("a photo of cat dog portrait masterpiece best quality highly detailed landscape sunset over the "
             "ocean by greg rutkowski trending on artstation 8k octane render don't it's we're they've i'm "
             "you'll he'd").split()
    punct = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~¡¿«»…–—‘’“”•·"
    accented = ["café", "naïve", "résumé", "Ångström", "jalapeño", "crème brûlée", "Zoë", "São Paulo",
                "Dvořák", "Łódź", "smørrebrød", "façade", "Straße", "ẞ", "İstanbul", "ǅemal", "ﬁne ﬂower"]
    scripts = [(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x0400, 0x04FF), (0x0600, 0x06FF),
               (0x0370, 0x03FF), (0x05D0, 0x05EA), (0x0900, 0x097F), (0x0E00, 0x0E7F)]
    emoji = ["😀", "🐱", "🔥", "❤️", "👍🏽", "👋🏿", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "🧑🏻‍🎨", "✨", "☕", "👩🏾‍🚀", "🫠"]
    spaces = [" ", "  ", "\t", "\n", "\r\n", " \t \n ", "\u00a0", "\u2003", "\u3000", "\u200b", "\x85",
              "\x0b\x0c"]
    entities = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&nbsp;", "&amp;amp;", "&eacute;", "&#x1F600;"]
    a1111 = ["(masterpiece:1.2)", "((best quality))", "[blurry]", "[cat|dog]", "[from:to:0.5]",
             "<lora:detail:0.8>",
             "<hypernet:x:1>", "\\(escaped\\)", "AND", "BREAK", "(red:1.1) AND (blue:0.9)", "a:b|c<d>e\\f"]
    specials = ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "x<|endoftext|>y", "<|endoftext", "|>"]

    def word() -> str:
        w = rng.choice(words)
        style = rng.random()
        if style < 0.2:
            return w.upper()
        if style < 0.4:
            return "".join(c.upper() if rng.random() < 0.5 else c for c in w)
        return w

    def script_run() -> str:
        lo, hi = rng.choice(scripts)
        return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8)))

    def number() -> str:
        kind = rng.randrange(5)
        if kind == 0:
            return str(rng.randint(0, 10 ** rng.randint(1, 15)))
        if kind == 1:
            return f"{rng.uniform(-100, 100):.{rng.randint(0, 4)}f}"
        if kind == 2:
            return f"{rng.randint(1, 999_999_999):,}"
        if kind == 3:
            return rng.choice(["１２３", "٣٤٥", "²³", "½", "Ⅻ", "૭", "1st", "2nd", "3x4", "v1.5", "1024x768"])
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(10, 40)))

    def any_char() -> str:
        while True:
            cp = rng.randint(0, 0x2FFFF)
            if not 0xD800 <= cp <= 0xDFFF:
                return chr(cp)

    pieces = [
        word, word, word, script_run, number,
        lambda: "".join(rng.choice(punct) for _ in range(rng.randint(1, 8))),
        lambda: unicodedata.normalize(rng.choice(["NFC", "NFD", "NFKD"]), rng.choice(accented)),
        lambda: rng.choice(emoji) * rng.randint(1, 3),
        lambda: rng.choice(entities),
        lambda: rng.choice(a1111),
        lambda: rng.choice(specials),
        lambda: "".join(any_char() for _ in range(rng.randint(1, 4))),
        lambda: word() + rng.choice(["'s", "'S", "'t", "'RE", "'ve", "'m", "'ll", "'d", "’s", "''s", "'"]),
    ]
    texts = ["", " ", "   ", "\t\n", "\u3000\u00a0", "a photo of a cat", "A PHOTO OF A CAT"]
    while len(texts) < 1100:
        parts = [rng.choice(pieces)() for _ in range(rng.randint(1, 12))]
        text = ""
        for p in parts:
            text += p + (rng.choice(spaces) if rng.random() < 0.7 else "")
        if rng.random() < 0.2:
            text = rng.choice(spaces) + text
        texts.append(text)
    # Very long texts: thousands of tokens, encoded untruncated.
    texts.append(" ".join(rng.choice(words) for _ in range(3000)))
    texts.append("".join(rng.choice(pieces)() for _ in range(800)))
    return texts


def test_vocabulary_layout_matches_reference(tok: CLIPTokenizer):
    vocab, merges = _reference_vocab()
    assert len(merges) == 48894 and merges[-1] == ("jeky", "ll</w>")
    assert tok.vocab_size == len(vocab) == 49408
    assert all(tok.token_to_id(t) == i for t, i in vocab.items())
    assert all(tok.id_to_token(i) == t for t, i in vocab.items())
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    assert tok.id_to_token(0) == "!" and tok.token_to_id(",</w>") == 267


def test_ids_equal_transformers_on_varied_texts(tok: CLIPTokenizer, reference):
    texts = _varied_texts()
    assert len(texts) >= 1000
    expected = reference(texts, add_special_tokens=False)["input_ids"]
    got = tok.encode_batch(texts)
    mismatches = [(t, g, e) for t, g, e in zip(texts, got, expected) if g != e]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, first: {mismatches[0]!r}"
    assert max(len(e) for e in expected) > 3000  # the long texts were really encoded untruncated
    assert [tok.encode(t) for t in texts[::25]] == expected[::25]


def test_padded_batch_equals_transformers_padding(tok: CLIPTokenizer, reference):
    texts = _varied_texts()
    texts = texts[:298] + texts[-2:]
    expected = reference(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    got = tok(texts)
    assert sum(len(ids) > 75 for ids in tok.encode_batch(texts)) >= 4  # truncation is exercised too
    assert got.dtype == torch.long and got.shape == (300, 77)
    assert torch.equal(got, expected["input_ids"])


@pytest.mark.parametrize(
    "text, ids",
    [
        ("a photo of a cat", [320, 1125, 539, 320, 2368]),
        ("A  Photo\tof\na CAT ", [320, 1125, 539, 320, 2368]),
        ("(masterpiece:1.2)", [263, 12066, 281, 272, 269, 273, 264]),
        ("1234", [272, 273, 274, 275]),
        ("can't", [753, 713]),
        ("café", [15304]),
        ("cafe\u0301", [15304]),  # NFD is composed first
        ("&amp;", [261, 6259, 282]),  # not unescaped (open_clip would give '&' = [261])
        ("<|endoftext|>", [49407]),
        ("<|ENDOFTEXT|>", [27, 347, 40786, 4160, 91, 285]),
        ("", []),
        (" \t\n ", []),
    ],
)
def test_known_ids(tok: CLIPTokenizer, text: str, ids: list[int]):
    assert tok.encode(text) == ids


def test_padding_with_eos_or_zero(tok: CLIPTokenizer):
    content = [320, 1125, 539, 320, 2368]
    eos = tok(["a photo of a cat"])
    zero = tok(["a photo of a cat"], pad_with="zero")
    custom = tok("a photo of a cat", pad_with=5, max_length=9)
    assert eos.shape == zero.shape == (1, 77)
    assert eos[0].tolist() == [49406, *content] + [49407] * 71
    assert zero[0].tolist() == [49406, *content, 49407] + [0] * 70
    assert custom.tolist() == [[49406, *content, 49407, 5, 5]]
    for bad in ("pad", -1, 49408, True):
        with pytest.raises(InvalidInputError):
            tok(["x"], pad_with=bad)


def test_truncation_keeps_bos_and_final_eos(tok: CLIPTokenizer):
    long = " ".join(f"w{i % 10}" for i in range(60))  # 120 content tokens: 'w' and a digit each
    ids = tok.encode(long)
    assert len(ids) == 120
    for pad_with in ("eos", "zero"):
        row = tok([long], pad_with=pad_with)[0].tolist()
        assert row == [49406, *ids[:75], 49407]
    exactly = " ".join(["cat"] * 75)
    assert tok([exactly], truncation=False)[0].tolist() == [49406] + [2368] * 75 + [49407]
    with pytest.raises(InvalidInputError, match="76 tokens"):
        tok([exactly + " cat"], truncation=False)
    assert tok([long], max_length=4).tolist() == [[49406, *ids[:2], 49407]]
    with pytest.raises(InvalidInputError):
        tok(["x"], max_length=1)


def test_decode_round_trips_lowercase_ascii(tok: CLIPTokenizer):
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyz"
    for _ in range(300):
        text = " ".join("".join(rng.choice(letters) for _ in range(rng.randint(1, 12)))
                        for _ in range(rng.randint(1, 15)))
        assert tok.decode(tok.encode(text)) == text
    row = tok(["a photo of a cat"])[0]
    assert tok.decode(row) == "a photo of a cat"
    assert tok.decode(row[:7], skip_special_tokens=False) == "<|startoftext|>a photo of a cat <|endoftext|>"
    assert tok.decode(tok.encode("héllo 😀, world")) == "héllo 😀, world"  # multi-byte text survives


def test_default_is_cached_and_lookups_validate(tok: CLIPTokenizer):
    assert CLIPTokenizer.default() is tok
    with pytest.raises(InvalidInputError, match="</w>"):
        tok.token_to_id("not-a-token")
    with pytest.raises(InvalidInputError):
        tok.id_to_token(49408)


def test_from_file_reads_merges_txt_and_rejects_damaged_files(tok: CLIPTokenizer, tmp_path):
    lines = gzip.decompress(VOCAB_GZ.read_bytes()).decode("utf-8").split("\n")
    merges_txt = tmp_path / "merges.txt"
    merges_txt.write_text("#version: 0.2\n" + "\n".join(lines[1:49000]) + "\n", encoding="utf-8")
    other = CLIPTokenizer.from_file(merges_txt)
    text = "(masterpiece:1.2), a Photo of a cat 😀 on 日本の 街"
    assert other.encode(text) == tok.encode(text) and other.vocab_size == 49408
    small = CLIPTokenizer.from_file(merges_txt, merge_count=10)
    assert small.vocab_size == 512 + 10 + 2 and small.eos_token_id == 523
    assert max(small.encode("the quick brown fox")) < 522

    truncated = tmp_path / "short.txt"
    truncated.write_text("#version: 0.2\ni n\nt h\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="truncated"):
        CLIPTokenizer.from_file(truncated)
    headless = tmp_path / "nohead.txt"
    headless.write_text("i n\nt h\n", encoding="utf-8")
    with pytest.raises(CheckpointError, match="header"):
        CLIPTokenizer.from_file(headless)
    with pytest.raises(CheckpointError, match="missing.txt.gz"):
        CLIPTokenizer.from_file(tmp_path / "missing.txt.gz")


def test_import_reads_no_file_until_default_is_called():
    # Dependencies are imported first; the audit hook then sees every file the kuas import opens.
    script = r"""
import sys, torch, tokenizers, kuas.errors
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
import kuas.tokenizer
data = [p for p in opened if not p.endswith((".py", ".pyc")) and "__pycache__" not in p]
print("IMPORT", data)
kuas.tokenizer.CLIPTokenizer.default()
print("LOAD", any(p.endswith("bpe_simple_vocab_16e6.txt.gz") for p in opened))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "IMPORT []" in out
    assert "LOAD True" in out  # the hook does see the vocabulary being read
