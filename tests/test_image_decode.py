"""The one image decoder (sdonnx.image.open_image) behind every door: only PNG, JPEG, WebP, BMP and GIF
are tried (an EPS upload reached Ghostscript), decompression bombs are refused from the header, and no
error shows an object's repr or a memory address."""
import base64
import io
import struct
import zlib

import pytest
from click.testing import CliRunner
from PIL import EpsImagePlugin, Image

from sdonnx.image import ImageError, image_size, open_image, read_infotext
from sdonnx.img2img import load_image
from sdonnx.limits import MAX_IMAGE_PIXELS

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nnewpath 0 0 moveto 8 8 lineto stroke\n"


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width, height):
    """A PNG whose header claims width x height RGB pixels, with one row of data: what a bomb looks like
    before it is decoded (the real ones inflate a few KB of zeros into gigabytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * min(width, 64)))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _encoded(fmt, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (12, 10), "red" if mode == "RGB" else 1).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def no_ghostscript(monkeypatch):
    """Records any attempt to run Ghostscript (Pillow's EPS loader) instead of running it."""
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or Image.new("RGB", (8, 8)))
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    return calls


def _clean(message):
    return " at 0x" not in message and "<" not in message and "object" not in message


@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("JPEG", "RGB"), ("WEBP", "RGB"), ("BMP", "RGB"),
                                       ("GIF", "P"), ("PNG", "RGBA")])
def test_the_formats_a_user_sends_are_decoded(tmp_path, fmt, mode):
    raw = _encoded(fmt, mode)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(raw)
    for source in (raw, path, str(path), io.BytesIO(raw)):
        image = open_image(source)
        assert (image.format, image.size, image.mode) == (fmt, (12, 10), mode)
        assert image_size(io.BytesIO(raw) if isinstance(source, io.BytesIO) else source) == (12, 10)
        assert image.getpixel((0, 0)) is not None  # loaded: pixels readable after the file is closed


@pytest.mark.parametrize("fmt", ["TIFF", "PPM", "TGA", "ICO", "PCX", "SGI"])
def test_other_formats_pillow_knows_are_refused(tmp_path, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(_encoded(fmt))
    assert Image.open(path).format == fmt  # Pillow itself would decode it
    with pytest.raises(ImageError, match=f"init image {path} is not a PNG, JPEG, WebP, BMP or GIF image$"):
        load_image(path)


def test_eps_never_reaches_ghostscript(tmp_path, no_ghostscript):
    path = tmp_path / "upload.eps"
    path.write_bytes(EPS)
    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # without the format list, Pillow takes it
    for source, what in ((path, f"mask {path}"), (EPS, "mask")):
        with pytest.raises(ImageError, match=f"^{what} is not a PNG, JPEG, WebP, BMP or GIF image$"):
            load_image(source, "mask")
    for peek in (read_infotext, image_size):  # header-only readers refuse it too
        with pytest.raises(ImageError, match="is not a PNG"):
            peek(path)
    assert no_ghostscript == []


@pytest.mark.parametrize("width, height, message", [
    (100_000, 100_000, r"is too large \(over 179.0 megapixels\)"),  # Pillow's own bomb check
    (12_000, 12_000, "is 12000x12000, 144.0 megapixels"),  # Pillow only warns here
    (8200, 8192, "is 8200x8192, 67.2 megapixels"),
])
def test_decompression_bombs_are_refused_from_the_header(tmp_path, recwarn, width, height, message):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(width, height))
    with pytest.raises(ImageError, match=f"^init image {path} {message}; at most 67.1 megapixels are decoded$"):
        load_image(path)
    with pytest.raises(ImageError, match=message):
        image_size(path)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert 8192 * 8192 == MAX_IMAGE_PIXELS


def test_damaged_and_missing_files_say_so_without_reprs(tmp_path):
    png = _encoded("PNG")
    cases = {"truncated.png": png[: len(png) // 2], "garbage.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
             "empty.png": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageError, match=f"init image {tmp_path / name} ") as e:
            load_image(tmp_path / name)
        assert _clean(str(e.value)), e.value
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError) as e:  # bytes, as an upload arrives: named by the field, not a repr
        open_image(png[: len(png) // 2], "init_images[0]")
    assert str(e.value).startswith("init_images[0] is a damaged PNG image") and _clean(str(e.value)), e.value
    with pytest.raises(ImageError, match="must be a PIL image or a path to an image file, not int"):
        load_image(42)


def test_api_uploads_use_the_same_decoder(no_ghostscript):
    pytest.importorskip("fastapi")
    from sdonnx.server.codec import BadImage, decode_image

    def b64(raw):
        return base64.b64encode(raw).decode()

    assert decode_image(b64(_encoded("WEBP"))).format == "WEBP"
    for raw, message in ((EPS, "not a PNG, JPEG, WebP, BMP or GIF image"), (png_header(9000, 9000), "9000x9000"),
                         (_encoded("PNG")[:50], "damaged PNG image"), (b"hello", "not a PNG")):
        with pytest.raises(BadImage, match=f"^init_images\\[0\\] .*{message}") as e:
            decode_image(b64(raw), "init_images[0]")
        assert _clean(str(e.value)), e.value
    assert no_ghostscript == []


def test_cli_bomb_and_eps_are_one_line_errors(tiny_onnx, tmp_path, no_ghostscript):
    from sdonnx.cli import main

    bomb, eps = tmp_path / "bomb.png", tmp_path / "in.eps"
    bomb.write_bytes(png_header(100_000, 100_000))
    eps.write_bytes(EPS)
    for path, message in ((bomb, "is too large (over 179.0 megapixels); at most 67.1 megapixels are decoded"),
                          (eps, "is not a PNG, JPEG, WebP, BMP or GIF image")):
        result = CliRunner().invoke(main, ["generate", "-m", str(tiny_onnx("sd1")), "x", "--init-image", str(path),
                                           "--steps", "1", "-o", str(tmp_path / "out")])
        assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().splitlines() == [f"error: init image {path} {message}"]
    assert no_ghostscript == []
