"""Tiled VAE decode and encode: large images in overlapping tiles, blended with linear ramps.

Each tile goes through the VAE on its own, so peak memory inside the VAE follows the tile size, not the
image size (only the output array is full size). Tiles differ slightly from a whole-image pass because
the VAE's GroupNorm statistics are taken per tile; the ramps over the overlaps hide the seams that this
would leave.
"""
import numpy as np

# above this many image pixels (e.g. larger than 1024x1024) the pipeline tiles the VAE unless told
# otherwise: around there a whole-image SD VAE pass needs several GiB of activations (the decoder's
# full-resolution convolutions and its mid-block attention over every latent pixel)
TILE_THRESHOLD = 1024 * 1024


def needs_tiling(height, width, threshold=TILE_THRESHOLD):
    """Whether an image of height x width pixels is above `threshold` pixels and so should be tiled."""
    return height * width > threshold


def decode_tiled(decode_fn, latents, tile=64, overlap=16):
    """latents: [B, C, h, w] -> images [B, 3, 8h, 8w], decoding latent tiles of at most tile x tile
    overlapping by `overlap` latent pixels. decode_fn: [B, C, th, tw] -> [B, 3, 8th, 8tw]."""
    return _tiled(lambda x: (decode_fn(x),), latents, tile, overlap, unit=1)[0]


def encode_tiled(encode_fn, images, tile=512, overlap=64, factor=8):
    """images: [B, 3, H, W] -> (mean, logvar), each [B, C, H/factor, W/factor], encoding image tiles of at
    most tile x tile pixels overlapping by `overlap`. encode_fn: [B, 3, th, tw] -> (mean, logvar).

    factor: the VAE's downsampling; H, W, tile and overlap must be multiples of it."""
    bad = {k: v for k, v in {"height": images.shape[-2], "width": images.shape[-1], "tile": tile,
                             "overlap": overlap}.items() if v % factor}
    if bad:
        raise ValueError(f"encode_tiled: {bad} must be multiples of the VAE factor {factor}")
    return tuple(_tiled(encode_fn, images, tile // factor, overlap // factor, unit=factor))


def _spans(n, tile, overlap):
    """[(start, end)] of the tiles along an axis of n units: stride tile - overlap, the last flush with n."""
    if n <= tile:
        return [(0, n)]
    starts = list(range(0, n - tile, tile - overlap)) + [n - tile]
    return [(s, s + tile) for s in starts]


def _ramp(start, end, n, overlap):
    """Blend weights [end - start] of one tile along an axis of n pixels: rising over `overlap` where a
    tile lies before it, falling where one lies after; strictly positive, so every pixel has weight."""
    weight = np.ones(end - start, np.float32)
    if overlap:
        rise = ((np.arange(overlap) + 0.5) / overlap).astype(np.float32)
        if start > 0:
            weight[:overlap] = np.minimum(weight[:overlap], rise)
        if end < n:
            weight[-overlap:] = np.minimum(weight[-overlap:], rise[::-1])
    return weight


def _tiled(fn, x, tile, overlap, unit):
    """Run fn (array -> tuple of arrays) over overlapping tiles of x and blend its outputs.

    Tiles are counted in units of `unit` input pixels (the VAE factor when encoding, 1 when decoding);
    each output is as many pixels per unit as fn makes of a tile, the same for all outputs."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tiled VAE: overlap {overlap * unit} must be at least 0 and less than the tile {tile * unit}")
    n_h, n_w = x.shape[-2] // unit, x.shape[-1] // unit
    rows, cols = _spans(n_h, tile, overlap), _spans(n_w, tile, overlap)
    if len(rows) == len(cols) == 1:
        return fn(x)
    sums, total, scale = None, None, None
    for r0, r1 in rows:
        for c0, c1 in cols:
            outs = fn(x[..., r0 * unit:r1 * unit, c0 * unit:c1 * unit])
            if sums is None:
                scale = outs[0].shape[-1] // (c1 - c0)
                if outs[0].shape[-1] != scale * (c1 - c0) or outs[0].shape[-2] != scale * (r1 - r0):
                    raise ValueError(f"tiled VAE: a {(r1 - r0) * unit}x{(c1 - c0) * unit} tile gave "
                                     f"{tuple(outs[0].shape[-2:])}, not a whole multiple")
                sums = [np.zeros(o.shape[:-2] + (n_h * scale, n_w * scale), np.float32) for o in outs]
                total = np.zeros((n_h * scale, n_w * scale), np.float32)
            weight = np.outer(_ramp(r0 * scale, r1 * scale, n_h * scale, overlap * scale),
                              _ramp(c0 * scale, c1 * scale, n_w * scale, overlap * scale))
            window = np.s_[..., r0 * scale:r1 * scale, c0 * scale:c1 * scale]
            for acc, out in zip(sums, outs):
                acc[window] += out * weight
            total[window] += weight
    return [acc / total for acc in sums]
