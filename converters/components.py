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
        # every layer's raw output (no final layer norm): SDXL conditions on the penultimate one
        "hidden_states": (None, "batch", "tokens", None),
    },
    input_dtypes={"input_ids": "int64", "inputs_embeds": "float32"},
)
# an encoder with a text projection (OpenCLIP bigG in SDXL) also gives the projected pooled output
TEXT_ENCODER_PROJECTED = Contract(
    inputs=TEXT_ENCODER.inputs, outputs={**TEXT_ENCODER.outputs, "text_embeds": ("batch", None)},
    input_dtypes=TEXT_ENCODER.input_dtypes)
UNET = Contract(
    inputs={
        "sample": ("batch", None, "height", "width"),
        "timestep": ("batch",),
        "encoder_hidden_states": ("batch", "sequence", None),
    },
    outputs={"out_sample": ("batch", None, "height", "width")},
    input_dtypes={"sample": "float32", "timestep": "float32", "encoder_hidden_states": "float32"},
)
# SDXL's UNet also takes the added "text_time" conditions: pooled text embeddings and the size/crop time ids
UNET_ADDED = Contract(
    inputs={**UNET.inputs, "text_embeds": ("batch", None), "time_ids": ("batch", None)},
    outputs=UNET.outputs,
    input_dtypes={**UNET.input_dtypes, "text_embeds": "float32", "time_ids": "float32"},
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
        core = _text_core(self.model)
        out = core(input_ids, output_hidden_states=True, return_dict=True)
        normed = torch.stack([core.final_layer_norm(h) for h in out.hidden_states[1:]])
        raw = torch.stack(out.hidden_states[1:])
        projection = getattr(self.model, "text_projection", None)
        if projection is None:
            return out.last_hidden_state, out.pooler_output, normed, raw
        return out.last_hidden_state, out.pooler_output, normed, raw, projection(out.pooler_output)


class UNetExport(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class UNetAddedExport(UNetExport):
    """The UNet with SDXL's added conditions (pooled text embeddings and time ids) as graph inputs."""

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.model(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


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


def _unet_example(unet, batch, latent_h, latent_w, tokens, generator, pooled_dim=None):
    c = unet.config
    sample = torch.randn(batch, c.in_channels, latent_h, latent_w, generator=generator)
    timestep = torch.rand(batch, generator=generator) * 999
    context = torch.randn(batch, tokens, c.cross_attention_dim, generator=generator)
    if c.addition_embed_type != "text_time":
        return sample, timestep, context
    pooled_dim, time_ids = added_dims(unet, pooled_dim)
    text_embeds = torch.randn(batch, pooled_dim, generator=generator)
    ids = torch.randint(0, 1025, (batch, time_ids), generator=generator).float()  # sizes, crops, scores
    return sample, timestep, context, text_embeds, ids


def added_dims(unet, pooled_dim):
    """(pooled text width, number of time ids) of a "text_time" UNet: its added-embedding input is the
    pooled text embeddings followed by one sinusoidal embedding per time id (SDXL base: 6 ids, original
    size, crop and target size; refiner: 5, the aesthetic score instead of the target size)."""
    c = unet.config
    n, rest = divmod(c.projection_class_embeddings_input_dim - pooled_dim, c.addition_time_embed_dim)
    if rest or n < 1:
        raise ValueError(f"the UNet's added-embedding width {c.projection_class_embeddings_input_dim} is not "
                         f"pooled text ({pooled_dim}) + k * {c.addition_time_embed_dim}")
    return pooled_dim, n


def unet_odd_size(unet):
    """A latent size that does not divide by the UNet's downsampling: tracing at it makes diffusers size
    every upsample from its skip connection, so the graph accepts any multiple-of-8 image size."""
    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    return factor * 2 + 1


def component_specs(text_encoders, unet, vae, seed=0):
    """The graphs sdonnx exports, with example and check inputs drawn from `seed`.

    text_encoders: {component name: CLIP text model} ("text_encoder", "text_encoder_2"), or one model."""
    if not isinstance(text_encoders, dict):
        text_encoders = {"text_encoder": text_encoders}
    g = torch.Generator().manual_seed(seed)
    max_len = min(_text_core(t).embeddings.position_embedding.num_embeddings for t in text_encoders.values())
    odd = unet_odd_size(unet)

    def ids(table):
        def make(b, t):
            input_ids = torch.randint(0, table.shape[0], (b, t), generator=g)
            return input_ids, table[input_ids]
        return make

    specs = []
    for name, model in text_encoders.items():
        make = ids(token_embedding(model).weight.detach())
        contract = TEXT_ENCODER_PROJECTED if hasattr(model, "text_projection") else TEXT_ENCODER
        specs.append(ComponentSpec(name, TextEncoderExport(model), contract, make(2, max_len),
                                   [make(1, max_len), make(3, 9)], "model.", name))
    added = unet.config.addition_embed_type == "text_time"
    pooled = next((t.config.projection_dim for t in text_encoders.values() if hasattr(t, "text_projection")), None)
    unet_in = lambda *a: _unet_example(unet, *a, g, pooled)  # noqa: E731
    return specs + [
        ComponentSpec("unet", (UNetAddedExport if added else UNetExport)(unet), UNET_ADDED if added else UNET,
                      unet_in(2, odd, odd + 2, max_len),
                      [unet_in(2, 8, 8, max_len), unet_in(1, odd + 4, 6, 2 * max_len)], "model.", "unet"),
    ] + vae_specs(vae, g)


def vae_specs(vae, g):
    """The VAE decoder and encoder graphs (a checkpoint's, or an external VAE converted on its own), with
    example and check inputs drawn from the generator g."""
    lat_c = vae.config.latent_channels
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    lat = lambda b, h, w: (torch.randn(b, lat_c, h, w, generator=g),)  # noqa: E731
    img = lambda b, h, w: (torch.rand(b, 3, h, w, generator=g) * 2 - 1,)  # noqa: E731
    return [
        ComponentSpec("vae_decoder", VaeDecoderExport(vae), VAE_DECODER, lat(1, 5, 7), [lat(2, 8, 8), lat(1, 3, 5)],
                      "model.", "vae"),
        ComponentSpec("vae_encoder", VaeEncoderExport(vae), VAE_ENCODER, img(1, 5 * vae_factor, 7 * vae_factor),
                      [img(2, 8 * vae_factor, 8 * vae_factor)], "model.", "vae"),
    ]
