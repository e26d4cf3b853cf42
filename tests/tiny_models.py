"""Tiny random Stable Diffusion pipelines, built locally (never downloaded).

They are scaled-down copies of the real architectures and keep the rules a single-file checkpoint
cannot spell out in its shapes, so that the converter's family rules hold for them too:
- SD 1.x: CLIP text encoder with quick_gelu, 64-dim heads; UNet with 8 attention heads per block,
  conv proj_in/proj_out; VAE with 4 levels (scale factor 8) and 32-group norms; eps prediction.
- SD 2.x: OpenCLIP-style text encoder (gelu, 64-dim heads); UNet with 64-dim heads and linear
  proj_in/proj_out; v prediction for the "768-v" flavour.
Both use the real CLIP tokenizer shipped in sdonnx/data/clip (so vocab size 49408).
"""
from pathlib import Path

import torch

TOKENIZER_JSON = Path(__file__).resolve().parents[1] / "sdonnx" / "data" / "clip" / "tokenizer.json"

FAMILIES = ("sd1", "sd2")


def _perturb(module, seed, scale=0.02):
    """Add small noise to every parameter: fresh layers have bit-identical norms and zero biases, which
    real checkpoints never have (and which exporters may merge into one initializer)."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def _text_encoder(family, seed):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=1,
        max_position_embeddings=77,
        hidden_act="quick_gelu" if family == "sd1" else "gelu",
        projection_dim=64,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407 if family == "sd1" else 0,
    )
    return _perturb(CLIPTextModel(cfg), seed)


def _unet(family, seed):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    sd2 = family == "sd2"
    channels = (64, 64, 128) if sd2 else (32, 32, 64)
    return _perturb(UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=tuple(c // 64 for c in channels) if sd2 else 8,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=32,
    ), seed)


def _vae(seed):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return _perturb(AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.18215,
    ), seed)


def tokenizer(family):
    from transformers import CLIPTokenizerFast

    return CLIPTokenizerFast(tokenizer_file=str(TOKENIZER_JSON), pad_token="<|endoftext|>" if family == "sd1" else "!", model_max_length=77)


def make_pipeline(family="sd1", prediction=None, seed=0):
    """A StableDiffusionPipeline with tiny random weights. prediction defaults to the family's own."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: choose one of {FAMILIES}")
    prediction = prediction or ("epsilon" if family == "sd1" else "v_prediction")
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=prediction, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )
    return StableDiffusionPipeline(
        vae=_vae(seed + 2),
        text_encoder=_text_encoder(family, seed),
        tokenizer=tokenizer(family),
        unet=_unet(family, seed + 1),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(path, family="sd1", prediction=None, seed=0):
    pipe = make_pipeline(family, prediction, seed)
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe
