"""CodeFormer (Zhou et al. 2022, "Towards Robust Blind Face Restoration with Codebook Lookup Transformer").

A VQGAN encoder, a transformer predicting codebook indices, the codebook lookup and the VQGAN generator,
with encoder features fused back into the generator (controllable feature transform) weighted by the
fidelity `w`: 0 trusts the codebook (quality), 1 the input (fidelity). Written from the paper and the
released layout; names match codeformer-v0.1.0.pth's `params_ema`. Sizes are parameters so that tests can
build small instances of the same layout; the released model is `CodeFormer()`.

Export differences from the training code, none changing the numbers: the index lookup is a Gather
instead of a one-hot matrix product (the product of a one-hot row with the codebook is the row itself),
and the fusion is always computed and scaled by `w` (A1111 skips it for w == 0, where w * residual is 0).
"""
import torch
from torch import nn
from torch.nn import functional as F


def _norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


def _swish(x):
    return x * torch.sigmoid(x)


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.conv_out = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(_swish(self.norm2(self.conv1(_swish(self.norm1(x))))))
        return h + (self.conv_out(x) if hasattr(self, "conv_out") else x)


class AttnBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)
        k, v = self.k(h).reshape(b, c, hh * ww), self.v(h).reshape(b, c, hh * ww)
        attn = F.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
        return x + self.proj_out(torch.bmm(v, attn.permute(0, 2, 1)).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def encoder_blocks(nf, ch_mult, img_size, emb_dim, attn_res=16, res_blocks=2):
    """The VQGAN encoder's blocks and, per resolution, the index of its last residual block (where
    CodeFormer reads the features it fuses back)."""
    blocks, taps, res = [nn.Conv2d(3, nf, 3, 1, 1)], {}, img_size
    cin = nf
    for i, mult in enumerate(ch_mult):
        for _ in range(res_blocks):
            blocks.append(ResBlock(cin, nf * mult))
            cin = nf * mult
            taps[res] = len(blocks) - 1
            if res == attn_res:
                blocks.append(AttnBlock(cin))
        if i != len(ch_mult) - 1:
            blocks.append(Downsample(cin))
            res //= 2
    blocks += [ResBlock(cin, cin), AttnBlock(cin), ResBlock(cin, cin), _norm(cin), nn.Conv2d(cin, emb_dim, 3, 1, 1)]
    return blocks, taps


def generator_blocks(nf, ch_mult, img_size, emb_dim, attn_res=16, res_blocks=2):
    """The VQGAN generator's blocks and, per resolution, the index of the block after which the encoder's
    features are fused: the last residual block at the smallest resolution, the first one above it."""
    cin, res = nf * ch_mult[-1], img_size // 2 ** (len(ch_mult) - 1)
    blocks = [nn.Conv2d(emb_dim, cin, 3, 1, 1), ResBlock(cin, cin), AttnBlock(cin), ResBlock(cin, cin)]
    taps = {}
    for i in reversed(range(len(ch_mult))):
        for j in range(res_blocks):
            blocks.append(ResBlock(cin, nf * ch_mult[i]))
            cin = nf * ch_mult[i]
            if j == 0 or res == attn_res:
                taps[res] = len(blocks) - 1
            if res == attn_res:
                blocks.append(AttnBlock(cin))
        if i != 0:
            blocks.append(Upsample(cin))
            res *= 2
    blocks += [_norm(cin), nn.Conv2d(cin, 3, 3, 1, 1)]
    return blocks, taps


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size, emb_dim):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, emb_dim)


class BlockList(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class TransformerSALayer(nn.Module):
    """Pre-norm self-attention and GELU MLP; the positions are added to queries and keys only."""

    def __init__(self, dim, heads, dim_mlp):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=0.0)
        self.linear1, self.linear2 = nn.Linear(dim, dim_mlp), nn.Linear(dim_mlp, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, pos):
        h = self.norm1(x)
        x = x + self.self_attn(h + pos, h + pos, value=h, need_weights=False)[0]
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class FuseSFT(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.encode_enc = ResBlock(2 * channels, channels)
        self.scale = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2),
                                   nn.Conv2d(channels, channels, 3, padding=1))
        self.shift = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2),
                                   nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, enc, dec, w):
        enc = self.encode_enc(torch.cat([enc, dec], dim=1))
        return dec + w * (dec * self.scale(enc) + self.shift(enc))


def _adain(content, style, eps=1e-5):
    """Give `content` the per-channel mean and (unbiased) std of `style`."""
    def stats(x):
        flat = x.flatten(2)
        return flat.mean(2)[..., None, None], (flat.var(2) + eps).sqrt()[..., None, None]
    c_mean, c_std = stats(content)
    s_mean, s_std = stats(style)
    return (content - c_mean) / c_std * s_std + s_mean


class CodeFormer(nn.Module):
    """(image [B, 3, S, S] RGB in [-1, 1], w [1]) -> restored image (not clamped)."""

    def __init__(self, img_size=512, nf=64, ch_mult=(1, 2, 2, 4, 4, 8), emb_dim=256, codebook_size=1024,
                 dim_embd=512, n_head=8, n_layers=9, connect_list=(32, 64, 128, 256)):
        super().__init__()
        self.img_size, self.latent_side = img_size, img_size // 2 ** (len(ch_mult) - 1)
        enc, self.enc_taps = encoder_blocks(nf, ch_mult, img_size, emb_dim, attn_res=self.latent_side)
        gen, self.gen_taps = generator_blocks(nf, ch_mult, img_size, emb_dim, attn_res=self.latent_side)
        self.encoder, self.generator = BlockList(enc), BlockList(gen)
        self.quantize = VectorQuantizer(codebook_size, emb_dim)
        self.position_emb = nn.Parameter(torch.zeros(self.latent_side ** 2, dim_embd))
        self.feat_emb = nn.Linear(emb_dim, dim_embd)
        self.ft_layers = nn.Sequential(*(TransformerSALayer(dim_embd, n_head, dim_embd * 2) for _ in range(n_layers)))
        self.idx_pred_layer = nn.Sequential(nn.LayerNorm(dim_embd), nn.Linear(dim_embd, codebook_size, bias=False))
        self.connect = [int(r) for r in connect_list]
        width = {img_size // 2 ** i: nf * m for i, m in enumerate(ch_mult)}
        self.fuse_convs_dict = nn.ModuleDict({str(r): FuseSFT(width[r]) for r in self.connect})

    def forward(self, x, w):
        enc_taps = {self.enc_taps[r]: r for r in self.connect}
        features = {}
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i in enc_taps:
                features[enc_taps[i]] = x
        lq = x
        b, c = lq.shape[:2]
        query = self.feat_emb(lq.flatten(2).permute(2, 0, 1))  # [HW, B, D]
        pos = self.position_emb.unsqueeze(1).repeat(1, b, 1)
        for layer in self.ft_layers:
            query = layer(query, pos)
        logits = self.idx_pred_layer(query).permute(1, 0, 2)  # [B, HW, codebook]
        index = torch.argmax(F.softmax(logits, dim=2), dim=2)
        side = self.latent_side
        quant = F.embedding(index, self.quantize.embedding.weight).view(b, side, side, c).permute(0, 3, 1, 2)
        x = _adain(quant, lq)
        gen_taps = {self.gen_taps[r]: r for r in self.connect}
        for i, block in enumerate(self.generator.blocks):
            x = block(x)
            if i in gen_taps:
                r = gen_taps[i]
                x = self.fuse_convs_dict[str(r)](features[r], x, w)
        return x

    @classmethod
    def from_state_dict(cls, state, n_head=8):
        """The module the weights describe, loaded strictly. The head count is not in the weights: 8, as
        in every released CodeFormer."""
        tokens, dim = state["position_emb"].shape
        nf = state["encoder.blocks.0.weight"].shape[0]
        emb_dim = state["quantize.embedding.weight"].shape[1]
        mults = _encoder_mults(state, nf)
        side = int(round(tokens ** 0.5))
        img_size = side * 2 ** (len(mults) - 1)
        layers = len({k.split(".")[1] for k in state if k.startswith("ft_layers.")})
        connect = sorted(int(k.split(".")[1]) for k in state if k.startswith("fuse_convs_dict.")
                         and k.endswith("scale.0.weight"))
        model = cls(img_size, nf, mults, emb_dim, state["idx_pred_layer.1.weight"].shape[0], dim, n_head,
                    layers, connect)
        model.load_state_dict(state, strict=True)
        return model.eval()


def _encoder_mults(state, nf, res_blocks=2):
    """Channel multipliers per level, read from the encoder's residual blocks: levels are separated by
    the downsampling convolutions (blocks with a lone "conv"), and the last level is followed by the
    non-local blocks of the same width."""
    levels, level, i = [], [], 1
    while any(k.startswith(f"encoder.blocks.{i}.") for k in state):
        if f"encoder.blocks.{i}.conv.weight" in state:
            levels.append(level)
            level = []
        elif f"encoder.blocks.{i}.conv1.weight" in state:
            level.append(state[f"encoder.blocks.{i}.conv1.weight"].shape[0])
        i += 1
    levels.append(level[:res_blocks])
    return tuple(lv[-1] // nf for lv in levels)
