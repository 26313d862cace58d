"""The A1111 prompt language: parity with A1111's prompt_parser / extra_networks on their documented examples
and on a table of tricky inputs, fallbacks on malformed input, bounded time, and the embedding registry."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time

import pytest
import torch

from kuas.errors import InvalidInputError
from kuas.prompts import (
    EmbeddingRegistry,
    ExtraNetworkRequest,
    extract_extra_networks,
    parse_prompt,
    parse_prompt_attention,
    prompt_schedule,
    split_and,
)

# Expected values: the outputs of A1111's functions (lark 1.1.2 grammar, webui >= 1.6) for these inputs.
EMPHASIS_CASES = [
    ('normal text', [('normal text', 1.0)]),
    ('an (important) word', [('an ', 1.0), ('important', 1.1), (' word', 1.0)]),
    ('(unbalanced', [('unbalanced', 1.1)]),
    ('\\(literal\\]', [('(literal]', 1.0)]),
    ('(unnecessary)(parens)', [('unnecessaryparens', 1.1)]),
    (
        'a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).',
        [
            ('a ', 1.0),
            ('house', 1.5730000000000004),
            (' ', 1.1),
            ('on', 1.0),
            (' a ', 1.1),
            ('hill', 0.55),
            (', sun, ', 1.1),
            ('sky', 1.4641000000000006),
            ('.', 1.1),
        ],
    ),
    ('', [('', 1.0)]),
    ('(((', [('', 1.0)]),
    ('[]', [('', 1.0)]),
    ('()', [('', 1.0)]),
    ('a\\b', [('ab', 1.0)]),
    ('\\\\', [('\\', 1.0)]),
    ('\\', [('', 1.0)]),
    ('(a [b) c]', [('a ', 1.1), ('b', 1.0), (' c', 0.9090909090909091)]),
    ('(a [b:1.5) c]', [('a ', 1.5), ('b', 1.3636363636363635), (' c', 0.9090909090909091)]),
    ('x:1.5) y', [('x:1.5) y', 1.0)]),
    ('a ) b ] c', [('a ) b ] c', 1.0)]),
    ('(x:abc)', [('x:abc', 1.1)]),
    ('(x:nan)', [('x:nan', 1.1)]),
    ('(x:inf)', [('x:inf', 1.1)]),
    ('(x:1e309)', [('x:1e309', 1.1)]),
    ('(x: 2 )', [('x', 2.0)]),
    ('(x:-1)', [('x', -1.0)]),
    ('(x:+.5)', [('x', 0.5)]),
    ('(x:0)', [('x', 0.0)]),
    ('((x:0):2)', [('x', 0.0)]),
    ('a BREAK b', [('a', 1.0), ('BREAK', -1.0), ('b', 1.0)]),
    ('BREAK', [('', 1.0), ('BREAK', -1.0), ('', 1.0)]),
    ('BREAKfast BREAK_ aBREAK', [('BREAKfast BREAK_ aBREAK', 1.0)]),
    ('(a BREAK b)', [('a', 1.1), ('BREAK', -1.1), ('b', 1.1)]),
    ('a\nBREAK\nb', [('a', 1.0), ('BREAK', -1.0), ('b', 1.0)]),
    (
        '[a BREAK b:2]',
        [('a', 0.9090909090909091), ('BREAK', -0.9090909090909091), ('b:2', 0.9090909090909091)],
    ),
    ('a :', [('a :', 1.0)]),
    (': (b:1.2) :', [(': ', 1.0), ('b', 1.2), (' :', 1.0)]),
    ('[[[x]]]', [('x', 0.7513148009015777)]),
    ('(a(b(c)))', [('a', 1.1), ('b', 1.2100000000000002), ('c', 1.3310000000000004)]),
    ('[(a)]', [('a', 1.0)]),
    ('((a)b)c', [('a', 1.2100000000000002), ('b', 1.1), ('c', 1.0)]),
    ('\\(a\\)(b)', [('(a)', 1.0), ('b', 1.1)]),
    ('(١٫5)', [('١٫5', 1.1)]),
    ('(x:١.5)', [('x', 1.5)]),
    ('[x:3]', [('x:3', 0.9090909090909091)]),
    ('a (b:1.1 ) c', [('a ', 1.0), ('b', 1.1), (' c', 1.0)]),
    ('(b :1.2)', [('b ', 1.2)]),
    (
        'a ((b) [c] (d:0.9))',
        [
            ('a ', 1.0),
            ('b', 1.2100000000000002),
            (' ', 1.1),
            ('c', 1.0),
            (' ', 1.1),
            ('d', 0.9900000000000001),
        ],
    ),
    (
        '1girl, (masterpiece:1.2), [[low quality]], (red eyes:1.1) BREAK (blue:0.8) sky',
        [
            ('1girl, ', 1.0),
            ('masterpiece', 1.2),
            (', ', 1.0),
            ('low quality', 0.8264462809917354),
            (', ', 1.0),
            ('red eyes', 1.1),
            ('', 1.0),
            ('BREAK', -1.0),
            ('', 1.0),
            ('blue', 0.8),
            (' sky', 1.0),
        ],
    ),
]

SCHEDULE_CASES = [
    ('test', 10, [(10, 'test')]),
    ('a [b:3]', 10, [(3, 'a '), (10, 'a b')]),
    ('a [b: 3]', 10, [(3, 'a '), (10, 'a b')]),
    ('a [[[b]]:2]', 10, [(2, 'a '), (10, 'a [[b]]')]),
    ('[(a:2):3]', 10, [(3, ''), (10, '(a:2)')]),
    ('a [b : c : 1] d', 10, [(1, 'a b  d'), (10, 'a  c  d')]),
    ('a[b:[c:d:2]:1]e', 10, [(1, 'abe'), (2, 'ace'), (10, 'ade')]),
    ('a [unbalanced', 10, [(10, 'a [unbalanced')]),
    ('a [b:.5] c', 10, [(5, 'a  c'), (10, 'a b c')]),
    ('a [{b|d{:.5] c', 10, [(10, 'a [{b|d{:.5] c')]),
    ('((a][:b:c [d:3]', 10, [(3, '((a][:b:c '), (10, '((a][:b:c d')]),
    (
        '[a|(b:1.1)]',
        10,
        [
            (1, 'a'),
            (2, '(b:1.1)'),
            (3, 'a'),
            (4, '(b:1.1)'),
            (5, 'a'),
            (6, '(b:1.1)'),
            (7, 'a'),
            (8, '(b:1.1)'),
            (9, 'a'),
            (10, '(b:1.1)'),
        ],
    ),
    (
        '[fe|]male',
        10,
        [
            (1, 'female'),
            (2, 'male'),
            (3, 'female'),
            (4, 'male'),
            (5, 'female'),
            (6, 'male'),
            (7, 'female'),
            (8, 'male'),
            (9, 'female'),
            (10, 'male'),
        ],
    ),
    (
        '[fe|||]male',
        10,
        [
            (1, 'female'),
            (2, 'male'),
            (3, 'male'),
            (4, 'male'),
            (5, 'female'),
            (6, 'male'),
            (7, 'male'),
            (8, 'male'),
            (9, 'female'),
            (10, 'male'),
        ],
    ),
    (
        (
            'fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]'
            '[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]'
        ),
        100,
        [
            (25, 'fantasy landscape with a mountain and an oak in foreground shoddy'),
            (50, 'fantasy landscape with a lake and an oak in foreground in background shoddy'),
            (60, 'fantasy landscape with a lake and an oak in foreground in background masterful'),
            (75, 'fantasy landscape with a lake and an oak in background masterful'),
            (100, 'fantasy landscape with a lake and a christmas tree in background masterful'),
        ],
    ),
    ('a [b:c:0.5] d', 7, [(3, 'a b d'), (7, 'a c d')]),
    ('a [b:c:5] d', 3, [(3, 'a b d')]),
    ('[a:b:0]', 4, [(4, 'b')]),
    ('[a:b:-2]', 4, [(4, 'b')]),
    ('[a:b:1e1]', 20, [(10, 'a'), (20, 'b')]),
    ('[a:b:2.5e-1]', 20, [(5, 'a'), (20, 'b')]),
    ('[a:b:5e-1]', 20, [(20, 'b')]),
    ('[a:b:+3]', 10, [(3, 'a'), (10, 'b')]),
    ('[a:b:5.]', 10, [(10, 'a')]),
    ('[a:b:1.0]', 10, [(10, 'a')]),
    ('[ a : b : 3 ]', 10, [(3, ' a '), (10, ' b ')]),
    ('[a:b:3 ]', 10, [(3, 'a'), (10, 'b')]),
    ('[a:b:3x]', 10, [(10, '[a:b:3x]')]),
    ('[a:b]', 10, [(10, '[a:b]')]),
    ('[a:b:c:3]', 10, [(10, '[a:b:c:3]')]),
    ('[:3]', 10, [(3, ''), (10, '')]),
    ('[::3]', 10, [(3, ''), (10, '')]),
    ('[:]', 10, [(10, '[:]')]),
    ('[|]', 3, [(1, ''), (2, ''), (3, '')]),
    ('[]', 3, [(3, '[]')]),
    ('()', 3, [(3, '()')]),
    ('(:)', 3, [(3, '(:)')]),
    ('[a:b:]', 10, [(10, '[a:b:]')]),
    ('a | b', 10, [(10, 'a | b')]),
    ('a\\', 10, [(10, 'a\\')]),
    ('a\\\nb [c:2]', 10, [(10, 'a\\\nb [c:2]')]),
    ('\\[a:2]', 10, [(10, '\\[a:2]')]),
    ('[a\\:2]', 10, [(10, '[a\\:2]')]),
    ('[a\\|b]', 10, [(10, '[a\\|b]')]),
    ('[a|b\\]', 10, [(10, '[a|b\\]')]),
    ('(a|b)', 10, [(10, '(a|b)')]),
    ('[a|(b|c)]', 10, [(10, '[a|(b|c)]')]),
    ('[a|[b|c]]', 5, [(1, 'a'), (2, 'c'), (3, 'a'), (4, 'c'), (5, 'a')]),
    ('[[a|b]:3]', 6, [(1, ''), (2, ''), (3, ''), (4, 'b'), (5, 'a'), (6, 'b')]),
    ('[a|b:3]', 10, [(10, '[a|b:3]')]),
    ('[a:b|c:3]', 10, [(10, '[a:b|c:3]')]),
    ('[a [b|c]', 5, [(1, '[a b'), (2, '[a c'), (3, '[a b'), (4, '[a c'), (5, '[a b')]),
    ('([a:2]:1.2)', 5, [(2, '(:1.2)'), (5, '(a:1.2)')]),
    ('(a:[b:2])', 5, [(2, '(a:)'), (5, '(a:b)')]),
    ('(a:b:c) [d:2]', 5, [(2, '(a:b:c) '), (5, '(a:b:c) d')]),
    ('[a:b:c:3] [d:5]', 10, [(5, '[a:b:c:3] '), (10, '[a:b:c:3] d')]),
    ('] [d:5]', 10, [(5, '] '), (10, '] d')]),
    ('[[d:5]', 10, [(5, '['), (10, '[d')]),
    ('(a[d:5]', 10, [(5, '(a'), (10, '(ad')]),
    ('[a:[b:3]', 10, [(3, '[a:'), (10, '[a:b')]),
    ('x:', 10, [(10, 'x:')]),
    ('[a:3] [b:7]', 10, [(3, ' '), (7, 'a '), (10, 'a b')]),
    ('[a:b:1.5]', 10, [(10, 'a')]),
    (
        '[cow|horse|[cat:dog:3]]',
        6,
        [(1, 'cow'), (2, 'horse'), (3, 'cat'), (4, 'cow'), (5, 'horse'), (6, 'dog')],
    ),
    ('[a:b:0.33]', 12, [(3, 'a'), (12, 'b')]),
    ('[a:b:99]', 12, [(12, 'a')]),
    ('a\tb [c\n:2]', 4, [(2, 'a\tb '), (4, 'a\tb c\n')]),
    ('[\xa0a:\u20032\u3000]', 4, [(2, ''), (4, '\xa0a')]),
]

HIRES_CASES = [
    ('a [b:.5] c', 10, 10, [(10, 'a b c')]),
    ('a [b:1.5] c', 10, 10, [(5, 'a  c'), (10, 'a b c')]),
    ('a [b:15] c', 10, 10, [(5, 'a  c'), (10, 'a b c')]),
    ('a [b:5] c', 10, 10, [(10, 'a b c')]),
    ('[a:b:12]', 10, 6, [(2, 'a'), (6, 'b')]),
    ('[a|b]', 10, 3, [(1, 'a'), (2, 'b'), (3, 'a')]),
]

OLD_SCHEDULING_CASES = [
    ('a [b:.5] c', 10, [(5, 'a  c'), (10, 'a b c')]),
    ('a [b:1.0] c', 10, [(1, 'a  c'), (10, 'a b c')]),
    ('a [b:0.999] c', 10, [(9, 'a  c'), (10, 'a b c')]),
    ('[a:b:1e-1]', 10, [(1, 'a'), (10, 'b')]),
]

AND_CASES = [
    ('a cat :1.2 AND a dog :0.8', [('a cat', 1.2), (' a dog', 0.8)]),
    ('a AND b', [('a', 1.0), (' b', 1.0)]),
    ('a AND', [('a', 1.0), ('', 1.0)]),
    ('AND', [('', 1.0), ('', 1.0)]),
    ('ANDROID AND x', [('ANDROID', 1.0), (' x', 1.0)]),
    ('a AND b :2. AND c: .5 AND d :1.5.3', [('a', 1.0), (' b', 2.0), (' c', 0.5), (' d :1.5.3', 1.0)]),
    ('x : -1', [('x', -1.0)]),
    ('x :+2 ', [('x', 2.0)]),
    ('a:1 b', [('a:1 b', 1.0)]),
    ('  lead AND trail  ', [('  lead', 1.0), (' trail', 1.0)]),
    ('a\n:\n3\n', [('a', 3.0)]),
    ('weight :١٢', [('weight', 12.0)]),
    ('a _AND_ b', [('a _AND_ b', 1.0)]),
    ('a\tAND\tb', [('a', 1.0), ('\tb', 1.0)]),
    ('éAND b', [('éAND b', 1.0)]),
    ('x : 1e3', [('x : 1e3', 1.0)]),
    ('x :', [('x :', 1.0)]),
    (':5', [('', 5.0)]),
    ('a ::5', [('a :', 5.0)]),
]

EXTRA_NETWORK_TEXT_CASES = [
    ('a <lora:foo:0.5> b', 'a  b', {'lora': [['foo', '0.5']]}),
    ('<lora:a:1><lora:b:2>', '', {'lora': [['a', '1'], ['b', '2']]}),
    ('<lora:x>', '', {'lora': [['x']]}),
    ('<lora:>', '<lora:>', {}),
    ('<:x:1>', '<:x:1>', {}),
    ('<lo ra:x:1>', '<lo ra:x:1>', {}),
    ('<lora:a<b>', '', {'lora': [['a<b']]}),
    ('<<lora:x:1>>', '<>', {'lora': [['x', '1']]}),
    ('<lora:x:1', '<lora:x:1', {}),
    (
        'x <hypernet:h:0.3> <lyco:l:1:2> <foo_bar:baz:q=1:2>',
        'x   ',
        {'hypernet': [['h', '0.3']], 'lyco': [['l', '1', '2']], 'foo_bar': [['baz', 'q=1', '2']]},
    ),
    ('<lora:a:te=0.5:unet=0.25:dyn=16>', '', {'lora': [['a', 'te=0.5', 'unet=0.25', 'dyn=16']]}),
    ('<lora:a:b:c:d:e>', '', {'lora': [['a', 'b', 'c', 'd', 'e']]}),
    ('<lora:../../etc/passwd:1>', '', {'lora': [['../../etc/passwd', '1']]}),
    ('<lora:a:x=y=z>', '', {'lora': [['a', 'x=y=z']]}),
    ('<lora:a:1>BREAK<lora:b:2>', 'BREAK', {'lora': [['a', '1'], ['b', '2']]}),
    ('<é:x:1>', '', {'é': [['x', '1']]}),
    ('<lora:a:\n1>', '', {'lora': [['a', '\n1']]}),
]

# ------------------------------------------------------------------------------------------------
# Emphasis
# ------------------------------------------------------------------------------------------------


def test_emphasis_docstring_example_within_1e4_and_bit_exact():
    got = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected = [
        ("a ", 1.0), ("house", 1.5730), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1),
    ]
    assert [text for text, _ in got] == [text for text, _ in expected]
    for (_, weight), (_, want) in zip(got, expected):
        assert abs(weight - want) < 1e-4
    # The reference multiplies in closing order: inner weight first, then each enclosing bracket.
    assert got[1][1] == 1.3 * 1.1 * 1.1 and got[7][1] == 1.1 * 1.1 * 1.1 * 1.1
    assert got[3][1] == (1 / 1.1) * 1.1  # "]" first, then the "(" left open, closed at the end


@pytest.mark.parametrize("text, expected", EMPHASIS_CASES)
def test_emphasis_matches_reference(text, expected):
    got = parse_prompt_attention(text)
    assert got == expected  # exact floats: merging of equal neighbours depends on them
    assert all(type(weight) is float for _, weight in got)


def test_emphasis_break_marker_only_at_weight_minus_one():
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    # Inside brackets A1111 multiplies the marker too, so it is no longer a chunk break there.
    assert parse_prompt_attention("(a BREAK b)")[1] == ("BREAK", -1.1)


def test_emphasis_fallbacks_where_the_reference_raises():
    # float("1.2.3") raises in A1111; here the weight is text and the bracket a plain ")".
    assert parse_prompt_attention("(x:1.2.3) y") == [("x:1.2.3", 1.1), (" y", 1.0)]
    assert parse_prompt_attention("(x:.)") == [("x:.", 1.1)]
    # A weight that overflows a float (A1111: inf) and nesting that overflows (1.1**10000) reset to 1.0.
    assert parse_prompt_attention("a (x:" + "9" * 400 + ")") == [("a x", 1.0)]
    deep = parse_prompt_attention("(" * 10000 + "x" + ")" * 10000)
    assert deep == [("x", 1.0)]
    # Exact arithmetic is kept up to the point of overflow: 1.1**7000 is finite.
    assert parse_prompt_attention("(" * 7000 + "x")[0][1] == pytest.approx(1.1**7000, rel=1e-9)
    notes = parse_prompt("(" * 10000 + "x", 20).notes
    assert any("inf/nan" in note for note in notes) and any("unbalanced" in note for note in notes)


def test_emphasis_deep_nesting_with_text_everywhere_is_bounded_and_close_to_exact():
    got = parse_prompt_attention("(x" * 3000 + "y" + ")" * 3000)  # 4.5M multiplications: still exact
    expected, weight = [], 1.0
    for _ in range(3000):  # the k-th "x" is multiplied by 1.1 k times, one after the other
        weight *= 1.1
        expected.append(("x", weight))
    expected[-1] = ("xy", weight)
    assert got == expected
    start = time.perf_counter()
    huge = parse_prompt_attention("[x" * 20000)  # 2e8 multiplications: log-space fallback
    assert time.perf_counter() - start < 5
    assert huge[0] == ("x", pytest.approx(1 / 1.1, rel=1e-12))
    assert huge[99] == ("x", pytest.approx(1.1**-100, rel=1e-9))
    assert huge[-1][1] == 0.0  # underflows, as the exact products do
    assert any("log space" in note for note in parse_prompt("[x" * 20000, 3).notes)


# ------------------------------------------------------------------------------------------------
# Prompt editing and alternation
# ------------------------------------------------------------------------------------------------


def test_schedule_docstring_examples():
    def g(prompt: str) -> list[tuple[int, str]]:
        return prompt_schedule(prompt, 10)

    assert g("test") == [(10, "test")]
    assert g("a [b:3]") == [(3, "a "), (10, "a b")]
    assert g("a [b: 3]") == [(3, "a "), (10, "a b")]
    assert g("a [[[b]]:2]") == [(2, "a "), (10, "a [[b]]")]
    assert g("[(a:2):3]") == [(3, ""), (10, "(a:2)")]
    assert g("a [b : c : 1] d") == [(1, "a b  d"), (10, "a  c  d")]
    assert g("a[b:[c:d:2]:1]e") == [(1, "abe"), (2, "ace"), (10, "ade")]
    assert g("a [unbalanced") == [(10, "a [unbalanced")]
    assert g("a [b:.5] c") == [(5, "a  c"), (10, "a b c")]
    assert g("((a][:b:c [d:3]") == [(3, "((a][:b:c "), (10, "((a][:b:c d")]
    assert g("[a|(b:1.1)]") == [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]
    assert g("[fe|]male") == [(i, "female" if i % 2 else "male") for i in range(1, 11)]
    assert g("[fe|||]male") == [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]
    # The docstring's "not handling this right now" case: with the current grammar it is not parsed at all.
    assert g("a [{b|d{:.5] c") == [(10, "a [{b|d{:.5] c")]
    assert prompt_schedule("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]


@pytest.mark.parametrize("prompt, steps, expected", SCHEDULE_CASES)
def test_schedule_matches_reference(prompt, steps, expected):
    assert prompt_schedule(prompt, steps) == expected


@pytest.mark.parametrize("prompt, steps, hires, expected", HIRES_CASES)
def test_hires_schedule_matches_reference(prompt, steps, hires, expected):
    assert prompt_schedule(prompt, steps, hires_steps=hires) == expected


@pytest.mark.parametrize("prompt, steps, expected", OLD_SCHEDULING_CASES)
def test_old_scheduling_matches_reference(prompt, steps, expected):
    assert prompt_schedule(prompt, steps, use_old_scheduling=True) == expected


def test_schedule_step_by_step():
    # A fraction is a share of the steps, an integer a step number, one at or past the end never switches.
    assert prompt_schedule("[a:b:0.25]", 8) == [(2, "a"), (8, "b")]
    assert prompt_schedule("[a:b:2]", 8) == [(2, "a"), (8, "b")]
    assert prompt_schedule("[a:b:8]", 8) == [(8, "a")]
    assert prompt_schedule("[a:b:12]", 8) == [(8, "a")]
    assert prompt_schedule("[a:b:0.99]", 8) == [(7, "a"), (8, "b")]  # int() truncates
    assert prompt_schedule("x [a:b:2] [c|d] y", 3) == [(1, "x a c y"), (2, "x a d y"), (3, "x b c y")]


def test_schedule_ambiguous_in_a1111_reads_the_structure():
    # A1111's lark parse of these depends on the process's hash seed (either reading occurs); kuas
    # always takes the prompt-editing reading, which is one of them.
    assert prompt_schedule("[a:3](", 10) == [(3, "("), (10, "a(")]
    assert prompt_schedule("x [a:3]:y", 10) == [(3, "x :y"), (10, "x a:y")]


def test_schedule_fallbacks_never_raise():
    # A1111 raises OverflowError on these step numbers.
    assert prompt_schedule("[a:b:1e400]", 10) == [(10, "a")]
    assert prompt_schedule("[a:b:-1e400]", 10) == [(10, "b")]
    assert prompt_schedule("[a:b:1.5e400]", 10) == [(10, "a")]
    parsed = parse_prompt("[a:b:1e400]", 10)
    assert any("overflow" in note for note in parsed.notes)
    # The grammar rejects these: the whole prompt stays literal (so [c:2] is not edited either).
    for prompt in ["a | b [c:2]", "a [c:2] \\", "(a|b) [c:2]", "[a:b|c:2] [c:2]", "a\\\n[c:2]"]:
        assert prompt_schedule(prompt, 10) == [(10, prompt)]
        assert any("prompt editing ignored" in note for note in parse_prompt(prompt, 10).notes)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", None, True])
def test_schedule_rejects_bad_steps(bad):
    with pytest.raises(InvalidInputError, match="steps"):
        prompt_schedule("a", bad)
    with pytest.raises(InvalidInputError, match="steps"):
        parse_prompt("a", bad)


# ------------------------------------------------------------------------------------------------
# AND and extra networks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, expected", AND_CASES)
def test_split_and_matches_reference(prompt, expected):
    assert split_and(prompt) == expected


def test_split_and_brief_example_and_overflowing_weight():
    assert split_and("a cat :1.2 AND a dog :0.8") == [("a cat", 1.2), (" a dog", 0.8)]
    assert split_and("a :" + "9" * 400) == [("a", math.inf)]  # the reference's value
    parsed = parse_prompt("a :" + "9" * 400 + " AND b", 4)
    assert parsed.parts[0].weight == 1.0 and parsed.parts[0].text == "a :" + "9" * 400
    assert any("AND weight" in note for note in parsed.notes)


@pytest.mark.parametrize("prompt, text, items", EXTRA_NETWORK_TEXT_CASES)
def test_extra_network_tags_removed_like_reference(prompt, text, items):
    got_text, requests = extract_extra_networks(prompt)
    assert got_text == text
    # Every tag is returned with the reference's items, except those whose multiplier is not a number,
    # which are dropped with a note.
    notes = parse_prompt(prompt, 3).notes
    for kind, reference_items in items.items():
        got = [list(r.items) for r in requests if r.kind == kind]
        dropped = [i for i in reference_items if i not in got]
        assert got == [i for i in reference_items if i in got]
        assert len([n for n in notes if n.startswith(f"extra network tag <{kind}:")]) == len(dropped)
    assert {r.kind for r in requests} <= set(items)


def test_extra_network_multipliers():
    text, requests = extract_extra_networks(
        "x <lora:a:0.5> <lora:b:0.5:0.25:8> <lora:c:te=0.1:unet=0.2:dyn=4> <lora:d:1:unet=3> <lora:e> "
        "<hypernet:h:0.7> <lyco:l:2> <custom:k:v=1:0.3>"
    )
    assert text == "x        "
    fields = [(r.kind, r.name, r.te_multiplier, r.unet_multiplier, r.dyn_dim) for r in requests]
    assert fields == [
        ("lora", "a", 0.5, 0.5, None),
        ("lora", "b", 0.5, 0.25, 8),
        ("lora", "c", 0.1, 0.2, 4),
        ("lora", "d", 1.0, 3.0, None),
        ("lora", "e", 1.0, 1.0, None),
        ("hypernet", "h", 0.7, 0.7, None),
        ("lyco", "l", 2.0, 2.0, None),
        ("custom", "k", 0.3, 0.3, None),
    ]
    assert requests[2].named == (("te", "0.1"), ("unet", "0.2"), ("dyn", "4"))
    assert requests[2].positional == ("c",) and requests[7].named_params == {"v": "1"}
    assert all(isinstance(r, ExtraNetworkRequest) for r in requests)
    with pytest.raises(dataclasses.FrozenInstanceError):
        requests[0].name = "other"


def test_extra_network_bad_multipliers_are_ignored_with_notes():
    prompt = (
        "<lora:ok:0.5> <lora:n:nan> <lora:i:inf> <lora:t:te=abc> <lora:d:1:1:1.5> <lora:only=1> <lora:../x:1>"
    )
    text, requests = extract_extra_networks(prompt)
    assert text == "      "
    assert [(r.name, r.te_multiplier) for r in requests] == [("ok", 0.5), ("../x", 1.0)]  # names are data
    notes = parse_prompt(prompt, 5).notes
    for name in ["<lora:n:nan>", "<lora:i:inf>", "<lora:t:te=abc>", "<lora:d:1:1:1.5>", "<lora:only=1>"]:
        assert any(name in note for note in notes), name


# ------------------------------------------------------------------------------------------------
# parse_prompt
# ------------------------------------------------------------------------------------------------


def test_parse_prompt_ties_the_stages_together():
    parsed = parse_prompt("a (cat:1.2) [on:under:0.5] <lora:style:0.6> sofa :1.5 AND [red|blue] sky", 4)
    assert [(r.kind, r.name, r.te_multiplier) for r in parsed.extra_networks] == [("lora", "style", 0.6)]
    first, second = parsed.parts
    assert (first.text, first.weight) == ("a (cat:1.2) [on:under:0.5]  sofa", 1.5)
    assert [(e.end_at_step, e.text) for e in first.schedule] == [
        (2, "a (cat:1.2) on  sofa"), (4, "a (cat:1.2) under  sofa"),
    ]
    assert first.schedule[0].attention == (("a ", 1.0), ("cat", 1.2), (" on  sofa", 1.0))
    assert second.weight == 1.0
    assert [e.text for e in second.schedule] == [" red sky", " blue sky", " red sky", " blue sky"]
    # A1111's sampler looks up the 0-based step: the first entry with step <= end_at_step.
    assert [first.at_step(s).text for s in range(4)] == [
        "a (cat:1.2) on  sofa", "a (cat:1.2) on  sofa", "a (cat:1.2) on  sofa", "a (cat:1.2) under  sofa",
    ]
    assert parsed.texts == [e.text for e in first.schedule] + [" red sky", " blue sky"]
    assert parsed.notes == ()


def test_parse_prompt_notes_for_fallbacks():
    def notes(prompt: str) -> str:
        return " | ".join(parse_prompt(prompt, 10).notes)

    assert "closed at the end" in notes("a (b [c")
    assert "without an opening one" in notes("a b) c]")
    assert "not valid prompt editing" in notes("[x:y] z")
    assert "not a weight" in notes("(g:abc)")
    assert "not numbers" in notes("(g:1.2.3)")
    assert parse_prompt("plain words, (fine:1.1) [a:b:2] [c|d] <lora:x:1>", 10).notes == ()


MALFORMED = [
    "", "(", ")", "[", "]", ":", "|", "\\", "(((", ")))", "[[[", "]]]", "(unbalanced", "unbalanced)",
    "(x:abc)", "(x:nan)", "(x:inf)", "(x:1e309)", "(x:-inf)", "(x:1.2.3)", "(x:.)", "(x:" + "9" * 400 + ")",
    "lone : colon", "[a:b:]", "[|]", "[:]", "[::]", "[a::]", "[:a:]", "[a:b:c:d]", "[a:b:1e999]",
    "a\x00b(\x00:1.2)[\x00:\x00:1]", "\ud800 lone \udfff surrogates (\ud800:1.1)", "AND", "AND AND :",
    "<lora:>", "<lora:x:1e999>", "<:>", "<lora:x:te=:unet=>", "<lora:x:1:1:" + "9" * 5000 + ">",
    "\\(\\)\\[\\]\\\\\\", "[a|[b|[c|", "[[[[a:1]:2]:3]:4]", "BREAK" * 3, "(BREAK:-1)",
    "\u2028\u00a0[\u3000a:2\u3000]",
]


@pytest.mark.parametrize("prompt", MALFORMED)
def test_malformed_prompts_never_raise(prompt):
    parsed = parse_prompt(prompt, 20)
    assert parsed.parts and all(part.schedule for part in parsed.parts)
    for part in parsed.parts:
        assert part.schedule[-1].end_at_step == 20
        for entry in part.schedule:
            assert all(math.isfinite(w) for _, w in entry.attention)
    parse_prompt(prompt, 7, hires_steps=3)
    parse_prompt(prompt, 7, use_old_scheduling=True)


def _timed(prompt: str, steps: int = 20):
    start = time.perf_counter()
    parsed = parse_prompt(prompt, steps)
    return time.perf_counter() - start, parsed


def test_one_megabyte_prompts_parse_in_bounded_time():
    mb = 1 << 20
    rng = random.Random(0)
    words = ["a", "cat", "(dog:1.2)", "[sky]", "[x:y:0.5]", "BREAK", "AND", "<lora:z:0.5>", ","]
    words += ["\\(", "(", ")", "[", "]", ":", "\n"]
    prompts = {
        "plain": "a photo of a cat, " * (mb // 18),
        "mixed": " ".join(rng.choice(words) for _ in range(mb // 5))[:mb],
        "open square": "[" * mb,
        "open square colon": "[:" * (mb // 2),
        "close round": ")" * mb,
        "pipes": "[a|" * (mb // 3),
        "backslashes": "\\" * mb,
        "spaces then x": " " * mb + "x",
        "digits then x": "1" * mb + "x",
        "tag starts": "<a:" * (mb // 3),
        "open round text": "(x" * (mb // 2),
        "emphasis pairs": "(a)" * (mb // 3),
        "and": "a AND " * (mb // 6),
    }
    for name, prompt in prompts.items():
        seconds, parsed = _timed(prompt)
        assert seconds < 4, (name, seconds)
        assert parsed.parts[0].schedule
    assert _timed("plain " * (mb // 6))[0] < 1


def test_ten_thousand_nested_brackets():
    cases = {
        "round": "(" * 10000 + "x" + ")" * 10000,
        "square": "[" * 10000 + "x" + "]" * 10000,
        "editing": "[" * 10000 + "x" + ":1]" * 10000,
        "editing from": "[a:" * 10000 + "b:1]" * 10000,
        "alternation": "[a|" * 10000 + "b]" * 10000,
        "mismatched": "[(" * 5000 + "x" + "])" * 5000,
        "unclosed": "[(" * 10000,
    }
    for name, prompt in cases.items():
        seconds, _ = _timed(prompt)
        assert seconds < 4, (name, seconds)
    assert prompt_schedule(cases["editing"], 4) == [(1, ""), (4, "x")]
    assert prompt_schedule(cases["editing from"], 4) == [(1, "a"), (4, "b" * 10000)]
    assert prompt_schedule(cases["alternation"], 3) == [(1, "a"), (2, "b" * 10000), (3, "a")]
    assert prompt_schedule(cases["mismatched"], 4) == [(4, cases["mismatched"])]
    assert parse_prompt_attention(cases["square"]) == [("x", pytest.approx(1.1**-10000, abs=1e-300))]


SPECIALS = list("()[]:|\\<>= .,1e-+") + ["BREAK", "AND", "a", "b", ":1.5)", "\n", "\x00", "\ud800"]
SPECIALS.append("<lora:x:0.5>")


def test_property_random_special_strings():
    rng = random.Random(1234)
    for _ in range(1500):
        text = "".join(rng.choice(SPECIALS) for _ in range(rng.randint(0, 30)))
        pieces = parse_prompt_attention(text)
        joined = "".join(piece for piece, _ in pieces)
        assert pieces and set(joined) <= set(text) and len(joined) <= len(text), text
        assert all(math.isfinite(weight) for _, weight in pieces)
        assert all(a[1] != b[1] for a, b in itertools.pairwise(pieces))  # equal neighbours are merged
        if not any(c in text for c in "()[]\\") and "BREAK" not in text:
            assert pieces == [(text, 1.0)]
        schedule = prompt_schedule(text, 4)
        assert schedule[-1][0] == 4 and all(set(t) <= set(text) for _, t in schedule)
        assert [s for s, _ in schedule] == sorted({s for s, _ in schedule})
        parse_prompt(text, 4)


# ------------------------------------------------------------------------------------------------
# Textual-inversion embeddings
# ------------------------------------------------------------------------------------------------


class _WordTokenizer:
    """A fake tokenizer: one id per lower-cased whitespace-separated word, "-" splits words too."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        words = text.lower().replace("-", " - ").split()
        return [self.vocab.setdefault(word, len(self.vocab) + 1) for word in words]


def test_registry_longest_match_first_and_ties():
    tok = _WordTokenizer()
    registry = EmbeddingRegistry()
    style = registry.add("my style", torch.ones(2, 8))
    my = registry.add("my", torch.zeros(1, 8))
    longer = registry.add("my style plus", torch.full((3, 8), 2.0))
    tie_first = registry.add("Cat", torch.full((1, 8), 5.0))
    registry.add("cat", torch.full((1, 8), 6.0))  # same ids as "Cat": the first added wins
    ids = tok.encode("a my style plus and my style and my cat and my-style")
    matches = registry.find_in_tokens(ids, tok)
    assert [(m.position, m.length, m.embedding) for m in matches] == [
        (1, 3, longer), (5, 2, style), (8, 1, my), (9, 1, tie_first), (11, 1, my),
    ]
    assert [m.embedding.n_vectors for m in matches] == [3, 2, 1, 1, 1]
    index = registry.token_index(tok)
    assert index.match_at(ids, 0) is None and index.match_at(ids, 2) is None
    assert index.match_at(ids, 1).embedding is longer
    # Replacing a name replaces its vectors; removing forgets it.
    registry.add("my", torch.full((4, 8), 9.0))
    assert registry.find_in_tokens(tok.encode("my"), tok)[0].embedding.n_vectors == 4
    registry.remove("my")
    assert "my" not in registry and registry.find_in_tokens(tok.encode("my"), tok) == []
    assert len(registry) == 4 and sorted(registry) == ["Cat", "cat", "my style", "my style plus"]


def test_registry_sdxl_vectors_and_validation():
    registry = EmbeddingRegistry()
    both = registry.add("xl", {"clip_l": torch.zeros(2, 768), "clip_g": torch.ones(2, 1280)})
    assert both.n_vectors == 2 and both.vectors_for("clip_g").shape == (2, 1280)
    with pytest.raises(InvalidInputError, match="clip_l"):
        registry.add("only_g", {"clip_g": torch.ones(2, 1280)}).vectors_for("clip_l")
    with pytest.raises(TypeError):
        both.vectors["clip_l"] = torch.zeros(1, 768)  # read-only mapping
    bad = [
        ("", torch.zeros(1, 4), "name"),
        ("x", torch.zeros(4), "shape"),
        ("x", torch.zeros(0, 4), "shape"),
        ("x", torch.zeros(1, 4, dtype=torch.long), "dtype"),
        ("x", torch.tensor([[1.0, float("nan")]]), "inf or nan"),
        ("x", {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, "vector counts"),
        ("x", {"t5": torch.zeros(2, 4)}, "SDXL"),
        ("x", [[1.0]], "Tensor"),
    ]
    for name, vectors, message in bad:
        with pytest.raises(InvalidInputError, match=message):
            registry.add(name, vectors)


def test_registry_with_the_clip_tokenizer():
    from kuas.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer.default()
    registry = EmbeddingRegistry()
    easy = registry.add("EasyNegative", torch.zeros(8, 768))
    style = registry.add("my-style-v2", torch.zeros(3, 768))
    assert len(tok.encode("my-style-v2")) > 1  # several BPE tokens: matched as a sequence
    ids = tok.encode("a photo, easynegative, my-style-v2 and my-style")
    matches = registry.find_in_tokens(ids, tok)
    assert [m.embedding for m in matches] == [easy, style]
    found = matches[1]
    assert ids[found.position:found.position + found.length] == tok.encode("my-style-v2")
