"""Tiny random SDXL pipelines (base, refiner, inpainting), built locally (never downloaded).

Scaled-down copies of the real architectures that keep the family rules a single-file checkpoint
cannot spell out in its shapes:
- text_encoder: CLIP ViT-L style (quick_gelu, 64-dim heads, pads with <|endoftext|>);
- text_encoder_2: OpenCLIP ViT-bigG style CLIPTextModelWithProjection (gelu, 64-dim heads, pads with "!");
- UNet: 64-dim heads (attention_head_dim = channels // 64 heads), linear proj_in/out, no attention at the
  first level, transformer depth per block, added "text_time" embedding (pooled text + 6 time ids, or 5
  with the aesthetic score for the refiner);
- VAE: 4 levels (scale factor 8), scaling factor 0.13025.
The refiner has only the bigG encoder (its UNet's context is 1280 wide in the real model).
"""
import torch

from tiny_models import _perturb, _vae, tokenizer

HIDDEN_1, HIDDEN_2, PROJECTION = 64, 128, 96
TIME_EMBED = 8


def _clip(hidden, act, seed, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=3,
                         num_attention_heads=hidden // 64, max_position_embeddings=77, hidden_act=act,
                         projection_dim=PROJECTION, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407 if act == "quick_gelu" else 0)
    return _perturb((CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg), seed)


def _unet(seed, context, time_ids, in_channels=4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    channels = (64, 64, 128)
    return _perturb(UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=tuple(c // 64 for c in channels),
        use_linear_projection=True, cross_attention_dim=context, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=PROJECTION + time_ids * TIME_EMBED,
    ), seed)


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
                                  timestep_spacing="leading")


def _sdxl_vae(seed):
    vae = _vae(seed)
    vae.register_to_config(scaling_factor=0.13025)
    return vae


def make_base(seed=0, inpaint=False):
    """StableDiffusionXLPipeline (or ...InpaintPipeline with a 9-channel UNet) with tiny random weights."""
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline
    return cls(vae=_sdxl_vae(seed + 3), text_encoder=_clip(HIDDEN_1, "quick_gelu", seed),
               text_encoder_2=_clip(HIDDEN_2, "gelu", seed + 1, projection=True),
               tokenizer=tokenizer("sd1"), tokenizer_2=tokenizer("sd2"),
               unet=_unet(seed + 2, HIDDEN_1 + HIDDEN_2, 6, in_channels=9 if inpaint else 4),
               scheduler=_scheduler())


def make_refiner(seed=10):
    """StableDiffusionXLImg2ImgPipeline shaped like the refiner: bigG encoder only, aesthetic score."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline(
        vae=_sdxl_vae(seed + 3), text_encoder=None, text_encoder_2=_clip(HIDDEN_2, "gelu", seed + 1, projection=True),
        tokenizer=None, tokenizer_2=tokenizer("sd2"), unet=_unet(seed + 2, HIDDEN_2, 5), scheduler=_scheduler(),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)


def save(path, kind="base", seed=None):
    make = {"base": make_base, "inpaint": lambda seed=0: make_base(seed, inpaint=True), "refiner": make_refiner}[kind]
    pipe = make() if seed is None else make(seed)
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe
