"""Write a diffusers StableDiffusionPipeline's weights in the original CompVis / A1111 single-file layout.

The inverse of the single-file conversion, written out key by key so that tests can make realistic
checkpoints from the tiny pipelines of tiny_models.py:
- UNet under `model.diffusion_model.` (input_blocks / middle_block / output_blocks),
- VAE under `first_stage_model.` (encoder.down.N.block.M, conv 1x1 attention weights),
- SD 1.x text encoder in HF CLIP layout under `cond_stage_model.transformer.text_model.`,
- SD 2.x text encoder in OpenCLIP layout under `cond_stage_model.model.` (fused in_proj, resblocks,
  ln_final, text_projection) with one extra random final resblock, as in the real 24-layer file
  whose last layer SD 2 never uses;
- SDXL (pipelines with text_encoder_2): CLIP-L in HF layout under `conditioner.embedders.0.transformer.`,
  OpenCLIP bigG with its text_projection under `conditioner.embedders.1.model.` (the refiner, bigG only:
  `conditioner.embedders.0.model.`), the UNet's added embedding as `label_emb.0.{0,2}`.
"""
import re
from pathlib import Path

import torch

RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}


def to_original(pipe, extra_openclip_layer=True) -> dict:
    """{original key: tensor} for the pipeline's UNet, VAE and text encoder(s). The family follows the
    pipeline: text_encoder_2 -> SDXL; else the text encoder's activation: quick_gelu -> SD 1.x CLIP
    layout, otherwise SD 2.x OpenCLIP layout."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        text = _sdxl_text(pipe.text_encoder, pipe.text_encoder_2)
    elif pipe.text_encoder.config.hidden_act == "quick_gelu":
        text = _clip(pipe.text_encoder)
    else:
        text = _open_clip(pipe.text_encoder, extra_openclip_layer)
    out = {}
    out.update(_prefixed("model.diffusion_model.", _unet(pipe.unet)))
    out.update(_prefixed("first_stage_model.", _vae(pipe.vae)))
    out.update(text)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def save_checkpoint(pipe, path, extra_openclip_layer=True):
    """.safetensors via safetensors, anything else as torch.save({"state_dict": ...})."""
    path = Path(path)
    state_dict = to_original(pipe, extra_openclip_layer)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(path))
    else:
        torch.save({"state_dict": state_dict, "global_step": 0}, str(path))
    return path


def _prefixed(prefix, state_dict):
    return {prefix + k: v for k, v in state_dict.items()}


def _rename(name, table):
    for new, old in table.items():
        if name.startswith(new + ".") or name == new:
            return old + name[len(new):]
    return name


def _unet(unet):
    lpb = unet.config.layers_per_block
    has_attention = [len(block.attentions) > 0 if hasattr(block, "attentions") else False for block in unet.up_blocks]
    out = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        if parts[0] == "time_embedding":
            new = f"time_embed.{0 if parts[1] == 'linear_1' else 2}.{parts[2]}"
        elif parts[0] == "add_embedding":  # SDXL's pooled text + time ids embedding
            new = f"label_emb.0.{0 if parts[1] == 'linear_1' else 2}.{parts[2]}"
        elif parts[0] in ("conv_in", "conv_norm_out", "conv_out"):
            new = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}[parts[0]] + "." + parts[1]
        elif parts[0] == "down_blocks":
            new = _unet_down(int(parts[1]), parts[2:], lpb)
        elif parts[0] == "mid_block":
            index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
            new = f"middle_block.{index}." + _unet_inner(parts[1], parts[3:])
        elif parts[0] == "up_blocks":
            new = _unet_up(int(parts[1]), parts[2:], lpb, has_attention[int(parts[1])])
        else:
            raise KeyError(f"unexpected UNet key {key}")
        out[new] = value
    return out


def _unet_inner(kind, rest):
    rest = ".".join(rest)
    return _rename(rest, RESNET_UNET) if kind == "resnets" else rest


def _unet_down(block, parts, lpb):
    kind, index = parts[0], int(parts[1])
    if kind == "downsamplers":
        return f"input_blocks.{1 + block * (lpb + 1) + lpb}.0.op." + ".".join(parts[3:])
    slot = 0 if kind == "resnets" else 1
    return f"input_blocks.{1 + block * (lpb + 1) + index}.{slot}." + _unet_inner(kind, parts[2:])


def _unet_up(block, parts, lpb, has_attention):
    kind, index = parts[0], int(parts[1])
    if kind == "upsamplers":
        # LDM appends the upsampler after the level's last resnet (and its attention, if any).
        slot = 2 if has_attention else 1
        return f"output_blocks.{block * (lpb + 1) + lpb}.{slot}.conv." + ".".join(parts[3:])
    slot = 0 if kind == "resnets" else 1
    return f"output_blocks.{block * (lpb + 1) + index}.{slot}." + _unet_inner(kind, parts[2:])


def _vae(vae):
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        coder = parts[0]
        if coder in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        rest = parts[1:]
        if rest[0] in ("down_blocks", "up_blocks"):
            level = int(rest[1]) if rest[0] == "down_blocks" else levels - 1 - int(rest[1])
            word = "down" if rest[0] == "down_blocks" else "up"
            if rest[2] in ("downsamplers", "upsamplers"):
                new = f"{word}.{level}.{'downsample' if word == 'down' else 'upsample'}." + ".".join(rest[4:])
            else:
                new = f"{word}.{level}.block.{rest[3]}." + _rename(".".join(rest[4:]), {"conv_shortcut": "nin_shortcut"})
        elif rest[0] == "mid_block" and rest[1] == "resnets":
            new = f"mid.block_{int(rest[2]) + 1}." + ".".join(rest[3:])
        elif rest[0] == "mid_block":
            new = "mid.attn_1." + _rename(".".join(rest[3:]), VAE_ATTENTION)
            if value.ndim == 2:
                value = value[:, :, None, None]  # LDM's attention q/k/v/proj_out are 1x1 convs
        else:
            new = _rename(".".join(rest), {"conv_norm_out": "norm_out"})
        out[f"{coder}.{new}"] = value
    return out


def _clip(text_encoder, prefix="cond_stage_model.transformer.text_model."):
    out = _prefixed(prefix, _text_state(text_encoder))
    # Files saved with older transformers carry the position_ids buffer; loaders must cope with it.
    positions = text_encoder.config.max_position_embeddings
    out[prefix + "embeddings.position_ids"] = torch.arange(positions)[None]
    return out


def _text_state(text_encoder):
    """The CLIP text transformer's weights without a `text_model.` prefix (transformers 5 drops it from
    CLIPTextModel, CLIPTextModelWithProjection keeps it)."""
    return {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}


def _sdxl_text(clip_l, big_g):
    if clip_l is None:  # the refiner
        return _open_clip(big_g, False, prefix="conditioner.embedders.0.model.")
    out = _clip(clip_l, prefix="conditioner.embedders.0.transformer.text_model.")
    out.update(_open_clip(big_g, False, prefix="conditioner.embedders.1.model."))
    return out


def _open_clip(text_encoder, extra_layer, prefix="cond_stage_model.model."):
    src = _text_state(text_encoder)
    out = {
        prefix + "token_embedding.weight": src["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": src["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": src["final_layer_norm.weight"],
        prefix + "ln_final.bias": src["final_layer_norm.bias"],
    }
    layers = text_encoder.config.num_hidden_layers
    for i in range(layers):
        out.update(_prefixed(f"{prefix}transformer.resblocks.{i}.", _open_clip_block(src, f"encoder.layers.{i}.")))
    width = text_encoder.config.hidden_size
    generator = torch.Generator().manual_seed(1234)
    if extra_layer:
        template = _open_clip_block(src, "encoder.layers.0.")
        extra = {k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in template.items()}
        out.update(_prefixed(f"{prefix}transformer.resblocks.{layers}.", extra))
    projection = src.get("text_projection.weight")  # OpenCLIP multiplies x @ P: P is the Linear weight transposed
    out[prefix + "text_projection"] = projection.T if projection is not None else torch.randn(
        width, text_encoder.config.projection_dim, generator=generator)
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    return out


def _open_clip_block(src, layer):
    block = {
        "attn.in_proj_weight": torch.cat([src[f"{layer}self_attn.{p}_proj.weight"] for p in "qkv"]),
        "attn.in_proj_bias": torch.cat([src[f"{layer}self_attn.{p}_proj.bias"] for p in "qkv"]),
    }
    for key, value in src.items():
        if key.startswith(layer) and not re.search(r"self_attn\.[qkv]_proj", key):
            block[_rename(key[len(layer):], OPENCLIP_LAYER)] = value
    return block


def controlnet_to_original(controlnet, prefix="control_model.") -> dict:
    """{original key: tensor} of a diffusers ControlNetModel in the layout of lllyasviel's ControlNet files
    (`control_v11p_sd15_canny.pth`): the UNet encoder as `input_blocks` / `middle_block`, the hint encoder as
    `input_hint_block.{0,2,...,14}`, the zero convolutions as `zero_convs.N.0` and `middle_block_out.0`, all
    under `control_model.`. The hint encoder must have diffusers' default 4 levels (conv_out is index 14)."""
    lpb = controlnet.config.layers_per_block
    out = {}
    for key, value in controlnet.state_dict().items():
        parts = key.split(".")
        if parts[0] == "controlnet_cond_embedding":
            index = 0 if parts[1] == "conv_in" else 14 if parts[1] == "conv_out" else 2 * (int(parts[2]) + 1)
            new = f"input_hint_block.{index}.{parts[-1]}"
        elif parts[0] == "controlnet_down_blocks":
            new = f"zero_convs.{parts[1]}.0.{parts[2]}"
        elif parts[0] == "controlnet_mid_block":
            new = f"middle_block_out.0.{parts[1]}"
        elif parts[0] == "time_embedding":
            new = f"time_embed.{0 if parts[1] == 'linear_1' else 2}.{parts[2]}"
        elif parts[0] == "add_embedding":
            new = f"label_emb.0.{0 if parts[1] == 'linear_1' else 2}.{parts[2]}"
        elif parts[0] == "conv_in":
            new = f"input_blocks.0.0.{parts[1]}"
        elif parts[0] == "down_blocks":
            new = _unet_down(int(parts[1]), parts[2:], lpb)
        elif parts[0] == "mid_block":
            index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
            new = f"middle_block.{index}." + _unet_inner(parts[1], parts[3:])
        else:
            raise KeyError(f"unexpected ControlNet key {key}")
        out[prefix + new] = value.detach().clone().contiguous()
    return out
