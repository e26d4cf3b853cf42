"""`AND` composition and extra-network tags (`<lora:name:w>`), as A1111 splits them off the prompt."""
import re
from dataclasses import dataclass

from .. import limits
from .checks import check_prompt

_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*")  # what follows a sub-prompt's last colon
_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetwork:
    """`<kind:name:arg:...>`: kind "lora", "hypernet", ...; args the remaining ':'-separated strings."""
    kind: str
    name: str
    args: tuple = ()


def split_and(text):
    """`a AND b :1.2` -> [("a", 1.0), ("b", 1.2)]: sub-prompts of composable diffusion with weights."""
    return [_weighted(part) for part in _AND.split(check_prompt(text))]


def _weighted(part):
    """`text :1.2` -> ("text", 1.2); without a weight after the last colon, (text, 1.0). Trailing
    whitespace goes, as A1111's pattern takes it. Found from the last colon: a pattern anchored at both
    ends took time quadratic in a run of whitespace."""
    colon = part.rfind(":")
    m = _WEIGHT.fullmatch(part, colon + 1) if colon >= 0 else None
    if m:
        return part[:colon].rstrip(), limits.finite("AND weight", float(m.group(1)))
    return part.rstrip(), 1.0


def extract_networks(text):
    """Prompt -> (text without `<kind:name:args>` tags, [ExtraNetwork]) in order of appearance."""
    found = []

    def take(m):
        name, *args = m.group(2).split(":")
        found.append(ExtraNetwork(m.group(1), name, tuple(args)))
        return ""

    # a tag ends at the first `>` after its colon: none starts after the last `>`, and leaving that tail
    # out of the search keeps it linear (each `<` there would scan to the end of the prompt)
    cut = check_prompt(text).rfind(">") + 1
    return _NETWORK.sub(take, text[:cut]) + text[cut:], found
