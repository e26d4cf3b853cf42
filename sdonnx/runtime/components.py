"""Thin facades over the ONNX graphs: the pipeline sees arrays in, arrays out, named by the manifest."""
import logging
from pathlib import Path

import numpy as np

from .precision import Precision
from .session import Session

log = logging.getLogger(__name__)
# graphs fused by onnxruntime's optimizer hold its contrib ops: a GPU target's need that provider's kernels
# (NhwcConv, GroupNorm, packed-QKV attention) and OpenVINO/MIGraphX run none of them (their nodes would go to
# the CPU provider). Elsewhere the fp32 base graph runs instead of failing or splitting at session creation.
FUSED_GRAPH_PROVIDERS = {"cpu": ("cpu", "cuda", "dml"), "gpu": ("cuda",), "dml": ("dml",)}


def derived_runs_on(spec, plan):
    """Whether the component's derived graph (optimized/fp16/int8) can run on the plan's first provider;
    a derived graph without fusions (fp16 or int8 alone) runs anywhere."""
    target = spec.optimized.get("target")
    return target is None or plan.names[0] in FUSED_GRAPH_PROVIDERS.get(target, ())


class _Component:
    def __init__(self, folder, manifest, name, plan, replacements=None, tiling=None, base=False, graph=None,
                 precision=None):
        """base: run the fp32 base graph even where a derived (optimized/fp16/int8) one exists; LoRA
        replacements, tiling and graph (a rewrite of the base graph: hypernetworks) always do, as they name
        and rewrite the base graph's initializers, convs and projections. precision: a runtime.precision
        Precision, which picks among the base graph, the derived one and the variants (default: the derived
        graph where there is one)."""
        spec = manifest.components[name]
        which = (precision or Precision()).graph(spec, name)
        if base or replacements or tiling or graph:
            which = "base"
        if which == "derived" and not derived_runs_on(spec, plan):
            log.warning("%s: its graph is optimized for %s, which %s does not run; using the fp32 base graph "
                        "(convert with --target cpu, or without --optimize, for this provider)",
                        name, spec.optimized["target"], plan.names[0])
            which = "base"
        derived = which != "base"
        path = Path(folder) / {"base": spec.path, "derived": spec.optimized_path}.get(which, which)
        self.session = Session(path, plan, name=name, replacements=replacements, tiling=tiling, dims=spec.inputs,
                               graph=graph)
        self.is_base = not derived
        self.manifest = manifest


class TextEncoder(_Component):
    """The CLIP text transformer; the token-embedding lookup happens here in numpy, so textual inversion
    can hand in extra rows (`inputs_embeds`) without touching the graph."""

    def __init__(self, folder, manifest, name, plan, info=None, replacements=None, precision=None):
        super().__init__(folder, manifest, name, plan, replacements, precision=precision)
        self.info = info = info or next(t for t in manifest.text_encoders if t.component == name)
        self.token_embeddings = _token_embeddings(Path(folder) / info.token_embeddings, info.hidden_size)

    def embed(self, input_ids):
        """input_ids: [B, T] -> token embeddings [B, T, D]."""
        return self.token_embeddings[np.asarray(input_ids)]

    def __call__(self, input_ids, clip_skip=1, inputs_embeds=None, pooled=False):
        """input_ids: [B, T] -> hidden states [B, T, D] of layer -clip_skip, final layer norm applied, or of
        the manifest's hidden_layer (raw; clip skip does not apply). With pooled=True: (hidden states,
        the manifest's pooled output [B, P]).

        inputs_embeds, if given, replaces the table lookup (ids then only locate the end token)."""
        feeds = {"input_ids": input_ids, "inputs_embeds": self.embed(input_ids) if inputs_embeds is None else inputs_embeds}
        layer = self.info.hidden_layer
        name = "hidden_states" if layer is not None else "last_hidden_state" if clip_skip <= 1 else "hidden_states_normed"
        if layer is None and clip_skip > 1:
            layer = -clip_skip
        wanted = [name] + ([self.info.pooled] if pooled else [])
        out = self.session.run(feeds, wanted)
        z = out[name]
        if layer is not None:
            if -layer > z.shape[0]:
                raise ValueError(f"clip skip {-layer} is more than the text encoder's {z.shape[0]} layers")
            z = z[layer]
        return (z, out[self.info.pooled]) if pooled else z


def _token_embeddings(path, width):
    """The [vocab, width] token-embedding table; a missing, damaged or misshapen file is a ModelFileError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from ..manifest import ModelFileError

    try:
        table = load_file(str(path)).get("weight")
    except (OSError, SafetensorError) as e:
        raise ModelFileError(f"token embeddings {path} cannot be read ({e}); convert the model again") from None
    if table is None or table.ndim != 2 or table.shape[1] != width:
        shape = "no tensor named weight" if table is None else f"shape {list(table.shape)}"
        raise ModelFileError(f"token embeddings {path} hold {shape}; the manifest expects [vocab, {width}]")
    return table


class UNet(_Component):
    def __call__(self, sample, timestep, context, residuals=None, **added):
        """sample: [B, C, h, w], timestep: [B], context: [B, T, D] -> model output [B, C_out, h, w].

        added: the UNet's added conditions, if it takes any (SDXL: text_embeds [B, P], time_ids [B, 6]).
        residuals: {input name: array} of a UNet made to take ControlNet residuals (controlnet.residuals)."""
        feeds = {"sample": sample, "timestep": np.asarray(timestep, np.float32).reshape(-1),
                 "encoder_hidden_states": context, **added, **(residuals or {})}
        # the conditioning repeats over the steps: on a GPU it stays there (IO binding) while it does not change
        return self.session.run(feeds, steady=("encoder_hidden_states", *added))["out_sample"]


class VaeDecoder(_Component):
    def __call__(self, latents):
        """latents: [B, C, h, w] (already divided by the scaling factor) -> images [B, 3, H, W] in [-1, 1]."""
        return self.session.run({"latent_sample": latents})["sample"]


class VaeEncoder(_Component):
    def __call__(self, images):
        """images: [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, C, h, w] (unscaled)."""
        out = self.session.run({"sample": images})
        return out["latent_mean"], out["latent_logvar"]
