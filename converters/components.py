"""Export wrappers: each torch component as a module with the fixed ONNX contract of sdonnx.

The I/O contract (names, dynamic axes, dtypes) is declared here as data and written into the manifest;
the runtime talks to the graphs only through these names.
"""
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Contract:
    """ONNX inputs/outputs of one component: name -> symbolic axes (None for a fixed axis)."""

    inputs: dict
    outputs: dict
    input_dtypes: dict = field(default_factory=dict)

    def dynamic_axes(self):
        axes = {}
        for name, dims in {**self.inputs, **self.outputs}.items():
            named = {i: d for i, d in enumerate(dims) if isinstance(d, str)}
            if named:
                axes[name] = named
        return axes


TEXT_ENCODER = Contract(
    # the token-embedding lookup happens at run time in numpy (text/embeddings.py), so textual inversion
    # adds rows there without touching the graph; input_ids only locate the end token for pooling
    inputs={"input_ids": ("batch", "tokens"), "inputs_embeds": ("batch", "tokens", None)},
    outputs={
        "last_hidden_state": ("batch", "tokens", None),
        "pooled_output": ("batch", None),
        # every layer's output with the final layer norm applied: clip skip N reads [-N], no re-export
        "hidden_states_normed": (None, "batch", "tokens", None),
    },
    input_dtypes={"input_ids": "int64", "inputs_embeds": "float32"},
)
UNET = Contract(
    inputs={
        "sample": ("batch", None, "height", "width"),
        "timestep": ("batch",),
        "encoder_hidden_states": ("batch", "sequence", None),
    },
    outputs={"out_sample": ("batch", None, "height", "width")},
    input_dtypes={"sample": "float32", "timestep": "float32", "encoder_hidden_states": "float32"},
)
VAE_DECODER = Contract(
    inputs={"latent_sample": ("batch", None, "latent_height", "latent_width")},
    outputs={"sample": ("batch", None, "height", "width")},
    input_dtypes={"latent_sample": "float32"},
)
VAE_ENCODER = Contract(
    inputs={"sample": ("batch", None, "height", "width")},
    outputs={
        "latent_mean": ("batch", None, "latent_height", "latent_width"),
        "latent_logvar": ("batch", None, "latent_height", "latent_width"),
    },
    input_dtypes={"sample": "float32"},
)


def _text_core(model):
    """transformers < 5 nests the CLIP text transformer under .text_model; 5.x does not."""
    return getattr(model, "text_model", model)


class _GivenEmbeddings(torch.nn.Module):
    """Stands in for the token-embedding table during export: returns the embeddings fed to the graph."""

    def __init__(self):
        super().__init__()
        self.value = None

    def forward(self, input_ids):
        return self.value


def _detached_copy(module):
    """A shallow copy whose child-module table is its own, so replacing a child leaves the original intact."""
    import copy

    clone = copy.copy(module)
    clone._modules = type(module._modules)(module._modules)
    return clone


def token_embedding(model):
    return _text_core(model).embeddings.token_embedding


class TextEncoderExport(torch.nn.Module):
    """(input_ids, inputs_embeds) -> last hidden state, pooled output, every layer's normed output.

    The export copy's token-embedding table is swapped for a module returning `inputs_embeds`; position
    embeddings, causal mask and pooling stay transformers' own code, whatever its version.
    """

    def __init__(self, model):
        super().__init__()
        self.model = _detached_copy(model)
        core = _text_core(self.model)
        if core is not self.model:
            core = _detached_copy(core)
            self.model.text_model = core
        core.embeddings = _detached_copy(core.embeddings)
        core.embeddings.token_embedding = self.given = _GivenEmbeddings()

    def forward(self, input_ids, inputs_embeds):
        self.given.value = inputs_embeds
        out = self.model(input_ids, output_hidden_states=True, return_dict=True)
        norm = _text_core(self.model).final_layer_norm
        normed = torch.stack([norm(h) for h in out.hidden_states[1:]])
        return out.last_hidden_state, out.pooler_output, normed


class UNetExport(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderExport(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, latent_sample):
        return self.model.decode(latent_sample, return_dict=False)[0]


class VaeEncoderExport(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample):
        dist = self.model.encode(sample, return_dict=False)[0]
        return dist.mean, dist.logvar


@dataclass
class ComponentSpec:
    """One graph to export: its name in the model folder, wrapper, contract and example inputs."""

    name: str
    wrapper: torch.nn.Module
    contract: Contract
    example: tuple
    check: list  # list of input tuples for the parity check (other shapes than the example)
    weight_prefix: str  # prefix of the torch state-dict names to strip ("model.")
    weight_namespace: str  # name of the diffusers component the weights belong to


def _unet_example(unet, batch, latent_h, latent_w, tokens, generator):
    c = unet.config
    sample = torch.randn(batch, c.in_channels, latent_h, latent_w, generator=generator)
    timestep = torch.rand(batch, generator=generator) * 999
    context = torch.randn(batch, tokens, c.cross_attention_dim, generator=generator)
    return sample, timestep, context


def unet_odd_size(unet):
    """A latent size that does not divide by the UNet's downsampling: tracing at it makes diffusers size
    every upsample from its skip connection, so the graph accepts any multiple-of-8 image size."""
    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    return factor * 2 + 1


def component_specs(text_encoder, unet, vae, seed=0):
    """The four graphs sdonnx exports, with example and check inputs drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    vocab = token_embedding(text_encoder).num_embeddings
    max_len = _text_core(text_encoder).embeddings.position_embedding.num_embeddings
    odd = unet_odd_size(unet)
    lat_c = vae.config.latent_channels
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    table = token_embedding(text_encoder).weight.detach()

    def ids(b, t):
        input_ids = torch.randint(0, vocab, (b, t), generator=g)
        return input_ids, table[input_ids]

    lat = lambda b, h, w: (torch.randn(b, lat_c, h, w, generator=g),)  # noqa: E731
    img = lambda b, h, w: (torch.rand(b, 3, h, w, generator=g) * 2 - 1,)  # noqa: E731
    return [
        ComponentSpec("text_encoder", TextEncoderExport(text_encoder), TEXT_ENCODER, ids(2, max_len),
                      [ids(1, max_len), ids(3, 9)], "model.", "text_encoder"),
        ComponentSpec("unet", UNetExport(unet), UNET, _unet_example(unet, 2, odd, odd + 2, max_len, g),
                      [_unet_example(unet, 2, 8, 8, max_len, g), _unet_example(unet, 1, odd + 4, 6, 2 * max_len, g)],
                      "model.", "unet"),
        ComponentSpec("vae_decoder", VaeDecoderExport(vae), VAE_DECODER, lat(1, 5, 7), [lat(2, 8, 8), lat(1, 3, 5)],
                      "model.", "vae"),
        ComponentSpec("vae_encoder", VaeEncoderExport(vae), VAE_ENCODER, img(1, 5 * vae_factor, 7 * vae_factor),
                      [img(2, 8 * vae_factor, 8 * vae_factor)], "model.", "vae"),
    ]
