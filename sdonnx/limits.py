"""Every limit sdonnx enforces on what a user or a file can ask for, in one place, for every door
(Python, CLI, HTTP API). Each is checked before anything large is allocated; crossing one is a clear
error naming the limit.

Sizes are sized for a 24 GB CPU machine running the `--optimize` graphs (flash attention: activation
memory grows with the pixel count, not its square). Measured on SD 1.5: the UNet stage of one 512x512
image peaks at 3.7 GiB, of which 3.4 GiB are weights; 16 times the pixels (2048x2048, or 16 images
of 512x512) adds about 5 GiB of activations, and SDXL's 10 GiB of fp32 weights plus the same still fit.
Graphs exported without `--optimize` materialize attention score matrices that grow with the square of
the pixel count (1 GiB at 512x512 on SD 1.5, 16 GiB at 1024x1024): what does not fit inside these limits
is an `OutOfMemory` error naming what to reduce, never a traceback.
"""
import math
import re
from numbers import Real

# ---------------------------------------------------------------------------------------------- files
# a .pt/.ckpt file may unpack to at most this many times its size on disk (torch stores tensors uncompressed)
TORCH_FILE_MAX_EXPANSION = 4
# ...but a small file may always unpack to this many bytes (tiny embeddings, hand-made test files)
TORCH_FILE_MIN_BUDGET = 1 << 20

# bytes of a model folder's sdonnx.json (an SDXL manifest with its weight-name maps is about 1 MB)
MAX_MANIFEST_BYTES = 64 << 20

# pixels of an image decoded from a file or a request (init image, mask, PNG info): 8192x8192, 256 MiB as RGBA
MAX_IMAGE_PIXELS = 8192 * 8192

# ---------------------------------------------------------------------------------------------- sizes
# width and height of an image, the hires fix target, an outpaint canvas and A1111's "resize seed from";
# A1111's own sliders stop here too
MAX_SIDE = 2048
# pixels of one UNet batch (width x height x batch size), first pass and hires pass: one 2048x2048 image,
# 4 of 1024x1024 or 16 of 512x512
MAX_BATCH_PIXELS = 2048 * 2048
# pixels of a whole job (every batch), held as RGB images until it returns: 1000 images of 512x512,
# 62 of 2048x2048; about 0.8 GB of images (twice that once a server has encoded them)
MAX_JOB_PIXELS = 1000 * 512 * 512
MAX_BATCH_SIZE = 64
MAX_BATCH_COUNT = 1000
# steps of one pass: the models are trained on 1000 timesteps, more steps revisit the same ones
MAX_STEPS = 1000
# cells of one X/Y/Z plot or prompt matrix (each one a generation): 1000 is a 10x10x10 plot. Its images
# together stay within MAX_JOB_PIXELS, as one job's do, since the grid is made from all of them at once
MAX_PLOT_CELLS = 1000
# mask blur radius and the "only masked" padding, in pixels: past the image side they change nothing
MAX_MARGIN = MAX_SIDE

# ---------------------------------------------------------------------------------------------- prompts
# characters in one prompt (positive or negative, before AND/BREAK splitting): about 50 chunks of 75 tokens
MAX_PROMPT_CHARS = 20_000
# brackets open at once in a prompt, `(` and `[` together; A1111 prompts rarely nest past 10
MAX_PROMPT_NESTING = 32
# 75-token chunks of one prompt: each is a text encoder run and 77 more context tokens for every UNet
# call; A1111 prompts rarely pass 5
MAX_PROMPT_CHUNKS = 64
# `AND` sub-prompts: each one is one more conditioning in every UNet batch
MAX_PROMPT_PARTS = 16

# ControlNet units of one generation: each runs its ControlNet (a copy of the UNet's encoder) at every step
MAX_CONTROLNET_UNITS = 8

# ---------------------------------------------------------------------------------------------- server
# generations waiting behind the running one; more are refused (503) as a busy server does
MAX_QUEUED_JOBS = 32
# bytes of one POST /options body (JSON): option values are short names and numbers
MAX_OPTIONS_BYTES = 64 << 10

# what the user can change when memory runs out
REDUCE = "reduce the width/height, the batch size or the hires scale"


class LimitError(ValueError):
    """A value outside sdonnx's limits; the message names the value and the limit."""


class OutOfMemory(MemoryError):
    """A run inside the limits still found too little memory; the message says what to reduce."""


def finite(name, value, allow_inf=False):
    """A real number that is not NaN (nor infinite, unless allow_inf: s_tmax's "no bound") -> float."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise LimitError(f"{name} must be a number, got {value!r}")
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise LimitError(f"{name} must be a finite number, got {value}")
    return float(value)


def check_max(name, value, high):
    """A number at most `high`; the lower bounds, types and whole numbers are the request's own checks."""
    if _number(value) and finite(name, value) > high:
        raise LimitError(f"{name} {value} is over the limit of {high}")
    return value


def _number(value):
    return isinstance(value, Real) and not isinstance(value, bool)


def check_range(name, value, low, high):
    """A finite number in [low, high] (a whole-number check stays with the caller)."""
    if not low <= finite(name, value) <= high:
        raise LimitError(f"{name} {value} is outside {low}..{high}")
    return value


def check_image(width, height, what="image", count=1):
    """Each side at most MAX_SIDE, and count images of this size at most MAX_BATCH_PIXELS."""
    if not all(_number(v) for v in (width, height, count)):
        return  # a size that is not a number is the request's own error to name
    for name, value in ((f"{what} width", width), (f"{what} height", height)):
        if finite(name, value) > MAX_SIDE:
            raise LimitError(f"{name} {value} is over the limit of {MAX_SIDE} pixels")
    if width * height * count > MAX_BATCH_PIXELS:
        raise LimitError(f"a batch of {count} x {width}x{height} ({what}) is {width * height * count:.0f} pixels, "
                         f"over the limit of {MAX_BATCH_PIXELS} (one {MAX_SIDE}x{MAX_SIDE}): reduce the batch "
                         f"size or the size")


def check_job(width, height, batch_size, batch_count):
    if not all(_number(v) for v in (width, height, batch_size, batch_count)):
        return
    pixels = width * height * batch_size * batch_count
    if pixels > MAX_JOB_PIXELS:
        raise LimitError(f"{batch_count} batches of {batch_size} x {width}x{height} are {pixels:.0f} pixels, over the "
                         f"limit of {MAX_JOB_PIXELS} for one job: reduce the batch count")


def check_numbers(args):
    """Every float among generate's arguments is finite (NaN would pass every range check and give a NaN
    image); s_tmax alone may be +inf, its "no bound". Tuples (crop_top_left) are looked into."""
    for name, value in args.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, float) or (isinstance(v, Real) and not isinstance(v, int)):
                if not (name == "s_tmax" and v == math.inf):
                    finite(name, v)


def check_generation(args, native_size):
    """generate's keyword arguments (a mapping; missing ones take generate's defaults) within the limits.

    native_size: the model's default side, used where width/height are not given and no init image sets
    them. Raises LimitError before anything is allocated."""
    check_numbers(args)
    steps, batch_size, batch_count = args.get("steps", 20), args.get("batch_size", 1), args.get("batch_count", 1)
    check_max("steps", steps, MAX_STEPS)
    check_max("hires_steps", args.get("hires_steps", 0), MAX_STEPS)
    check_max("batch_size", batch_size, MAX_BATCH_SIZE)
    check_max("batch_count", batch_count, MAX_BATCH_COUNT)
    for name in ("mask_blur", "inpaint_full_res_padding"):
        check_max(name, args.get(name, 0), MAX_MARGIN)
    for name in ("seed_resize_from_w", "seed_resize_from_h"):  # 0 or less: off
        check_max(name, args.get(name, 0), MAX_SIDE)
    width, height = final_size(args, native_size)
    check_job(width, height, batch_size, batch_count)


def final_size(args, native_size):
    """(width, height) of the job's images, first pass and hires target checked against the size limits."""
    batch_size = args.get("batch_size", 1)
    width, height = _size(args, native_size)
    check_image(width, height, "image", batch_size)
    if args.get("hires") and _number(width) and _number(height):
        width, height = _hires_size(args, width, height)
        check_image(width, height, "hires fix target", batch_size)
    return width, height


def _size(args, native_size):
    """The first pass's size as far as it is known before the init image is decoded: width/height, else
    the init image's header, else the model's native size."""
    width, height = args.get("width"), args.get("height")
    if (not width or not height) and args.get("init_image") is not None:
        size = _image_size(args["init_image"])
        if size is not None:
            width, height = width or size[0], height or size[1]
    return width or native_size, height or native_size


def _image_size(image):
    """(width, height) of a PIL image or image file from its header; None when unreadable (loading it
    later gives the error that names the file)."""
    from PIL import Image

    from .image import ImageError, image_size

    if isinstance(image, Image.Image):
        return image.size
    try:
        return image_size(image, "init image")
    except ImageError:
        return None


def _hires_size(args, width, height):
    """The hires fix target as img2img.hires_plan makes it (scale, or hires_width/hires_height)."""
    hires_width, hires_height = args.get("hires_width", 0), args.get("hires_height", 0)
    check_max("hires_width", hires_width, MAX_SIDE)
    check_max("hires_height", hires_height, MAX_SIDE)
    if hires_width or hires_height:
        return hires_width or int(width * hires_height / height), hires_height or int(height * hires_width / width)
    scale = finite("hires_scale", args.get("hires_scale", 2.0))
    return int(width * scale), int(height * scale)


# ---------------------------------------------------------------------------------------------- memory

_ALLOCATION_FAILURES = ("failed to allocate memory", "bad_alloc", "bad allocation", "out of memory",
                        "e_outofmemory", "8007000e")


def is_allocation_failure(error):
    """A MemoryError, or an ONNX Runtime error that says an allocation failed (CPU arena, CUDA, DirectML)."""
    return isinstance(error, MemoryError) or any(s in str(error).lower() for s in _ALLOCATION_FAILURES)


def out_of_memory(where, error):
    """OutOfMemory naming what ran out and what to reduce, from the allocation failure `error`."""
    if isinstance(error, OutOfMemory):
        return error
    needed = _requested_bytes(str(error))
    size = f" (a buffer of {needed / 2**30:.1f} GiB)" if needed else ""
    return OutOfMemory(f"out of memory in {where}{size}: {REDUCE}")


def _requested_bytes(text):
    """The size in ONNX Runtime's "requested buffer of size N" message, or None."""
    found = re.search(r"buffer of size (\d+)", text)
    return int(found.group(1)) if found else None

# ---------------------------------------------------------------------------------------------- upscaling
# the Extras tab's "scale by" (A1111's slider stops at 8) and the largest image an upscale may produce or
# pass through: a 4x model run toward 2x on a 2048 image makes 8192x8192 before Lanczos brings it down
MAX_UPSCALE_BY = 8.0
MAX_UPSCALE_PIXELS = 8192 * 8192
