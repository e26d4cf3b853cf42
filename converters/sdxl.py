"""The SDXL family's facts for the converter: which encoders, which of their outputs, and the added
UNet conditions, decided from the modules themselves and written into the manifest.

SDXL conditions on the penultimate hidden state of both encoders (CLIP ViT-L and OpenCLIP ViT-bigG),
raw, without the final layer norm, concatenated; and on bigG's pooled, projected output (text_embeds)
plus size/crop time ids through the UNet's added "text_time" embedding. The refiner has bigG only and
an aesthetic score among its time ids.
"""
import json
from pathlib import Path

SDXL_FAMILIES = ("sdxl", "sdxl_refiner")
HIDDEN_LAYER = -2  # penultimate layer, raw (diffusers: hidden_states[-2]; sgm: layer "penultimate")


def is_sdxl_unet(unet):
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def family_of(unet, text_encoder_2):
    """"sdxl" (6 time ids) or "sdxl_refiner" (5: the aesthetic score instead of the target size)."""
    from .components import added_dims

    _, time_ids = added_dims(unet, text_encoder_2.config.projection_dim)
    if time_ids not in (5, 6):
        raise ValueError(f"an SDXL UNet takes 5 or 6 time ids; this one takes {time_ids}")
    return "sdxl_refiner" if time_ids == 5 else "sdxl"


def text_encoder_facts(family, model):
    """TextEncoderInfo fields beyond the defaults (which are SD 1.x/2.x's)."""
    if family not in SDXL_FAMILIES:
        return {}
    return {"hidden_layer": HIDDEN_LAYER, "pooled": "text_embeds" if hasattr(model, "text_projection") else None}


def manifest_extra(unet, family, force_zeros_for_empty_prompt=True):
    """Manifest fields of the added conditions."""
    return {"addition_time_embed_dim": int(unet.config.addition_time_embed_dim),
            "requires_aesthetics_score": family == "sdxl_refiner",
            "force_zeros_for_empty_prompt": bool(force_zeros_for_empty_prompt)}


def load_diffusers_encoders(path):
    """{text_encoder, tokenizer, text_encoder_2, tokenizer_2} of an SDXL diffusers folder; the refiner's
    first encoder and tokenizer are None. Also returns the pipeline's force_zeros_for_empty_prompt."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizerFast

    path = Path(path)
    index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}

    def present(name):
        entry = index.get(name, [None, None])
        return (path / name).is_dir() and (not index or (entry and entry[0] is not None))

    load = dict(local_files_only=True)
    out = {"text_encoder": None, "tokenizer": None}
    if present("text_encoder"):
        out["text_encoder"] = CLIPTextModel.from_pretrained(path / "text_encoder", attn_implementation="eager",
                                                            **load).eval()
        out["tokenizer"] = CLIPTokenizerFast.from_pretrained(path / "tokenizer", **load)
    out["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
        path / "text_encoder_2", attn_implementation="eager", **load).eval()
    out["tokenizer_2"] = CLIPTokenizerFast.from_pretrained(path / "tokenizer_2", **load)
    return out, bool(index.get("force_zeros_for_empty_prompt", True))
