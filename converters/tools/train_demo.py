"""Train the shipped demo model: a tiny Stable Diffusion 1.x that draws coloured shapes.

    python converters/tools/train_demo.py --workdir /tmp/demo-train \
        --out models/demo/sdonnx-shapes-demo.safetensors

A demonstration, not an art model: it knows three shapes (circle, square, triangle) in six colours
(red, green, blue, yellow, white, black) on a background of another of those colours, captioned
"a red circle on a blue background". It has the real SD 1.x architecture and code paths (CLIP text
encoder with the real CLIP tokenizer, UNet2DConditionModel with 8 heads per block, 4-level AutoencoderKL,
eps prediction on the scaled_linear schedule, latent scaling factor 0.18215), only scaled down, so that
`sdonnx convert` reads the single file like any SD 1.x checkpoint.

Stages, each deterministic for a given --seed (one CPU thread by default: on a shared 2-core machine a
single thread is both faster and reproducible):
1. dataset: 90 (shape colour, background, shape) combinations x --variants random sizes/positions,
   rendered at 4x and box-filtered to 64x64 (the model's native size; latents are 8x8).
2. latent space, defined by hand (`target_latents`): per 8x8 patch the mean colour and a vertical
   moment, standardized, so that latents x 0.18215 (SD 1.x's fixed factor) have unit variance.
3. vae: decoder (latents -> image) and encoder (image -> latents) trained as two regressions on aligned
   32x32 crops. unet: first the text encoder alone, with a linear probe that must read (shape colour,
   background colour, shape) back from the states after the caption, until it reads all 90 captions
   (the part of CLIP's pre-training this model needs: without it the UNet never bound the background
   word; the probe reads the word tokens, so the UNet learns to read them too and A1111 emphasis on a
   word moves the picture); then UNet + text encoder jointly on the latents of stage 2: eps loss weighted so that the x0
   error counts between 1 and 5 times ("truncated" min-SNR-5: the noisy steps, where colours are decided,
   keep their weight), plus 0.1 x the probe loss; 10% empty captions so that classifier-free guidance
   and negative prompts work; a few partial captions ("a red circle", "red circle", "red", "a blue
   background") so that single words mean something; EMA weights are kept, and their accuracy over all
   90 captions is logged every --eval-every steps (read from sampled latents: the latent space is the
   patch colours). The two stages are independent: `--stage vae` and `--stage unet` may run at the same
   time in two processes.
4. export: original CompVis layout, fp16, safetensors (converters/original_layout.py).

Stage results are kept in --workdir, so a rerun skips finished stages. How long the shipped model took
is in models/demo/README.md.
"""
import argparse
import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

log = logging.getLogger("train_demo")

TOKENIZER_JSON = Path(__file__).resolve().parents[2] / "sdonnx" / "data" / "clip" / "tokenizer.json"

COLOURS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "yellow": (255, 230, 0),
           "white": (255, 255, 255), "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle")
SIZE = 64
STAGES = ("vae", "unet", "export")
SCALING_FACTOR = 0.18215
# (template, probability): mostly full captions, 10% empty for classifier-free guidance.
CAPTIONS = (("a {c} {s} on a {b} background", 0.70), ("a {c} {s}", 0.05), ("{c} {s}", 0.04), ("{c}", 0.03),
            ("a {s} on a {b} background", 0.04), ("a {b} background", 0.04), ("", 0.10))


def combos():
    """[(shape colour, background colour, shape)] with the colours different: 6 x 5 x 3 = 90."""
    return [(c, b, s) for c in COLOURS for b in COLOURS if b != c for s in SHAPES]


def caption(colour, background, shape, template="a {c} {s} on a {b} background"):
    return template.format(c=colour, s=shape, b=background)


# --- dataset -------------------------------------------------------------------------------------------

def render(colour, background, shape, rng, scale=4):
    """One [64, 64, 3] uint8 image: the shape near the centre, 40-70% of the side, never at the border."""
    n = SIZE * scale
    image = Image.new("RGB", (n, n), COLOURS[background])
    draw = ImageDraw.Draw(image)
    half = rng.uniform(0.20, 0.35) * n
    cx, cy = (n / 2 + rng.uniform(-0.08, 0.08) * n for _ in range(2))
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half * 0.8), (cx - half, cy + half * 0.8)], fill=COLOURS[colour])
    return np.asarray(image.resize((SIZE, SIZE), Image.BOX))


def make_dataset(variants, seed):
    """images: [N, 3, 64, 64] float in [-1, 1]; labels: [N] index into combos()."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for index, (colour, background, shape) in enumerate(combos()):
        for _ in range(variants):
            images.append(render(colour, background, shape, rng))
            labels.append(index)
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, torch.tensor(labels)


# --- models --------------------------------------------------------------------------------------------

def make_models():
    """SD 1.x family rules: CLIP 64-dim heads, quick_gelu; UNet 8 heads per block; VAE 4 levels, 32 groups."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=SIZE, scaling_factor=SCALING_FACTOR)
    return text_encoder, unet, vae


def tokenizer():
    from transformers import CLIPTokenizerFast

    return CLIPTokenizerFast(tokenizer_file=str(TOKENIZER_JSON), pad_token="<|endoftext|>", model_max_length=77)


def alphas_cumprod():
    """SD 1.x training schedule: scaled_linear betas 0.00085..0.012 over 1000 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


# --- latent space ---------------------------------------------------------------------------------------

def _patch_features(images):
    """[N, 4, 8, 8]: per 8x8 patch the mean R, G, B and the vertical moment of R+G+B."""
    patches = images.unfold(2, 8, 8).unfold(3, 8, 8)  # [N, 3, 8, 8, 8 (y), 8 (x)]
    y = torch.linspace(-1, 1, 8).view(8, 1)
    moment = (patches.sum(1) * y).mean(dim=(-2, -1))[:, None]
    return torch.cat([patches.mean(dim=(-2, -1)), moment], 1)


def latent_stats(images):
    """(mean, std), each [1, 4, 1, 1]: the standardization of the latent space over the dataset."""
    z = _patch_features(images)
    return z.mean(dim=(0, 2, 3), keepdim=True), z.std(dim=(0, 2, 3), keepdim=True)


def target_latents(images):
    """The latent space, defined by hand, already multiplied by SCALING_FACTOR: [N, 4, 8, 8].

    Per 8x8 pixel patch: mean R, G, B and the vertical first moment of R+G+B (where in the patch the
    bright part lies), each standardized over the dataset. Defining it (rather than learning it end to
    end) lets the UNet train without waiting for the VAE, and the VAE train as two plain regressions.
    """
    mean, std = latent_stats(images)
    return (_patch_features(images) - mean) / std


# --- stage 2: VAE --------------------------------------------------------------------------------------

def _crops(images, latents, g, batch, cells=4):
    """Aligned random crops: `cells` x `cells` latents and the 8x larger image region they describe."""
    index = torch.randint(0, len(images), (batch,), generator=g)
    y, x = torch.randint(0, SIZE // 8 - cells + 1, (2,), generator=g).tolist()
    return (images[index, :, 8 * y:8 * (y + cells), 8 * x:8 * (x + cells)],
            latents[index, :, y:y + cells, x:x + cells])


def _cosine(opt, lr, step, steps):
    for group in opt.param_groups:
        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))


def train_vae(vae, images, latents, steps, batch, lr, seed):
    """Decoder: target latents (slightly noised, as a sampler leaves them) -> image; encoder: image ->
    target latents, near-deterministic (log-variance fixed at -8). Trained on aligned 32x32 crops."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vae.quant_conv.weight[vae.config.latent_channels:] = 0
        vae.quant_conv.bias[vae.config.latent_channels:] = -8.0
        vae.quant_conv.weight[:vae.config.latent_channels] /= SCALING_FACTOR  # the encoder makes latents / SCALING_FACTOR
        vae.post_quant_conv.weight *= SCALING_FACTOR  # and the decoder is fed them
    # the log-variance rows get no gradient (the loss reads the mean only), so Adam leaves them at -8
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train()
    start = time.time()
    for step in range(steps):
        _cosine(opt, lr, step, steps)
        image, z = _crops(images, latents, g, batch)
        rec = vae.decode((z + 0.05 * torch.randn(z.shape, generator=g)) / SCALING_FACTOR).sample
        mean = vae.quant_conv(vae.encoder(image))[:, :vae.config.latent_channels] * SCALING_FACTOR
        decoder_loss = F.mse_loss(rec, image) + 0.5 * F.l1_loss(rec, image)
        loss = decoder_loss + F.mse_loss(mean, z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("vae step %d/%d decoder %.4f encoder %.4f (%.0f s)", step, steps, decoder_loss.item(),
                     (loss - decoder_loss).item(), time.time() - start)
    return vae.eval()


# --- stage 3: UNet + text encoder ----------------------------------------------------------------------

def caption_ids(tok):
    """[combos, templates, 77] token ids, padded as SD 1.x pads (with <|endoftext|>)."""
    ids = [[tok(caption(c, b, s, template), padding="max_length", max_length=77, truncation=True).input_ids
            for template, _ in CAPTIONS] for c, b, s in combos()]
    return torch.tensor(ids)


@torch.no_grad()
def latent_accuracy(unet, text_encoder, ids, stats, steps=20, cfg=7.0, seed=1234):
    """(shape colour, background colour) accuracy over all 90 full captions, read from the latents.

    The latent space is hand-defined, so no VAE is needed to look: channels 0-2 of a sampled latent,
    de-standardized, are the patch mean colours. Euler sampling on the Karras schedule with CFG; the
    centre 2x2 cells are the shape, the outer ring of cells the background; each is named by the nearest
    palette colour, as tests/test_demo_semantic.py does on the decoded picture.
    """
    unet.eval()
    text_encoder.eval()
    acp = alphas_cumprod()
    train_sigmas = ((1 - acp) / acp).sqrt()
    g = torch.Generator().manual_seed(seed)
    cond = text_encoder(ids[:, 0]).last_hidden_state
    uncond = text_encoder(ids[:1, len(CAPTIONS) - 1]).last_hidden_state.expand_as(cond)
    ramp = torch.linspace(0, 1, steps)
    smin, smax = train_sigmas[0].item(), train_sigmas[-1].item()
    sigmas = torch.cat([(smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7, torch.zeros(1)])
    x = torch.randn((len(cond), 4, SIZE // 8, SIZE // 8), generator=g) * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.argmin((train_sigmas.log() - sigma.log()).abs()).float()  # nearest training timestep
        scaled = torch.cat([x, x]) / (sigma ** 2 + 1).sqrt()
        eps_u, eps_c = unet(scaled, t.expand(2 * len(x)), encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        denoised = x - sigma * (eps_u + cfg * (eps_c - eps_u))
        x = denoised + (x - denoised) / sigma * sigma_next if sigma_next > 0 else denoised
    mean, std = stats
    rgb = (x * std + mean)[:, :3]  # [-1, 1] colours per latent cell (x is already the scaled latent)
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1
    ring = torch.ones(SIZE // 8, SIZE // 8, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    c = SIZE // 16
    centre = rgb[:, :, c - 1:c + 1, c - 1:c + 1].flatten(2).median(-1).values
    border = rgb[:, :, ring].median(-1).values
    names = list(COLOURS)
    shape_ok = bg_ok = 0
    for (colour, background, _), a, b in zip(combos(), centre, border):
        shape_ok += names[int(torch.cdist(a[None], palette).argmin())] == colour
        bg_ok += names[int(torch.cdist(b[None], palette).argmin())] == background
    return shape_ok / len(cond), bg_ok / len(cond)


EOS = 49407  # CLIP's <|endoftext|>: ends the caption and pads it to 77 tokens (SD 1.x)
BOS = 49406


def caption_targets():
    """[90, 3]: class indices (shape colour, background colour, shape) of combos()."""
    names = list(COLOURS)
    return torch.tensor([[names.index(c), names.index(b), SHAPES.index(s)] for c, b, s in combos()])


class CaptionProbe(torch.nn.Module):
    """Reads (shape colour, background colour, shape) back from the text encoder's states: by default the
    mean over the caption's own tokens ("words"), or over the end-of-text and padding tokens ("end").

    Its loss is auxiliary: it makes the text encoder tell "a red circle on a blue background" from "a blue
    circle on a red background" early, the part of language understanding that CLIP's pre-training gives
    real models. Without it the UNet learnt the shape's colour but ignored the background word (the
    earlier demo model: 0-2 of 12 backgrounds right)."""

    def __init__(self, width, tokens="words"):
        super().__init__()
        self.head = torch.nn.Linear(width, len(COLOURS) * 2 + len(SHAPES))
        self.tokens = tokens  # "end": end-of-text and padding states; "words": the caption's own tokens

    def forward(self, hidden, ids):
        where = (ids == EOS) if self.tokens == "end" else (ids != EOS) & (ids != BOS)
        after = where.float()[..., None]
        pooled = (hidden * after).sum(1) / after.sum(1)
        return self.head(pooled).split([len(COLOURS), len(COLOURS), len(SHAPES)], -1)

    def loss(self, hidden, ids, targets):
        return sum(F.cross_entropy(logits, targets[:, i]) for i, logits in enumerate(self(hidden, ids)))


def pretrain_text_encoder(text_encoder, probe, ids, targets, steps, lr):
    """The text encoder and probe alone on the 90 full captions until the probe reads all of them back."""
    opt = torch.optim.Adam(list(text_encoder.parameters()) + list(probe.parameters()), lr=lr)
    full = ids[:, 0]
    for step in range(steps):
        hidden = text_encoder(full).last_hidden_state
        loss = probe.loss(hidden, full, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            right = torch.stack([o.argmax(-1) for o in probe(hidden, full)], 1).eq(targets).all(1).float().mean()
        if step % 25 == 0 or right == 1:
            log.info("text encoder pre-training step %d: loss %.4f, captions read back %.2f", step, loss.item(), right)
        if right == 1:
            break


class EMA:
    def __init__(self, modules, decay):
        self.modules, self.decay = modules, decay
        self.shadow = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]

    @torch.no_grad()
    def update(self, step):
        decay = min(self.decay, (1 + step) / (10 + step))
        for module, shadow in zip(self.modules, self.shadow):
            for k, v in module.state_dict().items():
                if v.dtype.is_floating_point:
                    shadow[k].lerp_(v, 1 - decay)


def train_unet(unet, text_encoder, latents, labels, ids, steps, batch, lr, seed, partial=None, evaluate=None,
               eval_every=250, weighting="truncated-snr", probe_tokens="words"):
    g = torch.Generator().manual_seed(seed)
    acp = alphas_cumprod()
    snr = acp / (1 - acp)
    weights = torch.tensor([p for _, p in CAPTIONS])
    targets = caption_targets()
    probe = CaptionProbe(text_encoder.config.hidden_size, probe_tokens)
    text_encoder.train()
    pretrain_text_encoder(text_encoder, probe, ids, targets, steps=500, lr=1e-3)
    params = list(unet.parameters()) + list(text_encoder.parameters()) + list(probe.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    ema = EMA([unet, text_encoder], 0.995)
    unet.train()
    text_encoder.train()
    start = time.time()
    for step in range(steps):
        warm = min(1.0, (step + 1) / 100)
        for group in opt.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.randint(0, len(labels), (batch,), generator=g)
        x0 = latents[index]
        template = torch.multinomial(weights, batch, replacement=True, generator=g)
        caption = ids[labels[index], template]
        context = text_encoder(caption).last_hidden_state
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        eps = unet(xt, t, encoder_hidden_states=context).sample
        per_sample = (eps - noise).pow(2).mean(dim=(1, 2, 3))
        # per-timestep weight of the eps loss = (weight on the x0 error) / SNR. min-SNR-5 (Hang et al. 2023)
        # caps the x0 weight at 5; "truncated" also floors it at 1 (Salimans & Ho 2022), so the noisy
        # timesteps, where the colours of shape and background are decided, are not drowned out
        x0_weight = snr[t].clamp(min=1, max=5) if weighting == "truncated-snr" else snr[t].clamp(max=5)
        loss = (per_sample * (x0_weight / snr[t])).mean()
        full = template == 0  # the probe's targets hold for full captions only
        if full.any():
            loss = loss + 0.1 * probe.loss(context[full], caption[full], targets[labels[index][full]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        if step % 25 == 0 or step == steps - 1:
            log.info("unet step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(), time.time() - start)
        if partial and step % 100 == 99:  # EMA snapshots, to look at (or ship) an unfinished run
            torch.save({"unet": ema.shadow[0], "text_encoder": ema.shadow[1], "step": step + 1}, partial)
        if evaluate and (step % eval_every == eval_every - 1 or step == steps - 1):
            shape_acc, background_acc = evaluate(*ema.shadow)
            log.info("unet step %d/%d EMA accuracy over the 90 captions: shape colour %.2f, background %.2f",
                     step + 1, steps, shape_acc, background_acc)
    unet.load_state_dict(ema.shadow[0])
    text_encoder.load_state_dict(ema.shadow[1])
    return unet.eval(), text_encoder.eval()


def _ema_evaluator(ids, stats):
    """evaluate(unet_state, text_encoder_state) -> latent_accuracy of a separate copy holding those weights."""
    text_encoder, unet, _ = make_models()

    def evaluate(unet_state, text_encoder_state):
        unet.load_state_dict(unet_state)
        text_encoder.load_state_dict(text_encoder_state)
        return latent_accuracy(unet, text_encoder, ids, stats)
    return evaluate


# --- stage 4: export -----------------------------------------------------------------------------------

def export(text_encoder, unet, vae, out):
    """Original CompVis layout, float tensors in fp16."""
    from safetensors.torch import save_file

    from converters.original_layout import to_original

    state_dict = to_original(SimpleNamespace(text_encoder=text_encoder, unet=unet, vae=vae))
    state_dict = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out), metadata={"modelspec.prediction_type": "epsilon", "modelspec.resolution": "64x64",
                                              "sdonnx.made_by": "converters/tools/train_demo.py"})
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="Stage results (resumable).")
    parser.add_argument("--out", type=Path, required=True, help="Single-file .safetensors to write.")
    parser.add_argument("--stage", choices=STAGES, action="append",
                        help="Run only this stage (repeatable; vae and unet are independent and may run at the "
                             "same time in two processes). Default: all, in order.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", type=int, default=24, help="Images per combination.")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="Peak learning rate of the UNet stage.")
    parser.add_argument("--weighting", choices=("truncated-snr", "min-snr"), default="truncated-snr",
                        help="Loss weighting over timesteps (see train_unet).")
    parser.add_argument("--probe-tokens", choices=("end", "words"), default="words",
                        help="Where the caption probe reads: the caption's own tokens (default: the UNet then "
                             "reads the words, so A1111 emphasis on a word works) or the end-of-text/padding "
                             "states (the UNet then reads those, and emphasis barely moves the picture).")
    parser.add_argument("--eval-every", type=int, default=250,
                        help="UNet steps between accuracy checks of the EMA weights (logged).")
    parser.add_argument("--from-partial", action="store_true", help="Export the last EMA snapshot of a running UNet stage.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    stages = args.stage or STAGES

    images, labels = make_dataset(args.variants, args.seed)
    latents = target_latents(images)
    text_encoder, unet, vae = make_models()
    vae_path = args.workdir / "vae.pt"
    unet_path = args.workdir / "unet_text.pt"
    if "vae" in stages and not vae_path.exists():
        vae = train_vae(vae, images, latents, args.vae_steps, 16, 1e-3, args.seed + 1)
        torch.save(vae.state_dict(), vae_path)
    if "unet" in stages and not unet_path.exists():
        ids = caption_ids(tokenizer())
        unet, text_encoder = train_unet(unet, text_encoder, latents, labels, ids, args.unet_steps, args.batch,
                                        args.lr, args.seed + 2, partial=args.workdir / "unet_text.partial.pt",
                                        evaluate=_ema_evaluator(ids, latent_stats(images)),
                                        eval_every=args.eval_every, weighting=args.weighting,
                                        probe_tokens=args.probe_tokens)
        torch.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict()}, unet_path)
    if "export" in stages:
        vae.load_state_dict(torch.load(vae_path))
        saved = torch.load(args.workdir / "unet_text.partial.pt" if args.from_partial else unet_path)
        unet.load_state_dict(saved["unet"])
        text_encoder.load_state_dict(saved["text_encoder"])
        export(text_encoder.eval(), unet.eval(), vae.eval(), args.out)


if __name__ == "__main__":
    main()
