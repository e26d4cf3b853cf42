"""Tiled VAE decode/encode: blending exactness on linear stand-ins, then the tiny model's tiled vs whole
passes (difference, seams, odd sizes, a tile bigger than the image)."""
import numpy as np
import pytest

from sdonnx.tiled_vae import (
    TILE_THRESHOLD,
    _spans,
    decode_tiled,
    encode_tiled,
    needs_tiling,
)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class Recorder:
    """A stand-in VAE that is local (each output pixel depends on its own input pixel only), so tiling
    must reproduce the whole pass exactly; records the tile shapes it was given."""

    def __init__(self):
        self.shapes = []

    def decode(self, z):
        self.shapes.append(z.shape)
        return np.repeat(np.repeat(np.tanh(z[:, :3]) * 2, 8, axis=-2), 8, axis=-1)

    def encode(self, x):
        self.shapes.append(x.shape)
        pooled = x.reshape(*x.shape[:2], x.shape[2] // 8, 8, x.shape[3] // 8, 8).mean(axis=(3, 5))
        mean = np.concatenate([pooled, pooled[:, :1] ** 2], axis=1)
        return mean, -np.abs(mean)


@pytest.mark.parametrize("shape, tile, overlap", [((2, 4, 13, 27), 8, 3), ((1, 4, 5, 70), 4, 1), ((1, 4, 40, 9), 16, 7),
                                                  ((1, 4, 20, 20), 10, 0)])
def test_decode_blend_is_exact_for_a_local_vae(shape, tile, overlap):
    vae, z = Recorder(), rand(*shape)
    got = decode_tiled(vae.decode, z, tile, overlap)
    want = Recorder().decode(z)
    assert got.shape == want.shape == (shape[0], 3, shape[2] * 8, shape[3] * 8)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # memory follows the tile: no call sees more than tile x tile latents
    assert len(vae.shapes) > 1 and all(h <= tile and w <= tile for *_, h, w in vae.shapes)


def test_encode_blend_is_exact_for_a_local_vae():
    vae, x = Recorder(), rand(2, 3, 8 * 13, 8 * 27)
    mean, logvar = encode_tiled(vae.encode, x, tile=64, overlap=16)
    want_mean, want_logvar = Recorder().encode(x)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logvar, want_logvar, rtol=1e-5, atol=1e-6)
    assert all(h <= 64 and w <= 64 for *_, h, w in vae.shapes)


def test_tile_bigger_than_the_image_is_one_call():
    vae, z = Recorder(), rand(1, 4, 12, 20)
    np.testing.assert_array_equal(decode_tiled(vae.decode, z, tile=20), Recorder().decode(z))
    assert vae.shapes == [z.shape]


def test_spans_cover_the_axis_with_the_last_tile_flush():
    assert _spans(10, 16, 4) == [(0, 10)]
    assert _spans(40, 16, 4) == [(0, 16), (12, 28), (24, 40)]
    assert _spans(29, 16, 4) == [(0, 16), (12, 28), (13, 29)]


@pytest.mark.parametrize("tile, overlap", [(16, 16), (16, 20), (16, -1)])
def test_bad_overlap(tile, overlap):
    with pytest.raises(ValueError, match=f"overlap {overlap} must be at least 0 and less than the tile {tile}"):
        decode_tiled(Recorder().decode, rand(1, 4, 40, 40), tile, overlap)


def test_encode_sizes_must_be_multiples_of_the_factor():
    with pytest.raises(ValueError, match=r"\{'width': 100\} must be multiples of the VAE factor 8"):
        encode_tiled(Recorder().encode, rand(1, 3, 64, 100), tile=32, overlap=8)
    with pytest.raises(ValueError, match="'overlap': 12"):
        encode_tiled(Recorder().encode, rand(1, 3, 64, 96), tile=32, overlap=12)


def test_needs_tiling():
    assert TILE_THRESHOLD == 1024 * 1024
    assert not needs_tiling(1024, 1024) and needs_tiling(1024, 1032) and needs_tiling(1536, 1536)
    assert needs_tiling(512, 512, threshold=0)


# the tiny SD 1.x VAE through ONNX Runtime


@pytest.fixture(scope="module")
def vae(tiny_onnx):
    from sdonnx.runtime.providers import plan
    from sdonnx.runtime.session import Session

    folder = tiny_onnx("sd1")
    decoder = Session(folder / "vae_decoder" / "model.onnx", plan("cpu"))
    encoder = Session(folder / "vae_encoder" / "model.onnx", plan("cpu"))
    decode = lambda z: decoder.run({"latent_sample": z})["sample"]
    encode = lambda x: tuple(encoder.run({"sample": x}, ["latent_mean", "latent_logvar"]).values())
    return decode, encode


def report(name, got, want):
    diff = np.abs(got - want)
    print(f"{name}: max |diff| {diff.max():.3f}, mean {diff.mean():.4f}, output std {want.std():.3f}")
    return diff.max() / want.std(), diff.mean() / want.std()


@pytest.mark.parametrize("shape, tile, overlap", [((1, 4, 24, 32), 16, 8), ((2, 4, 13, 27), 12, 6)])
def test_tiled_decode_close_to_whole(vae, shape, tile, overlap):
    """Tiles see zero padding at their borders and their own GroupNorm statistics; in this tiny VAE the
    border effect reaches ~4 latent pixels into a tile (a real SD VAE at 64-latent tiles differs far less)."""
    decode, _ = vae
    z = rand(*shape, seed=1)
    whole, tiled = decode(z), decode_tiled(decode, z, tile, overlap)
    assert tiled.shape == whole.shape
    peak, mean = report(f"decode {shape[2:]} tile {tile} overlap {overlap}", tiled, whole)
    assert mean < 0.35 and peak < 5


def test_tiled_decode_has_no_seams(vae):
    """Where tiles are cut, the tiled image's departure from the whole decode changes no faster than
    elsewhere (the tiny random VAE paints noise-like texture, so the image's own gradient hides seams;
    its difference to the whole pass shows them): blended tiles, against hard cuts with overlap 0."""
    decode, _ = vae
    z = rand(2, 4, 24, 32, seed=2)
    whole = decode(z)

    def jump_ratios(tile, overlap):
        """Per cut: mean |step of (tiled - whole)| across the cut / median step elsewhere, both axes."""
        diff, ratios = decode_tiled(decode, z, tile, overlap) - whole, []
        for axis, n in ((-1, z.shape[-1]), (-2, z.shape[-2])):
            steps = np.abs(np.diff(np.moveaxis(diff, axis, -1), axis=-1)).mean(axis=(0, 1, 2))
            cuts = sorted({8 * p for span in _spans(n, tile, overlap) for p in span} - {0, 8 * n})
            ratios += list(steps[[c - 1 for c in cuts]] / np.median(np.delete(steps, [c - 1 for c in cuts])))
        return np.array(ratios)

    blended, hard = jump_ratios(16, 8), jump_ratios(16, 0)
    print(f"step across tile cuts / median step: blended {blended.round(2)}, hard cuts {hard.round(2)}")
    assert blended.max() < 1.5
    assert hard.mean() > 1.8  # the measure does see a seam


def test_tile_bigger_than_the_image_is_the_whole_decode(vae):
    decode, _ = vae
    z = rand(1, 4, 13, 21, seed=3)
    np.testing.assert_array_equal(decode_tiled(decode, z, tile=21, overlap=8), decode(z))
    np.testing.assert_array_equal(decode_tiled(decode, z), decode(z))


def test_tiled_encode_close_to_whole(vae):
    decode, encode = vae
    images = np.tanh(decode(rand(1, 4, 24, 32, seed=4)))
    whole, tiled = encode(images), encode_tiled(encode, images, tile=128, overlap=64)
    for name, got, want in zip(("mean", "logvar"), tiled, whole):
        assert got.shape == want.shape == (1, 4, 24, 32)
        peak, mean = report(f"encode {name} tile 128 overlap 64", got, want)
        assert mean < 0.35 and peak < 5
    for got, want in zip(encode_tiled(encode, images), whole):  # the default tile holds the image
        np.testing.assert_array_equal(got, want)
