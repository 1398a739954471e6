"""Rounding-error bounds for the steps of :mod:`belm_kernels.multistep`.

The builders of :mod:`belm_kernels.multistep` write each sampler's step with the operations the
original (diffusers, k-diffusion) performs, in its order. Run with :class:`Roundoff` numbers instead
of float64, the same code gives, for every output of every step, a bound on how far the original's
floating-point evaluation can be from the exact value: first-order running error analysis (Higham,
*Accuracy and Stability of Numerical Algorithms*, ch. 3), with each operation rounding to nearest,
``fl(a op b) = (a op b)(1 + d)``, ``|d| <= u``:

* scalars (the coefficients, computed by the original from its float32 grid) are
  :class:`Approx` values carrying a bound on their error; ``+ - * /`` and sqrt round once (u),
  ``log``, ``exp``, ``expm1`` and powers within two units in the last place (4u, what CPU and CUDA
  libm guarantee for float32), small linear solves with the componentwise backward error of LU
  (gamma_{3n} |L||U|, Higham Thm 9.4);
* tensors are :class:`TrackedLin` combinations of the inputs (roles) carrying, per role, the
  magnitude ``mag`` of every intermediate (``|intermediate| <= sum_r mag_r |t_r|`` elementwise) and
  the error ``err`` (``|computed - exact| <= sum_r err_r |t_r|``); every tensor operation adds
  ``u_tensor * (mag + err)``.

Uses: ``Roundoff(torch.float32)`` bounds the original's float32 step; ``Roundoff(torch.float64)``
bounds the float64 tables' own coefficient error; :func:`fused_bound` bounds the fused op. The
tests (``tests/test_fused_schedulers.py``) compare the fused schedulers with the originals within
the sum of the two bounds.

The inputs (the grid values, the tensors a step reads) are exact by definition: the fused
scheduler takes them from the original as they are. Infinite intermediates (log(0) at a final
sigma of 0) are reproduced exactly by any evaluation and carry no error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .multistep import Lin

#: Rounding of log, exp, expm1 and pow, in units of u (two ulps).
TRANSCENDENTAL_ULPS = 4


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2 of ``dtype`` (float32: 2**-24)."""
    return torch.finfo(dtype).eps / 2


def _scaled(d: float, e: float) -> float:
    """|d| * e, with 0 when e is 0 (an infinite derivative times an exact value)."""
    return 0.0 if e == 0 else abs(d) * e


class Approx:
    """A value computed in floating point (``v``, evaluated here in float64) and a bound ``e`` on
    the distance of the original's computation of it from the exact value."""

    __slots__ = ("v", "e", "sys")

    def __init__(self, v: float, e: float, sys: Roundoff):
        self.v, self.sys = float(v), sys
        self.e = 0.0 if not math.isfinite(self.v) else float(e)

    def _wrap(self, c) -> Approx:
        return c if isinstance(c, Approx) else self.sys.const(c)

    def _round(self, v: float, e: float, ulps: float = 1) -> Approx:
        u = self.sys.u_scalar
        return Approx(v, e + ulps * u * abs(v) if math.isfinite(v) else 0.0, self.sys)

    def __add__(self, o):
        if isinstance(o, Lin):
            return NotImplemented
        o = self._wrap(o)
        return self._round(self.v + o.v, self.e + o.e)

    __radd__ = __add__

    def __sub__(self, o):
        if isinstance(o, Lin):
            return NotImplemented
        o = self._wrap(o)
        return self._round(self.v - o.v, self.e + o.e)

    def __rsub__(self, o):
        return self._wrap(o) - self

    def __neg__(self):
        return Approx(-self.v, self.e, self.sys)

    def __mul__(self, o):
        if isinstance(o, Lin):
            return NotImplemented
        o = self._wrap(o)
        v = self.v * o.v
        return self._round(v, _scaled(self.v, o.e) + _scaled(o.v, self.e) + self.e * o.e)

    __rmul__ = __mul__

    def __truediv__(self, o):
        if isinstance(o, Lin):
            return NotImplemented
        o = self._wrap(o)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = float(np.float64(self.v) / np.float64(o.v))
        if self.e == 0 and o.e == 0:
            return self._round(v, 0.0)
        room = abs(o.v) - o.e
        e = (self.e + _scaled(v, o.e)) / room if room > 0 else math.inf
        return self._round(v, e)

    def __rtruediv__(self, o):
        return self._wrap(o) / self

    def __pow__(self, p):
        if p == 0:
            return self.sys.const(1.0)
        if p == 1:
            return self
        if p == 2:
            return self * self
        if p == 0.5:
            return self.sys.sqrt(self)
        v = self.v ** p
        d = p * self.v ** (p - 1) if self.v else math.inf
        return self._round(v, _scaled(d, self.e), TRANSCENDENTAL_ULPS)

    def __lt__(self, o):
        return self.v < (o.v if isinstance(o, Approx) else o)

    def __gt__(self, o):
        return self.v > (o.v if isinstance(o, Approx) else o)

    def __eq__(self, o):
        return self.v == (o.v if isinstance(o, Approx) else o)

    __hash__ = None

    def __float__(self):
        return self.v

    def __repr__(self):
        return f"Approx({self.v!r} +- {self.e:.3g})"


class TrackedLin(Lin):
    """A :class:`~belm_kernels.multistep.Lin` whose arithmetic also tracks, per role, the
    magnitude of the intermediate tensors and a bound on the original's rounding error (see the
    module docstring). Its coefficients are float64 values."""

    __slots__ = ("mag", "err", "sys")

    def __init__(self, coef, mag, err, sys: Roundoff, basis: str | None = None):
        super().__init__(coef, basis)
        self.mag, self.err, self.sys = dict(mag), dict(err), sys

    def _new(self, coef, mag, err) -> TrackedLin:
        u = self.sys.u_tensor
        return TrackedLin(coef, mag, {r: err[r] + u * (mag[r] + err[r]) for r in coef}, self.sys)

    def _combine(self, other, sign):
        if not isinstance(other, TrackedLin):
            return NotImplemented
        roles = list(dict.fromkeys([*self.coef, *other.coef]))
        coef = {r: self.coef.get(r, 0.0) + sign * other.coef.get(r, 0.0) for r in roles}
        mag = {r: self.mag.get(r, 0.0) + other.mag.get(r, 0.0) for r in roles}
        err = {r: self.err.get(r, 0.0) + other.err.get(r, 0.0) for r in roles}
        return self._new(coef, mag, err)

    def __neg__(self):
        return TrackedLin({r: -c for r, c in self.coef.items()}, self.mag, self.err, self.sys)

    def _operand(self, s) -> Approx:
        """A scalar as a tensor operation uses it: rounded to the tensor dtype when it is wider
        (a float64 sigma times float32 latents is computed in float32)."""
        s = s if isinstance(s, Approx) else self.sys.const(s)
        if self.sys.u_scalar < self.sys.u_tensor and math.isfinite(s.v):
            s = Approx(s.v, s.e + self.sys.u_tensor * abs(s.v), self.sys)
        return s

    def __mul__(self, s):
        if isinstance(s, Lin):
            return NotImplemented
        s = self._operand(s)
        coef = {r: c * s.v for r, c in self.coef.items()}
        mag = {r: abs(s.v) * m for r, m in self.mag.items()}
        err = {r: _scaled(s.v, self.err[r]) + _scaled(self.mag[r] + self.err[r], s.e)
               for r in self.coef}
        return self._new(coef, mag, err)

    __rmul__ = __mul__

    def __truediv__(self, s):
        if isinstance(s, Lin):
            return NotImplemented
        s = self._operand(s)
        room = abs(s.v) - s.e
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = float(1 / np.float64(s.v))
        coef = {r: c * inv for r, c in self.coef.items()}
        mag = {r: m * abs(inv) for r, m in self.mag.items()}
        if room <= 0:
            err = {r: math.inf for r in self.coef}
        else:
            err = {r: self.err[r] / room
                   + _scaled((self.mag[r] + self.err[r]) / room, s.e / abs(s.v))
                   for r in self.coef}
        return self._new(coef, mag, err)


class Roundoff:
    """The number system of an original's evaluation: scalars rounded to ``scalar_dtype`` (its
    grid's dtype, float32 in diffusers), tensor operations to ``tensor_dtype`` (the latents'),
    for the builders of :mod:`belm_kernels.multistep` in place of ``FLOAT64``."""

    def __init__(self, scalar_dtype: torch.dtype = torch.float32,
                 tensor_dtype: torch.dtype | None = None):
        self.scalar_dtype = scalar_dtype
        self.tensor_dtype = tensor_dtype or scalar_dtype
        self.u_scalar = unit_roundoff(scalar_dtype)
        self.u_tensor = unit_roundoff(self.tensor_dtype)

    def num(self, v) -> Approx:
        """A grid value (exact)."""
        return Approx(float(v), 0.0, self)

    def const(self, c) -> Approx:
        """A constant of the code (a Python float): exact if the scalar dtype represents it."""
        c = float(c)
        exact = float(torch.tensor(c, dtype=self.scalar_dtype)) == c if math.isfinite(c) else True
        return Approx(c, 0.0 if exact else self.u_scalar * abs(c), self)

    def lin(self, role: str) -> TrackedLin:
        return TrackedLin({role: 1.0}, {role: 1.0}, {role: 0.0}, self, basis=role)

    def _fn(self, a, v: float, d: float, ulps: float) -> Approx:
        a = a if isinstance(a, Approx) else self.const(a)
        return a._round(v, _scaled(d, a.e), ulps)

    def sqrt(self, a) -> Approx:
        a = a if isinstance(a, Approx) else self.const(a)
        v = math.sqrt(a.v)
        # |sqrt(a + d) - sqrt(a)| = |d| / (sqrt(a + d) + sqrt(a)) <= |d| / (sqrt(a) + sqrt(a - |d|))
        e = a.e / (v + math.sqrt(max(a.v - a.e, 0.0))) if a.e else 0.0
        return a._round(v, e)

    def log(self, a) -> Approx:
        a = a if isinstance(a, Approx) else self.const(a)
        if not math.isfinite(a.v):  # log(inf) = inf, exactly
            return Approx(math.log(a.v) if a.v > 0 else math.nan, 0.0, self)
        v = math.log(a.v) if a.v > 0 else -math.inf
        e = -math.log1p(-a.e / a.v) if a.e and a.e < a.v else (math.inf if a.e else 0.0)
        return a._round(v, e, TRANSCENDENTAL_ULPS)

    def exp(self, a) -> Approx:
        a = a if isinstance(a, Approx) else self.const(a)
        if not math.isfinite(a.v):  # exp(-inf) = 0, exp(inf) = inf, exactly
            return Approx(0.0 if a.v < 0 else math.inf, 0.0, self)
        v = math.exp(a.v) if a.v < 709 else math.inf
        return a._round(v, _scaled(v, math.expm1(a.e)) if math.isfinite(v) else 0.0,
                        TRANSCENDENTAL_ULPS)

    def expm1(self, a) -> Approx:
        a = a if isinstance(a, Approx) else self.const(a)
        if not math.isfinite(a.v):  # expm1(-inf) = -1, expm1(inf) = inf, exactly
            return Approx(-1.0 if a.v < 0 else math.inf, 0.0, self)
        v = math.expm1(a.v) if a.v < 709 else math.inf
        d = math.exp(a.v) if math.isfinite(v) else 0.0
        return a._round(v, _scaled(d, math.expm1(a.e)), TRANSCENDENTAL_ULPS)

    def solve(self, matrix: Sequence[Sequence[Approx]], rhs: Sequence[Approx]) -> list[Approx]:
        """``torch.linalg.solve`` (LU with partial pivoting) of a small system: the solution of
        the float64 values, with errors from the data and from the factorisation."""
        n = len(rhs)
        a = np.array([[float(x) for x in row] for row in matrix])
        da = np.array([[x.e for x in row] for row in matrix])
        b = np.array([float(x) for x in rhs])
        db = np.array([x.e for x in rhs])
        x = np.linalg.solve(a, b)
        inv = np.abs(np.linalg.inv(a))
        lower, upper = _lu_abs(a)
        gamma = 3 * n * self.u_scalar / (1 - 3 * n * self.u_scalar)
        e = inv @ (db + da @ np.abs(x) + gamma * (lower @ upper) @ np.abs(x))
        return [Approx(v, err + self.u_scalar * abs(v), self) for v, err in zip(x, e, strict=True)]


def _lu_abs(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|L| and |U| of LU with partial pivoting (rows of L in pivot order, as the bound needs)."""
    n = len(a)
    u = a.astype(np.float64).copy()
    low = np.eye(n)
    for j in range(n):
        p = j + int(np.argmax(np.abs(u[j:, j])))
        u[[j, p]] = u[[p, j]]
        low[[j, p], :j] = low[[p, j], :j]
        for i in range(j + 1, n):
            low[i, j] = u[i, j] / u[j, j]
            u[i] -= low[i, j] * u[j]
    return np.abs(low), np.abs(u)


def op_rounding(num_inputs: int, out_dtype: torch.dtype,
                compute_dtype: torch.dtype = torch.float32) -> float:
    """Relative rounding of one output of :func:`belm_kernels.lincomb`: its error is at most this
    times ``sum_k |c_k| |t_k|``. The op rounds each coefficient to the compute dtype, each
    product and each running sum once (or once per fused multiply-add) and the result to
    ``out_dtype``: (K + 2) u + u_out for K + 1 inputs, first order."""
    return (num_inputs + 1) * unit_roundoff(compute_dtype) + unit_roundoff(out_dtype)


# --------------------------------------------------------------------------------------------
# Elementwise bounds of one output of one step. ``values``: float64 tensors of the roles the step
# reads (its inputs as given; history entries as the exact run would have them), ``history``:
# per history role, the bound of that entry's own error (from the step that made it).


def _sum(terms) -> torch.Tensor | float:
    total = 0.0
    for t in terms:
        total = total + t
    return total


def original_error(lin: TrackedLin, values, history=None) -> torch.Tensor:
    """Bound on |original - exact| for an output ``lin`` (from ``Roundoff`` numbers): its rounding
    ``sum_r err_r |t_r|`` plus the errors of the history it reads, which the (linear) step
    carries as ``sum_h |c_h| B_h``."""
    history = history or {}
    return _sum([e * values[r].abs() for r, e in lin.err.items() if e]
                + [abs(lin.coef[r]) * b for r, b in history.items() if r in lin.coef])


def fused_error(step, row: int, lin64: TrackedLin, values, out_dtype: torch.dtype,
                history=None, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bound on |fused - exact| for output ``row`` of ``step`` (a float64
    :class:`~belm_kernels.multistep.Step`): the op's rounding (:func:`op_rounding`), the float64
    table's own coefficient error (``lin64``, the output in ``Roundoff(torch.float64)``
    numbers) and the history errors it reads, ``sum_h |c_h| B_h``."""
    history = history or {}
    rel = op_rounding(len(step.inputs), out_dtype, compute_dtype)
    coef = dict(zip(step.inputs, step.coef[row].tolist(), strict=True))
    return _sum([(rel * abs(coef.get(r, 0.0)) + lin64.err.get(r, 0.0)) * values[r].abs()
                 for r in set(coef) | {r for r, e in lin64.err.items() if e}]
                + [abs(coef[r]) * b for r, b in history.items() if r in coef])


def reference(step, row: int, values) -> torch.Tensor:
    """Output ``row`` of ``step`` in float64 from float64 ``values``."""
    return _sum([c * values[r] for r, c in zip(step.inputs, step.coef[row].tolist(), strict=True)])
