"""`kuas prompt`: the parse report users check their prompts with (kuas.cli.prompt)."""

from __future__ import annotations

import argparse
import time

import pytest

import kuas
from kuas.cli import prompt as prompt_cli
from kuas.errors import InvalidInputError

WORDS = ["cat", "dog", "red", "blue", "green", "tree", "house", "car", "bird", "fish"]


def run_cli(capsys, *argv: str) -> str:
    parser = argparse.ArgumentParser(prog="kuas")
    prompt_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prompt", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_parts_weights_schedule_tokens_tags(capsys):
    out = run_cli(
        capsys,
        "a (red:1.3) [cat:dog:0.5] <lora:cute:0.8> AND a hat :0.7",
        "--steps",
        "10",
        "--negative",
        "blurry, [ugly:3]",
    )
    lines = out.splitlines()
    assert lines[0] == "prompt: 2 parts (AND), 10 steps, emphasis Original"
    assert "part 1: weight 1  'a (red:1.3) [cat:dog:0.5]'" in lines  # the AND split drops trailing spaces
    assert "part 2: weight 0.7  ' a hat'" in lines
    # [cat:dog:0.5] at 10 steps: A1111 uses "cat" while step index <= 5, i.e. sampler steps 1-6
    assert "    steps 1-6: 'a (red:1.3) cat'" in lines
    assert "    steps 7-10: 'a (red:1.3) dog'" in lines
    assert "          1.3 'red'" in lines  # the weighted span
    assert "    tokens: 3 tokens in 1 chunk (3); the encoder sees 77" in lines
    assert "  lora 'cute': text encoder 0.8, U-Net 0.8" in lines
    # the negative prompt: its own schedule, no AND split
    assert "  steps 1-4: 'blurry, '" in lines and "  steps 5-10: 'blurry, ugly'" in lines
    assert lines[-1] == "notes: none (everything parsed as written)"


def test_chunks_comma_backtrack_break_and_alternation(capsys):
    long = " ".join(WORDS[i % 10] for i in range(200))
    out = run_cli(capsys, long)
    assert "    tokens: 200 tokens in 3 chunks (75, 75, 50); the encoder sees 231" in out
    backtracked = " ".join(WORDS[i % 10] for i in range(60)) + " , " + " ".join(WORDS * 2)
    assert "tokens: 81 tokens in 2 chunks (61, 20)" in run_cli(capsys, backtracked)
    out = run_cli(capsys, "a cat BREAK a dog")
    assert "      BREAK (next chunk)" in out and "tokens: 4 tokens in 2 chunks (2, 2)" in out
    out = run_cli(capsys, "a [cat|dog]", "--steps", "4")
    assert "steps 1-2: 'a cat'\n    step 3: 'a dog'\n    step 4: 'a cat'\n" in out
    assert "    never (earlier entries cover every step): 'a dog'" in out
    out = run_cli(capsys, "a (cat:1.5) BREAK x", "--emphasis", "None")
    assert "emphasis off: brackets and BREAK are plain text" in out and "in 1 chunk" in out


@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ("(unbalanced [x", "unbalanced brackets: '(' or '[' left open were closed"),
        ("(x:abc)", "':' inside (...) not followed by a number"),
        ("(x:nan)", "':' inside (...) not followed by a number"),
        ("(x:1e309)", "':' inside (...) not followed by a number"),
        ("[a:b:]", "not valid prompt editing [from:to:when]"),
        ("a ) b ]", "closing brackets without an opening one were kept as text"),
        ("[a|b] | c", "'|' outside a well-formed [a|b] alternation"),
        ("<lora:x:abc> cat", "extra network tag <lora:x:abc> ignored"),
        (":", "notes: none"),
        ("[|]", "part 1: weight 1  '[|]'\n  text:\n    tokens: 0 tokens in 1 chunk (0)"),
        ("nul\x00byte", "'nul\\x00byte'"),
    ],
)
def test_malformed_prompts_never_raise_and_say_what_happened(capsys, prompt, says):
    out = run_cli(capsys, prompt, "--steps", "4")
    assert says in out
    assert "tokens:" in out


def test_a_megabyte_of_text_is_bounded(capsys):
    text = "a (red:1.2) cat, [blue|green] " * 35_000  # ~1 MB
    assert len(text) >= 1_000_000
    start = time.perf_counter()
    out = run_cli(capsys, text, "--steps", "2")
    assert time.perf_counter() - start < 30
    assert len(out) < 20_000  # long texts and lists are shortened in the report
    assert "'... (1,049,999 characters)" in out  # the AND split drops the trailing space
    assert "the encoder sees" in out


def test_model_option_reports_the_family(capsys, tmp_path):
    sd = kuas.create(
        "sd1",
        unet={"model_channels": 32, "num_heads": -1, "num_head_channels": 8},
        vae={"ch": 32},
        text_encoder={"width": 64, "layers": 2, "heads": 2, "mlp_width": 128},
    )
    path = sd.save(tmp_path / "tiny.safetensors")
    out = run_cli(capsys, " ".join(WORDS * 10), "--model", str(path))
    assert "model: tiny (sd1); conditioning (batch, 77 x chunks, 64), up to (1, 154, 64) here" in out


def test_bad_steps_is_a_clear_error(capsys):
    with pytest.raises(InvalidInputError, match="--steps must be 1 or more"):
        run_cli(capsys, "a cat", "--steps", "0")
