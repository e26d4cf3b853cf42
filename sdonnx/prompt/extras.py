"""`AND` composition and extra-network tags (`<lora:name:w>`), as A1111 splits them off the prompt."""
import re
from dataclasses import dataclass

_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetwork:
    """`<kind:name:arg:...>`: kind "lora", "hypernet", ...; args the remaining ':'-separated strings."""
    kind: str
    name: str
    args: tuple = ()


def split_and(text):
    """`a AND b :1.2` -> [("a", 1.0), ("b", 1.2)]: sub-prompts of composable diffusion with weights."""
    out = []
    for part in _AND.split(text):
        m = _WEIGHT.search(part)
        out.append((m.group(1), float(m.group(2))) if m.group(2) is not None else (m.group(1), 1.0))
    return out


def extract_networks(text):
    """Prompt -> (text without `<kind:name:args>` tags, [ExtraNetwork]) in order of appearance."""
    found = []

    def take(m):
        name, *args = m.group(2).split(":")
        found.append(ExtraNetwork(m.group(1), name, tuple(args)))
        return ""

    return _NETWORK.sub(take, text), found
