"""sdonnx.diffusion.rng: torch's CPU generator bit for bit, A1111's NV source, ImageRNG behaviour.

Where expected numbers come from is said next to each; nothing is downloaded.
"""

import numpy as np
import pytest

from sdonnx.diffusion import rng

SEEDS = [0, 1, 42, 1234567890, 2**32 - 1, 2**32, 2**63 + 12345, 2**64 - 1, -5]
# numel < 16 (scalar path), multiples of 16, and tails that are not (torch redraws the last 16)
SHAPES = [1, 7, 15, 16, 17, 31, 33, (1, 4, 64, 64), (2, 4, 9, 11)]


def bits(x):
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def from_bits(*words):
    return np.array(words, dtype=np.uint32).view(np.float32)


# ---------------------------------------------------------------------------------------------------
# "cpu" source against torch itself
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("seed", SEEDS)
def test_cpu_randn_is_torch_randn_bit_for_bit(torch, seed):
    for shape in SHAPES:
        expected = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)).numpy()
        got = rng.randn(seed, shape, source="cpu")
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_array_equal(bits(got), bits(expected), err_msg=f"seed={seed} shape={shape}")


def test_cpu_generator_continues_torch_stream_across_mixed_sizes(torch):
    # Odd sizes under 16 leave Box-Muller's second value cached in torch's generator; the vectorised
    # path neither uses nor clears it. Interleave both to check the state carries over exactly.
    shapes = [7, 16, 3, 33, 1, (4, 8, 8), 5, 5, 2, 17]
    for seed in (0, 99, 2**32 - 1):
        gen = torch.Generator("cpu").manual_seed(seed)
        ours = rng.create_generator(seed, "cpu")
        for shape in shapes:
            expected = torch.randn(shape, generator=gen).numpy()
            np.testing.assert_array_equal(bits(ours.randn(shape)), bits(expected),
                                          err_msg=f"seed={seed} shape={shape}")


@pytest.mark.parametrize("shape", [(4, 8, 8), (1, 2, 3)])
def test_image_rng_cpu_first_and_next_continue_each_images_torch_generator(torch, shape):
    # A1111: one torch.Generator("cpu").manual_seed(seed) per image; the initial noise is its first
    # torch.randn, every later draw (ancestral/SDE noise) another torch.randn on the same generator.
    seeds = [3, 1234567890]
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    image_rng = rng.ImageRNG(shape, seeds, source="cpu")
    for draw in range(4):
        expected = np.stack([torch.randn(shape, generator=g).numpy() for g in gens])
        got = image_rng.first() if draw == 0 else image_rng.next()
        assert got.shape == (2, *shape) and got.dtype == np.float32
        np.testing.assert_array_equal(bits(got), bits(expected), err_msg=f"draw {draw}")


def test_image_rng_eta_noise_seed_delta_restarts_streams_after_first(torch):
    shape = (4, 8, 8)
    image_rng = rng.ImageRNG(shape, [10, 20], source="cpu", eta_noise_seed_delta=31337)
    first = image_rng.next()  # A1111's first next() is first()
    np.testing.assert_array_equal(first[1], rng.randn(20, shape, "cpu"))
    gens = [torch.Generator("cpu").manual_seed(s + 31337) for s in (10, 20)]
    expected = np.stack([torch.randn(shape, generator=g).numpy() for g in gens])
    np.testing.assert_array_equal(bits(image_rng.next()), bits(expected))


# ---------------------------------------------------------------------------------------------------
# "cpu" source without torch: golden numbers
# ---------------------------------------------------------------------------------------------------

def test_cpu_golden_values():
    # From torch 2.13.0+cpu, Linux x86-64 AVX2 kernel: torch.randn(shape, generator=
    # torch.Generator("cpu").manual_seed(1234567890)), float32 bit patterns.
    big = rng.randn(1234567890, (1, 4, 64, 64), "cpu").ravel()
    np.testing.assert_array_equal(bits(big[:4]),
                                  bits(from_bits(0x3F2B79D7, 0xBB3D05E4, 0x3E6E6499, 0xBF022DFD)))
    np.testing.assert_array_equal(bits(big[-3:]), bits(from_bits(0xBCB6994E, 0x3F04CE7B, 0xBFA5CCC1)))
    small = rng.randn(1234567890, 5, "cpu")
    np.testing.assert_array_equal(bits(small), bits(from_bits(0xBEBEDC47, 0x3FB1FAAF, 0x3EF33969, 0x3D93C923,
                                                              0x3FA8C07E)))


def test_cpu_seed_uses_low_32_bits_like_torch():
    np.testing.assert_array_equal(rng.randn(2**32 + 7, 20, "cpu"), rng.randn(7, 20, "cpu"))
    np.testing.assert_array_equal(rng.randn(-1, 20, "cpu"), rng.randn(2**32 - 1, 20, "cpu"))


# ---------------------------------------------------------------------------------------------------
# "nv" source
# ---------------------------------------------------------------------------------------------------

def test_philox_known_answers():
    # Random123 kat_vectors, philox4x32_10: counter, key -> output.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        out = rng.philox4x32_10(np.array(counter, dtype=np.uint32)[:, None], key)
        assert tuple(int(v) for v in out[:, 0]) == expected


def test_nv_matches_torch_cuda_reference_values():
    # torch.randn((3, 4), device="cuda") after manual_seed(0), as printed in the docstring of A1111's
    # modules/rng_philox.py (the first row is also the reference). The GPU computes Box-Muller
    # with float32 intrinsics, A1111's numpy (and so this source) in float64: equal to ~2e-7.
    expected = np.array([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                         [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                         [-1.07454231, -0.36314407, -1.67105067, 2.26550497]])
    got = rng.randn(0, (3, 4), source="nv")
    assert got.dtype == np.float32 and got.shape == (3, 4)
    np.testing.assert_allclose(got, expected, rtol=0, atol=3e-7)


def test_nv_golden_values_and_offset_per_draw():
    # Bit patterns from A1111's rng_philox.Generator(1234567890).randn((4, 64, 64)) called twice
    # (the algorithm run in a scratch script outside this repository, numpy 2.4).
    gen = rng.create_generator(1234567890, "nv")
    first, second = gen.randn((4, 64, 64)).ravel(), gen.randn((4, 64, 64)).ravel()
    np.testing.assert_array_equal(bits(first[:3]), bits(from_bits(0x3E71D8AD, 0x3FA1B6C5, 0xBF0ACF2D)))
    np.testing.assert_array_equal(bits(first[-1:]), bits(from_bits(0xBED0585D)))
    np.testing.assert_array_equal(bits(second[:3]), bits(from_bits(0x3FC3E659, 0xBE87364F, 0xBF2A4F81)))


def test_nv_element_depends_only_on_seed_offset_and_index():
    # curand's layout: element i of a draw is subsequence i, so a longer draw extends a shorter one.
    np.testing.assert_array_equal(rng.randn(5, (4, 4, 4), "nv").ravel()[:10], rng.randn(5, 10, "nv"))


def test_image_rng_nv_next_continues_the_philox_offset():
    shape = (4, 6, 5)
    image_rng = rng.ImageRNG(shape, [7, 8], source="nv")
    draws = [image_rng.first(), image_rng.next(), image_rng.next()]
    for i, seed in enumerate([7, 8]):
        gen = rng.PhiloxGenerator(seed)
        for draw in draws:
            np.testing.assert_array_equal(draw[i], gen.randn(shape))


# ---------------------------------------------------------------------------------------------------
# variation seeds, seed resize, slerp, errors
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", rng.SOURCES)
def test_variation_strength_0_is_seed_noise_and_1_is_subseed_noise(source):
    shape = (4, 8, 8)
    seed_noise, subseed_noise = rng.randn(11, shape, source), rng.randn(99, shape, source)
    none = rng.ImageRNG(shape, [11], source=source, subseeds=[99], subseed_strength=0.0).first()[0]
    np.testing.assert_array_equal(none, seed_noise)
    full = rng.ImageRNG(shape, [11], source=source, subseeds=[99], subseed_strength=1.0).first()[0]
    np.testing.assert_allclose(full, subseed_noise, rtol=0, atol=1e-5)
    half = rng.ImageRNG(shape, [11], source=source, subseeds=[99], subseed_strength=0.5).first()[0]
    np.testing.assert_allclose(half, rng.slerp(0.5, seed_noise, subseed_noise), rtol=0, atol=1e-6)


def test_variation_missing_subseeds_default_to_0():
    shape = (4, 4, 4)
    got = rng.ImageRNG(shape, [1, 2], source="nv", subseeds=[5], subseed_strength=1.0).first()
    np.testing.assert_allclose(got[1], rng.randn(0, shape, "nv"), rtol=0, atol=1e-5)


def test_slerp_interpolates_along_dim_1_per_channel_and_column():
    rs = np.random.default_rng(0)
    low, high = rs.standard_normal((2, 5, 3)), rs.standard_normal((2, 5, 3))
    got = rng.slerp(0.3, low, high)
    for c in range(2):
        for w in range(3):
            a, b = low[:, :, w][c], high[:, :, w][c]
            omega = np.arccos(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)))
            expected = (np.sin(0.7 * omega) * a + np.sin(0.3 * omega) * b) / np.sin(omega)
            np.testing.assert_allclose(got[c, :, w], expected, rtol=1e-6, atol=1e-6)


def test_slerp_keeps_a1111_near_parallel_fallback():
    # A1111 falls back to `low * val + high * (1 - val)` when the vectors are (nearly) parallel.
    low = np.ones((1, 4, 2), dtype=np.float32)
    np.testing.assert_allclose(rng.slerp(0.25, low, 3 * low), 0.25 * low + 0.75 * 3 * low)


@pytest.mark.parametrize("source", rng.SOURCES)
def test_seed_resize_from_smaller_pastes_centred(source):
    # 32x32 px -> latent 4x4, centred in the 8x8 latent drawn from the image's own generator
    shape = (4, 8, 8)
    got = rng.ImageRNG(shape, [21], source=source, seed_resize_from_h=32, seed_resize_from_w=32).first()[0]
    outer, inner = rng.randn(21, shape, source), rng.randn(21, (4, 4, 4), source)
    expected = outer.copy()
    expected[:, 2:6, 2:6] = inner
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("source", rng.SOURCES)
def test_seed_resize_from_larger_takes_centred_crop(source):
    # 96x80 px -> latent 12x10; the 8x6 target takes its centre
    shape = (4, 8, 6)
    got = rng.ImageRNG(shape, [21], source=source, seed_resize_from_h=96, seed_resize_from_w=80).first()[0]
    np.testing.assert_array_equal(got, rng.randn(21, (4, 12, 10), source)[:, 2:10, 2:8])


def test_seed_resize_odd_shrink_keeps_a1111_floor_rounding():
    # 72 px -> 9 latent columns onto 6: A1111 computes the offset as (6 - 9) // 2 = -2 and pastes
    # 9 - 4 = 5 columns, so the last column stays the image's own noise.
    shape = (4, 8, 6)
    got = rng.ImageRNG(shape, [21], source="nv", seed_resize_from_h=64, seed_resize_from_w=72).first()[0]
    np.testing.assert_array_equal(got[:, :, :5], rng.randn(21, (4, 8, 9), "nv")[:, :, 2:7])
    np.testing.assert_array_equal(got[:, :, 5], rng.randn(21, shape, "nv")[:, :, 5])


def test_seed_resize_with_variation_slerps_at_the_resize_size():
    shape = (4, 8, 8)
    got = rng.ImageRNG(shape, [21], source="nv", subseeds=[5], subseed_strength=0.4,
                       seed_resize_from_h=32, seed_resize_from_w=32).first()[0]
    inner = rng.slerp(0.4, rng.randn(21, (4, 4, 4), "nv"), rng.randn(5, (4, 4, 4), "nv"))
    np.testing.assert_array_equal(got[:, 2:6, 2:6], inner)
    np.testing.assert_array_equal(got[:, 0], rng.randn(21, shape, "nv")[:, 0])


def test_runtime_module_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, sdonnx.diffusion.rng; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_same_inputs_same_numbers():
    for source in rng.SOURCES:
        np.testing.assert_array_equal(rng.randn(77, (2, 3, 5), source), rng.randn(77, (2, 3, 5), source))


def test_unknown_source_names_valid_ones():
    with pytest.raises(ValueError, match=r"'gpu'.*cpu, nv"):
        rng.randn(0, 4, source="gpu")
    with pytest.raises(ValueError, match=r"cpu, nv"):
        rng.ImageRNG((4, 8, 8), [0], source="NV")


def test_seed_out_of_range():
    with pytest.raises(ValueError, match="seed"):
        rng.randn(2**64, 4, "cpu")
