"""Images in and out of JSON: base64 PNG with infotext (A1111's encoding), and a cheap latent preview."""
import base64
import binascii
import io

import numpy as np
from PIL import Image

from ..image import ImageError, image_size, open_image, png_texts

# A1111 "Approx cheap" live preview: SD 1.x/2.x latent channels -> RGB (sd_vae_approx.cheap_approximation)
_CHEAP_RGB = np.array([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                       [-0.184, -0.271, -0.473]], np.float32)


class BadImage(ValueError):
    """A request's image field is not decodable base64 image data."""


def encode_png(image, infotext=None, texts=None):
    """PIL image -> base64 PNG (no data: prefix) carrying ``infotext`` as the "parameters" chunk, as A1111,
    and the other text chunks in ``texts``."""
    info = png_texts(infotext, texts)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_bytes(data, field="image"):
    """Base64 text, optionally a ``data:image/...;base64,`` URL -> bytes."""
    if not isinstance(data, str) or not data:
        raise BadImage(f"{field}: expected a base64-encoded image string")
    if data.startswith(("http://", "https://")):
        raise BadImage(f"{field}: image URLs are not fetched; send the image as base64")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadImage(f"{field}: invalid base64 ({e})") from None


class EncodedImage:
    """A request's image kept as sent (base64, compressed) while its job waits in the queue: checked and
    sized from its header now, its pixels decoded when the job runs (decode())."""

    def __init__(self, data, field="image"):
        try:
            self.size = image_size(decode_bytes(data, field), field)
        except ImageError as e:
            raise BadImage(str(e)) from None
        self.data, self.field = data, field

    @property
    def width(self):
        return self.size[0]

    @property
    def height(self):
        return self.size[1]

    def decode(self):
        return decode_image(self.data, self.field)


def decode_image(data, field="image"):
    """Base64 (optionally a ``data:image/...;base64,`` URL) -> PIL image, fully loaded by the one image
    decoder (PNG, JPEG, WebP, BMP, GIF only; size checked from the header)."""
    try:
        return open_image(decode_bytes(data, field), field)
    except ImageError as e:
        raise BadImage(str(e)) from None


def latent_preview(latents):
    """x0 estimate [B, 4, h, w] in the sampler's scale -> a small RGB PIL image of the first item (or None)."""
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 4 or latents.shape[1] != _CHEAP_RGB.shape[0]:
        return None
    rgb = np.einsum("chw,cr->hwr", latents[0], _CHEAP_RGB)
    return Image.fromarray((np.clip((rgb + 1) / 2, 0, 1) * 255).astype(np.uint8))
