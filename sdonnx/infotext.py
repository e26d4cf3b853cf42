"""A1111 "parameters" text (infotext): write it, read it back, and the file hashes it cites.

Format (the PNG "parameters" chunk, EXIF UserComment in JPEG/WebP)::

    <prompt, may span lines>
    Negative prompt: <negative prompt>          (line omitted when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, ...

Reading follows A1111's ``parse_generation_parameters``: every value comes back as ``str``, exactly as
A1111 returns it (callers convert: ``int(res["Steps"])``). Strings keep hashes such as ``0123456789`` and
large seeds exact, and they are what the A1111 ``/png-info`` API hands out.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import re
from collections.abc import Mapping
from os import PathLike

# A1111's create_infotext order; other keys follow in insertion order, then "Version".
KNOWN_KEYS = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength", "Seed resize from",
    "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD", "Token merging ratio",
    "Init image hash", "RNG", "NGMS", "Tiling",
)
LAST_KEY = "Version"

# A1111's infotext_utils regexes: a key is a word char then words/spaces/dashes/slashes; a value is a
# JSON string or runs to the next comma.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_KEY = re.compile(r"\w[\w \-/]+")
_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"
_CHUNK = 1 << 20


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """A1111 infotext: prompt, optional ``Negative prompt:`` line, then one ``Key: value, ...`` line.

    Values: None is left out; ``Clip skip`` only when > 1; ``Tiling`` only when true (written ``True``);
    ``RNG`` only when not A1111's default ``GPU``. Whole floats are written as ints (``CFG scale: 7``,
    as A1111's UI writes them); a (w, h) pair as ``WxH``; a mapping as ``k: v, k: v`` (Lora/TI hashes).
    Values holding ``,``, ``:`` or a newline are JSON-quoted.
    """
    pairs = [f"{key}: {_quote(_format_value(value))}" for key, value in _ordered(params) if _keep(key, value)]
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(pairs)}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """Read an infotext back as A1111 does: {"Prompt", "Negative prompt", key: value, ...}, all str.

    The last line is the parameters line only when it holds at least 3 ``Key: value`` pairs. JSON-quoted
    values are unquoted. A ``WxH`` value also gives ``<key>-1`` (width) and ``<key>-2`` (height), e.g.
    ``Size-1``/``Size-2``; unlike A1111 the ``WxH`` value itself is kept under its key too. A1111's
    paste-time defaults for missing keys (Clip skip 1, RNG GPU, Schedule type Automatic) are not filled in.
    Legacy ``Hypernet`` / ``Hypernet strength`` keys append ``<hypernet:name:strength>`` to the prompt, as A1111.
    """
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative = _split_prompts(lines)
    res = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in _RE_PARAM.findall(last):
        value = _unquote(value)
        res[key] = value
        size = _RE_IMAGESIZE.match(value)
        if size:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
    if "Hypernet" in res:  # old A1111 versions wrote the hypernetwork as keys; it reads them back as a tag
        res["Prompt"] += f"<hypernet:{res['Hypernet']}:{res.get('Hypernet strength', '1.0')}>"
    return res


def parse_hashes(value: str) -> dict[str, str]:
    """``"add_detail: 7c6bad76eb54, x: 0123"`` (a Lora/TI hashes value) -> {"add_detail": "7c6bad76eb54", ...}."""
    pairs = (item.rpartition(":") for item in value.split(","))
    return {name.strip(): digest.strip() for name, _, digest in pairs if name.strip()}


def sha256_file(path: str | PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints are several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_hash(path: str | PathLike) -> str:
    """A1111 ``Model hash`` / ``VAE hash``: the first 10 hex digits of the file's sha256."""
    return sha256_file(path)[:10]


def short_hash(path: str | PathLike, n: int = 12) -> str:
    """First ``n`` hex digits of the file's sha256: A1111's ``TI hashes`` entries (n=12).

    A1111's ``Lora hashes`` of .safetensors files use :func:`addnet_hash` instead.
    """
    return sha256_file(path)[:n]


def addnet_hash(path: str | PathLike) -> str:
    """kohya-ss/A1111 hash of a .safetensors file: sha256 of the bytes after the JSON header.

    A1111 cites ``addnet_hash(path)[:12]`` in ``Lora hashes`` (unless the file's metadata carries
    ``sshs_model_hash``), so the hash survives metadata edits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _ordered(params: Mapping[str, object]):
    known = [(k, params[k]) for k in KNOWN_KEYS if k in params]
    extra = [(k, v) for k, v in params.items() if k not in KNOWN_KEYS and k != LAST_KEY]
    last = [(LAST_KEY, params[LAST_KEY])] if LAST_KEY in params else []
    for key, _ in extra:
        if not _RE_KEY.fullmatch(key):
            raise ValueError(f"infotext key {key!r} must be 2+ characters: a word character, then words, spaces, '-' or '/'")
    return known + extra + last


def _keep(key: str, value: object) -> bool:
    if value is None:
        return False
    if key == "Clip skip":
        return int(value) > 1
    if key == "Tiling":
        return bool(value)
    if key == "RNG":
        return value != "GPU"
    return True


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        # str() of the value's own type: np.float32(0.45) -> "0.45", not float32's binary expansion.
        return str(int(value)) if float(value).is_integer() else str(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, numbers.Integral) for v in value):
        return f"{int(value[0])}x{int(value[1])}"
    return str(value)


def _quote(text: str) -> str:
    # A1111 quotes on , : and newline; a value that starts with '"' is quoted too, else A1111's reader
    # would unquote it into something else.
    if any(c in text for c in ",:\n") or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _split_prompts(lines: list[str]) -> tuple[str, str]:
    # A1111 joins with "\n" only once text has started, so a blank first line after "Negative prompt:"
    # is dropped rather than kept as a leading newline.
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative, line = True, line[len(_NEGATIVE):].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    return prompt, negative


def generation_args(text: str) -> dict:
    """Keyword arguments for `Pipeline.generate` that reproduce the image whose infotext this is: the
    settings `GenerationRequest.from_infotext` reads that differ from generate's defaults (A1111's defaults
    where a key is absent; legacy combined sampler names split)."""
    from .request import GenerationRequest  # the request owns the infotext keys; it imports this module

    return GenerationRequest.from_infotext(text).to_kwargs(changed_only=True)
