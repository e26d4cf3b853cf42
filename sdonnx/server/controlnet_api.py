"""sd-webui-controlnet's HTTP routes (/controlnet/...), so clients that probe for the extension find it."""
import asyncio
import logging

import numpy as np
from fastapi import APIRouter
from PIL import Image

from .. import limits
from ..controlnet import preprocess as cn
from .api import ApiError
from .codec import decode_image, encode_png
from .schemas import FiniteBody

log = logging.getLogger(__name__)


class DetectRequest(FiniteBody):
    """POST /controlnet/detect, with the extension's field names and defaults (-1: the module's default)."""

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = []
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = []
    low_vram: bool = False


# what the extension's /controlnet/version answers (external_code.get_api_version): clients check for 2
API_VERSION = 2


def build_controlnet_router(state):
    router = APIRouter(prefix="/controlnet")

    @router.get("/version")
    async def version():
        return {"version": API_VERSION}

    @router.get("/model_list")
    async def model_list(update: bool = True):
        # the converted ControlNets under --controlnet-dir, as the extension lists them: "name [hash]"
        return {"model_list": await asyncio.to_thread(state.store.controlnets().titles)}

    @router.get("/settings")
    async def settings():
        return {"control_net_unit_count": limits.MAX_CONTROLNET_UNITS}

    @router.get("/module_list")
    async def module_list(alias_names: bool = False):
        return {"module_list": cn.module_names(alias_names), "module_detail": cn.module_detail(alias_names)}

    @router.post("/detect")
    async def detect(req: DetectRequest):
        module = _checked(req)
        # CPU work on pixels: off the event loop, so progress polls keep being answered
        images = await asyncio.to_thread(_detect, module, req)
        return {"images": images, "info": "Success"}

    return router


def _checked(req):
    try:
        module = cn.find_module(req.controlnet_module)
    except cn.UnknownModule as e:
        raise ApiError(422, str(e)) from None
    count = len(req.controlnet_input_images)
    if count == 0:
        raise ApiError(422, "No image selected: controlnet_input_images is empty")
    if count > limits.MAX_BATCH_SIZE:
        raise ApiError(422, f"controlnet_input_images holds {count} images, more than the {limits.MAX_BATCH_SIZE} "
                            "allowed")
    if module.mask_in_alpha and len(req.controlnet_masks) != count:
        raise ApiError(422, f"Preprocessor {module.name} requires `controlnet_masks`: one mask per input image "
                            f"({count}), got {len(req.controlnet_masks)}")
    return module


def _detect(module, req):
    res, a, b = cn.resolve_params(module.name, req.controlnet_processor_res, req.controlnet_threshold_a,
                                  req.controlnet_threshold_b)
    if req.controlnet_masks and not module.mask_in_alpha:
        log.warning("ControlNet module %s takes no mask; controlnet_masks ignored", module.name)
    out = []
    for i, data in enumerate(req.controlnet_input_images):
        image = _pixels(decode_image(data, f"controlnet_input_images[{i}]"))
        mask = None
        if module.mask_in_alpha:
            mask = _pixels(decode_image(req.controlnet_masks[i], f"controlnet_masks[{i}]"))
        try:
            result = cn.preprocess(module.name, cn.control_input(image, mask, module.name), res, a, b)
        except ValueError as e:
            raise ApiError(422, f"controlnet_input_images[{i}]: {e}") from None
        out.append(encode_png(Image.fromarray(cn.display_image(module.name, result))))
    return out


def _pixels(img):
    """PIL image -> uint8 [H, W, 3] or [H, W, 4] (alpha kept for `preprocess` to composite over white)."""
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    return np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
