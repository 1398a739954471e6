"""The samplers people already run, each step as one fused linear combination.

Every step of DDIM, DPM-Solver++ (1-3, ODE and SDE), UniPC (bh1/bh2, predictor and corrector),
Euler, Euler ancestral, LCM and flow-matching Euler -- as diffusers and k-diffusion write them --
is a linear combination of a few latent-sized tensors whose coefficients depend only on the grid.
This module turns a grid into a table: per step, which tensors are read (their *roles*), which are
written, and a float64 coefficient matrix, so that a driver does the step with one
:func:`belm_kernels.lincomb` call (up to three outputs in one pass over memory).

Roles. Inputs of a step are ``"sample"`` (always the first, the op's ``x``), ``"model_output"``
(the model's raw prediction), ``"noise"`` (a standard normal draw, for the stochastic samplers)
and history entries ``"name[-j]"``: the value of role ``name`` (an output, or an input) of the
step j steps before this one. Outputs are the sampler's results (``"prev_sample"``,
``"pred_original_sample"``, LCM's ``"denoised"``) and its history streams (DPM-Solver's data
prediction ``"x0"``, UniPC's ``"x0"``/``"eps"`` and corrected ``"last_sample"``), which a later
step reads back as ``"x0[-1]"`` and so on. A driver maps roles to buffers: history it owns in a
ring with one slot more than the deepest lag, so that a step never writes a slot it reads (slot of
``name`` at step k: ``k % ring``; of ``name[-j]``: ``(k - j) % ring``); a lagged *input* (the
previous denoiser output ``"model_output[-1]"`` of k-diffusion's DPM-Solver++(2M)) is what the
driver was given at that step, kept by reference or copied. A multistep builder takes the step a
run starts at (``start``, an img2img ``begin_index``): the warm-up of its order counts from there.
A step lists its inputs in one canonical order (:func:`role_order`: sample, model_output, noise,
then history by stream and lag), so that every step's inputs are, in order, a subsequence of its
table's :func:`uniform` layout: the fused op's chain of multiply-adds then runs over the same
terms in the same order whether a driver runs a step alone or zero-padded to the uniform layout,
and zero terms add exactly nothing. Three drivers use the tables: the fused diffusers
schedulers (:mod:`belm_kernels.diffusers.fused`), the k-diffusion-style functions
(:mod:`belm_kernels.k_diffusion`) and the batched stepper (:mod:`belm_kernels.batched`).

How a table is made. Each sampler's step is written once, line by line as the original writes it
(same operations in the same order), on :class:`Lin` values (linear combinations of roles) and
scalars of a *number system* ``F``: :data:`FLOAT64` gives the float64 tables; the error model in
:mod:`belm_kernels.roundoff` runs the very same code with numbers that carry rounding-error bounds,
which is how the tests bound the difference between a fused step and the original's float32
evaluation. The grid (sigmas, alphas_cumprod, timesteps) is taken from the original as it computed
it (float32 values, widened exactly), so only the arithmetic of a step differs.

API for drivers::

    with ieee():                                          # log(0) = -inf quietly
        steps = dpm_solver(FLOAT64, sigmas, solver_order=2, ...)  # {output role: Lin} per step
    table = tabulate(steps)                               # list[Step]
    step = table[k]
    step.inputs, step.outputs, step.coef                  # roles; float64 (M, K+1), x = inputs[0]
    step.noise                                            # the original draws noise at this step
    step.aliases                                          # outputs that are another role as is
    ring_sizes(table)                                     # {stream: slots} for the history
    uniform(table)                                        # one layout for every step (batched)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "FLOAT64", "Lin", "Step", "ieee", "tabulate", "ring_sizes", "uniform", "lag", "parse_role",
    "role_order",
    "ddim", "dpm_solver", "unipc", "euler", "euler_ancestral", "lcm", "flow_euler",
    "k_euler", "k_euler_ancestral", "k_dpmpp_2m",
]

SAMPLE, MODEL_OUTPUT, NOISE = "sample", "model_output", "noise"
PREV_SAMPLE, PRED_ORIGINAL, DENOISED = "prev_sample", "pred_original_sample", "denoised"
#: The outputs a sampler returns; every other output is history.
RESULTS = (PREV_SAMPLE, PRED_ORIGINAL, DENOISED)


def lag(role: str, j: int) -> str:
    """The role ``role`` of the step ``j`` steps back: ``"x0[-1]"``."""
    return f"{role}[-{j}]"


_LAG = re.compile(r"^(.*)\[-(\d+)\]$")


def parse_role(name: str) -> tuple[str, int]:
    """``"x0[-2]"`` -> ``("x0", 2)``; ``"sample"`` -> ``("sample", 0)``."""
    m = _LAG.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, 0)


_FIRST = {SAMPLE: 0, MODEL_OUTPUT: 1, NOISE: 2}


def role_order(role: str) -> tuple:
    """Sort key of the canonical input order: sample, model_output, noise, then history entries
    by stream name and lag (``"last_sample[-1]"``, ``"x0[-1]"``, ``"x0[-2]"``)."""
    name, j = parse_role(role)
    return (_FIRST[name], "", 0) if j == 0 and name in _FIRST else (3, name, j)


# --------------------------------------------------------------------------------------------
# Linear combinations of roles, and the float64 number system.


class Lin:
    """A linear combination of roles, ``sum_r coef[r] * r``, with the arithmetic a sampler applies
    to tensors: ``+``, ``-`` between combinations, ``*`` and ``/`` by a scalar. ``basis`` names the
    role when this is a role itself (made by ``F.lin``, not by arithmetic)."""

    __slots__ = ("coef", "basis")
    __array_ufunc__ = None  # numpy scalars defer to our operators (np.float64 * Lin is a Lin)

    def __init__(self, coef: Mapping[str, object], basis: str | None = None):
        self.coef = dict(coef)
        self.basis = basis

    def _combine(self, other: Lin, sign: float) -> Lin:
        if not isinstance(other, Lin):
            return NotImplemented
        coef = dict(self.coef)
        for role, c in other.coef.items():
            coef[role] = coef[role] + sign * c if role in coef else sign * c
        return type(self)(coef)

    def __add__(self, other):
        return self._combine(other, 1.0)

    def __sub__(self, other):
        return self._combine(other, -1.0)

    def __neg__(self):
        return type(self)({r: -c for r, c in self.coef.items()})

    def __mul__(self, s):
        if isinstance(s, Lin):
            return NotImplemented
        return type(self)({r: c * s for r, c in self.coef.items()})

    def __rmul__(self, s):
        if isinstance(s, Lin):
            return NotImplemented
        return type(self)({r: s * c for r, c in self.coef.items()})

    def __truediv__(self, s):
        if isinstance(s, Lin):
            return NotImplemented
        return type(self)({r: c / s for r, c in self.coef.items()})

    def __repr__(self) -> str:
        return " + ".join(f"{float(c):.6g}*{r}" for r, c in self.coef.items()) or "0"


class _Float64:
    """Scalars as numpy float64 (IEEE semantics: log(0) = -inf, x / 0 = inf, no exceptions)."""

    log = staticmethod(np.log)
    exp = staticmethod(np.exp)
    expm1 = staticmethod(np.expm1)
    sqrt = staticmethod(np.sqrt)

    @staticmethod
    def num(v) -> np.float64:
        """A value of the grid (exact)."""
        return np.float64(v)

    @staticmethod
    def lin(role: str) -> Lin:
        return Lin({role: np.float64(1.0)}, basis=role)

    @staticmethod
    def solve(matrix: list[list], rhs: list) -> list:
        """``torch.linalg.solve(matrix, rhs)`` for the few-by-few systems of UniPC."""
        return list(np.linalg.solve(np.array(matrix, dtype=np.float64),
                                    np.array(rhs, dtype=np.float64)))


#: The number system of the float64 tables.
FLOAT64 = _Float64()


# --------------------------------------------------------------------------------------------
# Tables.


@dataclass(frozen=True)
class Step:
    """One step: ``outputs[m] = coef[m, 0] * inputs[0] + sum_k coef[m, k] * inputs[k]``.

    ``inputs[0]`` is ``"sample"`` (the op's x); inputs whose coefficient is 0 in every output are
    left out (a history slot not written yet, a noise term of coefficient 0). ``noise``: the
    original draws a noise tensor at this step (also when its coefficient is 0, so that a seeded
    generator stays in step with the original's). ``aliases``: outputs that are another role as it
    is -- an input (diffusers returns ``model_output`` itself as ``pred_original_sample`` of a
    ``"sample"`` prediction) or another output (LCM's last ``prev_sample`` is its ``denoised``) --
    and are not computed.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    coef: torch.Tensor
    noise: bool = False
    aliases: Mapping[str, str] = field(default_factory=dict)


def ieee():
    """A context in which the float64 builders follow IEEE semantics quietly: the final sigma 0 of
    a grid gives log(0) = -inf and an infinite log-SNR step, as in the originals' float32."""
    return np.errstate(divide="ignore", invalid="ignore", over="ignore")


def tabulate(steps: Iterable[Mapping[str, Lin]]) -> list[Step]:
    """Float64 :class:`Step` tables from the per-step outputs of a sampler (``{role: Lin}``, made
    with :data:`FLOAT64`).

    A step draws noise when its formula has a noise term (even one of coefficient 0). Results
    (``prev_sample``, ``pred_original_sample``, ``denoised``) that are a role as it is become
    aliases. Any other output is history: it is kept only at the steps whose value a later step
    reads (DPM-Solver's ``x0`` of the last step, or of every step at order 1, is not written)."""
    steps = list(steps)
    needed: set[tuple[str, int]] = set()  # (history role, step) read by a later step
    table: list[Step] = []
    for n in range(len(steps) - 1, -1, -1):
        outs = steps[n]
        aliases, computed = {}, {}
        for role, lin in outs.items():
            if role not in RESULTS and (role, n) not in needed:
                continue
            same = next((r for r, other in computed.items() if other is lin), None)
            if same is not None and role in RESULTS:
                aliases[role] = same
            elif lin.basis is not None and role in RESULTS:
                aliases[role] = lin.basis
            else:
                computed[role] = lin
        inputs = [SAMPLE]
        for lin in computed.values():
            for role, c in lin.coef.items():
                if role not in inputs and c != 0:
                    inputs.append(role)
                    name, j = parse_role(role)
                    if j:
                        needed.add((name, n - j))
        inputs.sort(key=role_order)
        coef = torch.tensor([[float(lin.coef.get(r, 0.0)) for r in inputs]
                             for lin in computed.values()], dtype=torch.float64)
        draws = any(NOISE in lin.coef for lin in outs.values())
        table.append(Step(tuple(inputs), tuple(computed), coef.reshape(len(computed), len(inputs)),
                          draws, aliases))
    return table[::-1]


def ring_sizes(table: Sequence[Step]) -> dict[str, int]:
    """Slots each history stream needs: one more than the deepest lag any step reads it at."""
    sizes: dict[str, int] = {}
    for step in table:
        for role in step.inputs:
            name, j = parse_role(role)
            if j:
                sizes[name] = max(sizes.get(name, 1), j + 1)
    return sizes


def uniform(table: Sequence[Step]) -> tuple[tuple[str, ...], tuple[str, ...], torch.Tensor]:
    """One layout for all steps: ``(inputs, outputs, coef)`` with the union of the roles (sample
    first) and coef float64 (N, M, K+1), zero where a step does not read or write a role. For a
    driver that runs steps of different kinds in one op (the batched stepper: one coefficient row
    per sample). Aliased outputs are left out; a zero column still reads its buffer, so such a
    driver fills history buffers with zeros before they are first written. The inputs are in the
    canonical order (:func:`role_order`), so each step's are a subsequence of them."""
    inputs = [SAMPLE]
    outputs: list[str] = []
    for step in table:
        inputs += [r for r in step.inputs if r not in inputs]
        outputs += [r for r in step.outputs if r not in outputs]
    inputs.sort(key=role_order)
    coef = torch.zeros(len(table), len(outputs), len(inputs), dtype=torch.float64)
    for n, step in enumerate(table):
        rows = [outputs.index(r) for r in step.outputs]
        cols = [inputs.index(r) for r in step.inputs]
        coef[n][np.ix_(rows, cols)] = step.coef
    return tuple(inputs), tuple(outputs), coef


# --------------------------------------------------------------------------------------------
# diffusers' schedulers, step by step as diffusers 0.42 writes them. Scalars come from the
# original's float32 grid; ``F`` is the number system (FLOAT64 for tables).


def ddim(F, alpha_prod_t, alpha_prod_t_prev, *, eta: float = 0.0,
         use_clipped_model_output: bool = False,
         prediction_type: str = "epsilon") -> dict[str, Lin]:
    """``DDIMScheduler.step`` (no clipping or thresholding): ``prev_sample`` and
    ``pred_original_sample``; with ``eta > 0`` the variance noise is the input ``"noise"``.
    ``use_clipped_model_output`` recomputes the noise prediction from ``pred_original_sample``,
    as the original does (the same value up to rounding, without clipping)."""
    sample, model_output = F.lin(SAMPLE), F.lin(MODEL_OUTPUT)
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** 0.5 * pred_original_sample) / beta_prod_t ** 0.5
    elif prediction_type == "v_prediction":
        pred_original_sample = alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * model_output
        pred_epsilon = alpha_prod_t ** 0.5 * model_output + beta_prod_t ** 0.5 * sample
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of 'epsilon', 'sample', "
                         "'v_prediction'")
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** 0.5
    if use_clipped_model_output:
        pred_epsilon = (sample - alpha_prod_t ** 0.5 * pred_original_sample) / beta_prod_t ** 0.5
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5 * pred_epsilon
    prev_sample = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
    if eta > 0:
        prev_sample = prev_sample + std_dev_t * F.lin(NOISE)
    return {PREV_SAMPLE: prev_sample, PRED_ORIGINAL: pred_original_sample}


def _vp_alpha_sigma(F, sigma, flow: bool):
    """``_sigma_to_alpha_sigma_t`` of the multistep schedulers."""
    if flow:
        return 1 - sigma, sigma
    alpha_t = 1 / ((sigma ** 2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _lambda(F, alpha, sigma):
    return F.log(alpha) - F.log(sigma)


def _data_prediction(F, sigma, prediction_type: str, flow: bool) -> Lin:
    """``convert_model_output`` of DPM-Solver++ / UniPC (predict_x0): the data prediction."""
    sample, model_output = F.lin(SAMPLE), F.lin(MODEL_OUTPUT)
    if prediction_type == "epsilon":
        alpha_t, sigma_t = _vp_alpha_sigma(F, sigma, flow)
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        alpha_t, sigma_t = _vp_alpha_sigma(F, sigma, flow)
        return alpha_t * sample - sigma_t * model_output
    if prediction_type == "flow_prediction":
        return sample - sigma * model_output
    raise ValueError(f"prediction_type {prediction_type!r} is not one of 'epsilon', 'sample', "
                     "'v_prediction', 'flow_prediction'")


def _noise_prediction(F, sigma, prediction_type: str, flow: bool) -> Lin:
    """``convert_model_output`` of UniPC with ``predict_x0=False``: the noise prediction."""
    sample, model_output = F.lin(SAMPLE), F.lin(MODEL_OUTPUT)
    if prediction_type == "epsilon":
        return model_output
    alpha_t, sigma_t = _vp_alpha_sigma(F, sigma, flow)
    if prediction_type == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    if prediction_type == "v_prediction":
        return alpha_t * model_output + sigma_t * sample
    raise ValueError(f"prediction_type {prediction_type!r} is not one of 'epsilon', 'sample', "
                     "'v_prediction' (UniPC with predict_x0=False)")


def dpm_solver(F, sigmas: Sequence, *, solver_order: int = 2,
               algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint",
               prediction_type: str = "epsilon", flow: bool = False,
               lower_order_final: bool = True, euler_at_final: bool = False,
               final_sigmas_type: str = "zero", start: int = 0) -> list[dict[str, Lin]]:
    """``DPMSolverMultistepScheduler.step`` for a run from ``timesteps[start]`` to the end.

    ``sigmas``: the scheduler's N + 1 sigmas; ``flow``: ``use_flow_sigmas``. Outputs per step:
    ``prev_sample`` and ``x0`` (the data prediction, read back as ``x0[-1]``, ``x0[-2]``); the
    SDE variant reads ``noise``. The order of each step follows diffusers: the warm-up, and
    ``lower_order_final`` / ``euler_at_final`` / a zero final sigma at the end.
    """
    if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
        raise ValueError(f"algorithm_type {algorithm_type!r} is not one of 'dpmsolver++', "
                         "'sde-dpmsolver++'")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type {solver_type!r} is not one of 'midpoint', 'heun'")
    sde = algorithm_type == "sde-dpmsolver++"
    s = [F.num(v) for v in sigmas]
    n = len(s) - 1
    sample, noise = F.lin(SAMPLE), F.lin(NOISE)
    steps = []
    lower_order_nums = 0
    for k in range(start, n):
        is_final = k == n - 1 and (euler_at_final or (lower_order_final and n < 15)
                                   or final_sigmas_type == "zero")
        is_second = k == n - 2 and lower_order_final and n < 15
        m0 = _data_prediction(F, s[k], prediction_type, flow)
        alpha_t, sigma_t = _vp_alpha_sigma(F, s[k + 1], flow)
        alpha_s0, sigma_s0 = _vp_alpha_sigma(F, s[k], flow)
        lambda_t, lambda_s0 = _lambda(F, alpha_t, sigma_t), _lambda(F, alpha_s0, sigma_s0)
        h = lambda_t - lambda_s0
        if solver_order == 1 or lower_order_nums < 1 or is_final:
            if not sde:
                x_t = (sigma_t / sigma_s0) * sample - (alpha_t * (F.exp(-h) - 1.0)) * m0
            else:
                x_t = ((sigma_t / sigma_s0 * F.exp(-h)) * sample
                       + (alpha_t * (1 - F.exp(-2.0 * h))) * m0
                       + sigma_t * F.sqrt(1.0 - F.exp(-2 * h)) * noise)
        elif solver_order == 2 or lower_order_nums < 2 or is_second:
            m1 = F.lin(lag("x0", 1))
            alpha_s1, sigma_s1 = _vp_alpha_sigma(F, s[k - 1], flow)
            lambda_s1 = _lambda(F, alpha_s1, sigma_s1)
            h_0 = lambda_s0 - lambda_s1
            r0 = h_0 / h
            D0, D1 = m0, (1.0 / r0) * (m0 - m1)
            if not sde and solver_type == "midpoint":
                x_t = ((sigma_t / sigma_s0) * sample - (alpha_t * (F.exp(-h) - 1.0)) * D0
                       - 0.5 * (alpha_t * (F.exp(-h) - 1.0)) * D1)
            elif not sde:
                x_t = ((sigma_t / sigma_s0) * sample - (alpha_t * (F.exp(-h) - 1.0)) * D0
                       + (alpha_t * ((F.exp(-h) - 1.0) / h + 1.0)) * D1)
            elif solver_type == "midpoint":
                x_t = ((sigma_t / sigma_s0 * F.exp(-h)) * sample
                       + (alpha_t * (1 - F.exp(-2.0 * h))) * D0
                       + 0.5 * (alpha_t * (1 - F.exp(-2.0 * h))) * D1
                       + sigma_t * F.sqrt(1.0 - F.exp(-2 * h)) * noise)
            else:
                x_t = ((sigma_t / sigma_s0 * F.exp(-h)) * sample
                       + (alpha_t * (1 - F.exp(-2.0 * h))) * D0
                       + (alpha_t * ((1.0 - F.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
                       + sigma_t * F.sqrt(1.0 - F.exp(-2 * h)) * noise)
        else:
            m1, m2 = F.lin(lag("x0", 1)), F.lin(lag("x0", 2))
            alpha_s1, sigma_s1 = _vp_alpha_sigma(F, s[k - 1], flow)
            alpha_s2, sigma_s2 = _vp_alpha_sigma(F, s[k - 2], flow)
            lambda_s1, lambda_s2 = _lambda(F, alpha_s1, sigma_s1), _lambda(F, alpha_s2, sigma_s2)
            h_0, h_1 = lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
            r0, r1 = h_0 / h, h_1 / h
            D0 = m0
            D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
            if not sde:
                x_t = ((sigma_t / sigma_s0) * sample - (alpha_t * (F.exp(-h) - 1.0)) * D0
                       + (alpha_t * ((F.exp(-h) - 1.0) / h + 1.0)) * D1
                       - (alpha_t * ((F.exp(-h) - 1.0 + h) / h ** 2 - 0.5)) * D2)
            else:
                x_t = ((sigma_t / sigma_s0 * F.exp(-h)) * sample
                       + (alpha_t * (1.0 - F.exp(-2.0 * h))) * D0
                       + (alpha_t * ((1.0 - F.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
                       + (alpha_t * ((1.0 - F.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2
                                     - 0.5)) * D2
                       + sigma_t * F.sqrt(1.0 - F.exp(-2 * h)) * noise)
        lower_order_nums = min(lower_order_nums + 1, solver_order)
        steps.append({PREV_SAMPLE: x_t, "x0": m0})
    return steps


def _unipc_update(F, s, k: int, order: int, x: Lin, m0: Lin, history: Callable[[int], Lin],
                  *, corrector: bool, model_t: Lin | None, predict_x0: bool, bh1: bool,
                  flow: bool) -> Lin:
    """``multistep_uni_p_bh_update`` (corrector False) or ``multistep_uni_c_bh_update``.

    ``x``: the sample the update starts from (the predictor's current sample, the corrector's last
    one); ``m0``: the newest converted output before this update; ``history(i)``: the one i
    further back; ``model_t``: the corrector's current converted output. Step index ``k`` as
    diffusers', so the update goes from sigma ``s[k]`` to ``s[k + 1]`` (predictor) or from
    ``s[k - 1]`` to ``s[k]`` (corrector).
    """
    t_index, s0_index = (k, k - 1) if corrector else (k + 1, k)
    alpha_t, sigma_t = _vp_alpha_sigma(F, s[t_index], flow)
    alpha_s0, sigma_s0 = _vp_alpha_sigma(F, s[s0_index], flow)
    lambda_t, lambda_s0 = _lambda(F, alpha_t, sigma_t), _lambda(F, alpha_s0, sigma_s0)
    h = lambda_t - lambda_s0
    rks, D1s = [], []
    for i in range(1, order):
        si = k - (i + 1) if corrector else k - i
        mi = history(i)
        alpha_si, sigma_si = _vp_alpha_sigma(F, s[si], flow)
        lambda_si = _lambda(F, alpha_si, sigma_si)
        rk = (lambda_si - lambda_s0) / h
        rks.append(rk)
        D1s.append((mi - m0) / rk)
    rks.append(F.num(1.0))
    hh = -h if predict_x0 else h
    h_phi_1 = F.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial_i = 1
    B_h = hh if bh1 else F.expm1(hh)
    R, b = [], []
    for i in range(1, order + 1):
        R.append([rk ** (i - 1) for rk in rks])
        b.append(h_phi_k * factorial_i / B_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    scale = alpha_t if predict_x0 else sigma_t
    x_t_ = (sigma_t / sigma_s0 * x if predict_x0 else alpha_t / alpha_s0 * x) - scale * h_phi_1 * m0
    if not corrector:
        if not D1s:
            return x_t_
        rhos_p = [F.num(0.5)] if order == 2 else F.solve([r[:-1] for r in R[:-1]], b[:-1])
        return x_t_ - scale * B_h * _weighted_sum(rhos_p, D1s)
    rhos_c = [F.num(0.5)] if order == 1 else F.solve(R, b)
    D1_t = model_t - m0
    last = rhos_c[-1] * D1_t
    total = last if not D1s else _weighted_sum(rhos_c[:-1], D1s) + last
    return x_t_ - scale * B_h * total


def _weighted_sum(weights: Sequence, terms: Sequence[Lin]) -> Lin:
    """``torch.einsum("k,bkc...->bc...", weights, stack(terms))``."""
    total = weights[0] * terms[0]
    for w, t in zip(weights[1:], terms[1:], strict=True):
        total = total + w * t
    return total


def unipc(F, sigmas: Sequence, *, solver_order: int = 2, solver_type: str = "bh2",
          predict_x0: bool = True, prediction_type: str = "epsilon", flow: bool = False,
          lower_order_final: bool = True, disable_corrector: Sequence[int] = (),
          start: int = 0) -> list[dict[str, Lin]]:
    """``UniPCMultistepScheduler.step`` for a run from ``timesteps[start]`` to the end: the
    corrector (UniC, from the second step of the run on, unless disabled) and the predictor
    (UniP), each of the order diffusers picks.

    Outputs per step: ``prev_sample``; the converted model output (``"x0"``, or ``"eps"`` with
    ``predict_x0=False``), read back as ``x0[-1]`` ...; and ``last_sample`` (the current sample
    after the corrector), read back as ``last_sample[-1]`` by the next corrector.
    """
    if solver_type not in ("bh1", "bh2"):
        raise ValueError(f"solver_type {solver_type!r} is not one of 'bh1', 'bh2'")
    s = [F.num(v) for v in sigmas]
    n = len(s) - 1
    stream = "x0" if predict_x0 else "eps"
    convert = _data_prediction if predict_x0 else _noise_prediction
    steps = []
    lower_order_nums = 0
    prev_order = None
    for k in range(start, n):
        model_t = convert(F, s[k], prediction_type, flow)
        sample = F.lin(SAMPLE)
        if k > start and k - 1 not in disable_corrector:
            sample = _unipc_update(
                F, s, k, prev_order, F.lin(lag("last_sample", 1)), F.lin(lag(stream, 1)),
                lambda i: F.lin(lag(stream, i + 1)), corrector=True, model_t=model_t,
                predict_x0=predict_x0, bh1=solver_type == "bh1", flow=flow)
        this_order = min(solver_order, n - k) if lower_order_final else solver_order
        this_order = min(this_order, lower_order_nums + 1)
        prev = _unipc_update(F, s, k, this_order, sample, model_t,
                             lambda i: F.lin(lag(stream, i)), corrector=False, model_t=None,
                             predict_x0=predict_x0, bh1=solver_type == "bh1", flow=flow)
        lower_order_nums = min(lower_order_nums + 1, solver_order)
        prev_order = this_order
        steps.append({PREV_SAMPLE: prev, stream: model_t, "last_sample": sample})
    return steps


def euler(F, sigma, sigma_next, *, prediction_type: str = "epsilon") -> dict[str, Lin]:
    """``EulerDiscreteScheduler.step`` without churn (``s_churn=0``): ``prev_sample`` and
    ``pred_original_sample``."""
    sample, model_output = F.lin(SAMPLE), F.lin(MODEL_OUTPUT)
    sigma_hat = sigma * (0.0 + 1)
    if prediction_type in ("original_sample", "sample"):
        pred_original_sample = model_output
    elif prediction_type == "epsilon":
        pred_original_sample = sample - sigma_hat * model_output
    elif prediction_type == "v_prediction":
        pred_original_sample = (model_output * (-sigma / (sigma ** 2 + 1) ** 0.5)
                                + (sample / (sigma ** 2 + 1)))
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of 'epsilon', "
                         "'v_prediction', 'sample', 'original_sample'")
    derivative = (sample - pred_original_sample) / sigma_hat
    dt = sigma_next - sigma_hat
    prev_sample = sample + derivative * dt
    return {PREV_SAMPLE: prev_sample, PRED_ORIGINAL: pred_original_sample}


def euler_ancestral(F, sigma, sigma_next, *,
                    prediction_type: str = "epsilon") -> dict[str, Lin]:
    """``EulerAncestralDiscreteScheduler.step``: ``prev_sample`` (with ``noise``) and
    ``pred_original_sample``. diffusers draws the noise at every step."""
    sample, model_output = F.lin(SAMPLE), F.lin(MODEL_OUTPUT)
    if prediction_type == "epsilon":
        pred_original_sample = sample - sigma * model_output
    elif prediction_type == "v_prediction":
        pred_original_sample = (model_output * (-sigma / (sigma ** 2 + 1) ** 0.5)
                                + (sample / (sigma ** 2 + 1)))
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of 'epsilon', "
                         "'v_prediction' (EulerAncestralDiscreteScheduler)")
    sigma_from, sigma_to = sigma, sigma_next
    sigma_up = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    derivative = (sample - pred_original_sample) / sigma
    dt = sigma_down - sigma
    prev_sample = sample + derivative * dt
    prev_sample = prev_sample + F.lin(NOISE) * sigma_up
    return {PREV_SAMPLE: prev_sample, PRED_ORIGINAL: pred_original_sample}


def lcm(F, timestep, alpha_prod_t, alpha_prod_t_prev, *, last: bool,
        timestep_scaling: float = 10.0, prediction_type: str = "epsilon") -> dict[str, Lin]:
    """``LCMScheduler.step`` (no clipping or thresholding): ``prev_sample`` and ``denoised``; the
    last step returns ``denoised`` as ``prev_sample`` and draws no noise."""
    sample, model_output = F.lin(SAMPLE), F.lin(MODEL_OUTPUT)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    sigma_data = 0.5
    scaled_timestep = timestep * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled_timestep ** 2 + sigma_data ** 2)
    c_out = scaled_timestep / (scaled_timestep ** 2 + sigma_data ** 2) ** 0.5
    if prediction_type == "epsilon":
        predicted_original_sample = ((sample - beta_prod_t ** 0.5 * model_output)
                                     / alpha_prod_t ** 0.5)
    elif prediction_type == "sample":
        predicted_original_sample = model_output
    elif prediction_type == "v_prediction":
        predicted_original_sample = alpha_prod_t ** 0.5 * sample - beta_prod_t ** 0.5 * model_output
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of 'epsilon', 'sample', "
                         "'v_prediction'")
    denoised = c_out * predicted_original_sample + c_skip * sample
    if last:
        prev_sample = denoised
    else:
        prev_sample = alpha_prod_t_prev ** 0.5 * denoised + beta_prod_t_prev ** 0.5 * F.lin(NOISE)
    return {PREV_SAMPLE: prev_sample, DENOISED: denoised}


def flow_euler(F, sigma, sigma_next, *, stochastic: bool = False) -> dict[str, Lin]:
    """``FlowMatchEulerDiscreteScheduler.step`` (one sigma per step, not per token)."""
    sample, model_output = F.lin(SAMPLE), F.lin(MODEL_OUTPUT)
    dt = sigma_next - sigma
    if stochastic:
        x0 = sample - sigma * model_output
        return {PREV_SAMPLE: (1.0 - sigma_next) * x0 + sigma_next * F.lin(NOISE)}
    return {PREV_SAMPLE: sample + dt * model_output}


# --------------------------------------------------------------------------------------------
# k-diffusion's samplers (0.1.1.post1), in its variables: x = x0 + sigma * noise and a denoiser
# ``model(x, sigma) -> denoised``, which plays the role of the model output.


def k_euler(F, sigma, sigma_next) -> dict[str, Lin]:
    """One step of ``k_diffusion.sampling.sample_euler`` without churn."""
    x, denoised = F.lin(SAMPLE), F.lin(MODEL_OUTPUT)
    sigma_hat = sigma * (0.0 + 1)
    d = (x - denoised) / sigma_hat
    dt = sigma_next - sigma_hat
    return {PREV_SAMPLE: x + d * dt}


def k_euler_ancestral(F, sigma, sigma_next, *, eta: float = 1.0,
                      s_noise: float = 1.0) -> dict[str, Lin]:
    """One step of ``sample_euler_ancestral``; it draws noise when ``sigma_next > 0``."""
    x, denoised = F.lin(SAMPLE), F.lin(MODEL_OUTPUT)
    if not eta:
        sigma_down, sigma_up = sigma_next, 0.0
    else:
        sigma_up = eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_up = sigma_up if sigma_up < sigma_next else sigma_next  # min(sigma_next, sigma_up)
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
    d = (x - denoised) / sigma
    dt = sigma_down - sigma
    x = x + d * dt
    if sigma_next > 0:
        x = x + F.lin(NOISE) * s_noise * sigma_up
    return {PREV_SAMPLE: x}


def k_dpmpp_2m(F, sigmas: Sequence) -> list[dict[str, Lin]]:
    """The steps of ``sample_dpmpp_2m``; a step after the first reads the previous step's
    denoiser output as ``model_output[-1]``."""
    s = [F.num(v) for v in sigmas]
    x, denoised = F.lin(SAMPLE), F.lin(MODEL_OUTPUT)

    def t_fn(sigma):
        return -F.log(sigma)

    def sigma_fn(t):
        return F.exp(-t)

    steps = []
    for i in range(len(s) - 1):
        t, t_next = t_fn(s[i]), t_fn(s[i + 1])
        h = t_next - t
        if i == 0 or s[i + 1] == 0:
            x_next = (sigma_fn(t_next) / sigma_fn(t)) * x - F.expm1(-h) * denoised
        else:
            h_last = t - t_fn(s[i - 1])
            r = h_last / h
            denoised_d = ((1 + 1 / (2 * r)) * denoised
                          - (1 / (2 * r)) * F.lin(lag(MODEL_OUTPUT, 1)))
            x_next = (sigma_fn(t_next) / sigma_fn(t)) * x - F.expm1(-h) * denoised_d
        steps.append({PREV_SAMPLE: x_next})
    return steps

