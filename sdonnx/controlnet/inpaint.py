"""The mask arithmetic of the extension's `inpaint_only` beyond the hint (scripts/hook.py, scripts/controlnet.py).

`inpaint_only` keeps the unmasked area: during sampling the predicted x0 outside a latent-sized mask is replaced
by the control image's latent (`latent_mask`), and the decoded image outside a grown, softened pixel mask is
replaced by the control image (`restore_unmasked`). Both take the prepared control image (`prepare_control_image`:
uint8 [H, W, 4], the mask in alpha, 255 = repaint).
"""

from __future__ import annotations

import numpy as np

from . import imageops

# A1111 setting "ControlNet inpainting Gaussian blur sigma" (control_net_inpaint_blur_sigma), its default
RESTORE_SIGMA = 7


def latent_mask(prepared: np.ndarray) -> np.ndarray:
    """[H, W, 4] -> float32 [1, 1, H/8, W/8]: 1 where a latent pixel touches the mask. The extension's
    max_pool2d(mask, kernel 10, stride 8, padding 1): each latent pixel looks one image pixel past its 8x8 cell."""
    mask = _mask(prepared)
    h, w = mask.shape
    out_h, out_w = (h + 2 - 10) // 8 + 1, (w + 2 - 10) // 8 + 1
    padded = np.pad(mask, 1, constant_values=-np.inf)
    pooled = np.full((out_h, out_w), -np.inf, np.float32)
    for dy in range(10):
        for dx in range(10):
            pooled = np.maximum(pooled, padded[dy::8, dx::8][:out_h, :out_w])
    return pooled[None, None]


def restore_unmasked(image: np.ndarray, prepared: np.ndarray, sigma: int = RESTORE_SIGMA) -> np.ndarray:
    """The decoded image (float [H, W, 3] in [0, 1]) with the control image put back outside the mask, which is
    first grown by `sigma` pixels (a sigma x sigma dilation) and then softened (a sigma x sigma box blur)."""
    if int(sigma) != sigma or sigma < 1:
        raise ValueError(f"inpaint restore sigma must be a whole number of pixels >= 1, got {sigma}")
    if image.shape[:2] != prepared.shape[:2]:
        raise ValueError(f"image {image.shape[1]}x{image.shape[0]} and control image "
                         f"{prepared.shape[1]}x{prepared.shape[0]} differ in size")
    m = imageops.dilate(_mask(prepared), np.ones((sigma, sigma), np.uint8))
    m = imageops.box_blur(m, int(sigma))[:, :, None]
    original = prepared[:, :, :3].astype(np.float32) / 255.0
    return (m * np.clip(image, 0, 1) + (1 - m) * original).clip(0, 1)


def _mask(prepared):
    if prepared.ndim != 3 or prepared.shape[2] != 4:
        raise ValueError(f"inpaint_only needs the prepared control image with its mask ([H, W, 4]), got shape "
                         f"{prepared.shape}")
    return prepared[:, :, 3].astype(np.float32) / 255.0
