"""DDIM, BDIA, EDICT and O-BELM samplers with (exact) inversion on top of the fused op, for
variance-preserving schedules (``Schedule``: SD 1.x/2.x/XL, ``eps_fn(x, t)``) and for rectified
flow (``FlowSchedule``: SD3, Flux, ``v_fn(x, sigma)``).

Every step is one model call and one ``lincomb3_`` (EDICT: its four coupled lines, each one op
call). The two-step methods keep two state buffers and update the older one in place:

    prev <- a * prev + b * cur + c * eps(cur, t);  prev, cur = cur, prev

and inversion runs the same loop backwards with ``lincomb3_inverse_`` and the same coefficients,
which is why reconstruction is exact up to rounding.

Flow matching needs no code of its own here (DESIGN.md section 2b): its ODE dx/ds = v has the
form d xbar = eps d sbar with xbar = x, sbar = s and eps = v, so on the flow grid (alpha = 1,
sigma = s, see ``FlowSchedule.grid``) the same coefficient functions give exactly the flow rows:
``coefficients.ddim`` is the Euler step x - h v ("euler"), ``coefficients.obelm`` is
(h_j^2 / h_{j-1}^2, 1 - a, -h_j (h_j + h_{j-1}) / h_{j-1}), and BDIA and EDICT carry over the
same way. The model then receives the state's float sigma instead of an integer timestep
(``Sampler.model_times``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from . import coefficients
from .ops import check_like, coef_table, lincomb3_, lincomb3_inverse_
from .schedule import FlowSchedule, Schedule

#: eps_fn(x, t) with an integer timestep t (VP), or v_fn(x, sigma) with a float sigma (flow).
EpsFn = Callable[[torch.Tensor, int | float], torch.Tensor]
DEFAULT_STEPS = 50


#: DDIM (on a VP Schedule) and Euler (on a FlowSchedule) are the same step.
SAME_STEP = {"ddim": "euler", "euler": "ddim"}


def _wrong_schedule(name: str, schedule) -> str:
    kind, other = (("FlowSchedule", "VP Schedule") if isinstance(schedule, FlowSchedule)
                   else ("VP Schedule", "FlowSchedule"))
    return (f"sampler {name!r} needs a {other}, got a {kind}; on a {kind} the same step is "
            f"{SAME_STEP[name]!r}")


def _check_pair(x_T: torch.Tensor, x_T2: torch.Tensor | None) -> None:
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
        raise TypeError(f"x_T must be a float tensor, got {getattr(x_T, 'dtype', type(x_T))}")
    if x_T2 is None:
        return
    if not isinstance(x_T2, torch.Tensor):
        raise TypeError(f"x_T2 must be a tensor or None, got {type(x_T2).__name__}")
    check_like(x_T2, x_T, "x_T2", "x_T")


def _custom_timesteps(timesteps, num_steps: int | None, schedule: Schedule) -> torch.Tensor:
    """Given VP timesteps as a LongTensor, checked: 1-D integers, strictly decreasing, in range,
    at least two (a clean state follows them), as many as num_steps when it is given too."""
    ts = torch.as_tensor(timesteps).detach().cpu()
    if ts.dim() != 1 or ts.is_floating_point() or ts.is_complex() or ts.dtype == torch.bool:
        raise ValueError(f"timesteps must be a 1-D sequence of integers, got {timesteps!r}")
    ts = ts.to(torch.long)
    if num_steps is not None and num_steps != len(ts):
        raise ValueError(f"num_steps={num_steps!r} but {len(ts)} timesteps were given; pass one "
                         "of them, or both equal")
    T = schedule.num_train_timesteps
    if len(ts) < 2 or bool((ts[1:] >= ts[:-1]).any()) or int(ts.min()) < 0 or int(ts.max()) >= T:
        raise ValueError(f"timesteps must be at least two strictly decreasing integers in "
                         f"[0, {T - 1}], got {ts.tolist()}")
    return ts


class Sampler:
    """Base class: a fixed state grid of ``num_steps`` model calls plus the clean state.

    On a ``Schedule`` (VP) the states sit at ``num_steps`` integer timesteps chosen by
    ``spacing``, or at custom descending ``timesteps`` (as diffusers' ``set_timesteps(
    timesteps=...)``, e.g. a pipeline scheduler's grid with its ``steps_offset``); on a
    ``FlowSchedule`` at the schedule's ``num_steps`` sigmas, or at custom unshifted ``sigmas``
    (as diffusers' ``set_timesteps(sigmas=...)``). With custom values num_steps follows.
    """

    name = "sampler"
    #: Model calls per step (EDICT evaluates both of its coupled sequences).
    calls_per_step = 1
    #: Which schedules the method runs on, and the fewest steps it can take on a FlowSchedule
    #: (on a Schedule the timestep spacing already needs two).
    on_vp, on_flow, min_steps = True, True, 1

    def __init__(self, schedule: Schedule | FlowSchedule, num_steps: int | None = None,
                 spacing: str | None = None, *, sigmas=None, timesteps=None):
        self.schedule = schedule
        if num_steps is None and sigmas is None and timesteps is None:
            num_steps = DEFAULT_STEPS
        if isinstance(schedule, FlowSchedule):
            if not self.on_flow:
                raise ValueError(_wrong_schedule(self.name, schedule))
            if spacing is not None or timesteps is not None:
                what = f"spacing={spacing!r}" if timesteps is None else "timesteps="
                raise ValueError(f"{what} is for a VP Schedule; a FlowSchedule spaces its "
                                 "sigmas itself or takes custom sigmas=")
            self.spacing = None
            self.sigmas = schedule.sigmas(num_steps, sigmas)
            self.grid = schedule.grid(self.sigmas)
            if self.num_steps < self.min_steps:
                raise ValueError(f"{self.name!r} is a two-step method and needs num_steps >= "
                                 f"{self.min_steps}, got {self.num_steps}; 'euler' can take "
                                 "a single step")
        elif isinstance(schedule, Schedule):
            if not self.on_vp:
                raise ValueError(_wrong_schedule(self.name, schedule))
            if sigmas is not None:
                raise ValueError("sigmas= is for a FlowSchedule; a VP Schedule picks its "
                                 "timesteps by num_steps and spacing")
            self.spacing = "linspace" if spacing is None else spacing
            self.sigmas = None
            if timesteps is None:
                timesteps = schedule.timesteps(num_steps, self.spacing)
            else:
                if spacing is not None:
                    raise ValueError("pass either spacing or custom timesteps=, not both")
                self.spacing = None
                timesteps = _custom_timesteps(timesteps, num_steps, schedule)
            self.grid = schedule.grid(timesteps)
        else:
            raise TypeError("schedule must be a belm_kernels.Schedule or FlowSchedule, got "
                            f"{type(schedule).__name__}")
        #: LongTensor of training timesteps (VP) or float64 num_train_timesteps * sigma (flow).
        self.timesteps = self.grid.timesteps

    @property
    def is_flow(self) -> bool:
        return isinstance(self.schedule, FlowSchedule)

    @property
    def num_steps(self) -> int:
        return self.grid.num_steps

    @property
    def model_times(self) -> list:
        """What the model receives as its time argument at each of the N states, noisiest first:
        integer training timesteps (VP, ``eps_fn(x, t)``) or the state's float sigma (flow,
        ``v_fn(x, sigma)``)."""
        return self.sigmas[:-1].tolist() if self.is_flow else self.timesteps.tolist()

    def __repr__(self) -> str:
        if self.is_flow:
            return f"{type(self).__name__}(num_steps={self.num_steps}, {self.schedule!r})"
        return f"{type(self).__name__}(num_steps={self.num_steps}, spacing={self.spacing!r})"

    def _progress(self, total: int, enabled: bool, what: str):
        return tqdm(total=total, disable=not enabled, desc=f"{self.name} {what}", unit="step")

    def _model(self, fn: EpsFn, x: torch.Tensor, t) -> torch.Tensor:
        """fn(x, t), checked: a float tensor of x's shape on x's device."""
        out = fn(x, t)
        what, at = ("v_fn", f"sigma={t!r}") if self.is_flow else ("eps_fn", f"t={t}")
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise TypeError(f"{what} must return a float tensor, got "
                            f"{getattr(out, 'dtype', type(out).__name__)} at {at}")
        if out.shape != x.shape or out.device != x.device:
            raise ValueError(f"{what} must return a tensor of x's shape {tuple(x.shape)} on "
                             f"{x.device}, got shape {tuple(out.shape)} on {out.device} at {at}")
        return out

    def sample(self, eps_fn: EpsFn, x_T: torch.Tensor, x_T2: torch.Tensor | None = None, *,
               backend: str = "auto", progress: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def invert(self, eps_fn: EpsFn, x0: torch.Tensor, *, backend: str = "auto",
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TwoStepSampler(Sampler):
    """x_{j+1} = a_j x_{j-1} + b_j x_j + c_j eps(x_j, t_j); subclasses give the (N, 3) rows."""

    min_steps = 2

    def rows(self) -> torch.Tensor:
        raise NotImplementedError

    def _check_invertible(self) -> None:
        pass

    def _run(self, eps_fn, prev, cur, steps, coef, inverse, backend, progress, what):
        """The shared loop: steps is a list of (timestep, row index into coef)."""
        op = lincomb3_inverse_ if inverse else lincomb3_
        with self._progress(len(steps), progress, what) as bar:
            for t, k in steps:
                op(prev, cur, self._model(eps_fn, cur, t), coef[k], backend=backend)
                prev, cur = cur, prev
                bar.update()
        return prev, cur

    def sample(self, eps_fn, x_T, x_T2=None, *, backend="auto", progress=False):
        """Integrate from x_T (state 0) to the clean state; from the pair, start at state 1."""
        _check_pair(x_T, x_T2)
        ts = self.model_times
        first = 0 if x_T2 is None else 1
        prev, cur = x_T.clone(), (x_T if x_T2 is None else x_T2).clone()
        coef = coef_table(self.rows(), x_T)
        steps = [(ts[j], j) for j in range(first, self.num_steps)]
        _, cur = self._run(eps_fn, prev, cur, steps, coef, False, backend, progress, "sampling")
        return cur

    def invert(self, eps_fn, x0, *, backend="auto", progress=False):
        """Return (x_T, x_T2), the two noisiest states, from which ``sample`` rebuilds x0."""
        self._check_invertible()
        _check_pair(x0, None)
        ts, n = self.model_times, self.num_steps
        # One DDIM-inversion step from the clean state gives the second state of the pair ...
        ddim_inv = coef_table(coefficients.ddim_inverse_op_rows(self.grid), x0)
        prev, cur = self._run(eps_fn, x0.clone(), x0.clone(), [(ts[n - 1], n - 1)], ddim_inv,
                              True, backend, False, "inversion")
        # ... then every later step is the exact algebraic inverse of a sampling step.
        steps = [(ts[j], j) for j in range(n - 1, 0, -1)]
        prev, cur = self._run(eps_fn, prev, cur, steps, coef_table(self.rows(), x0), True,
                              backend, progress, "inversion")
        return cur, prev


class DDIMSampler(TwoStepSampler):
    """DDIM (eta = 0). Its inversion evaluates eps at the less noisy state, so it is not exact."""

    name = "ddim"
    on_flow = False

    def rows(self):
        return coefficients.ddim(self.grid)

    def invert(self, eps_fn, x0, *, backend="auto", progress=False):
        _check_pair(x0, None)
        ts = self.model_times
        coef = coef_table(coefficients.ddim_inverse(self.grid), x0)
        steps = [(ts[j], j) for j in range(self.num_steps - 1, -1, -1)]
        prev, cur = self._run(eps_fn, x0.clone(), x0.clone(), steps, coef, False, backend,
                              progress, "inversion")
        return cur, prev


class EulerSampler(DDIMSampler):
    """The flow's Euler step x - h v, FlowMatchEulerDiscreteScheduler's step, which is DDIM in the
    flow's variables (the ``coefficients.ddim`` rows of the flow grid); inversion is inexact."""

    name = "euler"
    on_vp, on_flow, min_steps = False, True, 1


class BDIASampler(TwoStepSampler):
    """BDIA with mixing gamma (gamma = 0 is DDIM / Euler, which cannot be inverted this way)."""

    name = "bdia"

    def __init__(self, schedule, num_steps=None, spacing=None, gamma: float = 0.5, *,
                 sigmas=None, timesteps=None):
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise TypeError(f"gamma must be a float, got {type(gamma).__name__}")
        super().__init__(schedule, num_steps, spacing, sigmas=sigmas, timesteps=timesteps)
        self.gamma = float(gamma)

    def rows(self):
        return coefficients.bdia(self.grid, self.gamma)

    def _check_invertible(self):
        if self.gamma == 0:
            ddim = "euler" if self.is_flow else "ddim"
            raise ValueError(f"BDIA with gamma=0 is {ddim.upper()} and cannot be inverted "
                             "exactly (inversion divides by gamma); use gamma != 0 or the "
                             f"{ddim!r} sampler")


class OBELMSampler(TwoStepSampler):
    """O-BELM, the second-order exact-inversion sampler of the BELM paper."""

    name = "obelm"

    def rows(self):
        return coefficients.obelm(self.grid)


class EDICTSampler(Sampler):
    """EDICT: two coupled DDIM sequences mixed with weight p; two model calls per step."""

    name = "edict"
    calls_per_step = 2

    def __init__(self, schedule, num_steps=None, spacing=None, p: float = 0.93, *, sigmas=None,
                 timesteps=None):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
            raise ValueError(f"p must be a float in (0, 1) exclusive, got {p!r}")
        super().__init__(schedule, num_steps, spacing, sigmas=sigmas, timesteps=timesteps)
        self.p = float(p)

    def _tables(self, like):
        _, r, d = coefficients.ddim(self.grid).unbind(1)
        step = coef_table(torch.stack([r, torch.zeros_like(r), d], dim=1), like)
        mix = coef_table(torch.tensor([self.p, 1 - self.p, 0.0], dtype=torch.float64), like)
        return step, mix

    def sample(self, eps_fn, x_T, x_T2=None, *, backend="auto", progress=False):
        _check_pair(x_T, x_T2)
        x, y = x_T.clone(), (x_T if x_T2 is None else x_T2).clone()
        step, mix = self._tables(x)
        with self._progress(self.num_steps, progress, "sampling") as bar:
            for j, t in enumerate(self.model_times):
                lincomb3_(x, y, self._model(eps_fn, y, t), step[j], backend=backend)
                lincomb3_(y, x, self._model(eps_fn, x, t), step[j], backend=backend)
                lincomb3_(x, y, y, mix, backend=backend)
                lincomb3_(y, x, x, mix, backend=backend)
                bar.update()
        return x

    def invert(self, eps_fn, x0, *, backend="auto", progress=False):
        _check_pair(x0, None)
        x, y = x0.clone(), x0.clone()
        step, mix = self._tables(x)
        ts = self.model_times
        with self._progress(self.num_steps, progress, "inversion") as bar:
            for j in range(self.num_steps - 1, -1, -1):
                lincomb3_inverse_(y, x, x, mix, backend=backend)
                lincomb3_inverse_(x, y, y, mix, backend=backend)
                lincomb3_inverse_(y, x, self._model(eps_fn, x, ts[j]), step[j], backend=backend)
                lincomb3_inverse_(x, y, self._model(eps_fn, y, ts[j]), step[j], backend=backend)
                bar.update()
        return x, y


#: Samplers for a VP ``Schedule`` and for a ``FlowSchedule``, by name.
SAMPLERS = {cls.name: cls for cls in (DDIMSampler, BDIASampler, EDICTSampler, OBELMSampler)}
FLOW_SAMPLERS = {cls.name: cls for cls in (EulerSampler, BDIASampler, EDICTSampler, OBELMSampler)}


def get_sampler(name: str, schedule: Schedule | FlowSchedule, num_steps: int | None = None,
                spacing: str | None = None, **params) -> Sampler:
    """A sampler by name, with ``num_steps`` model calls (default ``DEFAULT_STEPS`` = 50).

    On a ``Schedule``: "ddim", "bdia" (gamma=0.5), "edict" (p=0.93) or "obelm"; ``spacing`` is
    "linspace" (default), "leading" or "trailing". On a ``FlowSchedule``: "euler", "bdia",
    "edict" or "obelm"; custom unshifted ``sigmas=`` may replace num_steps (on a ``Schedule``,
    custom descending integer ``timesteps=``).
    """
    flow = isinstance(schedule, FlowSchedule)
    names = FLOW_SAMPLERS if flow else SAMPLERS
    if name not in names:
        if name in SAME_STEP and isinstance(schedule, (Schedule, FlowSchedule)):
            raise ValueError(_wrong_schedule(name, schedule))
        raise ValueError(f"sampler name must be one of {tuple(names)} for a "
                         f"{type(schedule).__name__}, got {name!r}")
    try:
        return names[name](schedule, num_steps, spacing, **params)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise TypeError(f"sampler {name!r} got unknown parameters {sorted(params)}") from None
        raise
