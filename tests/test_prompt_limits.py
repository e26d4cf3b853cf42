"""The prompt parsers on hostile input: linear time on any text, clear errors past the length and nesting
limits, and A1111's results unchanged (checked against the slow reference parser on random prompts).

Times are bounded with SIGALRM: before issue 16 a prompt of 16 unbalanced `[` kept the parser busy for
minutes, and a run of whitespace took time quadratic in its length in the AND splitter."""
import random
import re
import signal
import tracemalloc
from contextlib import contextmanager

import pytest

import prompt_reference
from sdonnx.limits import MAX_PROMPT_CHARS, MAX_PROMPT_NESTING
from sdonnx.prompt import extract_networks, parse_attention, schedule, split_and
from sdonnx.prompt.checks import PromptError


class Overtime(Exception):
    pass


@contextmanager
def deadline(seconds):
    """Raises Overtime in the block once `seconds` of wall time have passed (the parsers are pure Python)."""
    def expire(*_):
        raise Overtime(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def parse_all(text, steps=20):
    """Every parser a prompt goes through, in the pipeline's order."""
    text, _ = extract_networks(text)
    for part, _ in split_and(text):
        for _, scheduled in schedule(part, steps):
            parse_attention(scheduled)


# ------------------------------------------------------------------ unbalanced brackets are literal text

@pytest.mark.parametrize("text, expected", [
    # each checked against A1111's lark grammar (Earley); the first two froze the old parser for minutes
    ("[" * 16 + "a", [(10, "[" * 16 + "a")]),
    ("(" * 16 + "a", [(10, "(" * 16 + "a")]),
    ("[" * 8 + "a:1]", [(1, "[" * 7), (10, "[" * 7 + "a")]),
    ("a [b:3", [(10, "a [b:3")]),
    ("a [b|c", [(10, "a [b|c")]),
    ("a ]b[ c", [(10, "a ]b[ c")]),
    ("a [b:c:3", [(10, "a [b:c:3")]),
    ("[a:b:c:3]", [(10, "[a:b:c:3]")]),
    ("a [b [c [d", [(10, "a [b [c [d")]),
    ("[[[a]]", [(10, "[[[a]]")]),
    ("((a:3)", [(10, "((a:3)")]),
    ("(a [b:2) c]", [(10, "(a [b:2) c]")]),
    ("[a|b:3]", [(10, "[a|b:3]")]),
    ("[a|[b|c]", [(10, "[a|[b|c]")]),
    ("[a:b:3]]", [(3, "a]"), (10, "b]")]),
    ("[[a:b:3]", [(3, "[a"), (10, "[b")]),
    ("[a:[b:2]", [(2, "[a:"), (10, "[a:b")]),
    ("[a:b:2] ((c", [(2, "a ((c"), (10, "b ((c")]),
    ("] [a:2] [", [(2, "]  ["), (10, "] a [")]),
    ("x [a|b] [c", [(i, f"x {'a' if i % 2 else 'b'} [c") for i in range(1, 11)]),
])
def test_unbalanced_brackets_are_literal_text(text, expected):
    with deadline(2):
        assert schedule(text, 10) == expected


# ------------------------------------------------------------------ limits

def test_deep_nesting_is_a_clear_error_in_every_parser():
    text = "(" * 400 + "a" + ")" * 400  # a RecursionError in the schedule parser before the limit
    for parse in (schedule, parse_attention, split_and, extract_networks):
        with pytest.raises(PromptError, match=f"nest 400 deep .*at most {MAX_PROMPT_NESTING}"):
            parse(text, 20) if parse is schedule else parse(text)
    ok = "(" * MAX_PROMPT_NESTING + "a" + ")" * MAX_PROMPT_NESTING
    assert parse_attention(ok) == [("a", pytest.approx(1.1 ** MAX_PROMPT_NESTING))]
    # escaped brackets are text, and closers with nothing open do not lower the count below zero
    assert schedule("\\(" * 400 + "a", 20) == [(20, "\\(" * 400 + "a")]
    with pytest.raises(PromptError, match=f"nest {MAX_PROMPT_NESTING + 1} deep"):
        parse_attention(")" * 100 + "[" * (MAX_PROMPT_NESTING + 1))


def test_overlong_prompt_is_a_clear_error_before_any_work():
    text = "a, " * 400_000  # 1.2M characters: 23 s and 4.7 GB before the limit
    tracemalloc.start()
    for parse in (extract_networks, split_and, parse_attention):
        with pytest.raises(PromptError, match=f"{len(text)} characters long; at most {MAX_PROMPT_CHARS}"):
            parse(text)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < len(text)  # refused before any copy or split of the text (4.7 GB before the limit)
    parse_all("a" * MAX_PROMPT_CHARS)  # the limit itself is allowed


# ------------------------------------------------------------------ fuzz

PIECES = ["[", "]", "(", ")", ":", "|", "\\", "a", "b", " ", "1", "2", ".", "5", "0.5", "3", " AND ", "BREAK",
          "<lora:x:1>", "<", ">", "\n"]
BALANCED = [8, 8, 5, 5, 6, 2, 1, 4, 3, 4, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
OPENERS = [8, 1, 3, 1, 2, 1, 1, 4, 3, 4, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # mostly unclosed brackets


def _random_prompts(seed, count, max_pieces, weights=BALANCED):
    rng = random.Random(seed)
    return ["".join(rng.choices(PIECES, weights, k=rng.randint(0, max_pieces))) for _ in range(count)]


def test_fuzz_every_random_prompt_parses_in_bounded_time():
    """2000 random prompts, half bracket-heavy of up to 400 pieces (about 1500 characters), half mostly
    unclosed brackets (a quarter of them 16 to 32 deep, which froze the old parser): each through every
    parser within 2 s (about 5 ms here). The only errors allowed are clear ones: nesting past the limit,
    or an emphasis weight that is not a number, like `(a:.)`."""
    refused = 0
    prompts = _random_prompts(16, 1000, 400) + _random_prompts(17, 1000, 100, OPENERS)
    for text in prompts:
        with deadline(2):
            try:
                parse_all(text)
            except ValueError as e:
                assert isinstance(e, PromptError) or str(e).startswith("emphasis weight"), e
                refused += 1
    assert refused < 1000  # most are parsed, not refused


_OLD_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")  # before issue 16
_OLD_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _old_split_and(text):
    parts = []
    for part in re.split(r"\bAND\b", text):
        m = _OLD_WEIGHT.search(part)
        parts.append((m.group(1), float(m.group(2)) if m.group(2) is not None else 1.0))
    return parts


def test_fuzz_results_equal_the_slow_reference():
    """Short random prompts (at most 10 brackets, where the exponential reference still finishes): the
    schedule equals the old backtracking parser's, AND splitting and BREAK splitting the old patterns'."""
    from sdonnx.prompt.attention import _split_break

    checked = 0
    for text in _random_prompts(1111, 4000, 14):
        if text.count("[") + text.count("(") > 10:
            continue
        checked += 1
        for steps in (1, 10):
            assert schedule(text, steps) == prompt_reference.schedule(text, steps), text
        assert schedule(text, 10, first_pass_steps=7) == prompt_reference.schedule(text, 10, first_pass_steps=7)
        assert split_and(text) == _old_split_and(text), text
        assert _split_break(text) == _OLD_BREAK.split(text), text
    assert checked > 3000


@pytest.mark.parametrize("name, text", [
    ("unbalanced [", "[" * 30 + "a" * (MAX_PROMPT_CHARS - 30)),
    ("open edits", "[a:" * 30 + "b" * (MAX_PROMPT_CHARS - 90)),
    ("emphasis after an open edit", "[x:" + "(a)" * ((MAX_PROMPT_CHARS - 3) // 3)),
    ("alternations", ("[a|" * 10 + "]" * 10) * (MAX_PROMPT_CHARS // 40)),
    ("edits", "[a:b:3]" * (MAX_PROMPT_CHARS // 7)),
    ("colons", ":" * MAX_PROMPT_CHARS),
    ("whitespace", "a :" + " " * (MAX_PROMPT_CHARS - 10) + "1.5"),
    ("whitespace before BREAK", " " * (MAX_PROMPT_CHARS - 6) + "BREAK"),
    ("unclosed tags", "<a:" * (MAX_PROMPT_CHARS // 3)),
    ("nested groups", ("[" * 16 + "x" + "]:" * 16) * (MAX_PROMPT_CHARS // 49)),
])
def test_worst_cases_at_the_length_limit_stay_fast(name, text):
    """Inputs built to hit each parser's slow path, at the length limit: under 5 s each (about 0.3 s here)."""
    with deadline(5):
        parse_all(text, steps=30)
