"""Image operations of A1111's face restoration (facexlib's helper), in numpy with OpenCV's arithmetic.

facexlib does these with OpenCV; sdonnx needs no OpenCV, so each is written here to give OpenCV's
numbers: bilinear warps sample at OpenCV's 1/32-pixel positions with its integer rounding for 8-bit
images, the Gaussian blur uses OpenCV's kernel and reflect-101 border, the Lanczos resize OpenCV's
8-tap kernel with its 11-bit fixed-point weights. tests/test_faces.py compares each with the OpenCV installed;
bench/face_ops_opencv.py measured them identical to OpenCV 4.10's (OpenCV 5 computes 8-bit warps in float32).
"""
import math

import numpy as np

_AB_BITS, _INTER_BITS = 10, 5  # OpenCV's warpAffine: coordinates in 1/1024, then rounded to 1/32 pixel


def similarity_transform(src, dst):
    """2x3 matrix of the similarity (rotation, uniform scale, shift) taking the points src to dst in the
    least-squares sense (OpenCV's estimateAffinePartial2D model). src, dst: [N, 2]."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    x, y = src[:, 0], src[:, 1]
    ones, zeros = np.ones_like(x), np.zeros_like(x)
    # [a -b tx; b a ty] applied to (x, y): two linear equations per point in (a, b, tx, ty)
    rows = np.concatenate([np.stack([x, -y, ones, zeros], 1), np.stack([y, x, zeros, ones], 1)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(rows, np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


def invert_affine(matrix):
    """Inverse of a 2x3 affine matrix (OpenCV's invertAffineTransform)."""
    linear = np.linalg.inv(matrix[:, :2])
    return np.concatenate([linear, -linear @ matrix[:, 2:]], axis=1)


def _sample_positions(inverse, xs, ys):
    """Source positions of the output pixels xs x ys in 1/32 pixel, as OpenCV's warpAffine computes them
    (from the absolute output coordinates, so a window gives the same numbers as the whole image)."""
    scale = 1 << _AB_BITS
    round_delta = scale // (1 << _INTER_BITS) // 2
    shift = _AB_BITS - _INTER_BITS

    def axis(row):
        per_x = np.rint(inverse[row, 0] * xs * scale).astype(np.int64)
        per_y = np.rint((inverse[row, 1] * ys + inverse[row, 2]) * scale).astype(np.int64) + round_delta
        return (per_y[:, None] + per_x[None, :]) >> shift

    return axis(0), axis(1)


def warp_affine(image, matrix, size, border=0.0, window=None):
    """OpenCV's warpAffine(image, matrix, size) with bilinear sampling and a constant border.

    image: [H, W] or [H, W, C], uint8 (results rounded as OpenCV rounds) or float; matrix maps source to
    output pixels; size: (width, height) of the output; border: value or per-channel values; window:
    (x0, y0, x1, y1), only that part of the output (the rest would be border)."""
    x0, y0, x1, y1 = window or (0, 0, *size)
    sx, sy = _sample_positions(invert_affine(np.asarray(matrix, np.float64)), np.arange(x0, x1), np.arange(y0, y1))
    x0, y0 = sx >> _INTER_BITS, sy >> _INTER_BITS
    fx, fy = (sx & 31) / 32.0, (sy & 31) / 32.0
    height, width = sx.shape
    src = image.astype(np.float64)
    extra = src.shape[2:]
    fill = np.broadcast_to(np.asarray(border, np.float64), extra) if extra else float(border)
    h, w = image.shape[:2]
    out = np.zeros((height, width) + extra)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            value = np.where(inside[..., None] if extra else inside,
                             src[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)], fill)
            weight = wx * wy
            out += (weight[..., None] if extra else weight) * value
    if image.dtype == np.uint8:  # exact 1/1024 weights: OpenCV's 15-bit fixed point, rounded half up
        return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    return out.astype(image.dtype)


def footprint(matrix, size, bounds):
    """(x0, y0, x1, y1): the output pixels a [size, size] source can reach through `matrix`, one pixel of
    bilinear reach added, clipped to bounds (width, height)."""
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) @ np.asarray(matrix).T
    low, high = np.floor(corners.min(0)) - 2, np.ceil(corners.max(0)) + 2
    x0, y0 = (int(max(0, v)) for v in low)
    x1, y1 = int(min(bounds[0], max(high[0], 0))), int(min(bounds[1], max(high[1], 0)))
    return x0, y0, max(x0, x1), max(y0, y1)


def gaussian_kernel(ksize, sigma):
    """OpenCV's getGaussianKernel (float64) for ksize > 7."""
    x = np.arange(ksize) - (ksize - 1) * 0.5
    kernel = np.exp(-0.5 / (sigma * sigma) * x * x)
    return kernel / kernel.sum()


def _blur_matrix(n, kernel):
    """[n, n] matrix applying `kernel` along one axis with OpenCV's default reflect-101 border."""
    radius = len(kernel) // 2
    matrix = np.zeros((n, n))
    rows = np.arange(n)
    for t, k in enumerate(kernel):
        j = rows + t - radius
        period = 2 * (n - 1) if n > 1 else 1
        j = np.abs(j) % period
        j = np.where(j >= n, period - j, j)
        np.add.at(matrix, (rows, j), k)
    return matrix


def gaussian_blur(image, ksize, sigma):
    """OpenCV's GaussianBlur(image, (ksize, ksize), sigma) of a float [H, W] array."""
    kernel = gaussian_kernel(ksize, sigma)
    h, w = image.shape
    return _blur_matrix(h, kernel) @ image @ _blur_matrix(w, kernel).T


def _lanczos4_taps(dst, src):
    """(indices [dst, 8], weights [dst, 8]) of OpenCV's INTER_LANCZOS4 resize along one axis: 8 source
    pixels per output pixel (edge pixels repeated outside the image), weights in its 11-bit fixed point."""
    scale = src / dst
    s45 = 0.70710678118654752440084436210485
    cs = [(1, 0), (-s45, -s45), (0, 1), (s45, -s45), (-1, 0), (s45, s45), (0, -1), (-s45, s45)]
    indices, weights = np.zeros((dst, 8), np.int64), np.zeros((dst, 8), np.int64)
    for d in range(dst):
        f = np.float32((d + 0.5) * scale - 0.5)
        start = math.floor(f)
        x = np.float32(f - start)
        y0 = -(float(x) + 3) * math.pi * 0.25
        s0, c0 = math.sin(y0), math.cos(y0)
        coeffs = np.zeros(8, np.float32)
        for i in range(8):
            t = np.float32(x + 3 - i)
            if abs(t) >= 1e-6:
                y = -float(t) * math.pi * 0.25
                coeffs[i] = np.float32((cs[i][0] * s0 + cs[i][1] * c0) / (y * y))
            else:
                coeffs[i] = np.float32(1e30)
        coeffs = coeffs * (np.float32(1) / np.sum(coeffs, dtype=np.float32))
        indices[d] = np.clip(np.arange(start - 3, start + 5), 0, src - 1)
        weights[d] = np.rint(coeffs * 2048).astype(np.int64)
    return indices, weights


def resize_lanczos4(image, size, chunk_elements=1 << 22):
    """OpenCV's resize(image, size, interpolation=INTER_LANCZOS4) of a uint8 [H, W, C] image.

    Integer sums as OpenCV's fixed point (exact, so the order of the two passes does not matter), the
    output made in bands of rows so that memory follows the band, not the image."""
    width, height = size
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image.copy()
    rows, row_weights = _lanczos4_taps(height, h)
    cols, col_weights = _lanczos4_taps(width, w)
    out = np.empty((height, width, image.shape[2]), np.uint8)
    band = max(1, chunk_elements // (8 * max(w, width) * image.shape[2]))
    for y in range(0, height, band):
        taps = image[rows[y:y + band]].astype(np.int64)  # [band, 8, W, C]
        vertical = np.einsum("bkwc,bk->bwc", taps, row_weights[y:y + band])
        total = np.einsum("bxkc,xk->bxc", vertical[:, cols], col_weights)
        out[y:y + band] = np.clip((total + (1 << 21)) >> 22, 0, 255)
    return out
