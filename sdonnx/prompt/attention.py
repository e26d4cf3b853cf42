"""A1111 emphasis syntax: `(x)` x1.1, `[x]` /1.1, `(x:w)`, escapes, BREAK -> [(text, weight)]."""
import re

from .. import limits
from .checks import check_prompt

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = ("BREAK", -1)

# one token per match: escapes, openers, an explicit weight closing a round bracket, closers, text, a lone colon
_TOKEN = re.compile(r"""
    \\[()\[\]\\] | \\ | \( | \[ | :\s*(?P<weight>[+-]?[.\d]+)\s*\) | \) | \] | [^\\()\[\]:]+ | :
""", re.X)
_BREAK = re.compile(r"\bBREAK\b")


def parse_attention(text):
    """Prompt text -> [(text, weight)] with A1111's semantics; `BREAK` appears as ("BREAK", -1).

    Unbalanced openers apply their multiplier to the rest of the text; unmatched closers are literal;
    runs of equal weight are merged. Time is linear in the length times the nesting, both bounded by
    `check_prompt`.
    """
    out = []  # [text, weight] pairs, mutated as brackets close
    rounds, squares = [], []

    def scale(start, factor):
        for pair in out[start:]:
            pair[1] *= factor

    for m in _TOKEN.finditer(check_prompt(text)):
        piece, weight = m.group(0), m.group("weight")
        if piece.startswith("\\"):
            out.append([piece[1:], 1.0])
        elif piece == "(":
            rounds.append(len(out))
        elif piece == "[":
            squares.append(len(out))
        elif weight is not None and rounds:
            scale(rounds.pop(), _weight(weight))
        elif piece == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif piece == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:
            for i, part in enumerate(_split_break(piece)):
                if i:
                    out.append(list(BREAK))
                out.append([part, 1.0])
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    if not out:
        out = [["", 1.0]]
    merged = [out[0]]
    for pair in out[1:]:
        if pair[1] == merged[-1][1]:
            merged[-1][0] += pair[0]
        else:
            merged.append(pair)
    return [(t, w) for t, w in merged]


def _split_break(text):
    """`a BREAK b` -> ["a", "b"]: split at each word BREAK with the whitespace around it. Whitespace is
    taken by hand from each BREAK outwards: a pattern with a leading `\\s*` retried at every position of a
    whitespace run, quadratic in its length."""
    parts, pos = [], 0
    for m in _BREAK.finditer(text):
        start, end = m.start(), m.end()
        while start > pos and text[start - 1].isspace():
            start -= 1
        while end < len(text) and text[end].isspace():
            end += 1
        parts.append(text[pos:start])
        pos = end
    return parts + [text[pos:]]


def _weight(text):
    try:
        return limits.finite("emphasis weight", float(text))
    except ValueError:
        raise ValueError(f"emphasis weight {text!r} is not a finite number; write it like (word:1.2)") from None
