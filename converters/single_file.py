"""Single-file SD 1.x / 2.x checkpoints (original CompVis / A1111 layout) -> diffusers torch modules.

Everything is decided from the weights, offline:
- `detect` tells the family from the text encoder's layout (SD 1.x: HF CLIP under
  `cond_stage_model.transformer.`, SD 2.x: OpenCLIP under `cond_stage_model.model.`), inpainting from the
  UNet's input channels, and the prediction type from a marker when the file has one.
- `load_components` infers every architecture number from tensor shapes (so real models and the tiny
  test models both load), renames keys with diffusers' own single-file conversion functions
  (`diffusers.loaders.single_file_utils.convert_ldm_*`, which are pure dict transforms and never touch
  the network) and loads each module strictly: a missing or unexpected weight is an error, not a warning.
The rules shapes cannot spell out are the families' own: SD 1.x UNet 8 heads per block, SD 2.x UNet
64-dim heads, CLIP 64-dim heads, quick_gelu (SD 1.x) / gelu (SD 2.x), 32 norm groups, VAE scale 0.18215.
"""
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from converters.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
PREDICTIONS = ("epsilon", "v_prediction")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: HF CLIPTextModel layout
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP layout
SDXL_PREFIX = "conditioner.embedders."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL base: CLIP ViT-L, HF layout
SDXL_BIGG_PREFIX = {"sdxl": "conditioner.embedders.1.model.",  # OpenCLIP ViT-bigG with text_projection
                    "sdxl_refiner": "conditioner.embedders.0.model."}  # the refiner has bigG only
SDXL_TIME_IDS = {"sdxl": 6, "sdxl_refiner": 5}  # size, crop, target size | size, crop, aesthetic score
SDXL_SAMPLE_SIZE = 128  # 1024 px
SDXL_VAE_SCALING_FACTOR = 0.13025

# converters/ and sdonnx/ sit side by side, in the repo and when installed.
TOKENIZER_JSON = Path(__file__).resolve().parents[1] / "sdonnx" / "data" / "clip" / "tokenizer.json"

CLIP_HEAD_DIM = 64
SD2_UNET_HEAD_DIM = 64
SD1_UNET_HEADS = 8
VAE_SCALING_FACTOR = 0.18215

# Prediction-type hints some files carry: a `v_pred` tensor (A1111/ComfyUI convention) or metadata.
V_PRED_KEY = "v_pred"
METADATA_PREDICTION_KEYS = ("modelspec.prediction_type", "prediction_type", "parameterization")
PREDICTION_SPELLINGS = {"v": "v_prediction", "v_prediction": "v_prediction", "v-prediction": "v_prediction",
                        "eps": "epsilon", "epsilon": "epsilon"}


@dataclass(frozen=True)
class ModelGuess:
    """What the weights say about a checkpoint.

    prediction is None when the weights cannot tell (SD 2.x 512-base is eps, 768 is v): call
    `probe_v_prediction` on the loaded UNet, or pass the prediction explicitly.
    """

    family: str  # "sd1" | "sd2"
    prediction: str | None  # "epsilon" | "v_prediction" | None
    inpaint: bool  # UNet takes latents + mask + masked-image latents (9 channels)
    in_channels: int
    context_dim: int  # cross-attention width = text encoder hidden size
    linear_projection: bool  # transformer proj_in is Linear (SD 2.x) rather than a 1x1 conv
    prediction_source: str  # "marker" (file says so), "family" (family rule) or "undecided"


def detect(state_dict, metadata=None) -> ModelGuess:
    """Family, inpainting and (when decidable) prediction type from key names and shapes.

    metadata: optional safetensors header metadata (`checkpoint.read_metadata`), searched for a
    prediction-type hint.
    """
    keys = state_dict.keys()
    if any(k.startswith(SDXL_PREFIX) for k in keys):
        return _detect_sdxl(state_dict, metadata)
    has_clip = any(k.startswith(CLIP_PREFIX) for k in keys)
    has_open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in keys)
    if UNET_PREFIX + "input_blocks.0.0.weight" not in state_dict or has_clip == has_open_clip:
        raise CheckpointError(
            f"unsupported model layout: expected a UNet under {UNET_PREFIX}* and exactly one text encoder "
            f"under {CLIP_PREFIX}* (sd1) or {OPEN_CLIP_PREFIX}* (sd2); found top-level groups "
            f"{_key_groups(keys)}; supported families: {', '.join(FAMILIES)}"
        )
    if any(k.startswith(UNET_PREFIX + "label_emb.") for k in keys):
        raise CheckpointError(
            "unsupported model: the UNet is class-conditioned (label_emb: unCLIP or x4 upscaler); "
            f"supported families: {', '.join(FAMILIES)} text-to-image and inpainting models"
        )
    family = "sd1" if has_clip else "sd2"
    in_channels = int(state_dict[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1])
    inpaint = in_channels == 9
    prediction, source = _prediction_hint(state_dict, metadata)
    if prediction is None and family == "sd1":
        prediction, source = "epsilon", "family"
    elif prediction is None and in_channels != 4:
        # SD 2's extra-input variants (inpainting: 9 channels, depth: 5) are all 512 eps models.
        prediction, source = "epsilon", "family"
    return ModelGuess(
        family=family,
        prediction=prediction,
        inpaint=inpaint,
        in_channels=in_channels,
        context_dim=int(_first(state_dict, UNET_PREFIX, ".attn2.to_k.weight").shape[1]),
        linear_projection=_first(state_dict, UNET_PREFIX, ".proj_in.weight").ndim == 2,
        prediction_source=source,
    )


@torch.no_grad()
def probe_v_prediction(unet) -> bool:
    """True when a UNet predicts v rather than eps, decided by running it once (A1111's SD 2 test).

    At t=999 x_t is almost pure noise, so an eps model's output stays close to its input, while a
    v model's (v ~ -x0 there) lands well below it. Input and context are constant 0.5; as in A1111,
    a mean output-minus-input below -1 means v.
    """
    param = next(unet.parameters())
    config = unet.config
    x = torch.full((1, config.in_channels, 8, 8), 0.5, dtype=param.dtype, device=param.device)
    context = torch.full((1, 2, config.cross_attention_dim), 0.5, dtype=param.dtype, device=param.device)
    out = unet(x, torch.tensor([999], device=param.device), encoder_hidden_states=context).sample
    return (out.float() - x[:, : config.out_channels].float()).mean().item() < -1


def _detect_sdxl(state_dict, metadata):
    keys = state_dict.keys()
    has_clip = any(k.startswith(SDXL_CLIP_PREFIX) for k in keys)
    family = "sdxl" if has_clip else "sdxl_refiner"
    if UNET_PREFIX + "input_blocks.0.0.weight" not in state_dict or not any(
            k.startswith(SDXL_BIGG_PREFIX[family]) for k in keys):
        raise CheckpointError(
            f"unsupported SDXL layout: expected a UNet under {UNET_PREFIX}* and the OpenCLIP bigG encoder under "
            f"{SDXL_BIGG_PREFIX['sdxl']}* (with CLIP-L under {SDXL_CLIP_PREFIX}*) or {SDXL_BIGG_PREFIX['sdxl_refiner']}* "
            f"(refiner); found top-level groups {_key_groups(keys)}")
    in_channels = int(state_dict[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1])
    prediction, source = _prediction_hint(state_dict, metadata)
    if prediction is None:  # SDXL base, refiner and inpainting are eps models; v-pred finetunes carry a marker
        prediction, source = "epsilon", "family"
    return ModelGuess(
        family=family, prediction=prediction, inpaint=in_channels == 9, in_channels=in_channels,
        context_dim=int(_first(state_dict, UNET_PREFIX, ".attn2.to_k.weight").shape[1]),
        linear_projection=_first(state_dict, UNET_PREFIX, ".proj_in.weight").ndim == 2, prediction_source=source)


def load_components(state_dict, guess, prediction=None) -> dict:
    """text_encoder, unet, vae (fp32, eval), tokenizer and scheduler_config for a detected checkpoint.

    prediction overrides guess.prediction; when both are None the UNet is probed. state_dict is consumed
    (left empty): each part's tensors are dropped once its module is built, so a half-precision SDXL file
    never sits in memory beside all of its fp32 modules.
    """
    prediction = prediction or guess.prediction
    if prediction not in PREDICTIONS + (None,):
        raise ValueError(f"prediction {prediction!r}: choose one of {PREDICTIONS}")
    if guess.family in SDXL_BIGG_PREFIX:
        return _load_sdxl(state_dict, guess, prediction or guess.prediction)
    converted = convert(state_dict, guess)
    state_dict.clear()  # the converted dicts hold what is still needed: each goes once its module is built
    unet = _build_unet(converted.pop("unet"), guess.family)
    if prediction is None:
        prediction = "v_prediction" if probe_v_prediction(unet) else "epsilon"
        logger.info("SD 2 prediction type from the UNet probe: %s", prediction)
    hi_res = guess.family == "sd2" and prediction == "v_prediction"  # the 768-v models
    unet.register_to_config(sample_size=96 if hi_res else 64)
    return {
        "text_encoder": _build_text_encoder(converted.pop("text_encoder"), guess.family),
        "unet": unet,
        "vae": _build_vae(converted.pop("vae"), sample_size=768 if hi_res else 512),
        "tokenizer": make_tokenizer(guess.family),
        "scheduler_config": scheduler_config(prediction),
    }


def _load_sdxl(state_dict, guess, prediction):
    """SDXL components: text_encoder (None for the refiner), text_encoder_2 with projection, unet, vae,
    tokenizers, scheduler_config and the manifest facts of the added conditions."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    converted = convert(state_dict, guess)
    state_dict.clear()  # as load_components: peak memory = half-precision file + the fp32 UNet, not both whole
    unet_sd = converted.pop("unet")
    big_g = converted.pop("text_encoder_2")
    config = text_encoder_config(big_g, "sdxl")
    config["projection_dim"] = int(big_g["text_projection.weight"].shape[0])
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    if not hasattr(text_encoder_2, "text_model"):  # should transformers flatten this class too
        big_g = {k.removeprefix("text_model."): v for k, v in big_g.items()}
    else:
        big_g = {k if k.startswith("text_projection.") else "text_model." + k: v for k, v in big_g.items()}
    unet = _build_unet(unet_sd, guess.family, pooled_dim=config["projection_dim"])
    del unet_sd
    unet.register_to_config(sample_size=SDXL_SAMPLE_SIZE)
    vae = _build_vae(converted.pop("vae"), sample_size=SDXL_SAMPLE_SIZE * 8)
    vae.register_to_config(scaling_factor=SDXL_VAE_SCALING_FACTOR)
    first = converted.get("text_encoder")
    return {
        "text_encoder": _build_text_encoder(first, "sd1") if first is not None else None,
        "tokenizer": make_tokenizer("sd1") if first is not None else None,
        "text_encoder_2": _load_strict(text_encoder_2, big_g, "text encoder 2"),
        "tokenizer_2": make_tokenizer("sd2"),
        "unet": unet,
        "vae": vae,
        "scheduler_config": scheduler_config(prediction),
    }


def convert(state_dict, guess) -> dict:
    """{"text_encoder" | "unet" | "vae": diffusers-named state dict} using diffusers' converters.

    Text-encoder keys carry no `text_model.` prefix (transformers >= 5.6 flattened CLIPTextModel).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet_sd = _with_prefix(state_dict, UNET_PREFIX, "UNet")
    vae_sd = _with_prefix(state_dict, VAE_PREFIX, "VAE")
    vae_levels = _count_indices(vae_sd, VAE_PREFIX + "encoder.down.")
    vae_blocks = {"down_block_types": ["DownEncoderBlock2D"] * vae_levels,
                  "up_block_types": ["UpDecoderBlock2D"] * vae_levels}
    unet_layout = {"layers_per_block": _unet_layers_per_block(unet_sd)}
    if guess.family in SDXL_BIGG_PREFIX:
        unet_layout["addition_embed_type"] = "text_time"
        text = _convert_sdxl_text(state_dict, guess.family)
    else:
        text = {"text_encoder": _convert_text_encoder(state_dict, guess.family)}
    return {
        **text,
        "unet": convert_ldm_unet_checkpoint(unet_sd, unet_layout),
        "vae": convert_ldm_vae_checkpoint(vae_sd, vae_blocks),
    }


def _convert_sdxl_text(state_dict, family):
    """{"text_encoder": CLIP-L (base only), "text_encoder_2": bigG with text_projection.weight}, keys
    without `text_model.`; all bigG layers are kept (SDXL pools the last, conditions on the penultimate)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    prefix = SDXL_BIGG_PREFIX[family]
    text_sd = _with_prefix(state_dict, prefix, "OpenCLIP bigG text encoder")
    width = text_sd[prefix + "token_embedding.weight"].shape[1]
    stand_in = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
    big_g = convert_open_clip_checkpoint(stand_in, text_sd, prefix=prefix)
    out = {"text_encoder_2": {k.removeprefix("text_model."): v for k, v in big_g.items()}}
    if family == "sdxl":
        clip = convert_ldm_clip_checkpoint(_with_prefix(state_dict, SDXL_CLIP_PREFIX, "CLIP-L text encoder"))
        out["text_encoder"] = {k.removeprefix("text_model."): v for k, v in clip.items()
                               if not k.endswith("position_ids")}
    return out


def key_map(state_dict, guess) -> dict:
    """{component: {original key: (diffusers key, ...)}}; a fused OpenCLIP in_proj maps to its q, k, v.

    Matched by tensor identity: the converters move tensors without copying, except the in_proj
    split, which is matched by name.
    """
    by_tensor = {}
    for key, value in state_dict.items():
        by_tensor.setdefault(_tensor_id(value), key)
    out = {}
    for component, converted in convert(state_dict, guess).items():
        mapping = {}
        for new_key, value in converted.items():
            original = by_tensor.get(_tensor_id(value)) or _in_proj_source(new_key)
            if original is None:
                raise CheckpointError(f"key_map: cannot trace {component} weight {new_key} to the checkpoint")
            mapping.setdefault(original, ())
            mapping[original] += (new_key,)
        out[component] = mapping
    return out


def make_tokenizer(family):
    """The shipped CLIP BPE tokenizer; SD 1.x pads with <|endoftext|>, SD 2.x (OpenCLIP) with "!"."""
    from transformers import CLIPTokenizerFast

    pad = "<|endoftext|>" if family == "sd1" else "!"
    return CLIPTokenizerFast(tokenizer_file=str(TOKENIZER_JSON), pad_token=pad, model_max_length=77)


def scheduler_config(prediction):
    """The SD 1.x / 2.x training noise schedule, for any diffusers scheduler's from_config."""
    return {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": prediction,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


# --- detection helpers ---------------------------------------------------------------------------

def _prediction_hint(state_dict, metadata):
    if V_PRED_KEY in state_dict:
        return "v_prediction", "marker"
    for key in METADATA_PREDICTION_KEYS:
        value = str((metadata or {}).get(key, "")).strip().lower()
        if value in PREDICTION_SPELLINGS:
            return PREDICTION_SPELLINGS[value], "marker"
    return None, "undecided"


def _key_groups(keys):
    groups = Counter(".".join(k.split(".")[:2]) for k in keys)
    return ", ".join(f"{g}.* ({n})" for g, n in groups.most_common(8))


def _first(state_dict, prefix, suffix):
    for key, value in state_dict.items():
        if key.startswith(prefix) and key.endswith(suffix):
            return value
    raise CheckpointError(f"no {prefix}*{suffix} weight: not a Stable Diffusion UNet")


def _with_prefix(state_dict, prefix, what):
    part = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not part:
        raise CheckpointError(f"the checkpoint has no {what} weights ({prefix}*)")
    return part


def _count_indices(state_dict, prefix):
    """How many distinct N appear in keys `prefix + "N."...`."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state_dict if (m := pattern.match(k))})


# --- text encoder ----------------------------------------------------------------------------------

def _convert_text_encoder(state_dict, family):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if family == "sd1":
        converted = convert_ldm_clip_checkpoint(_with_prefix(state_dict, CLIP_PREFIX, "text encoder"))
        converted = {k: v for k, v in converted.items() if not k.endswith("position_ids")}  # old buffer
    else:
        # SD 2 takes OpenCLIP's penultimate layer, then ln_final: drop the last resblock, as diffusers'
        # SD 2 configs do (23 of 24 layers).
        text_sd = _with_prefix(state_dict, OPEN_CLIP_PREFIX, "text encoder")
        last = _count_indices(text_sd, OPEN_CLIP_PREFIX + "transformer.resblocks.") - 1
        unused = f"{OPEN_CLIP_PREFIX}transformer.resblocks.{last}."
        text_sd = {k: v for k, v in text_sd.items() if not k.startswith(unused)}
        width = text_sd[OPEN_CLIP_PREFIX + "token_embedding.weight"].shape[1]
        # The converter reads hidden_size from the model only when text_projection is absent.
        stand_in = SimpleNamespace(config=SimpleNamespace(hidden_size=width))
        converted = convert_open_clip_checkpoint(stand_in, text_sd, prefix=OPEN_CLIP_PREFIX)
        converted.pop("text_projection.weight", None)  # CLIPTextModel has no projection
    return {k.removeprefix("text_model."): v for k, v in converted.items()}


def text_encoder_config(converted, family) -> dict:
    """CLIPTextConfig arguments from a converted text-encoder state dict's shapes."""
    vocab, hidden = converted["embeddings.token_embedding.weight"].shape
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=converted["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count_indices(converted, "encoder.layers."),
        num_attention_heads=hidden // CLIP_HEAD_DIM,
        max_position_embeddings=converted["embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu" if family == "sd1" else "gelu",  # SDXL's bigG: gelu
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407 if family == "sd1" else 0,
    )


def _build_text_encoder(converted, family):
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**text_encoder_config(converted, family)))
    if hasattr(model, "text_model"):  # transformers < 5.6 wraps the encoder
        converted = {"text_model." + k: v for k, v in converted.items()}
    return _load_strict(model, converted, "text encoder")


# --- UNet --------------------------------------------------------------------------------------------

def _unet_layers_per_block(unet_sd):
    levels = 1 + sum(k.startswith(UNET_PREFIX + "input_blocks.") and k.endswith(".0.op.weight") for k in unet_sd)
    outputs = _count_indices(unet_sd, UNET_PREFIX + "output_blocks.")
    if outputs % levels:
        raise CheckpointError(f"UNet has {outputs} output blocks for {levels} levels: not an SD UNet layout")
    return outputs // levels - 1


def unet_config(converted, family, pooled_dim=None) -> dict:
    """UNet2DConditionModel arguments from a converted UNet state dict's shapes and the family's head rule."""
    levels = _count_indices(converted, "down_blocks.")
    channels = [converted[f"down_blocks.{b}.resnets.0.conv1.weight"].shape[0] for b in range(levels)]
    down_attention = [_has(converted, f"down_blocks.{b}.attentions.") for b in range(levels)]
    up_attention = [_has(converted, f"up_blocks.{b}.attentions.") for b in range(levels)]
    depth = [_count_indices(converted, f"down_blocks.{b}.attentions.0.transformer_blocks.") or None for b in range(levels)]
    uniform_depth = {d for d in depth if d} or {1}
    return dict(
        sample_size=64,
        in_channels=converted["conv_in.weight"].shape[1],
        out_channels=converted["conv_out.weight"].shape[0],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attention),
        block_out_channels=tuple(channels),
        layers_per_block=_count_indices(converted, "down_blocks.0.resnets."),
        cross_attention_dim=_first(converted, "", ".attn2.to_k.weight").shape[1],
        transformer_layers_per_block=uniform_depth.pop() if len(uniform_depth) == 1 else tuple(d or 1 for d in depth),
        # diffusers' "attention_head_dim" is the number of heads here (its long-standing naming quirk).
        attention_head_dim=SD1_UNET_HEADS if family == "sd1" else tuple(c // SD2_UNET_HEAD_DIM for c in channels),
        use_linear_projection=_first(converted, "", ".proj_in.weight").ndim == 2,
        upcast_attention=family == "sd2",  # no-op in fp32; SD 2.1 needs it in fp16
        norm_num_groups=32,
        **(_added_embedding_config(converted, family, pooled_dim) if family in SDXL_TIME_IDS else {}),
    )


def _added_embedding_config(converted, family, pooled_dim):
    """SDXL's "text_time" embedding: its input is the pooled text (pooled_dim) + one sinusoidal embedding
    per time id; the width of each follows from the family's number of time ids."""
    total = int(converted["add_embedding.linear_1.weight"].shape[1])
    per_id, rest = divmod(total - pooled_dim, SDXL_TIME_IDS[family])
    if rest or per_id < 1:
        raise CheckpointError(f"the UNet's added embedding takes {total} inputs: not pooled text ({pooled_dim}) "
                              f"+ {SDXL_TIME_IDS[family]} time ids")
    return dict(addition_embed_type="text_time", addition_time_embed_dim=per_id,
                projection_class_embeddings_input_dim=total)


def _build_unet(converted, family, pooled_dim=None):
    from diffusers import UNet2DConditionModel

    config = unet_config(converted, family, pooled_dim)
    return _load_assigned(lambda: UNet2DConditionModel(**config), converted, "UNet")


def _has(state_dict, prefix):
    return any(k.startswith(prefix) for k in state_dict)


# --- VAE -----------------------------------------------------------------------------------------------

def vae_config(converted, sample_size=512) -> dict:
    """AutoencoderKL arguments from a converted VAE state dict's shapes."""
    levels = _count_indices(converted, "encoder.down_blocks.")
    return dict(
        in_channels=converted["encoder.conv_in.weight"].shape[1],
        out_channels=converted["decoder.conv_out.weight"].shape[0],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(converted[f"encoder.down_blocks.{b}.resnets.0.conv1.weight"].shape[0]
                                 for b in range(levels)),
        layers_per_block=_count_indices(converted, "encoder.down_blocks.0.resnets."),
        latent_channels=converted["decoder.conv_in.weight"].shape[1],
        norm_num_groups=32,
        sample_size=sample_size,
        scaling_factor=VAE_SCALING_FACTOR,
    )


def _build_vae(converted, sample_size):
    from diffusers import AutoencoderKL

    return _load_strict(AutoencoderKL(**vae_config(converted, sample_size)), converted, "VAE")


# --- shared --------------------------------------------------------------------------------------------

def _load_strict(model, converted, what, assign=False):
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{what} weights do not fit the architecture inferred from their shapes: "
            f"missing {len(missing)} {missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]}"
        )
    try:
        model.load_state_dict(converted, strict=True, assign=assign)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{what} weights do not fit the inferred architecture: {e}") from e
    return model.float().eval()


def _load_assigned(factory, converted, what):
    """factory() built on the meta device, its parameters then taken from `converted` as they are: no
    random initialization and, for fp32 files, no copy (an SDXL UNet is 10 GB in fp32). Falls back to a
    normal build when the module made state outside its state dict (a meta tensor would be left)."""
    import itertools

    import torch

    with torch.device("meta"):
        model = factory()
    model = _load_strict(model, converted, what, assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        return _load_strict(factory(), converted, what)
    return model


def _tensor_id(tensor):
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel()


def _in_proj_source(diffusers_key):
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)", diffusers_key)
    if m is None:
        return None
    return f"{OPEN_CLIP_PREFIX}transformer.resblocks.{m.group(1)}.attn.in_proj_{m.group(2)}"
