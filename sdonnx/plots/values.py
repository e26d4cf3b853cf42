"""A1111's X/Y/Z axis value syntax: comma lists with CSV quoting, and number ranges.

- ``a, b, "c, d"``: values separated by commas; a value holding a comma is double-quoted (CSV). Several lines
  are read one after the other, as A1111 reads the text box.
- ``1-5``: every whole number from 1 to 5; ``1-5 (+2)``: 1, 3, 5; ``10-30 [3]``: 3 values evenly spaced from
  10 to 30 (whole-number axes truncate them, as A1111's int()); ``0.5-1.5 (+0.25)`` and ``4-8 [5]`` on decimal
  axes. Ranges and single values mix: ``1-3, 10``.
- sdonnx extensions: ``8-32 (*2)`` multiplies (8, 16, 32); a range written high to low without a step counts
  down (``5-1``: 5, 4, 3, 2, 1; A1111 gives nothing); ``(2)`` reads as ``(+2)``.

Every count is known before a value is made, so ``1-1000000000`` is refused by the cell limit instead of
filling memory.
"""
import csv
import io
import math
import re

from .. import limits

_NUMBER = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
_RANGE = re.compile(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})\s*"
                    rf"(?:\(\s*([+\-*]?)\s*(\d+(?:\.\d*)?|\.\d+)\s*\)|\[\s*(\d+)\s*\])?\s*")


def split_values(text):
    """``'a, "b, c" , d'`` -> ['a', 'b, c', 'd'] (CSV, A1111's csv_string_to_list_strip); lines run on."""
    try:
        rows = list(csv.reader(io.StringIO(text), skipinitialspace=True))
    except csv.Error as e:
        raise ValueError(f"values {text!r} are not a comma-separated list: {e}") from None
    return [value.strip() for row in rows for value in row]


def expand_numbers(values, kind, what, most=limits.MAX_PLOT_CELLS):
    """Number axis values with their ranges expanded -> [int | float]; `what` names the axis in errors."""
    out = []
    for value in values:
        match = _RANGE.fullmatch(value)
        numbers = _expand(match, kind, value, what, most - len(out)) if match else [_number(value, kind, what)]
        out += numbers
    return out


def _number(text, kind, what):
    try:
        value = kind(text.replace(" ", ""))
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise ValueError(f"{what}: {text!r} is not {noun} or a range like 1-5, 1-5 (+2) or 1-10 [5]") from None
    if not math.isfinite(value):
        raise ValueError(f"{what}: {text!r} is not a finite number")
    return value


def _expand(match, kind, text, what, room):
    start, end = (_number(match.group(i), kind, what) for i in (1, 2))
    sign, step, count = match.group(3), match.group(4), match.group(5)
    if count is not None:
        return _spaced(start, end, int(count), kind, text, what, room)
    if sign == "*":
        return _multiplied(start, end, float(step), kind, text, what, room)
    step = float(step) if step is not None else (1.0 if end >= start else -1.0)
    return _stepped(start, end, -step if sign == "-" else step, kind, text, what, room)


def _check_count(n, text, what, room):
    if n > room:
        raise limits.LimitError(f"{what}: {text!r} makes {n} values, over the limit of {limits.MAX_PLOT_CELLS} "
                                f"cells of one plot")


def _spaced(start, end, count, kind, text, what, room):
    """A1111's ``[N]``: numpy.linspace(start, end, N), truncated to whole numbers on whole-number axes."""
    import numpy as np

    _check_count(count, text, what, room)
    return [_typed(v, kind) for v in np.linspace(start, end, count).tolist()]


def _stepped(start, end, step, kind, text, what, room):
    if kind is int and step != int(step):
        raise ValueError(f"{what}: {text!r}: a whole-number axis needs a whole step")
    if step == 0 or (end - start) * step < 0:
        raise ValueError(f"{what}: {text!r}: a step of {step:+g} never goes from {start} to {end}")
    # a hair of slack so 0.1-0.3 (+0.1) reaches 0.3 despite binary fractions
    n = math.floor((end - start) / step + 1e-9) + 1
    _check_count(n, text, what, room)
    return [_typed(start + i * step, kind) for i in range(n)]


def _multiplied(start, end, factor, kind, text, what, room):
    up = end >= start
    if start == 0 or (factor <= 1 if up else not 0 < factor < 1) or start * end <= 0:
        raise ValueError(f"{what}: {text!r}: multiplying {start} by {factor:g} never reaches {end}")
    n = math.floor(math.log(end / start) / math.log(factor) + 1e-9) + 1
    _check_count(n, text, what, room)
    return [_typed(start * factor ** i, kind) for i in range(n)]


def _typed(value, kind):
    return int(value) if kind is int else round(float(value), 10)
