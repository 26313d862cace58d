"""Sampler and schedule names as A1111 spells them, and how to turn a name into sigmas and a sampler call.

    spec, schedule_key = resolve_sampler("DPM++ 2M Karras")           # -> DPM++ 2M, "karras"
    sigmas = sigmas_for(spec, schedule_key, steps=20, schedule=DiscreteSchedule.sd())
    x = sample(denoiser, noise * sigmas[0], sigmas, sampler=spec, generator=g)

Names are matched as A1111 does: the label ("Euler a"), its legacy aliases ("k_euler_a"), a trailing schedule
label ("DPM++ 2M Karras" = DPM++ 2M with the Karras schedule), case- and space-insensitively.

"Automatic" picks the sampler's own default schedule, the one A1111 1.10 uses: Karras for DPM++ 2M / SDE /
2S a, DPM2 and DPM2 a; Exponential for DPM++ 2M SDE (Heun) and 3M SDE; the model's own evenly spaced
timesteps ("Uniform") for Euler, Euler a, LMS, Heun. A1111 runs DDIM / PLMS / UniPC on CompVis timestep code;
kuas runs them in sigma space on the equivalent timesteps ("DDIM" for DDIM and PLMS, "SGM Uniform" for UniPC),
and, like every kuas sampler, ends at sigma 0 where A1111's ends at the smallest training sigma (0.029).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from kuas.errors import InvalidInputError
from kuas.sampling import samplers as S
from kuas.sampling import schedules as K
from kuas.sampling.denoisers import Denoiser

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "SamplerSpec",
    "ScheduleSpec",
    "resolve_sampler",
    "resolve_schedule",
    "sample",
    "sampler_names",
    "schedule_labels",
    "sigmas_for",
]


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its A1111 label, function, aliases, default schedule and properties pipelines need.

    ``default_schedule`` is a schedule key used when the schedule is "Automatic". ``second_order`` means two
    model evaluations per step (A1111 halves the steps it reports). ``stochastic`` samplers consume noise;
    ``brownian_noise`` ones want a `BrownianNoiseSampler` (per-image seeds make them batch-independent).
    ``discard_next_to_last_sigma`` asks for one step more and drops the penultimate sigma.
    ``lcm`` samplers expect an `LCMDenoiser`. ``options`` are keyword arguments passed to ``function``.
    """

    name: str
    function: Callable[..., Tensor]
    aliases: tuple[str, ...] = ()
    default_schedule: str = "uniform"
    second_order: bool = False
    stochastic: bool = False
    brownian_noise: bool = False
    discard_next_to_last_sigma: bool = False
    lcm: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule type: A1111 key ("karras") and label ("Karras"), aliases, and how to build its sigmas."""

    key: str
    label: str
    aliases: tuple[str, ...] = ()
    rho: float | None = None


_SAMPLER_LIST = (
    SamplerSpec("DPM++ 2M", S.sample_dpmpp_2m, ("k_dpmpp_2m",), "karras"),
    SamplerSpec(
        "DPM++ SDE",
        S.sample_dpmpp_sde,
        ("k_dpmpp_sde",),
        "karras",
        second_order=True,
        stochastic=True,
        brownian_noise=True,
    ),
    SamplerSpec(
        "DPM++ 2M SDE",
        S.sample_dpmpp_2m_sde,
        ("k_dpmpp_2m_sde",),
        "exponential",
        stochastic=True,
        brownian_noise=True,
    ),
    SamplerSpec(
        "DPM++ 2M SDE Heun",
        S.sample_dpmpp_2m_sde,
        ("k_dpmpp_2m_sde_heun",),
        "exponential",
        stochastic=True,
        brownian_noise=True,
        options=MappingProxyType({"solver_type": "heun"}),
    ),
    SamplerSpec(
        "DPM++ 2S a",
        S.sample_dpmpp_2s_ancestral,
        ("k_dpmpp_2s_a",),
        "karras",
        second_order=True,
        stochastic=True,
    ),
    SamplerSpec(
        "DPM++ 3M SDE",
        S.sample_dpmpp_3m_sde,
        ("k_dpmpp_3m_sde",),
        "exponential",
        stochastic=True,
        brownian_noise=True,
        discard_next_to_last_sigma=True,
    ),
    SamplerSpec("Euler a", S.sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral"), stochastic=True),
    SamplerSpec("Euler", S.sample_euler, ("k_euler",)),
    SamplerSpec("LMS", S.sample_lms, ("k_lms",)),
    SamplerSpec("Heun", S.sample_heun, ("k_heun",), second_order=True),
    SamplerSpec(
        "DPM2", S.sample_dpm_2, ("k_dpm_2",), "karras", second_order=True, discard_next_to_last_sigma=True
    ),
    SamplerSpec(
        "DPM2 a",
        S.sample_dpm_2_ancestral,
        ("k_dpm_2_a",),
        "karras",
        second_order=True,
        stochastic=True,
        discard_next_to_last_sigma=True,
    ),
    SamplerSpec("DDIM", S.sample_ddim, ("ddim",), "ddim"),
    SamplerSpec("PLMS", S.sample_plms, ("plms",), "ddim"),
    SamplerSpec(
        "UniPC",
        S.sample_unipc,
        ("unipc",),
        "sgm_uniform",
        options=MappingProxyType({"variant": "bh1", "order": 3, "lower_order_final": True}),
    ),
    SamplerSpec("LCM", S.sample_lcm, ("k_lcm", "lcm"), "lcm", stochastic=True, lcm=True),
)

_SCHEDULE_LIST = (
    ScheduleSpec("automatic", "Automatic"),
    ScheduleSpec("uniform", "Uniform"),
    ScheduleSpec("karras", "Karras", rho=7.0),
    ScheduleSpec("exponential", "Exponential"),
    ScheduleSpec("polyexponential", "Polyexponential", rho=1.0),
    ScheduleSpec("sgm_uniform", "SGM Uniform", ("SGMUniform",)),
    ScheduleSpec("kl_optimal", "KL Optimal"),
    ScheduleSpec("align_your_steps", "Align Your Steps", ("AYS",)),
    ScheduleSpec("simple", "Simple"),
    ScheduleSpec("normal", "Normal"),
    ScheduleSpec("ddim", "DDIM"),
    ScheduleSpec("beta", "Beta"),
    ScheduleSpec("lcm", "LCM"),
)

SAMPLERS: Mapping[str, SamplerSpec] = MappingProxyType({spec.name: spec for spec in _SAMPLER_LIST})
SCHEDULES: Mapping[str, ScheduleSpec] = MappingProxyType({spec.key: spec for spec in _SCHEDULE_LIST})


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split()).replace(" ", "")


def _schedule_names(spec: ScheduleSpec) -> tuple[str, ...]:
    return (spec.label, spec.key, *spec.aliases)


_SAMPLER_LOOKUP = MappingProxyType(
    {_norm(n): spec for spec in _SAMPLER_LIST for n in (spec.name, *spec.aliases)}
)
_SCHEDULE_LOOKUP = MappingProxyType(
    {_norm(n): spec for spec in _SCHEDULE_LIST for n in _schedule_names(spec)}
)


def sampler_names() -> list[str]:
    """Every sampler label, in A1111's order."""
    return [spec.name for spec in _SAMPLER_LIST]


def schedule_labels() -> list[str]:
    """Every schedule label, "Automatic" first."""
    return [spec.label for spec in _SCHEDULE_LIST]


def resolve_schedule(name: str) -> ScheduleSpec:
    """A schedule by label, key or alias (case- and space-insensitive)."""
    spec = _SCHEDULE_LOOKUP.get(_norm(name or "Automatic"))
    if spec is None:
        raise InvalidInputError(
            f"unknown schedule type {name!r}; valid: {', '.join(schedule_labels())} (or their keys, e.g. 'karras')"
        )
    return spec


def resolve_sampler(name: str, scheduler: str | None = "Automatic") -> tuple[SamplerSpec, str]:
    """(sampler spec, schedule key) for an A1111 sampler name and schedule type.

    A schedule label at the end of the sampler name ("DPM++ 2M Karras", "Euler a exponential") wins over
    ``scheduler``, as in A1111. "Automatic" resolves to the sampler's default schedule key.
    """
    if not isinstance(name, str):
        raise InvalidInputError(
            f"sampler name must be a string, got {name!r}; valid: {', '.join(sampler_names())}"
        )
    schedule = resolve_schedule(scheduler or "Automatic")
    key = _norm(name)
    spec = _SAMPLER_LOOKUP.get(key)
    if spec is None:
        # legacy aliases of the "<sampler> Karras/Exponential" entries of A1111 < 1.9: "k_dpmpp_2m_ka", "..._exp"
        for suffix, legacy_schedule in (("_ka", "karras"), ("_exp", "exponential")):
            stem = name.strip().lower()
            if stem.endswith(suffix) and _norm(stem[: -len(suffix)]) in _SAMPLER_LOOKUP:
                spec, schedule = _SAMPLER_LOOKUP[_norm(stem[: -len(suffix)])], SCHEDULES[legacy_schedule]
                break
    if spec is None:
        # "DPM++ 2M Karras": strip a trailing schedule name; the longest match wins ("SGM Uniform" over "Uniform").
        words = name.strip().replace("_", " ").split()
        for cut in range(1, len(words)):
            head, tail = " ".join(words[:-cut]), " ".join(words[-cut:])
            found_sampler = _SAMPLER_LOOKUP.get(_norm(head))
            found_schedule = _SCHEDULE_LOOKUP.get(_norm(tail))
            if found_sampler is not None and found_schedule is not None:
                spec, schedule = found_sampler, found_schedule
                break
    if spec is None:
        aliases = "; ".join(f"{s.name} ({', '.join(s.aliases)})" for s in _SAMPLER_LIST)
        raise InvalidInputError(
            f"unknown sampler {name!r}; valid samplers (aliases): {aliases}. A schedule label may follow the name, "
            f"e.g. 'DPM++ 2M Karras'"
        )
    schedule_key = spec.default_schedule if schedule.key == "automatic" else schedule.key
    return spec, schedule_key


def sigmas_for(
    sampler: SamplerSpec | str,
    schedule_key: str,
    steps: int,
    schedule: K.DiscreteSchedule,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float | None = None,
    sdxl: bool = False,
    beta_alpha: float = 0.6,
    beta_beta: float = 0.6,
    device: torch.device | str | None = None,
) -> Tensor:
    """The sigmas A1111 would use for ``steps`` steps of this sampler with this schedule type.

    Applies the sampler's ``discard_next_to_last_sigma``; the range defaults to the model's
    (``schedule.sigma_min`` .. ``schedule.sigma_max``).
    """
    spec = sampler if isinstance(sampler, SamplerSpec) else resolve_sampler(sampler)[0]
    key = resolve_schedule(schedule_key).key
    if key == "automatic":
        key = spec.default_schedule
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InvalidInputError(f"steps must be an integer >= 1, got {steps!r}")
    n = steps + 1 if spec.discard_next_to_last_sigma else steps
    lo = schedule.sigma_min if sigma_min is None else sigma_min
    hi = schedule.sigma_max if sigma_max is None else sigma_max
    if key == "uniform":
        sigmas = K.get_sigmas_uniform(n, schedule)
    elif key == "karras":
        sigmas = K.get_sigmas_karras(n, lo, hi, rho=7.0 if rho is None else rho)
    elif key == "exponential":
        sigmas = K.get_sigmas_exponential(n, lo, hi)
    elif key == "polyexponential":
        sigmas = K.get_sigmas_polyexponential(n, lo, hi, rho=1.0 if rho is None else rho)
    elif key == "sgm_uniform":
        sigmas = K.get_sigmas_sgm_uniform(n, schedule, lo, hi)
    elif key == "kl_optimal":
        sigmas = K.get_sigmas_kl_optimal(n, lo, hi)
    elif key == "align_your_steps":
        sigmas = K.get_sigmas_align_your_steps(n, sdxl=sdxl)
    elif key == "simple":
        sigmas = K.get_sigmas_simple(n, schedule)
    elif key == "normal":
        sigmas = K.get_sigmas_normal(n, schedule, lo, hi)
    elif key == "ddim":
        sigmas = K.get_sigmas_ddim(n, schedule)
    elif key == "beta":
        sigmas = K.get_sigmas_beta(n, lo, hi, alpha=beta_alpha, beta=beta_beta)
    elif key == "lcm":
        sigmas = K.get_sigmas_lcm(n, schedule)
    else:  # pragma: no cover - every key of SCHEDULES is handled above
        raise InvalidInputError(f"schedule {key!r} has no sigma function")
    if spec.discard_next_to_last_sigma:
        sigmas = K.discard_next_to_last_sigma(sigmas)
    return sigmas.to(device) if device is not None else sigmas


def sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    sampler: SamplerSpec | str = "Euler a",
    **kwargs: Any,
) -> Tensor:
    """Run a sampler by name or spec: ``sample(denoiser, x, sigmas, sampler="DPM++ 2M", generator=g)``.

    The spec's options (e.g. UniPC's variant) are defaults that ``kwargs`` may override.
    """
    spec = sampler if isinstance(sampler, SamplerSpec) else resolve_sampler(sampler)[0]
    return spec.function(denoiser, x, sigmas, **{**dict(spec.options), **kwargs})
