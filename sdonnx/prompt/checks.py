"""The prompt limits every parser checks first: a prompt's length and how deep its brackets nest.

They bound the work the parsers do (each runs in time linear in the length, with recursion as deep as
the nesting), so a hostile prompt gets a clear error instead of a frozen worker or a RecursionError."""
from ..limits import MAX_PROMPT_CHARS, MAX_PROMPT_NESTING


class PromptError(ValueError):
    """A prompt beyond the limits."""


def check_prompt(text):
    """Raises PromptError when `text` is longer than MAX_PROMPT_CHARS or its brackets nest deeper than
    MAX_PROMPT_NESTING; returns the text."""
    if not isinstance(text, str):
        raise PromptError(f"a prompt must be text, not {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"the prompt is {len(text)} characters long; at most {MAX_PROMPT_CHARS} are allowed")
    depth, where = nesting(text)
    if depth > MAX_PROMPT_NESTING:
        raise PromptError(f"the prompt's brackets nest {depth} deep (at character {where + 1}); at most "
                          f"{MAX_PROMPT_NESTING} may be open at once: close them, or write \\( \\[ for literal ones")
    return text


def nesting(text):
    """(deepest count of open `(`/`[` brackets, index where it is first reached). Escaped brackets do not
    count; a closer with nothing open is literal text, as the parsers read it."""
    depth = deepest = 0
    where, escaped = -1, False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in "([":
            depth += 1
            if depth > deepest:
                deepest, where = depth, i
        elif char in ")]" and depth:
            depth -= 1
    return deepest, where
