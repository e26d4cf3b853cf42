"""Which model layer a LoRA key names: kohya (diffusers or original-LDM module names, `.` as `_`) and
diffusers/PEFT (dotted, `unet.` / `text_encoder.` prefixed) spellings, resolved against the manifest's
weight map (canonical diffusers names such as `unet.down_blocks.0.resnets.0.conv1.weight`).
"""
import re

# manifest component -> (kohya prefix, diffusers/PEFT prefix). SDXL's first encoder is `lora_te1_`.
PREFIXES = {"text_encoder": ("lora_te_", "text_encoder."), "text_encoder_2": ("lora_te2_", "text_encoder_2."),
            "unet": ("lora_unet_", "unet.")}
SDXL_ONLY_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")

_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_TOP_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def modules(weight_names, namespace):
    """Canonical weight names of one component -> {module name without namespace: {"weight", "bias"}}."""
    out = {}
    for name in weight_names:
        if not name.startswith(namespace + "."):
            continue
        module, _, param = name[len(namespace) + 1:].rpartition(".")
        out.setdefault(module, set()).add(param)
    return out


def ldm_unet_names(unet_modules):
    """diffusers UNet module -> its original LDM (CompVis) name, for SD 1.x/2.x-shaped UNets of any depth.

    Layout of the original: input_blocks are [conv_in, (resnet, attn) x L, downsample] per level;
    output_blocks [(resnet, attn) x (L + 1)] per level with the upsampler in the level's last block.
    """
    per_level = 1 + max((int(m.split(".")[3]) for m in unet_modules if m.startswith("down_blocks.0.resnets.")),
                        default=-1)
    if per_level == 0:
        return {}
    has_attention = {tuple(m.split(".")[:2]) for m in unet_modules if ".attentions." in m}
    step = per_level + 1
    out = {}
    for module in unet_modules:
        name = _ldm_name(module, step, has_attention)
        if name:
            out[module] = name
    return out


def _ldm_name(module, step, has_attention):
    for new, old in _TOP_LDM.items():
        if module == new or module.startswith(new + "."):
            return old + module[len(new):]
    parts = module.split(".")
    if parts[0] == "mid_block" and len(parts) > 3:
        index = 1 if parts[1] == "attentions" else 2 * int(parts[2])
        return _join(f"middle_block.{index}", parts[1], parts[3:])
    if parts[0] not in ("down_blocks", "up_blocks") or len(parts) < 5:
        return None
    level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return _join(f"input_blocks.{step * (level + 1)}.0", "op", rest[1:]) if rest[0] == "conv" else None
        return _join(f"input_blocks.{step * level + j + 1}.{0 if kind == 'resnets' else 1}", kind, rest)
    if kind == "upsamplers":
        slot = 2 if (parts[0], parts[1]) in has_attention else 1
        return _join(f"output_blocks.{step * level + step - 1}.{slot}", None, rest)
    return _join(f"output_blocks.{step * level + j}.{0 if kind == 'resnets' else 1}", kind, rest)


def _join(prefix, kind, rest):
    rest = list(rest)
    if kind == "resnets" and rest:
        rest[0] = _RESNET_LDM.get(rest[0], rest[0])
    elif kind == "op":
        rest = ["op", *rest]
    return ".".join([prefix, *rest])


class Resolver:
    """LoRA module key -> (component, module) of the model, or None.

    Keys are the LoRA file's module part: `lora_unet_down_blocks_0_..._to_q`, `lora_unet_input_blocks_1_1_...`,
    `unet.down_blocks.0....to_q`, `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`, old diffusers
    attention-processor names (`...attn1.processor.to_q_lora`).
    """

    def __init__(self, component_modules):
        """component_modules: {manifest component: {module name: params}}."""
        self.components = dict(component_modules)
        self._underscored = {}
        self._dotted = {}
        two_encoders = "text_encoder_2" in self.components
        for component, mods in self.components.items():
            kohya, dotted = PREFIXES[component]
            # SDXL kohya files name the first encoder lora_te1_
            kohyas = [kohya, "lora_te1_"] if component == "text_encoder" and two_encoders else [kohya]
            aliases = {m: [m] for m in mods}
            if component == "unet":
                for module, ldm in ldm_unet_names(mods).items():
                    aliases[module].append(ldm)
            for module, names in aliases.items():
                for name in names:
                    for prefix in kohyas:
                        self._underscored[prefix + name.replace(".", "_")] = (component, module)
                self._dotted[dotted + module] = (component, module)
                if component.startswith("text_encoder") and module.startswith("text_model."):
                    self._dotted[dotted + module[len("text_model."):]] = (component, module)

    def resolve(self, key):
        if key.startswith("lora_"):
            return self._underscored.get(key)
        return self._dotted.get(_modern_diffusers(key))


_PROCESSOR = re.compile(r"\.processor\.(to_[qkv]|to_out)_lora$")


def _modern_diffusers(key):
    """Old diffusers attention-processor LoRA names -> module names (`attn1.processor.to_out_lora` ->
    `attn1.to_out.0`); PEFT's `base_model.model.` wrapper prefix dropped."""
    key = key.removeprefix("base_model.model.")
    match = _PROCESSOR.search(key)
    if match:
        layer = match.group(1)
        key = key[: match.start()] + "." + (layer + ".0" if layer == "to_out" else layer)
    return key
