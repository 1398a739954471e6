"""The plug-in of the BELM two-step samplers (DDIM / Euler, BDIA, O-BELM): sampling, from noise or
from an inverted pair, and inversion (exact, or DDIM's inexact one).

A request takes the very steps of ``sampler.sample`` / ``sampler.invert`` (:func:`step_plan`):
the same coefficient rows in the same op (``lincomb_`` / ``lincomb_inverse_`` in place on the
older state, which is ``lincomb3_``), the same buffer roles and model times, so its result is bit
for bit the plain sampler's whenever the model's output for one sample does not depend on the
rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import coefficients
from ..samplers import SAMPLERS, DDIMSampler, TwoStepSampler
from .plugin import TWO_STEP, TWO_STEP_INVERSE, Plan, Plugin, check_noise_levels

#: Methods the stepper runs as two-step samplers (one model call and one update per step).
#: (On a FlowSchedule the DDIM step is named "euler".)
SUPPORTED = tuple(name for name, cls in SAMPLERS.items() if issubclass(cls, TwoStepSampler))
# The sample / invert implementations whose steps step_plan reproduces.
_KNOWN = {"sample": (TwoStepSampler.sample,), "invert": (TwoStepSampler.invert, DDIMSampler.invert)}


@dataclass(frozen=True)
class StepPlan:
    """The steps of one plain sampler run: step k calls the model at ``times[k]`` on ``cur`` and
    updates ``prev`` with ``rows[k]`` (``lincomb3_inverse_`` if ``inverse``), then the roles swap.

    The run starts from prev = cur = x (sample from x_T, invert from x0) or prev = x_T,
    cur = x_T2 (sample from the pair); it ends with the result in ``cur`` (for an inversion the
    pair is (cur, prev))."""

    times: list
    rows: torch.Tensor
    inverse: bool

    @property
    def num_steps(self) -> int:
        return len(self.times)


def step_plan(sampler: TwoStepSampler, direction: str, from_pair: bool = False) -> StepPlan:
    """The steps ``sampler.sample`` (``direction="sample"``) or ``sampler.invert`` would take,
    built from the sampler's grid, its rows and its model times only (so new two-step samplers
    work unchanged). Mirrors ``TwoStepSampler.sample`` / ``.invert`` and ``DDIMSampler.invert``."""
    ts, n = list(sampler.model_times), sampler.num_steps
    if direction == "sample":
        first = 1 if from_pair else 0
        return StepPlan(ts[first:], sampler.rows()[first:], inverse=False)
    if type(sampler).invert is DDIMSampler.invert:  # inexact: forward updates, eps at x_{j+1}
        return StepPlan(ts[::-1], coefficients.ddim_inverse(sampler.grid).flip(0), inverse=False)
    sampler._check_invertible()
    first = coefficients.ddim_inverse_op_rows(sampler.grid)[n - 1:]
    return StepPlan([ts[n - 1]] + ts[n - 1:0:-1], torch.cat([first, sampler.rows()[1:].flip(0)]),
                    inverse=True)


class TwoStepPlugin(Plugin):
    description = (f"two-step samplers {SUPPORTED} ('euler' in place of 'ddim' on a "
                   "FlowSchedule)")

    def accepts(self, sampler) -> bool:
        return isinstance(sampler, TwoStepSampler)

    def hint(self, sampler) -> str:
        if getattr(sampler, "name", None) == "edict":
            return (" (EDICT couples two sequences with two model calls and four updates per "
                    "step, which does not fit a tick of one call and one update per sample)")
        return ""

    def plan(self, stepper, who, sampler, direction, *, from_pair, generator, options) -> Plan:
        if generator is not None or options:
            given = ["generator"] * (generator is not None) + sorted(options)
            raise TypeError(f"{who}: a two-step sampler takes no options (it draws no noise and "
                            f"its grid is set), got {', '.join(given)}")
        if getattr(type(sampler), direction) not in _KNOWN[direction]:
            raise TypeError(f"{who}: {type(sampler).__name__} has its own {direction}(), whose "
                            "steps the batched stepper does not know")
        mine, theirs = stepper.schedule, sampler.schedule
        if type(theirs) is not type(mine):
            raise ValueError(f"{who}: its sampler's grid comes from a {type(theirs).__name__}, "
                             f"but the stepper's model takes the model times of a "
                             f"{type(mine).__name__}")
        if getattr(mine, "alphas_cumprod", None) is not None:
            check_noise_levels(who, mine, theirs.alphas_cumprod)
        steps = step_plan(sampler, direction, from_pair)
        return Plan(kind=sampler.name, layout=TWO_STEP_INVERSE if steps.inverse else TWO_STEP,
                    times=steps.times, coef=steps.rows[:, None, :],
                    result="pair" if direction == "invert" else "sample", sampler=sampler)
