"""DDIM, BDIA, EDICT and O-BELM samplers with (exact) inversion on top of the fused op.

Every step is one model call and one ``lincomb3_`` (EDICT: its four coupled lines, each one op
call). The two-step methods keep two state buffers and update the older one in place:

    prev <- a * prev + b * cur + c * eps(cur, t);  prev, cur = cur, prev

and inversion runs the same loop backwards with ``lincomb3_inverse_`` and the same coefficients,
which is why reconstruction is exact up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from . import coefficients
from .ops import check_like, coef_table, lincomb3_, lincomb3_inverse_
from .schedule import Schedule

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


def _eps(eps_fn: EpsFn, x: torch.Tensor, t: int) -> torch.Tensor:
    eps = eps_fn(x, t)
    if not isinstance(eps, torch.Tensor) or not eps.is_floating_point():
        raise TypeError(f"eps_fn must return a float tensor, got "
                        f"{getattr(eps, 'dtype', type(eps).__name__)} at t={t}")
    if eps.shape != x.shape or eps.device != x.device:
        raise ValueError(f"eps_fn must return a tensor of x's shape {tuple(x.shape)} on "
                         f"{x.device}, got shape {tuple(eps.shape)} on {eps.device} at t={t}")
    return eps


def _check_pair(x_T: torch.Tensor, x_T2: torch.Tensor | None) -> None:
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
        raise TypeError(f"x_T must be a float tensor, got {getattr(x_T, 'dtype', type(x_T))}")
    if x_T2 is None:
        return
    if not isinstance(x_T2, torch.Tensor):
        raise TypeError(f"x_T2 must be a tensor or None, got {type(x_T2).__name__}")
    check_like(x_T2, x_T, "x_T2", "x_T")


class Sampler:
    """Base class: a fixed state grid of ``num_steps`` model timesteps plus the clean state."""

    name = "sampler"
    #: Model calls per step (EDICT evaluates both of its coupled sequences).
    calls_per_step = 1

    def __init__(self, schedule: Schedule, num_steps: int = 50, spacing: str = "linspace"):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a belm_kernels.Schedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.spacing = spacing
        self.timesteps = schedule.timesteps(num_steps, spacing)
        self.grid = schedule.grid(self.timesteps)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def model_times(self) -> list:
        """What the model receives as its time argument at each of the N states, noisiest first
        (integer training timesteps here)."""
        return self.timesteps.tolist()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps}, spacing={self.spacing!r})"

    def _progress(self, total: int, enabled: bool, what: str):
        return tqdm(total=total, disable=not enabled, desc=f"{self.name} {what}", unit="step")

    def sample(self, eps_fn: EpsFn, x_T: torch.Tensor, x_T2: torch.Tensor | None = None, *,
               backend: str = "auto", progress: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def invert(self, eps_fn: EpsFn, x0: torch.Tensor, *, backend: str = "auto",
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TwoStepSampler(Sampler):
    """x_{j+1} = a_j x_{j-1} + b_j x_j + c_j eps(x_j, t_j); subclasses give the (N, 3) rows."""

    def rows(self) -> torch.Tensor:
        raise NotImplementedError

    def _check_invertible(self) -> None:
        pass

    def _run(self, eps_fn, prev, cur, steps, coef, inverse, backend, progress, what):
        """The shared loop: steps is a list of (timestep, row index into coef)."""
        op = lincomb3_inverse_ if inverse else lincomb3_
        with self._progress(len(steps), progress, what) as bar:
            for t, k in steps:
                op(prev, cur, _eps(eps_fn, cur, t), coef[k], backend=backend)
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


class BDIASampler(TwoStepSampler):
    """BDIA with mixing gamma (gamma = 0 is DDIM, which cannot be inverted this way)."""

    name = "bdia"

    def __init__(self, schedule, num_steps=50, spacing="linspace", gamma: float = 0.5):
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise TypeError(f"gamma must be a float, got {type(gamma).__name__}")
        super().__init__(schedule, num_steps, spacing)
        self.gamma = float(gamma)

    def rows(self):
        return coefficients.bdia(self.grid, self.gamma)

    def _check_invertible(self):
        if self.gamma == 0:
            raise ValueError("BDIA with gamma=0 is DDIM and cannot be inverted exactly "
                             "(inversion divides by gamma); use gamma != 0 or the 'ddim' sampler")


class OBELMSampler(TwoStepSampler):
    """O-BELM, the second-order exact-inversion sampler of the BELM paper."""

    name = "obelm"

    def rows(self):
        return coefficients.obelm(self.grid)


class EDICTSampler(Sampler):
    """EDICT: two coupled DDIM sequences mixed with weight p; two model calls per step."""

    name = "edict"
    calls_per_step = 2

    def __init__(self, schedule, num_steps=50, spacing="linspace", p: float = 0.93):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
            raise ValueError(f"p must be a float in (0, 1) exclusive, got {p!r}")
        super().__init__(schedule, num_steps, spacing)
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
                lincomb3_(x, y, _eps(eps_fn, y, t), step[j], backend=backend)
                lincomb3_(y, x, _eps(eps_fn, x, t), step[j], backend=backend)
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
                lincomb3_inverse_(y, x, _eps(eps_fn, x, ts[j]), step[j], backend=backend)
                lincomb3_inverse_(x, y, _eps(eps_fn, y, ts[j]), step[j], backend=backend)
                bar.update()
        return x, y


SAMPLERS = {cls.name: cls for cls in (DDIMSampler, BDIASampler, EDICTSampler, OBELMSampler)}


def get_sampler(name: str, schedule: Schedule, num_steps: int = 50, spacing: str = "linspace",
                **params) -> Sampler:
    """A sampler by name: "ddim", "bdia" (gamma=0.5), "edict" (p=0.93) or "obelm"."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler name must be one of {tuple(SAMPLERS)}, got {name!r}")
    try:
        return SAMPLERS[name](schedule, num_steps, spacing, **params)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise TypeError(f"sampler {name!r} got unknown parameters {sorted(params)}") from None
        raise
