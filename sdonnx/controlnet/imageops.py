"""The image operations ControlNet preprocessors are made of, as OpenCV computes them.

sd-webui-controlnet calls OpenCV for every one of them. When OpenCV is installed (the `sdonnx[opencv]` extra) the
public functions here call it, so results equal the extension's; otherwise they run the numpy re-statements below
(`*_np`), which follow OpenCV's definitions (kernel sizes, sampling grids, border rules) and differ from it only by
OpenCV's fixed-point rounding. tests/test_controlnet_preprocess.py states by how much.

Images are numpy arrays [H, W] or [H, W, C], uint8 unless a function says otherwise.
"""

from __future__ import annotations

import numpy as np

NEAREST, LINEAR, CUBIC, AREA = "nearest", "linear", "cubic", "area"
_CUBIC_A = -0.75  # OpenCV's bicubic kernel parameter (PIL uses -0.5)


def opencv():
    """The cv2 module, or None when OpenCV is not installed."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


# ----------------------------------------------------------------------------------------------- resize
def resize(img: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """cv2.resize(img, size=(width, height), interpolation) for NEAREST, LINEAR, CUBIC or AREA."""
    cv2 = opencv()
    if cv2 is None:
        return resize_np(img, size, interpolation)
    flags = {NEAREST: cv2.INTER_NEAREST, LINEAR: cv2.INTER_LINEAR, CUBIC: cv2.INTER_CUBIC, AREA: cv2.INTER_AREA}
    out = cv2.resize(img, size, interpolation=flags[interpolation])
    return out[:, :, None] if img.ndim == 3 and out.ndim == 2 else out


def resize_np(img: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """`resize` in numpy: each axis resampled by its taps, in float32."""
    width, height = size
    h, w = img.shape[:2]
    both_shrink = height <= h and width <= w
    rows = _sampling_taps(interpolation, h, height, both_shrink)
    cols = _sampling_taps(interpolation, w, width, both_shrink)
    y = _separable(img, rows, cols)
    if interpolation == AREA and h % height == 0 and w % width == 0:
        y += 1e-3  # OpenCV averages whole blocks in integers, rounding halves up
    return _saturate(y, img.dtype)


def _sampling_taps(interpolation, n_src, n_dst, both_shrink):
    """How each output pixel of one axis mixes input pixels: (index, weight), both [n_dst, taps]."""
    if interpolation == NEAREST:
        src = np.minimum(np.floor(np.arange(n_dst) * _scale(n_src, n_dst)).astype(np.int64), n_src - 1)
        return _taps(n_src, src[:, None], np.ones((n_dst, 1)))
    if interpolation == AREA:
        # OpenCV averages pixel areas only when neither axis grows; otherwise it interpolates linearly
        # with its own "area" coefficients
        return _area_taps(n_src, n_dst) if both_shrink else _area_zoom_taps(n_src, n_dst)
    if interpolation == LINEAR:
        return _linear_taps(n_src, n_dst)
    if interpolation == CUBIC:
        return _cubic_taps(n_src, n_dst)
    raise ValueError(f"unknown interpolation {interpolation!r}; valid: {NEAREST}, {LINEAR}, {CUBIC}, {AREA}")


def _scale(n_src, n_dst):
    """Source pixels per output pixel, rounded as OpenCV computes it (the inverse of its inverse)."""
    return 1.0 / (n_dst / n_src)


def _source_position(n_src, n_dst):
    """(index, fraction) of the output pixel centres in the input, in float32 as OpenCV keeps them."""
    fx = ((np.arange(n_dst) + 0.5) * _scale(n_src, n_dst) - 0.5).astype(np.float32)
    sx = np.floor(fx).astype(np.int64)
    return sx, (fx - sx).astype(np.float64)


def _taps(n_src, index, weight):
    """(index, weight) with indices past the border on the border pixel."""
    return np.clip(index, 0, n_src - 1), np.broadcast_to(weight, index.shape).astype(np.float32)


def _area_taps(n_src, n_dst):
    """Each output pixel is the mean of the input it covers, partly covered pixels by the covered fraction."""
    scale = n_src / n_dst
    start = (np.arange(n_dst) * scale)[:, None]
    index = np.floor(start).astype(np.int64) + np.arange(int(np.ceil(scale)) + 1)[None, :]
    overlap = np.minimum(index + 1, start + scale) - np.maximum(index, start)
    weight = np.where(index < n_src, np.clip(overlap, 0, None) / scale, 0.0)
    return _taps(n_src, index, weight)


def _area_zoom_taps(n_src, n_dst):
    dst = np.arange(n_dst)
    sx = np.floor(dst * _scale(n_src, n_dst)).astype(np.int64)
    fx = ((dst + 1) - (sx + 1) * (n_dst / n_src)).astype(np.float32).astype(np.float64)
    fx = np.where(fx <= 0, 0.0, fx - np.floor(fx))
    fx = np.where(sx + 1 >= n_src, 0.0, fx)
    return _taps(n_src, np.stack([sx, sx + 1], 1), np.stack([1 - fx, fx], 1))


def _linear_taps(n_src, n_dst):
    sx, fx = _source_position(n_src, n_dst)
    # OpenCV clamps the sampling position into the image
    fx = np.where(sx < 0, 0.0, fx)
    sx = np.maximum(sx, 0)
    fx = np.where(sx >= n_src - 1, 0.0, fx)
    return _taps(n_src, np.stack([sx, sx + 1], 1), np.stack([1 - fx, fx], 1))


def _cubic_taps(n_src, n_dst):
    sx, fx = _source_position(n_src, n_dst)
    a = _CUBIC_A
    w0 = ((a * (fx + 1) - 5 * a) * (fx + 1) + 8 * a) * (fx + 1) - 4 * a
    w1 = ((a + 2) * fx - (a + 3)) * fx * fx + 1
    w2 = ((a + 2) * (1 - fx) - (a + 3)) * (1 - fx) * (1 - fx) + 1
    w3 = 1 - w0 - w1 - w2
    index = sx[:, None] + np.arange(-1, 3)[None, :]  # neighbours past the border repeat the border pixel
    return _taps(n_src, index, np.stack([w0, w1, w2, w3], 1))


def _separable(img, rows, cols):
    """img [H, W] or [H, W, C] -> float32 [H', W'(, C)]: rows resampled by the row taps, then columns."""
    return _along(_along(img, rows, 0), cols, 1)


def _along(x, taps, axis):
    index, weight = taps
    n_src = x.shape[axis]
    if index.shape[1] * 32 > n_src:
        # wide kernels (blurs): one matrix product beats a loop over the taps
        matrix = np.zeros((index.shape[0], n_src), np.float32)
        np.add.at(matrix, (np.broadcast_to(np.arange(index.shape[0])[:, None], index.shape), index), weight)
        return np.moveaxis(np.tensordot(matrix, x.astype(np.float32), axes=(1, axis)), 0, axis)
    # few taps (resizing): gathered rows, weighted and summed; a large image is never copied whole to float
    shape = [1] * x.ndim
    shape[axis] = -1
    out = None
    for k in range(index.shape[1]):
        term = np.take(x, index[:, k], axis=axis).astype(np.float32, copy=False) * weight[:, k].reshape(shape)
        out = term if out is None else np.add(out, term, out=out)
    return out


def _saturate(x, dtype):
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    return x.astype(dtype)


# ----------------------------------------------------------------------------------------------- blur
def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """cv2.GaussianBlur(img, (0, 0), sigma): kernel size from sigma, mirrored borders (BORDER_REFLECT_101)."""
    cv2 = opencv()
    if cv2 is None:
        return gaussian_blur_np(img, sigma)
    out = cv2.GaussianBlur(img, (0, 0), float(sigma))
    return out[:, :, None] if img.ndim == 3 and out.ndim == 2 else out


def gaussian_blur_np(img: np.ndarray, sigma: float) -> np.ndarray:
    h, w = img.shape[:2]
    # OpenCV sizes the kernel to 3 sigmas for 8-bit images and 4 for float ones
    radius_sigmas = 3 if img.dtype == np.uint8 else 4
    ksize = int(np.rint(sigma * radius_sigmas * 2 + 1)) | 1
    kernel = _gaussian_kernel(ksize, sigma)
    return _saturate(_separable(img, _convolution_taps(kernel, h), _convolution_taps(kernel, w)), img.dtype)


def _gaussian_kernel(ksize, sigma):
    x = np.arange(ksize) - (ksize - 1) * 0.5
    k = np.exp(-0.5 * x * x / (sigma * sigma))
    return k / k.sum()


def box_blur(img: np.ndarray, ksize: int) -> np.ndarray:
    """cv2.blur(img, (ksize, ksize)): the mean over a ksize x ksize window anchored at its centre, mirrored
    borders (BORDER_REFLECT_101)."""
    cv2 = opencv()
    if cv2 is None:
        box = np.full(ksize, 1.0 / ksize)
        rows, cols = _convolution_taps(box, img.shape[0]), _convolution_taps(box, img.shape[1])
        return _saturate(_separable(img, rows, cols), img.dtype)
    return _keep_channels(img, cv2.blur(img, (ksize, ksize)))


def _convolution_taps(kernel, n):
    """A 1-D correlation anchored at the kernel's centre (len // 2), borders mirrored without repeating the edge
    pixel."""
    index = np.arange(n)[:, None] + (np.arange(len(kernel)) - len(kernel) // 2)[None, :]
    return _taps(n, reflect101(index, n), kernel[None, :])


def reflect101(index: np.ndarray, n: int) -> np.ndarray:
    """OpenCV's BORDER_REFLECT_101 index map (gfedcb|abcdefgh|gfedcba), also for offsets beyond one period."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * n - 2
    i = np.abs(index) % period
    return np.where(i >= n, period - i, i)


# ----------------------------------------------------------------------------------------------- morphology
def dilate(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.dilate(img, kernel) for a 0/1 kernel anchored at its centre: the maximum over the kernel's pixels;
    outside the image counts as nothing."""
    cv2 = opencv()
    if cv2 is None:
        return _morph_np(img, kernel, np.maximum, np.iinfo(img.dtype).min if img.dtype == np.uint8 else -np.inf)
    return _keep_channels(img, cv2.dilate(img, kernel.astype(np.uint8)))


def erode(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.erode(img, kernel) for a 0/1 kernel anchored at its centre: the minimum; outside the image counts as
    nothing."""
    cv2 = opencv()
    if cv2 is None:
        return _morph_np(img, kernel, np.minimum, np.iinfo(img.dtype).max if img.dtype == np.uint8 else np.inf)
    return _keep_channels(img, cv2.erode(img, kernel.astype(np.uint8)))


def hit_or_miss(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.morphologyEx(img, MORPH_HITMISS, kernel) on a 0/255 [H, W] image; kernel 3x3 of 1 (must be set),
    -1 (must be clear), 0 (either). Outside the image satisfies both."""
    cv2 = opencv()
    if cv2 is None:
        return hit_or_miss_np(img, kernel)
    return cv2.morphologyEx(img, cv2.MORPH_HITMISS, kernel.astype(np.int32))


def hit_or_miss_np(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    fits = np.ones(img.shape, dtype=bool)
    if (kernel == 1).any():
        fits &= _morph_np(img, kernel == 1, np.minimum, 255) == 255
    if (kernel == -1).any():
        fits &= _morph_np(255 - img, kernel == -1, np.minimum, 255) == 255
    return np.where(fits, 255, 0).astype(np.uint8)


def _morph_np(img, kernel, combine, outside):
    h, w = img.shape[:2]
    (kh, kw), (ay, ax) = kernel.shape, (kernel.shape[0] // 2, kernel.shape[1] // 2)
    pad = [(ay, kh - 1 - ay), (ax, kw - 1 - ax)] + [(0, 0)] * (img.ndim - 2)
    padded = np.pad(img, pad, constant_values=outside)
    out = None
    for dy, dx in zip(*np.nonzero(kernel)):
        window = padded[dy:dy + h, dx:dx + w]
        out = window.copy() if out is None else combine(out, window)
    return out


def _keep_channels(img, out):
    return out[:, :, None] if img.ndim == 3 and out.ndim == 2 else out


def otsu_threshold(gray: np.ndarray) -> np.ndarray:
    """cv2.threshold(gray, 0, 255, THRESH_BINARY | THRESH_OTSU)[1]: 255 above the threshold that best separates
    the histogram into two classes (largest between-class variance), else 0. gray: uint8 [H, W]."""
    cv2 = opencv()
    if cv2 is None:
        return np.where(gray > otsu_level_np(gray), 255, 0).astype(np.uint8)
    return cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]


def otsu_level_np(gray: np.ndarray) -> int:
    p = np.bincount(gray.ravel(), minlength=256).astype(np.float64) / gray.size
    i = np.arange(256)
    q1 = np.cumsum(p)
    q2 = 1.0 - q1
    eps = np.finfo(np.float32).eps
    valid = (np.minimum(q1, q2) >= eps) & (np.maximum(q1, q2) <= 1.0 - eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu1 = np.cumsum(i * p) / q1
        mu2 = ((i * p).sum() - q1 * mu1) / q2
        sigma = np.where(valid, q1 * q2 * (mu1 - mu2) ** 2, 0.0)
    # OpenCV keeps the first level of the largest variance, and 0 when no level splits the histogram
    return int(np.argmax(sigma)) if sigma.max() > 0 else 0


# ----------------------------------------------------------------------------------------------- canny
_TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)  # tan(22.5 deg) in OpenCV's 15-bit fixed point


def canny(img: np.ndarray, low: float, high: float) -> np.ndarray:
    """cv2.Canny(img, low, high): uint8 [H, W] or [H, W, C] -> uint8 [H, W] of 0/255 edges.

    OpenCV's Canny, which the extension calls: 3x3 Sobel gradients (replicated borders) with the L1 magnitude
    |dx| + |dy| (per pixel the channel of largest magnitude), non-maximum suppression along the gradient's
    direction quantized to 0/45/90/135 degrees, then hysteresis: pixels above `high` start edges that grow through
    8-connected pixels above `low`. Like OpenCV it does not blur first: callers blur when they want to."""
    cv2 = opencv()
    if cv2 is None:
        return canny_np(img, low, high)
    return cv2.Canny(img, low, high)


def canny_np(img: np.ndarray, low: float, high: float) -> np.ndarray:
    low, high = sorted((low, high))
    dx, dy, mag = _sobel_l1(img)
    candidate = (mag > int(np.floor(low))) & _is_ridge(dx, dy, mag)
    strong = candidate & (mag > int(np.floor(high)))
    return np.where(_grow(strong, candidate), 255, 0).astype(np.uint8)


def _sobel_l1(img):
    """dx, dy: int32 [H, W] Sobel derivatives and mag = |dx| + |dy|, of the strongest channel at each pixel.
    (int32 holds the fixed-point sector tests too: with |dx|, |dy| <= 1020, |dy| << 15 and |dx| * TG22 + (|dx| << 16)
    stay below 2**27.)"""
    x = img.astype(np.int32)
    x = x[:, :, None] if x.ndim == 2 else x
    p = np.pad(x, [(1, 1), (1, 1), (0, 0)], mode="edge")
    h, w = x.shape[:2]

    def at(dy, dx):
        return p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    mag = np.abs(gx) + np.abs(gy)
    pick = np.argmax(mag, axis=2)[:, :, None]  # first channel among equals, as OpenCV
    return (np.take_along_axis(gx, pick, 2)[:, :, 0], np.take_along_axis(gy, pick, 2)[:, :, 0],
            np.take_along_axis(mag, pick, 2)[:, :, 0])


def _is_ridge(dx, dy, mag):
    """Non-maximum suppression with OpenCV's sector tests and tie rules; outside the image counts as 0."""
    h, w = mag.shape
    m = np.pad(mag, 1)

    def at(oy, ox):
        return m[1 + oy:1 + oy + h, 1 + ox:1 + ox + w]

    ax, ay = np.abs(dx), np.abs(dy) << 15
    tg22x = ax * _TG22
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg22x + (ax << 16))
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0  # down-right diagonal when the signs agree, down-left otherwise
    ridge = horizontal & (mag > at(0, -1)) & (mag >= at(0, 1))
    ridge |= vertical & (mag > at(-1, 0)) & (mag >= at(1, 0))
    ridge |= diagonal & same_sign & (mag > at(-1, -1)) & (mag > at(1, 1))
    ridge |= diagonal & ~same_sign & (mag > at(-1, 1)) & (mag > at(1, -1))
    return ridge


def _grow(seeds, allowed):
    """The pixels of `allowed` 8-connected to a seed, by breadth-first search over flat indices."""
    h, w = allowed.shape
    todo = np.pad(allowed & ~seeds, 1).ravel()  # a false frame: neighbours never leave the image
    done = np.pad(seeds, 1).ravel()
    step = w + 2
    offsets = np.array([-step - 1, -step, -step + 1, -1, 1, step - 1, step, step + 1])
    frontier = np.flatnonzero(done)
    while frontier.size:
        near = np.unique((frontier[:, None] + offsets[None, :]).ravel())
        frontier = near[todo[near]]
        todo[frontier] = False
        done[frontier] = True
    return done.reshape(h + 2, w + 2)[1:-1, 1:-1]


# ----------------------------------------------------------------------------------------------- remap
def remap(img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """cv2.remap(img, map_x, map_y, INTER_LINEAR): out[i, j] = img sampled bilinearly at (map_y, map_x)[i, j];
    outside the image reads 0. img: uint8 [H, W, C]; maps: float32 [H', W']."""
    cv2 = opencv()
    if cv2 is None:
        return remap_np(img, map_x, map_y)
    return _keep_channels(img, cv2.remap(img, map_x.astype(np.float32), map_y.astype(np.float32),
                                         cv2.INTER_LINEAR))


def remap_np(img, map_x, map_y):
    h, w = img.shape[:2]
    # OpenCV samples at 1/32 pixel steps
    qx, qy = np.rint(map_x * 32).astype(np.int64), np.rint(map_y * 32).astype(np.int64)
    x0, y0 = qx >> 5, qy >> 5
    fx, fy = ((qx & 31) / 32.0)[..., None], ((qy & 31) / 32.0)[..., None]

    def read(y, x):
        inside = ((y >= 0) & (y < h) & (x >= 0) & (x < w))[..., None]
        return np.where(inside, img[np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)], 0).astype(np.float64)

    top = read(y0, x0) * (1 - fx) + read(y0, x0 + 1) * fx
    bottom = read(y0 + 1, x0) * (1 - fx) + read(y0 + 1, x0 + 1) * fx
    return _saturate(top * (1 - fy) + bottom * fy, img.dtype)
