"""A1111's Extras routes: /extra-single-image, /extra-batch-images (upscale, then GFPGAN and CodeFormer: the steps
of postprocess/extras.py) and the upscaler lists (/upscalers, /realesrgan-models).

The request fields are the A1111 API's (ExtrasBaseRequest) and go to `ExtrasRequest` as they are; the work
runs on the generation worker, one job at a time with generations. Response images carry the source's
text chunks ("parameters") plus A1111's "postprocessing" text; `html_info` is that text as A1111's HTML.
"""
import html
from dataclasses import fields

from pydantic import BaseModel, Field

from ..postprocess.extras import ExtrasModels, ExtrasRequest, check_size, run_extras
from ..postprocess.upscale import BUILTIN, REALESRGAN_FILES
from .codec import EncodedImage, encode_png
from .schemas import FiniteBody


class ExtrasBase(FiniteBody):
    """A1111's ExtrasBaseRequest: its fields and defaults (show_extras_results has no effect in the API)."""

    resize_mode: int = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasBase):
    image: str = ""


class FileData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasBase):
    imageList: list[FileData] = Field(default_factory=list)  # noqa: N815 (A1111's name)


def extras_request(req):
    """The A1111 body -> ExtrasRequest (the fields both have; the others are reported by `ignored`)."""
    names = {f.name for f in fields(ExtrasRequest)}
    return ExtrasRequest(**{k: v for k, v in req.model_dump().items() if k in names})


def ignored(req):
    """Fields set away from A1111's defaults that nothing here acts on."""
    names = {f.name for f in fields(ExtrasRequest)} | {"image", "imageList", "show_extras_results"}
    defaults = ExtrasBase()
    return sorted(k for k, v in req.model_dump().items()
                  if k not in names and v != getattr(defaults, k, None) and v not in (None, "", 0, False))


def html_info(text):
    """A1111's plaintext_to_html."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def run_images(images, request, upscalers, faces=None):
    """Worker side: each EncodedImage through the Extras steps -> (base64 PNGs, the last infotext)."""
    encoded, text = [], ""
    for image in images:
        source = image.decode()
        result = run_extras(source, request, ExtrasModels(upscalers, faces))
        text = result.infotext
        # A1111's API writes the source's text chunks and its postprocessing text into the PNG
        texts = {k: v for k, v in source.info.items() if isinstance(k, str) and isinstance(v, str) and k != "parameters"}
        encoded.append(encode_png(result.image, source.info.get("parameters"), {**texts, "postprocessing": text}))
    return encoded, text


def plan_images(req, images, upscalers, faces=None):
    """Validate before the job queues: the request, every image's size; -> ExtrasRequest."""
    request = extras_request(req)
    request.validate(upscalers, faces)
    for image in images:
        check_size(image.size, request, upscalers)
    return request


def decode_images(req):
    """EncodedImage of the single image or of every batch entry (checked from their headers)."""
    if isinstance(req, ExtrasSingleImageRequest):
        return [EncodedImage(req.image, "image")]
    return [EncodedImage(item.data, f"imageList[{i}]") for i, item in enumerate(req.imageList)]


def upscaler_list(upscalers):
    """A1111's /upscalers: the built-in ones, then the models found (converted or waiting for a convert)."""
    rows = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4} for name in BUILTIN]
    for model in upscalers.models():
        rows.append({"name": model.name, "model_name": (model.manifest.name if model.converted else model.source.stem),
                     "model_path": str(model.folder if model.converted else model.source), "model_url": None,
                     "scale": model.manifest.scale if model.converted else 4})
    return rows


def realesrgan_list(upscalers):
    """A1111's /realesrgan-models: its Real-ESRGAN entries that are installed."""
    return [{"name": row["name"], "path": row["model_path"], "scale": row["scale"]}
            for row in upscaler_list(upscalers) if row["name"] in REALESRGAN_FILES]
