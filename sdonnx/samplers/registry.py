"""Sampler names as A1111 spells them: registry, per-sampler defaults and name resolution."""

import dataclasses
import re
from types import MappingProxyType

import numpy as np

from sdonnx.samplers import dpm_solver, dpmpp, extra, karras
from sdonnx.schedules import DEFAULT_RHO, SCHEDULER_NAMES, SCHEDULES


@dataclasses.dataclass(frozen=True)
class SamplerInfo:
    """What A1111 knows about a sampler besides its function."""

    fn: object
    aliases: tuple = ()
    schedule: str = "Uniform"  # what "Automatic" resolves to
    discard_penultimate_sigma: bool = False
    options: MappingProxyType = dataclasses.field(default_factory=lambda: MappingProxyType({}))  # A1111 defaults
    cfg_multiplier: float = 1.0  # A1111 scales the CFG scale for this sampler (DDIM CFG++: 1 / 12.5)
    # A1111's "second_order": its prompt schedules (editing, alternation) and refiner switch count two
    # model calls per step
    second_order: bool = False

    def total_steps(self, steps):
        """The steps A1111 schedules prompts over: the model calls, counted as 2 per step for second-order
        samplers (A1111's SamplerData.total_steps; the last step may make one call only)."""
        return steps * 2 if self.second_order else steps


_CHURN = MappingProxyType({"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0})
_ANCESTRAL = MappingProxyType({"eta": 1.0, "s_noise": 1.0})

# A1111's "Sampling method" list, in its UI order (modules/sd_samplers_kdiffusion.py & friends).
SAMPLER_INFO = {
    "DPM++ 2M": SamplerInfo(dpmpp.sample_dpmpp_2m, ("k_dpmpp_2m",), "Karras"),
    "DPM++ SDE": SamplerInfo(dpmpp.sample_dpmpp_sde, ("k_dpmpp_sde",), "Karras", options=_ANCESTRAL, second_order=True),
    "DPM++ 2M SDE": SamplerInfo(dpmpp.sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde",), "Exponential", options=_ANCESTRAL),
    "DPM++ 2M SDE Heun": SamplerInfo(dpmpp.sample_dpmpp_2m_sde_heun, ("k_dpmpp_2m_sde_heun",), "Exponential",
                                     options=_ANCESTRAL),
    "DPM++ 2S a": SamplerInfo(dpmpp.sample_dpmpp_2s_ancestral, ("k_dpmpp_2s_a",), "Karras", options=_ANCESTRAL,
                              second_order=True),
    "DPM++ 3M SDE": SamplerInfo(dpmpp.sample_dpmpp_3m_sde, ("k_dpmpp_3m_sde",), "Exponential", True, _ANCESTRAL),
    "Euler a": SamplerInfo(karras.sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral"), options=_ANCESTRAL),
    "Euler": SamplerInfo(karras.sample_euler, ("k_euler",), options=_CHURN),
    "LMS": SamplerInfo(karras.sample_lms, ("k_lms",), options=MappingProxyType({"order": 4})),
    "Heun": SamplerInfo(karras.sample_heun, ("k_heun",), options=_CHURN, second_order=True),
    "DPM2": SamplerInfo(karras.sample_dpm_2, ("k_dpm_2",), "Karras", True, _CHURN, second_order=True),
    "DPM2 a": SamplerInfo(karras.sample_dpm_2_ancestral, ("k_dpm_2_a",), "Karras", True, _ANCESTRAL, second_order=True),
    "DPM fast": SamplerInfo(dpm_solver.sample_dpm_fast, ("k_dpm_fast",), options=_ANCESTRAL),
    "DPM adaptive": SamplerInfo(dpm_solver.sample_dpm_adaptive, ("k_dpm_ad",), options=_ANCESTRAL),
    "Restart": SamplerInfo(extra.sample_restart, ("restart",), "Karras", options=MappingProxyType({"s_noise": 1.0}),
                           second_order=True),
    "DDIM": SamplerInfo(karras.sample_ddim, ("ddim",), "DDIM", options=MappingProxyType({"eta": 0.0})),
    "DDIM CFG++": SamplerInfo(karras.sample_ddim_cfgpp, ("ddim_cfgpp",), "DDIM", options=MappingProxyType({"eta": 0.0}),
                              cfg_multiplier=1 / 12.5),
    "PLMS": SamplerInfo(extra.sample_plms, ("plms",), "DDIM"),
    "UniPC": SamplerInfo(extra.sample_unipc, ("unipc",),
                         options=MappingProxyType({"order": 3, "variant": "bh1", "lower_order_final": True})),
    "LCM": SamplerInfo(extra.sample_lcm, ("k_lcm", "lcm")),
}

SAMPLERS = {name: info.fn for name, info in SAMPLER_INFO.items()}
SAMPLER_NAMES = list(SAMPLER_INFO)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A sampler/schedule choice in A1111 display names, with the options to call the sampler with."""

    sampler: str
    schedule: str
    options: dict = dataclasses.field(default_factory=dict)
    discard_penultimate_sigma: bool = False


def _key(name):
    return re.sub(r"\s+", " ", name.strip()).casefold()


def _lookup_tables():
    samplers, schedules = {}, {}
    for name, info in SAMPLER_INFO.items():
        for alias in (name, *info.aliases):
            samplers[_key(alias)] = name
    for name in SCHEDULER_NAMES:
        schedules[_key(name)] = name
        schedules[_key(name.replace(" ", "_"))] = name  # A1111 internal ids: sgm_uniform, kl_optimal...
    schedules[_key("SGMUniform")] = "SGM Uniform"
    return samplers, schedules


def _split_legacy(name, samplers, schedules):
    """'DPM++ 2M Karras' -> ('DPM++ 2M', 'Karras'); None when no sampler+schedule split fits."""
    key = _key(name)
    for schedule_key, schedule in schedules.items():
        suffix = " " + schedule_key
        if key.endswith(suffix) and key[: -len(suffix)] in samplers:
            return samplers[key[: -len(suffix)]], schedule
    return None


def split_legacy_name(name):
    """A1111's infotext reading: 'DPM++ 2M Karras' -> ('DPM++ 2M', 'Karras'); None for a plain sampler
    name or an unknown one."""
    samplers, schedules = _lookup_tables()
    if _key(name) in samplers:
        return None
    return _split_legacy(name, samplers, schedules)


def _unknown(kind, name, choices):
    return ValueError(f"unknown {kind} {name!r}; valid choices: {', '.join(choices)}")


def resolve(sampler, scheduler="Automatic"):
    """A1111 display name, legacy combined name ("DPM++ 2M Karras") or API alias -> Resolved."""
    samplers, schedules = _lookup_tables()
    schedule = "Automatic"
    name = samplers.get(_key(sampler))
    if name is None:
        split = _split_legacy(sampler, samplers, schedules)
        if split is None:
            raise _unknown("sampler", sampler, SAMPLER_NAMES)
        name, schedule = split
    requested = schedules.get(_key(scheduler or "Automatic"))
    if requested is None:
        raise _unknown("schedule type", scheduler, SCHEDULER_NAMES)
    if requested != "Automatic":
        schedule = requested
    info = SAMPLER_INFO[name]
    if schedule == "Automatic":
        schedule = info.schedule
    return Resolved(name, schedule, dict(info.options), info.discard_penultimate_sigma)


def build_sigmas(resolved, steps, model_sigmas, *, sigma_min=None, sigma_max=None, rho=None, sdxl=False,
                 **options):
    """The sigmas a sampler runs on for `steps` steps: [steps + 1], ending in 0 (A1111 `get_sigmas`).

    sigma_min/sigma_max default to the ends of the model's table; rho applies to Karras and
    Polyexponential only; sdxl (the manifest's `is_sdxl`) picks Align Your Steps' SDXL table. Samplers that discard the penultimate sigma get one extra sigma built and
    the next-to-last removed, so the step count stays `steps`.
    """
    model_sigmas = np.asarray(model_sigmas, dtype=np.float64)
    sigma_min = float(model_sigmas[0]) if sigma_min is None else float(sigma_min)
    sigma_max = float(model_sigmas[-1]) if sigma_max is None else float(sigma_max)
    if rho is not None:
        if resolved.schedule not in DEFAULT_RHO:
            raise ValueError(f"rho applies to {', '.join(DEFAULT_RHO)} schedules, not {resolved.schedule!r}")
        options["rho"] = rho
    if resolved.schedule == "Align Your Steps":
        options["sdxl"] = sdxl
    n = steps + 1 if resolved.discard_penultimate_sigma else steps
    sigmas = SCHEDULES[resolved.schedule](n, sigma_min, sigma_max, model_sigmas=model_sigmas, **options)
    if resolved.discard_penultimate_sigma:
        sigmas = np.append(sigmas[:-2], sigmas[-1])
    return sigmas
