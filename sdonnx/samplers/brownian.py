"""Brownian-tree noise for the SDE samplers, in numpy (behaves like k-diffusion's torchsde-backed one).

W is a Brownian motion on [sigma_min, sigma_max], W(sigma_min) = 0, defined lazily by a binary tree
(Levy's construction): the root draws W(sigma_max); every dyadic midpoint is drawn from the Brownian
bridge between its interval's ends with a generator keyed by (seed, depth, index). W at any point is
therefore a pure function of the seed, so interval noise is the same whatever the query order, and
W(c) - W(a) = (W(b) - W(a)) + (W(c) - W(b)) exactly. Below `tol` the path is linear between dyadic
points. Values do not match torchsde bit for bit.
"""

import math

import numpy as np


def _normal(seed, key, shape):
    """Standard normal draws from a generator keyed by the seed and the tree node."""
    sequence = np.random.SeedSequence(entropy=seed % 2 ** 64, spawn_key=key)
    return np.random.Generator(np.random.PCG64(sequence)).standard_normal(shape)


def brownian_path(t, t0, t1, seed, shape, tol=1e-6):
    """W(t) of the tree-defined Brownian motion on [t0, t1] with W(t0) = 0: float64 [*shape]."""
    t = min(max(t, t0), t1)
    a, b = t0, t1
    w_a = np.zeros(shape)
    w_b = math.sqrt(t1 - t0) * _normal(seed, (0,), shape)
    depth, index = 0, 0
    while b - a > tol and t not in (a, b):
        mid = (a + b) / 2
        w_mid = (w_a + w_b) / 2 + math.sqrt((b - a) / 4) * _normal(seed, (1, depth, index), shape)
        depth += 1
        if t < mid:
            b, w_b, index = mid, w_mid, 2 * index
        else:
            a, w_a, index = mid, w_mid, 2 * index + 1
    if t == a:
        return w_a
    if t == b:
        return w_b
    return w_a + (w_b - w_a) * ((t - a) / (b - a))


class BrownianTreeNoiseSampler:
    """noise(sigma, sigma_next) = (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|), like k-diffusion.

    x_shape: shape of the latent [B, C, H, W]. seed: an int (one tree for the whole batch) or one int per
    batch item (A1111 passes the per-image seeds; each item then gets its own tree).
    """

    def __init__(self, x_shape, sigma_min, sigma_max, seed, dtype=np.float32, tol=1e-6):
        self.x_shape = tuple(x_shape)
        self.t0, self.t1 = float(min(sigma_min, sigma_max)), float(max(sigma_min, sigma_max))
        self.dtype = np.dtype(dtype)
        self.tol = tol
        self._recent = {}  # a few W(t) already built; values never depend on it
        if isinstance(seed, (int, np.integer)):
            self.seeds = (int(seed),)
        else:
            self.seeds = tuple(int(s) for s in seed)
            if len(self.seeds) != self.x_shape[0]:
                raise ValueError(f"got {len(self.seeds)} seeds for a batch of {self.x_shape[0]}")

    def w(self, t):
        """W(t) for the whole batch: float64 [*x_shape]. Memoised: consecutive steps share an end."""
        if t not in self._recent:
            if len(self.seeds) == 1:
                w = brownian_path(t, self.t0, self.t1, self.seeds[0], self.x_shape, self.tol)
            else:
                w = np.stack([brownian_path(t, self.t0, self.t1, s, self.x_shape[1:], self.tol) for s in self.seeds])
            self._recent = {**dict(list(self._recent.items())[-3:]), t: w}
        return self._recent[t]

    def __call__(self, sigma, sigma_next):
        sigma, sigma_next = float(sigma), float(sigma_next)
        dw = self.w(sigma_next) - self.w(sigma)
        return (dw / math.sqrt(abs(sigma_next - sigma))).astype(self.dtype)
