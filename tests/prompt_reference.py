"""The slow reference for the prompt-editing parser: sdonnx.prompt.schedule as it was before issue 16,
a plain recursive descent that re-parses the rest of the prompt at every bracket (about 3^n time in n
unbalanced `[`). The examples in tests/test_prompt.py were checked against A1111's grammar with it; the
fast parser must agree with it on every prompt it can finish. Only tests import this."""
import re
from dataclasses import dataclass

_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_LITERAL = "[]():"


@dataclass
class _Edit:  # [before:after:when]
    before: list
    after: list
    when: str


@dataclass
class _Alternate:  # [a|b|...]
    options: list


class _Fail(Exception):
    pass


@dataclass(frozen=True)
class _Timeline:
    """How `when` maps onto this pass's steps: a step number counts from `offset`, a fraction from
    `fraction_offset` (A1111 >= 1.6: the hires pass goes on where the first pass ended)."""

    steps: int
    offset: int = 0
    fraction_offset: float = 0.0


def schedule(text, steps, first_pass_steps=None):
    """Prompt -> [(end_step, text)]: the text to use up to and including each end_step (1-based steps).

    `steps` are the model calls the pass makes as A1111 counts them (`SamplerInfo.total_steps`: twice
    the steps for second-order samplers). `when` with a decimal point is a fraction of them, otherwise a
    call number (A1111 >= 1.6). first_pass_steps: this is the hires pass of a job whose first pass took
    that many; `when` then continues the first pass's timeline: a number n means call n - first_pass_steps
    of this pass, a fraction f means (f - 1) of this pass (so 1.5 is half-way through it, and everything
    <= the first pass's end gives the `to` text throughout).
    """
    steps = int(steps)
    timeline = _Timeline(steps) if first_pass_steps is None else _Timeline(steps, int(first_pass_steps), 1.0)
    try:
        tree = _parse_top(text)
    except _Fail:
        return [(steps, text)]
    ends = {steps}
    _collect(tree, timeline, ends)
    return [(end, _render(tree, end, timeline)) for end in sorted(ends)]


def _when(edit, timeline):
    value = float(edit.when)
    if "." in edit.when:
        value = (value - timeline.fraction_offset) * timeline.steps
    else:
        value -= timeline.offset
    return min(timeline.steps, int(value))


def _collect(nodes, timeline, ends):
    for node in nodes:
        if isinstance(node, _Edit):
            when = _when(node, timeline)
            if when >= 1:
                ends.add(when)
            _collect(node.before, timeline, ends)
            _collect(node.after, timeline, ends)
        elif isinstance(node, _Alternate):
            ends.update(range(1, timeline.steps + 1))
            for option in node.options:
                _collect(option, timeline, ends)


def _render(nodes, step, timeline):
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Edit):
            parts.append(_render(node.before if step <= _when(node, timeline) else node.after, step, timeline))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, timeline))
    return "".join(parts)


def _parse_top(text):
    nodes, pos = [], 0
    while pos < len(text):
        items, end = _parse_prompt(text, pos, top=True)
        if end == pos:
            if text[pos] not in _LITERAL:
                raise _Fail
            items, end = [text[pos]], pos + 1
        nodes += items
        pos = end
    return nodes


def _parse_prompt(text, pos, top=False):
    """A run of plain text and constructs starting at pos -> (nodes, end). Stops before anything else.

    At the top level, an edit directly followed by two bracket/colon characters is read as literal
    text: that is the derivation A1111's parser (lark Earley, ambiguity resolved) picks there."""
    nodes = []
    while pos < len(text):
        m = _PLAIN.match(text, pos)
        if m:
            nodes.append(m.group(0))
            pos = m.end()
            continue
        parsed = None
        if text[pos] == "[":
            parsed = _try(_parse_edit, text, pos) or _try(_parse_alternate, text, pos) or _try(_parse_group, text, pos)
        elif text[pos] == "(":
            parsed = _try(_parse_group, text, pos)
        if parsed is None or top and isinstance(parsed[0], _Edit) and _literal_run(text, parsed[1]):
            break
        node, pos = parsed
        nodes += node if isinstance(node, list) else [node]
    return nodes, pos


def _literal_run(text, pos):
    return len(text) >= pos + 2 and text[pos] in _LITERAL and text[pos + 1] in _LITERAL


def _try(parser, text, pos):
    try:
        return parser(text, pos)
    except _Fail:
        return None


def _expect(text, pos, char):
    if pos >= len(text) or text[pos] != char:
        raise _Fail
    return pos + 1


def _parse_edit(text, pos):
    first, pos = _parse_prompt(text, pos + 1)
    pos = _expect(text, pos, ":")
    m = _NUMBER.match(text, pos)
    if m:  # [to:when]
        return _Edit([], first, m.group(1)), m.end()
    second, pos = _parse_prompt(text, pos)
    pos = _expect(text, pos, ":")
    m = _NUMBER.match(text, pos)
    if not m:
        raise _Fail
    return _Edit(first, second, m.group(1)), m.end()


def _parse_alternate(text, pos):
    option, pos = _parse_prompt(text, pos + 1)
    options = [option]
    while pos < len(text) and text[pos] == "|":
        option, pos = _parse_prompt(text, pos + 1)
        options.append(option)
    if len(options) < 2:
        raise _Fail
    return _Alternate(options), _expect(text, pos, "]")


def _parse_group(text, pos):
    """Emphasis brackets `( )`, `(a:b)`, `[ ]`: kept verbatim, their insides may hold constructs."""
    close = ")" if text[pos] == "(" else "]"
    inner, end = _parse_prompt(text, pos + 1)
    nodes = [text[pos], *inner]
    if close == ")" and end < len(text) and text[end] == ":":
        weight, end = _parse_prompt(text, end + 1)
        nodes += [":", *weight]
    end = _expect(text, end, close)
    return nodes + [close], end
