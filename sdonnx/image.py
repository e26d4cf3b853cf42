"""PIL <-> arrays, and saving images with their infotext the way A1111 names them."""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import uuid
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .limits import MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_MAX_NAME_TRIES = 10_000
# Filesystems without hard links (FAT/exFAT, some network shares) answer os.link with one of these.
# Windows reports FAT/exFAT's refusal (ERROR_INVALID_FUNCTION) as EINVAL.
_NO_LINK_ERRNOS = {errno.EPERM, errno.EACCES, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS,
                   errno.EINVAL}


def latents_to_images(decoded: np.ndarray) -> list[Image.Image]:
    """VAE decoder output decoded: [B, 3, H, W] in [-1, 1] -> B RGB images, rounded as diffusers does.

    Computed in float32 (an fp16 decoder output is upcast first). A1111 truncates instead of rounding,
    so its pixels can be one lower.
    """
    if decoded.ndim != 4 or decoded.shape[1] != 3:
        raise ValueError(f"decoded images must be [B, 3, H, W], got shape {decoded.shape}")
    x = decoded.astype(np.float32)
    bad = np.count_nonzero(~np.isfinite(x))
    if bad:
        raise ValueError(f"decoded images hold {bad} NaN/inf values (an fp16 VAE overflowing? try an fp32 VAE)")
    x = np.clip(x / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    pixels = (x * 255).round().astype(np.uint8)
    return [Image.fromarray(p) for p in pixels]


def image_to_array(
    img: Image.Image, width: int, height: int, *, background: tuple[int, int, int] = (255, 255, 255)
) -> np.ndarray:
    """PIL image -> [1, 3, height, width] float32 in [-1, 1], the VAE encoder's input.

    Resized with Lanczos when the size differs (A1111 "Just resize", diffusers' default). Transparent
    pixels are composited over ``background`` (A1111's img2img background colour, white by default).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    img = flatten(img, background)
    if img.size != (width, height):
        img = img.resize((width, height), resample=Image.Resampling.LANCZOS)
    x = np.asarray(img, dtype=np.float32) / 255.0
    return (2.0 * x - 1.0).transpose(2, 0, 1)[None].copy()


def save_png(
    image: Image.Image,
    outdir: str | PathLike,
    infotext: str | None,
    *,
    seed: int | None = None,
    prefix: str = "",
    texts: Mapping[str, str] | None = None,
) -> Path:
    """Save ``image`` as ``outdir/NNNNN[-SEED].png`` (``PREFIX-NNNN[-SEED].png`` with a prefix), as A1111 names.

    The number continues from the highest one already in ``outdir``. The "parameters" text chunk holds
    ``infotext`` (tEXt, or iTXt when it is not Latin-1); ``texts`` adds other chunks (A1111's Extras writes
    "postprocessing" and "extras"). The PNG is written in full to a hidden temp file and
    then hard-linked to its name: the link fails when the name exists, so no file is ever overwritten (even
    with several writers racing) and no half-written PNG ever carries a final name.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    tmp = outdir / f".{uuid.uuid4().hex}.png.tmp"
    try:
        _write_png(image, tmp, infotext, texts)
        return _claim_name(tmp, outdir, prefix, seed)
    finally:
        tmp.unlink(missing_ok=True)


def write_png(image: Image.Image, path: str | PathLike, infotext: str | None) -> Path:
    """Write ``image`` to ``path`` with ``infotext``, replacing a file there. The PNG is written in full to a
    hidden temp file in the same folder and renamed over ``path``: the name never holds a partial PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{uuid.uuid4().hex}.png.tmp"
    try:
        _write_png(image, tmp, infotext)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_writable(outdir: str | PathLike) -> Path:
    """Prove images can be saved in ``outdir`` before any work whose images would be lost: a file is created
    and removed there, or, while the folder does not exist yet (it is made with the first image), its
    nearest existing parent must be a folder we may write. An OSError naming the folder otherwise."""
    outdir = Path(outdir)
    parent = next(p for p in (outdir, *outdir.parents) if p.exists() or p == p.parent)
    try:
        if parent != outdir:
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"{parent} is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, f"{parent} is not writable")
            return outdir
        probe = outdir / f".{uuid.uuid4().hex}.write-test"
        with open(probe, "xb"):
            pass
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write images to {outdir}: {e.strerror or e}") from None
    return outdir


def next_sequence_number(outdir: str | PathLike, prefix: str = "") -> int:
    """One past the highest running number among ``outdir``'s files (A1111's get_next_sequence_number)."""
    start = f"{prefix}-" if prefix else ""
    numbers = [-1]
    for name in os.listdir(outdir):
        if name.startswith(start):
            head = os.path.splitext(name[len(start):])[0].split("-")[0]
            if re.fullmatch(r"\d+", head):
                numbers.append(int(head))
    return max(numbers) + 1


# the formats a user sends; Pillow's other decoders are never tried (EPS would hand the file to Ghostscript)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class ImageError(ValueError):
    """An image file or upload that cannot be used: missing, of another format, damaged, or too large."""


def open_image(source: str | PathLike | bytes | io.IOBase, what: str = "image") -> Image.Image:
    """A path, bytes or binary file holding a PNG, JPEG, WebP, BMP or GIF -> the PIL image, loaded, in its
    own mode. The one decoder every door uses (CLI paths, API uploads, Python callers' paths).

    The pixel count is checked from the header, before anything is decoded; every failure is an
    ImageError naming `what` (and the path), never a Pillow traceback or an object's repr."""
    with _opened(source, what) as img:
        try:
            img.load()
        except (OSError, ValueError, EOFError) as e:  # Pillow's decoders: truncated or corrupt data
            raise ImageError(f"{_describe(source, what)} is a damaged {img.format} image ({_plain(e)})") from None
        return img


def image_size(source: str | PathLike | bytes | io.IOBase, what: str = "image") -> tuple[int, int]:
    """(width, height) from the header alone, with the same formats and pixel limit as open_image (for
    checks that must run before anything is decoded); ImageError when it would not open."""
    with _opened(source, what) as img:
        return img.size


@contextmanager
def _opened(source, what):
    """The image's header read with only IMAGE_FORMATS tried, its size within MAX_IMAGE_PIXELS."""
    name = _describe(source, what)
    try:
        with warnings.catch_warnings():  # sizes past Pillow's warning level are refused below, with a message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                             formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        fmt = _signature(source)
        raise ImageError(f"{name} is a damaged {fmt} image" if fmt else
                         f"{name} is not a PNG, JPEG, WebP, BMP or GIF image") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name} is too large (over {_megapixels(Image.MAX_IMAGE_PIXELS * 2)}); at most "
                         f"{_megapixels(MAX_IMAGE_PIXELS)} are decoded") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except (OSError, ValueError, EOFError) as e:
        raise ImageError(f"{name} cannot be read ({_plain(e)})") from None
    with img:
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageError(f"{name} is {width}x{height}, {_megapixels(width * height)}; at most "
                             f"{_megapixels(MAX_IMAGE_PIXELS)} are decoded")
        yield img


def _signature(source):
    """The accepted format whose signature the data starts with (its header did not parse), or None."""
    try:
        if isinstance(source, (bytes, bytearray)):
            head = bytes(source[:16])
        elif isinstance(source, (str, PathLike)):
            with open(source, "rb") as f:
                head = f.read(16)
        else:
            source.seek(0)
            head = source.read(16)
    except (OSError, ValueError, AttributeError):
        return None
    return next((fmt for fmt in IMAGE_FORMATS if fmt in Image.OPEN and Image.OPEN[fmt][1](head)), None)


def _describe(source, what):
    return f"{what} {os.fspath(source)}" if isinstance(source, (str, PathLike)) else what


def _megapixels(pixels):
    return f"{pixels / 1e6:.1f} megapixels"


def _plain(error):
    """An exception's message without object reprs (Pillow names file objects as <... at 0x...>)."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(error))
    return text or type(error).__name__


def read_infotext(source: str | PathLike | bytes | io.IOBase) -> str | None:
    """The infotext stored in an image: PNG "parameters" text chunk, else EXIF UserComment (JPEG/WebP)."""
    with _opened(source, "image") as img:
        text = img.info.get("parameters")
        if text is not None:
            return text
        comment = img.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    return _decode_user_comment(comment) if comment else None


def _sequence_name(n: int, prefix: str, seed: int | None) -> str:
    number = f"{prefix}-{n:04}" if prefix else f"{n:05}"
    return f"{number}-{seed}.png" if seed is not None else f"{number}.png"


def _write_png(image: Image.Image, path: Path, infotext: str | None, texts: Mapping[str, str] | None = None) -> None:
    info = png_texts(infotext, texts)
    with open(path, "xb") as f:
        image.save(f, format="PNG", pnginfo=info)
        f.flush()
        os.fsync(f.fileno())


def png_texts(infotext: str | None, texts: Mapping[str, str] | None = None) -> PngImagePlugin.PngInfo:
    """The PNG text chunks: "parameters" (the infotext), then the other texts given."""
    info = PngImagePlugin.PngInfo()
    for key, text in {"parameters": infotext, **(texts or {})}.items():
        if text:
            info.add_text(key, text)
    return info


def _claim_name(tmp: Path, outdir: Path, prefix: str, seed: int | None) -> Path:
    n = next_sequence_number(outdir, prefix)
    for _ in range(_MAX_NAME_TRIES):
        final = outdir / _sequence_name(n, prefix, seed)
        try:
            _publish(tmp, final)
            return final
        except FileExistsError:
            n += 1
    raise FileExistsError(f"no free file name in {outdir} after {_MAX_NAME_TRIES} tries from number {n}")


def _publish(tmp: Path, final: Path) -> None:
    """Give the finished file ``tmp`` the name ``final``; FileExistsError when that name is taken."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_LINK_ERRNOS:
            raise
        # No hard links here: reserve the name exclusively, then move the finished file over the
        # reservation. An interruption between the two leaves an empty file, never a partial PNG.
        log.debug("os.link unsupported in %s (%s); reserving the name instead", final.parent, e)
        with open(final, "xb"):
            pass
        os.replace(tmp, final)


def flatten(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB image with transparency composited over ``background`` (A1111's img2img background, white).

    A1111 flattens RGBA images this way (a paste through the alpha channel); every other mode that carries
    transparency (LA, PA, RGBa, P with a transparent index) is treated the same here, where A1111 would
    drop the alpha and keep whatever colour lies under it.
    """
    if img.mode in ("RGBA", "LA", "PA", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.paste(rgba, mask=rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def _decode_user_comment(raw: bytes | str) -> str:
    """EXIF UserComment: an 8-byte charset code, then the text (A1111 writes "UNICODE" + UTF-16-BE)."""
    if isinstance(raw, str):
        return raw
    code, body = raw[:8], raw[8:]
    if code == b"UNICODE\0":
        return body.decode(_utf16_order(body), errors="replace")
    if code in (b"ASCII\0\0\0", b"\0" * 8):
        return body.decode("utf-8", errors="replace").rstrip("\0")
    return raw.decode("utf-8", errors="replace")


def _utf16_order(body: bytes) -> str:
    # piexif (A1111) writes big-endian; some tools write little-endian. Mostly-ASCII text has its zero
    # bytes first in big-endian pairs.
    if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
        return "utf-16"
    return "utf-16-be" if body[0::2].count(0) >= body[1::2].count(0) else "utf-16-le"
