"""Seeded Gaussian noise exactly as AUTOMATIC1111 draws it, in numpy.

Two sources, as A1111's "Random number generator source" setting:

- "cpu": torch's CPU generator (MT19937) and torch's CPU `normal_` transforms, reproduced bit for bit
  (scalar Box-Muller in double for tensors under 16 elements, the vectorised float32 fill otherwise).
  The float32 fill is torch's x86-64 AVX2 kernel (avx_mathfun.h Cephes log/sincos, with the
  multiply-adds GCC fuses in the Linux wheels); torch's generic kernel (libm, used on CPUs without
  AVX2 and on ARM) differs from it in the last bits of many elements.
- "nv": A1111's numpy imitation of `torch.randn` on an NVIDIA GPU (`modules/rng_philox.py`): Philox
  4x32-10 keyed by the seed, counter (offset, 0, index, 0), Box-Muller keeping the sine of curand's pair.

`ImageRNG` is A1111's per-image noise for a batch: variation seeds (slerp towards a subseed's noise),
"resize seed from" (noise drawn at another size, pasted centred) and the continued per-image streams
that ancestral/SDE samplers draw from.
"""

import math

import numpy as np

SOURCES = ("cpu", "nv")

_U64 = 1 << 64


def _seed_u64(seed):
    """torch's manual_seed range: any int in [-2**63, 2**64), taken modulo 2**64."""
    seed = int(seed)
    if not -(1 << 63) <= seed < _U64:
        raise ValueError(f"seed {seed} out of range; valid: integers in [-2**63, 2**64)")
    return seed % _U64


def _numel(shape):
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape {shape} has a negative dimension")
    return shape, math.prod(shape)


# ---------------------------------------------------------------------------------------------------
# torch CPU generator
# ---------------------------------------------------------------------------------------------------

_MT_N = 624


def _mt19937_init_state(seed32):
    """MT19937 init_genrand as at::mt19937 seeds itself (only the low 32 bits of the seed count)."""
    state = np.empty(_MT_N, dtype=np.uint32)
    s = seed32
    state[0] = s
    for j in range(1, _MT_N):
        s = (1812433253 * (s ^ (s >> 30)) + j) & 0xFFFFFFFF
        state[j] = s
    return state


def _f32(x):
    return np.float32(x)


# Constants of avx_mathfun.h (Cephes logf/sinf/cosf), stored as float32 like the C float arrays.
_LOG_P = tuple(_f32(c) for c in (7.0376836292E-2, -1.1514610310E-1, 1.1676998740E-1, -1.2420140846E-1,
                                 1.4249322787E-1, -1.6668057665E-1, 2.0000714765E-1, -2.4999993993E-1,
                                 3.3333331174E-1))
_LOG_Q1, _LOG_Q2 = _f32(-2.12194440e-4), _f32(0.693359375)
_SQRTHF = _f32(0.707106781186547524)
_MINUS_DP = (_f32(-0.78515625), _f32(-2.4187564849853515625e-4), _f32(-3.77489497744594108e-8))
_SINCOF = (_f32(-1.9515295891E-4), _f32(8.3321608736E-3), _f32(-1.6666654611E-1))
_COSCOF = (_f32(2.443315711809948E-005), _f32(-1.388731625493765E-003), _f32(4.166664568298827E-002))
_FOPI = _f32(1.27323954473516)
_TWO_PI_F32 = _f32(2.0 * math.pi)
_ONE, _HALF = _f32(1.0), _f32(0.5)


def _fma32(a, b, c):
    """Fused multiply-add in float32 with a single rounding, as vfmadd*ps.

    a*b is exact in float64; the float64 sum is rounded to odd (TwoSum error term) so that the final
    rounding to float32 is the correctly rounded a*b+c.
    """
    p = np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    s = p + c
    t = s - p
    err = (p - (s - t)) + (c - t)
    inexact_even = (err != 0) & ((s.view(np.int64) & 1) == 0)
    s = np.where(inexact_even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def _cephes_logf(x):
    """log256_ps of avx_mathfun.h as GCC compiles it into torch (mul+add pairs fused), for positive
    normal float32 x: [N] -> [N]."""
    bits = x.view(np.uint32)
    e = ((bits >> 23).astype(np.int32) - 0x7F).astype(np.float32) + _ONE
    x = ((bits & np.uint32(0x807FFFFF)) | _HALF.view(np.uint32)).view(np.float32)  # mantissa in [0.5, 1)
    small = x < _SQRTHF
    tmp = np.where(small, x, _f32(0))
    x = x - _ONE
    e = e - np.where(small, _ONE, _f32(0))
    x = x + tmp
    z = x * x
    y = np.full_like(x, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = _fma32(y, x, p)
    y = _fma32(y * x, z, e * _LOG_Q1)
    y = y - z * _HALF  # z * 0.5 is exact, fused or not
    return _fma32(e, _LOG_Q2, x + y)


def _cephes_sincosf(x):
    """sincos256_ps of avx_mathfun.h as GCC compiles it into torch, for float32 x >= 0: [N] -> ([N], [N])."""
    j = (x * _FOPI).astype(np.int32)  # truncation, as _mm256_cvttps_epi32
    j = (j + 1) & ~1
    y = j.astype(np.float32)
    sin_sign = ((j & 4) << 29).astype(np.uint32)
    poly_is_cos = (j & 2) == 0
    cos_sign = ((~(j - 2) & 4) << 29).astype(np.uint32)
    for dp in _MINUS_DP:  # extended precision modular arithmetic
        x = _fma32(y, dp, x)
    z = x * x
    yc = _fma32(_fma32(np.full_like(z, _COSCOF[0]), z, _COSCOF[1]), z, _COSCOF[2])
    yc = _fma32(z, yc * z, -(z * _HALF)) + _ONE
    ys = _fma32(_fma32(np.full_like(z, _SINCOF[0]), z, _SINCOF[1]), z, _SINCOF[2])
    ys = _fma32(x, z * ys, x)
    # The C code selects with and/andnot and adds the zeroed other polynomial; emulate it literally
    # so signed zeros come out the same.
    zero = _f32(0)
    ysin2 = np.where(poly_is_cos, ys, zero)
    ysin1 = np.where(poly_is_cos, zero, yc)
    sin = (ysin1 + ysin2).view(np.uint32) ^ sin_sign
    cos = ((yc - ysin1) + (ys - ysin2)).view(np.uint32) ^ cos_sign
    return sin.view(np.float32), cos.view(np.float32)


def _box_muller_16(u):
    """torch's vectorised (AVX2) normal_fill_16 on blocks of 16 uniforms: [K, 16] -> [K, 16].

    In each block the first 8 uniforms give the radius and the last 8 the angle;
    outputs are radius*cos in the first half and radius*sin in the second.
    """
    radius = np.sqrt(_f32(-2.0) * _cephes_logf((_ONE - u[:, :8]).ravel()))
    sin, cos = _cephes_sincosf((_TWO_PI_F32 * u[:, 8:]).ravel())
    # fma(n, std=1, mean=0) only turns -0.0 into +0.0
    out = np.concatenate([(radius * cos).reshape(-1, 8), (radius * sin).reshape(-1, 8)], axis=1)
    return out + _f32(0)


class TorchCPUGenerator:
    """`torch.Generator("cpu").manual_seed(seed)` and `torch.randn(shape, generator=...)` in numpy.

    Seeds as torch takes them: ints in [-2**63, 2**64), of which MT19937 uses the low 32 bits.
    """

    def __init__(self, seed):
        self.seed = _seed_u64(seed)
        self._mt = np.random.MT19937(0)
        self._mt.state = {"bit_generator": "MT19937",
                          "state": {"key": _mt19937_init_state(self.seed & 0xFFFFFFFF), "pos": _MT_N}}
        self._next_normal = None  # Box-Muller's second value, cached by the scalar path as torch does

    def _u32(self, n):
        return self._mt.random_raw(n).astype(np.uint32)

    def _uniform_f32(self, n):
        """at::uniform_real_distribution<float>(0, 1): 24 low bits of one draw."""
        return (self._u32(n) & np.uint32(0xFFFFFF)).astype(np.float32) * _f32(2.0 ** -24)

    def _uniform_f64(self):
        """at::uniform_real_distribution<double>(0, 1): 53 low bits of (first draw << 32 | second)."""
        hi, lo = (int(v) for v in self._u32(2))
        return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0 ** -53

    def _normal_f64(self):
        """at::normal_distribution<double>: Box-Muller in double, the sine kept for the next call."""
        if self._next_normal is not None:
            value, self._next_normal = self._next_normal, None
            return value
        u1 = self._uniform_f64()
        u2 = self._uniform_f64()
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_normal = r * math.sin(theta)
        return r * math.cos(theta)

    def randn(self, shape):
        """Next standard normal draw of this generator, as float32: shape -> shape."""
        shape, n = _numel(shape)
        if n < 16:
            return np.array([self._normal_f64() for _ in range(n)], dtype=np.float32).reshape(shape)
        data = self._uniform_f32(n)
        full = n - n % 16
        out = np.empty(n, dtype=np.float32)
        out[:full] = _box_muller_16(data[:full].reshape(-1, 16)).ravel()
        if full != n:
            # torch redraws 16 fresh uniforms for the last 16 values, overlapping the previous block
            out[n - 16:] = _box_muller_16(self._uniform_f32(16).reshape(1, 16)).ravel()
        return out.reshape(shape)


# ---------------------------------------------------------------------------------------------------
# NV source: Philox 4x32-10 and Box-Muller as A1111's rng_philox
# ---------------------------------------------------------------------------------------------------

_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_LO32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def philox4x32_10(counter, key):
    """Philox 4x32 with 10 rounds (Salmon et al. 2011): counter [4, N] uint32, key [2] -> [4, N] uint32."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint32) for c in counter)
    k0, k1 = int(key[0]), int(key[1])
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + _PHILOX_W[0]) & 0xFFFFFFFF, (k1 + _PHILOX_W[1]) & 0xFFFFFFFF
        p0 = c0.astype(np.uint64) * _PHILOX_M[0]
        p1 = c2.astype(np.uint64) * _PHILOX_M[1]
        c0, c1, c2, c3 = (
            (p1 >> _SHIFT32).astype(np.uint32) ^ c1 ^ np.uint32(k0),
            (p1 & _LO32).astype(np.uint32),
            (p0 >> _SHIFT32).astype(np.uint32) ^ c3 ^ np.uint32(k1),
            (p0 & _LO32).astype(np.uint32),
        )
    return np.stack([c0, c1, c2, c3])


# curand's 2**-32 and 2**-32 * 2pi as the float32 literals A1111 uses
_TWO_POW32_INV = float(_f32(2.3283064e-10))
_TWO_POW32_INV_2PI = float(_f32(2.3283064e-10 * 6.2831855))


class PhiloxGenerator:
    """A1111's NV generator: one Philox counter offset per draw, one counter index per element."""

    def __init__(self, seed):
        self.seed = _seed_u64(seed)
        self.offset = 0

    def randn(self, shape):
        """Next standard normal draw of this generator, as float32: shape -> shape."""
        shape, n = _numel(shape)
        if n > 1 << 32:
            raise ValueError(f"shape {shape} has {n} elements; the NV source draws at most 2**32 at once")
        zeros = np.zeros(n, dtype=np.uint32)
        index = np.arange(n, dtype=np.uint64).astype(np.uint32)
        counter = (np.full(n, self.offset & 0xFFFFFFFF, dtype=np.uint32), zeros, index, zeros)
        self.offset += 1
        x, y = philox4x32_10(counter, (self.seed & 0xFFFFFFFF, self.seed >> 32))[:2]
        u = x * _TWO_POW32_INV + _TWO_POW32_INV / 2
        v = y * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
        return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32).reshape(shape)


# ---------------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------------

def create_generator(seed, source="nv"):
    """A fresh generator for seed: `.randn(shape)` continues its stream on every call."""
    if source == "cpu":
        return TorchCPUGenerator(seed)
    if source == "nv":
        return PhiloxGenerator(seed)
    raise ValueError(f"unknown RNG source {source!r}; valid: {', '.join(SOURCES)}")


def randn(seed, shape, source="nv"):
    """The first standard normal draw of seed: float32 array of shape."""
    return create_generator(seed, source).randn(shape)


def slerp(val, low, high):
    """A1111's variation-seed slerp, per (channel, column) along dim 1 of low/high: [C, H, W].

    Kept as A1111 has it, including the near-parallel fallback that weighs low by val.
    """
    low = np.asarray(low, dtype=np.float64)
    high = np.asarray(high, dtype=np.float64)
    low_norm = low / np.linalg.norm(low, axis=1, keepdims=True)
    high_norm = high / np.linalg.norm(high, axis=1, keepdims=True)
    dot = (low_norm * high_norm).sum(axis=1)
    if dot.mean() > 0.9995:
        return (low * val + high * (1 - val)).astype(np.float32)
    omega = np.arccos(dot)
    so = np.sin(omega)
    res = (np.expand_dims(np.sin((1.0 - val) * omega) / so, 1) * low
           + np.expand_dims(np.sin(val * omega) / so, 1) * high)
    return res.astype(np.float32)


def _paste_centred(x, noise):
    """A1111's seed-resize paste: noise [C, h, w] centred on x [C, H, W], cropped where larger."""
    dx = (x.shape[2] - noise.shape[2]) // 2
    dy = (x.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    x = x.copy()
    x[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
    return x


class ImageRNG:
    """Per-image noise for a batch, as A1111's `modules.rng.ImageRNG`.

    shape: per-image latent shape (C, H, W). `first()` is the initial noise [B, C, H, W]; `next()`
    continues each image's own generator (its first call returns `first()` if that was not called).
    eta_noise_seed_delta: A1111's "Eta noise seed delta"; when set, the streams after the initial
    noise restart from seed + delta.
    """

    def __init__(self, shape, seeds, source="nv", subseeds=None, subseed_strength=0.0,
                 seed_resize_from_h=0, seed_resize_from_w=0, eta_noise_seed_delta=0):
        if source not in SOURCES:
            raise ValueError(f"unknown RNG source {source!r}; valid: {', '.join(SOURCES)}")
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3:
            raise ValueError(f"shape {self.shape} is not a per-image latent shape (C, H, W)")
        self.seeds = [int(s) for s in seeds]
        self.source = source
        self.subseeds = None if subseeds is None else [int(s) for s in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from_h = int(seed_resize_from_h)
        self.seed_resize_from_w = int(seed_resize_from_w)
        self.eta_noise_seed_delta = int(eta_noise_seed_delta or 0)
        self.generators = [create_generator(seed, source) for seed in self.seeds]
        self.is_first = True

    def _noise_shape(self):
        if self.seed_resize_from_h <= 0 or self.seed_resize_from_w <= 0:
            return self.shape
        return (self.shape[0], self.seed_resize_from_h // 8, self.seed_resize_from_w // 8)

    def first(self):
        """Initial noise: [B, C, H, W] float32."""
        self.is_first = False
        xs = [self._first_noise(i, seed, generator)
              for i, (seed, generator) in enumerate(zip(self.seeds, self.generators))]
        if self.eta_noise_seed_delta:
            self.generators = [create_generator(seed + self.eta_noise_seed_delta, self.source)
                               for seed in self.seeds]
        return np.stack(xs).astype(np.float32)

    def _first_noise(self, i, seed, generator):
        """One image's initial noise: [C, H, W]. Noise at another size and subseed noise come from fresh
        generators, as A1111 draws them; the image's own generator always advances by one draw."""
        noise_shape = self._noise_shape()
        resized = noise_shape != self.shape
        noise = randn(seed, noise_shape, self.source) if resized else generator.randn(self.shape)
        if self.subseeds is not None and self.subseed_strength != 0:
            subseed = self.subseeds[i] if i < len(self.subseeds) else 0
            noise = slerp(self.subseed_strength, noise, randn(subseed, noise_shape, self.source))
        if resized:
            noise = _paste_centred(generator.randn(self.shape), noise)
        return noise

    def next(self):
        """Next draw of each image's stream: [B, C, H, W] float32."""
        if self.is_first:
            return self.first()
        return np.stack([generator.randn(self.shape) for generator in self.generators])
