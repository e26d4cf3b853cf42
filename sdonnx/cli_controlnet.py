"""ControlNet units on the command line: `--controlnet MODEL` starts a unit; the `--control-*` flags after it set
that unit's fields; `--control-*` flags before the first `--controlnet` apply to every unit (its defaults):

    sdonnx generate -m sd15 "a house" --controlnet control_v11p_sd15_canny --control-image edges.png \\
        --control-module canny --control-weight 0.8 \\
        --controlnet control_v11f1p_sd15_depth --control-image depth.png --control-end 0.6

Without any `--controlnet`, `--control-*` flags fill the units an infotext brought (--from-image / --from-infotext:
the text holds each unit's settings but not its image), in order.
"""
import click

# flag -> (unit field, click options)
UNIT_FLAGS = {
    "--control-image": ("image", dict(type=click.Path(), help="The unit's control image.")),
    "--control-mask": ("mask", dict(type=click.Path(), help="The unit's mask (inpaint modules: white = repaint).")),
    "--control-module": ("module", dict(help="Preprocessor: none, canny, invert, scribble_xdog, threshold, "
                                             "blur_gaussian, shuffle, tile_resample, inpaint_only, ... [none].")),
    "--control-weight": ("weight", dict(type=float, help="Control weight, 0 to 2 [1].")),
    "--control-start": ("guidance_start", dict(type=float, help="Starting control step, a fraction of the steps [0].")),
    "--control-end": ("guidance_end", dict(type=float, help="Ending control step, a fraction of the steps [1].")),
    "--control-mode": ("control_mode", dict(help="Balanced, \"My prompt is more important\" or \"ControlNet is more "
                                                 "important\" (or 0, 1, 2) [Balanced].")),
    "--control-resize-mode": ("resize_mode", dict(help="Just Resize, Crop and Resize or Resize and Fill (or 0, 1, 2) "
                                                       "[Crop and Resize].")),
    "--control-processor-res": ("processor_res", dict(type=int, help="Preprocessor resolution [the module's].")),
    "--control-threshold-a": ("threshold_a", dict(type=float, help="Preprocessor threshold A [the module's].")),
    "--control-threshold-b": ("threshold_b", dict(type=float, help="Preprocessor threshold B [the module's].")),
    "--control-pixel-perfect": ("pixel_perfect", dict(is_flag=True, flag_value=True,
                                                      help="Preprocessor resolution from the image size.")),
    "--control-hr-option": ("hr_option", dict(help="With hires fix: Both, Low res only or High res only [Both].")),
}
RAW_ARGS = "sdonnx.raw_args"
_NUMERIC = {"control_mode": ("Balanced", "My prompt is more important", "ControlNet is more important"),
            "resize_mode": ("Just Resize", "Crop and Resize", "Resize and Fill")}


class UnitOrderCommand(click.Command):
    """A command that keeps its raw arguments (ctx.meta), so unit flags can be grouped by position."""

    def parse_args(self, ctx, args):
        ctx.meta[RAW_ARGS] = list(args)
        return super().parse_args(ctx, args)


def controlnet_options(command):
    """Add --controlnet and the --control-* flags to a click command."""
    for flag, (field, options) in reversed(UNIT_FLAGS.items()):
        command = click.option(flag, "control_" + field if not field.startswith("control") else field,
                               multiple=True, default=(), **{k: v for k, v in options.items() if k != "help"},
                               help=options["help"] + " Repeatable: see --controlnet.")(command)
    return click.option("--controlnet", "controlnet", multiple=True, default=(), metavar="MODEL",
                        help="Add a ControlNet unit with this model (a converted ControlNet's name in "
                             "--controlnet-dir, or its folder); the --control-* flags after it set that unit, "
                             "those before the first --controlnet every unit.")(command)


def _option_names():
    return {flag: ("control_" + field if not field.startswith("control") else field) for flag, (field, _) in
            UNIT_FLAGS.items()}


def take_units(fields, raw_args, inherited=()):
    """Pop the unit flags from a command's parsed `fields` -> the units, or None when no flag was given.

    raw_args: the command's arguments as typed, which give the flags' order; inherited: the units an infotext
    brought, which --control-* flags fill when no --controlnet is given."""
    from .controlnet.unit import ControlNetUnit

    given = {name: fields.pop(name, ()) for name in ["controlnet", *_option_names().values()]}
    if not any(given.values()):
        return None
    common, units = _group(raw_args, given)
    if not units:  # flags only: they fill the units the infotext brought
        if not inherited:
            raise ValueError("--control-* flags need a unit: give --controlnet MODEL (or --from-image with units)")
        units = [{} for _ in inherited]
        for flag, values in common.items():
            for unit, value in zip(units, values if len(values) == len(units) else values[:1] * len(units)):
                unit[flag] = value
        return tuple(_unit(base, u) for base, u in zip(inherited, units))
    flat = {flag: values[-1] for flag, values in common.items()}
    return tuple(_unit(ControlNetUnit(model=model), {**flat, **own}) for model, own in units)


def _group(raw_args, given):
    """({flag: [values before the first --controlnet]}, [(model, {flag: value})]) from the raw arguments; the
    values are click's (converted), matched to the raw flags by their order."""
    names = _option_names()
    queues = {name: list(values) for name, values in given.items()}
    common, units = {}, []
    tokens = iter(raw_args)
    for token in tokens:
        flag, _, inline = token.partition("=")
        if flag == "--controlnet":
            units.append((queues["controlnet"].pop(0), {}))
            if not inline:
                next(tokens, None)
        elif flag in names:
            name = names[flag]
            if not inline and flag != "--control-pixel-perfect":
                next(tokens, None)
            value = queues[name].pop(0)
            if units:
                units[-1][1][name] = value
            else:
                common.setdefault(name, []).append(value)
    return common, units


def _unit(base, flags):
    """base (a ControlNetUnit) with the flags' values."""
    import dataclasses

    values = {}
    for name, value in flags.items():
        field = name.removeprefix("control_") if name not in ("control_mode",) else name
        if name == "control_pixel_perfect":
            value = True
        elif field in _NUMERIC and str(value).isdigit():
            value = int(value)
        values[field] = value
    return dataclasses.replace(base, **values)


def unit_args(units):
    """The command-line flags that give these units (ControlNetUnit) again; the inverse of take_units."""
    from .controlnet.unit import ControlNetUnit

    default = ControlNetUnit()
    args = []
    for unit in units:
        args += ["--controlnet", str(unit.model)]
        for flag, (field, _) in UNIT_FLAGS.items():
            value = getattr(unit, field)
            if value == getattr(default, field) or value is None:
                continue
            args += [flag] if field == "pixel_perfect" else [flag, str(value)]
    return args


def info(folder):
    """`sdonnx info` of a converted ControlNet folder."""
    from .cli import _fail, _user_errors
    from .controlnet.model import load_controlnet_manifest

    try:
        m = load_controlnet_manifest(folder)
    except _user_errors() as e:
        _fail(e)
    click.echo(f"ControlNet:      {m.title}")
    click.echo(f"family:          {m.family} (context {m.context_dim} wide, {m.latent_channels} latent channels)")
    click.echo(f"residuals:       {m.residuals} ({m.residuals - 1} skip connections + the middle block)")
    click.echo(f"control image:   {m.conditioning_channels} channels"
               f"{', globally pooled (shuffle)' if m.global_average_pooling else ''}")
    click.echo(f"graph:           {m.graph.path} parity max abs err {m.graph.parity_max_abs_err:.3g}")
    click.echo(f"converted with:  {', '.join(f'{k} {v}' for k, v in m.converter.items() if v)}")
