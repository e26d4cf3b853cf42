"""Weight deltas of the LoRA family, in numpy, with A1111's semantics (extensions-builtin/Lora).

One module of a file holds the tensors for one model layer; its delta is

    LoRA / LoCon   up @ down                  (conv: flattened, or rebuilt through lora_mid's CP core)
    LoHa           (w1a @ w1b) * (w2a @ w2b)  (Tucker cores hada_t1/t2 when present)
    LoKr           kron(w1, w2)               (each side full or a low-rank pair; lokr_t2 core)
    full / norm    diff (+ diff_b on the bias)

scaled by alpha / dim (1 when either is absent), then DoRA's weight decomposition if `dora_scale` is
given, then by the te or unet multiplier of the prompt tag.
"""
import numpy as np

# the tensor kinds a module may carry; the file's key suffix (see lora.py) names them
LORA = ("down", "up", "mid")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL = ("diff", "diff_b", "w_norm", "b_norm")
EXTRA = ("alpha", "dora_scale")
KINDS = LORA + LOHA + LOKR + FULL + EXTRA


class ShapeMismatch(ValueError):
    """A module's delta does not have the layer's number of elements: a LoRA for another model."""


def network_type(params):
    """'lora', 'loha', 'lokr', 'full', or None when the tensors make no complete module."""
    if "down" in params and "up" in params:
        return "lora"
    if all(k in params for k in LOHA[:4]):
        return "loha"
    if ("lokr_w1" in params or {"lokr_w1_a", "lokr_w1_b"} <= set(params)) and \
            ("lokr_w2" in params or {"lokr_w2_a", "lokr_w2_b"} <= set(params)):
        return "lokr"
    if any(k in params for k in FULL):
        return "full"
    return None


def delta(params, weight):
    """(weight delta shaped like `weight` at multiplier 1, bias delta or None). weight: the layer's
    current float32 weight (DoRA normalises against it)."""
    kind = network_type(params)
    updown, ex_bias, dim = _BUILDERS[kind](params, weight.shape)
    if updown is None:
        return None, ex_bias
    if updown.size != weight.size:
        raise ShapeMismatch(f"delta of shape {list(updown.shape)} for a weight of shape {list(weight.shape)}")
    updown = updown.reshape(weight.shape) * np.float32(_scale(params, dim))
    if "dora_scale" in params:
        updown = _weight_decompose(updown, weight, params["dora_scale"])
    return updown, ex_bias


def _scale(params, dim):
    alpha = params.get("alpha")
    return float(alpha) / dim if alpha is not None and dim else 1.0


def _rebuild(up, down, shape):
    """up [out, r, ...] @ down [r, in, ...] -> [out, in, ...] (conv kernels ride along in down)."""
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


def _cp(core, wa, wb):
    """Tucker rebuild: core [r, r2, k, k] with wa [r, out] and wb [r2, in] -> [out, in, k, k]."""
    return np.einsum("ijkl,jr,ip->prkl", core, wb, wa)


def _lora(p, _weight_shape):
    up, down = p["up"], p["down"]
    shape = [up.shape[0], down.shape[1]]
    if "mid" in p:
        mid = p["mid"]
        up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        updown = np.einsum("nmkl,in,mj->ijkl", mid, up2, down2)
    else:
        updown = _rebuild(up, down, shape + list(down.shape[2:]))
    return updown, None, down.shape[0]


def _hada_side(p, a, b, t):
    wa, wb = p[a], p[b]
    if t in p:
        return _cp(p[t], wa, wb)
    return _rebuild(wa, wb, [wa.shape[0], wb.shape[1], *wb.shape[2:]])


def _loha(p, _weight_shape):
    w1 = _hada_side(p, "hada_w1_a", "hada_w1_b", "hada_t1")
    w2 = _hada_side(p, "hada_w2_a", "hada_w2_b", "hada_t2")
    return w1 * w2, None, p["hada_w1_b"].shape[0]


def _lokr(p, weight_shape):
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = _cp(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    dim = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else None
    return np.kron(w1, w2), None, dim


def _full(p, _weight_shape):
    return p.get("diff", p.get("w_norm")), p.get("diff_b", p.get("b_norm")), None


_BUILDERS = {"lora": _lora, "loha": _loha, "lokr": _lokr, "full": _full}


def _weight_decompose(updown, weight, dora_scale):
    """DoRA as A1111 applies it: rescale W + dW to the learned norms, return the resulting delta.

    dora_scale [1, in, ...] holds norms over the output axis (LyCORIS' default); [out, 1, ...] norms over
    the inputs (wd_on_output)."""
    merged = weight + updown
    scale = dora_scale.reshape(_broadcast_shape(dora_scale, weight.shape))
    keep = 1 if scale.shape[0] == 1 and weight.shape[0] != 1 else 0
    axes = tuple(i for i in range(weight.ndim) if i != keep)
    norm = np.sqrt(np.sum(merged.astype(np.float64) ** 2, axis=axes, keepdims=True)).astype(np.float32)
    return merged * (scale / norm) - weight


def _broadcast_shape(dora_scale, weight_shape):
    shape = list(dora_scale.shape) + [1] * (len(weight_shape) - dora_scale.ndim)
    return shape[: len(weight_shape)]
