"""A1111 prompt editing `[from:to:when]` and alternation `[a|b]` -> per-step prompt texts.

A recursive-descent parser for A1111's grammar. Nested constructs may not contain stray brackets; at
the top level a bracket that opens no construct is literal text. A `|` outside an alternation (or a
trailing backslash) makes the whole prompt literal, as in A1111.

Every construct is parsed at most once per position (memoised): a `[` that opens no edit is tried as
an alternation and then as emphasis, and without the memo each try re-parsed the rest of the prompt,
about 3^n work for n unbalanced `[`. With it the parse takes time linear in the prompt's length and
recursion as deep as its brackets nest, both bounded by `check_prompt`.
"""
import re
from dataclasses import dataclass

from .checks import check_prompt

_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))\s*\]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_LITERAL = "[]():"


@dataclass(frozen=True)
class _Edit:  # [before:after:when]
    before: list
    after: list
    when: str


@dataclass(frozen=True)
class _Alternate:  # [a|b|...]
    options: list


@dataclass(frozen=True)
class _Group:  # emphasis `(inner)`, `(inner:weight)`, `[inner]`: kept verbatim, constructs inside work
    opener: str
    inner: list
    weight: list  # None without `:weight`
    closer: str


class _Literal(Exception):
    """The prompt does not parse: it is used as written."""


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
        tree = _Parser(check_prompt(text)).top()
    except _Literal:
        return [(steps, text)]
    ends = {steps}
    if _collect(tree, timeline, ends):
        ends.update(range(1, steps + 1))
    return [(end, _render(tree, end, timeline)) for end in sorted(ends)]


def _when(edit, timeline):
    value = float(edit.when)
    if "." in edit.when:
        value = (value - timeline.fraction_offset) * timeline.steps
    else:
        value -= timeline.offset
    return min(timeline.steps, int(value))


def _collect(nodes, timeline, ends):
    """Adds the edits' switch steps to `ends`; True when an alternation (which switches every step) is met."""
    alternates = False
    for node in nodes:
        if isinstance(node, _Edit):
            when = _when(node, timeline)
            if when >= 1:
                ends.add(when)
            alternates |= _collect(node.before, timeline, ends) | _collect(node.after, timeline, ends)
        elif isinstance(node, _Alternate):
            alternates = True
            for option in node.options:
                _collect(option, timeline, ends)
        elif isinstance(node, _Group):
            alternates |= _collect(node.inner, timeline, ends) | _collect(node.weight or [], timeline, ends)
    return alternates


def _render(nodes, step, timeline):
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Edit):
            parts.append(_render(node.before if step <= _when(node, timeline) else node.after, step, timeline))
        elif isinstance(node, _Alternate):
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, timeline))
        else:
            weight = "" if node.weight is None else ":" + _render(node.weight, step, timeline)
            parts += [node.opener, _render(node.inner, step, timeline), weight, node.closer]
    return "".join(parts)


class _Parser:
    """One prompt's parse. `run(pos)` and `construct(pos)` are deterministic functions of the position,
    so their results are kept: each is computed once, and the runs nest or are disjoint, which keeps the
    total work linear."""

    def __init__(self, text):
        self.text = text
        self._runs, self._constructs = {}, {}  # position -> (nodes, end); position -> (node, end) or None

    def top(self):
        text, nodes, pos = self.text, [], 0
        while pos < len(text):
            items, end = self._run(pos, top=True)
            if end == pos:
                if text[pos] not in _LITERAL:
                    raise _Literal
                items, end = [text[pos]], pos + 1
            nodes += items
            pos = end
        return nodes

    def run(self, pos):
        """A run of plain text and constructs starting at pos -> (nodes, end); stops before anything else."""
        if pos not in self._runs:
            self._runs[pos] = self._run(pos)
        return self._runs[pos]

    def _run(self, pos, top=False):
        """At the top level, an edit directly followed by two bracket/colon characters is read as literal
        text: that is the derivation A1111's parser (lark Earley, ambiguity resolved) picks there."""
        text, nodes = self.text, []
        while pos < len(text):
            m = _PLAIN.match(text, pos)
            if m:
                nodes.append(m.group(0))
                pos = m.end()
                continue
            parsed = self.construct(pos)
            if parsed is None or top and isinstance(parsed[0], _Edit) and _literal_run(text, parsed[1]):
                break
            node, pos = parsed
            nodes.append(node)
        return nodes, pos

    def construct(self, pos):
        """The construct opening at pos -> (node, end), or None: `[` is an edit, else an alternation, else
        emphasis; `(` is emphasis."""
        if pos not in self._constructs:
            char = self.text[pos]
            parsed = None
            if char == "[":
                parsed = self._edit(pos) or self._alternate(pos) or self._group(pos)
            elif char == "(":
                parsed = self._group(pos)
            self._constructs[pos] = parsed
        return self._constructs[pos]

    def _at(self, pos, char):
        return pos < len(self.text) and self.text[pos] == char

    def _edit(self, pos):
        first, pos = self.run(pos + 1)
        if not self._at(pos, ":"):
            return None
        m = _NUMBER.match(self.text, pos + 1)
        if m:  # [to:when]
            return _Edit([], first, m.group(1)), m.end()
        second, pos = self.run(pos + 1)
        if not self._at(pos, ":"):
            return None
        m = _NUMBER.match(self.text, pos + 1)
        return (_Edit(first, second, m.group(1)), m.end()) if m else None

    def _alternate(self, pos):
        option, pos = self.run(pos + 1)
        options = [option]
        while self._at(pos, "|"):
            option, pos = self.run(pos + 1)
            options.append(option)
        if len(options) < 2 or not self._at(pos, "]"):
            return None
        return _Alternate(options), pos + 1

    def _group(self, pos):
        opener = self.text[pos]
        closer = ")" if opener == "(" else "]"
        inner, end = self.run(pos + 1)
        weight = None
        if closer == ")" and self._at(end, ":"):
            weight, end = self.run(end + 1)
        if not self._at(end, closer):
            return None
        return _Group(opener, inner, weight, closer), end + 1


def _literal_run(text, pos):
    return len(text) >= pos + 2 and text[pos] in _LITERAL and text[pos + 1] in _LITERAL
