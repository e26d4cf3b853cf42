import os
import threading

import numpy as np
import pytest
from PIL import Image

from sdonnx import image as image_mod
from sdonnx.image import (
    image_to_array,
    latents_to_images,
    next_sequence_number,
    read_infotext,
    save_png,
)
from sdonnx.infotext import parse_infotext

INFOTEXT = "a cat, día\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 8x8"


def small_image(value=128):
    return Image.new("RGB", (8, 8), (value, 64, 32))


def test_save_png_round_trips_infotext_and_pixels(tmp_path):
    path = save_png(small_image(), tmp_path, INFOTEXT, seed=42)
    assert path == tmp_path / "00000-42.png"
    assert read_infotext(path) == INFOTEXT
    assert parse_infotext(read_infotext(path))["Seed"] == "42"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert np.array_equal(np.asarray(img), np.asarray(small_image()))


def test_numbering_continues_from_highest_and_skips_unrelated_files(tmp_path):
    (tmp_path / "00007-1.png").write_bytes(b"x")
    (tmp_path / "00003-9.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not numbered")
    (tmp_path / "grid-0040.png").write_bytes(b"x")
    assert next_sequence_number(tmp_path) == 8
    assert save_png(small_image(), tmp_path, INFOTEXT, seed=5).name == "00008-5.png"
    assert save_png(small_image(), tmp_path, INFOTEXT).name == "00009.png"
    assert save_png(small_image(), tmp_path, INFOTEXT, prefix="grid").name == "grid-0041.png"


def test_never_overwrites_a_taken_name(tmp_path, monkeypatch):
    # Another writer claimed 00000 and 00001 after our scan: we must move on, not overwrite.
    for name in ("00000-1.png", "00001-1.png"):
        (tmp_path / name).write_bytes(b"theirs")
    monkeypatch.setattr(image_mod, "next_sequence_number", lambda outdir, prefix="": 0)
    path = save_png(small_image(), tmp_path, INFOTEXT, seed=1)
    assert path.name == "00002-1.png"
    assert (tmp_path / "00000-1.png").read_bytes() == b"theirs"
    assert (tmp_path / "00001-1.png").read_bytes() == b"theirs"


def test_racing_writers_get_distinct_files(tmp_path):
    paths, errors = [], []

    def work(i):
        try:
            paths.append(save_png(small_image(i), tmp_path, f"{INFOTEXT}-{i}", seed=7))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(paths)) == 16
    assert sorted(read_infotext(p) for p in paths) == sorted(f"{INFOTEXT}-{i}" for i in range(16))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    class Boom(RuntimeError):
        pass

    def fail(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise Boom

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(Boom):
        save_png(small_image(), tmp_path, INFOTEXT, seed=1)
    assert os.listdir(tmp_path) == []


def test_no_hard_link_filesystem_falls_back_to_exclusive_reservation(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise PermissionError(1, "Operation not permitted")

    (tmp_path / "00000-3.png").write_bytes(b"theirs")
    monkeypatch.setattr(image_mod, "next_sequence_number", lambda outdir, prefix="": 0)
    monkeypatch.setattr(os, "link", no_link)
    path = save_png(small_image(), tmp_path, INFOTEXT, seed=3)
    assert path.name == "00001-3.png"
    assert read_infotext(path) == INFOTEXT
    assert (tmp_path / "00000-3.png").read_bytes() == b"theirs"
    assert sorted(os.listdir(tmp_path)) == ["00000-3.png", "00001-3.png"]


def test_read_infotext_none_without_chunk(tmp_path):
    path = save_png(small_image(), tmp_path, None)
    assert read_infotext(path) is None


@pytest.mark.parametrize("fmt,order", [("JPEG", "utf-16-be"), ("WEBP", "utf-16-be"), ("JPEG", "utf-16-le")])
def test_read_infotext_from_exif_user_comment(tmp_path, fmt, order):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + INFOTEXT.encode(order)
    path = tmp_path / f"x.{fmt.lower()}"
    small_image().save(path, format=fmt, exif=exif)
    assert read_infotext(path) == INFOTEXT


def test_latents_to_images_rounds_like_diffusers():
    decoded = np.array([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0, -0.996, 0.999], dtype=np.float32)
    decoded = np.broadcast_to(decoded, (2, 3, 1, 8)).copy()
    decoded[1] = -decoded[1]
    images = latents_to_images(decoded)
    assert len(images) == 2
    assert images[0].mode == "RGB" and images[0].size == (8, 1)
    x = np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    expected = (x * 255).round().astype("uint8")  # diffusers' numpy_to_pil
    assert np.array_equal(np.asarray(images[0]), expected[0])
    assert np.array_equal(np.asarray(images[1]), expected[1])
    assert np.asarray(images[0])[0, :6, 0].tolist() == [0, 0, 128, 191, 255, 255]


def test_latents_to_images_refuses_bad_input():
    with pytest.raises(ValueError, match="shape"):
        latents_to_images(np.zeros((1, 4, 8, 8), np.float32))
    bad = np.zeros((1, 3, 2, 2), np.float16)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        latents_to_images(bad)


def test_image_to_array_inverts_latents_to_images():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    arr = image_to_array(Image.fromarray(pixels), 7, 5)
    assert arr.shape == (1, 3, 5, 7) and arr.dtype == np.float32
    assert arr.min() >= -1 and arr.max() <= 1
    assert np.array_equal(np.asarray(latents_to_images(arr)[0]), pixels)


def test_image_to_array_resizes_and_flattens_alpha():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    arr = image_to_array(img, 8, 16)
    assert arr.shape == (1, 3, 16, 8)
    assert np.allclose(arr, 1.0)  # fully transparent -> white background
    with pytest.raises(ValueError, match="0x8"):
        image_to_array(img, 0, 8)
