"""k-diffusion-style samplers: O-BELM and its exact inversion, and fused versions of k-diffusion's
own ``sample_euler``, ``sample_euler_ancestral`` and ``sample_dpmpp_2m`` (usable as ComfyUI sampler
functions).

The fused samplers take k-diffusion's arguments, call the model as it does and return what it
returns (to float32 rounding: ``tests/test_k_diffusion_samplers.py`` compares them with the
``k-diffusion`` package within the error model of :mod:`belm_kernels.roundoff`), but each step is
one :func:`belm_kernels.lincomb` with float64 coefficients from :mod:`belm_kernels.multistep`,
computed once from the sigmas, instead of k-diffusion's chain of tensor operations::

    from belm_kernels.k_diffusion import sample_dpmpp_2m
    x0 = sample_dpmpp_2m(denoiser, torch.randn(shape) * sigmas[0], sigmas)
    sampler = comfy.samplers.KSAMPLER(sample_dpmpp_2m)      # in ComfyUI

Differences, all outside the result: ``sample_euler`` draws no noise when it does not use it
(k-diffusion 0.1.1 draws ``torch.randn_like(x)`` at every step and discards it without churn, so
the global generator is left elsewhere); churn (``s_churn > 0``) is not implemented and refused;
``sample_dpmpp_2m`` keeps the previous denoiser output by reference, as k-diffusion does.

O-BELM (``sample_obelm``, ``invert_obelm``):

k-diffusion works in the variance-exploding (VE) parametrisation: the state is
``x = x0 + sigma * noise`` and the model is a denoiser, ``denoised = model(x, sigma * s_in,
**extra_args)``, returning its estimate of x0. That is exactly the ``xbar = x / alpha`` form of
DESIGN.md section 2 with ``sbar = sigma`` and ``alpha = 1`` everywhere, so the O-BELM step is

    x_{j+1} = a_j x_{j-1} + b_j x_j + c_j eps_j,     eps_j = (x_j - denoised_j) / sigma_j

with the rows of :func:`belm_kernels.coefficients.obelm` on a grid with alpha = 1 and
sigma = sigmas (so h_j = sigmas[j] - sigmas[j+1]). We substitute eps_j and feed the denoiser output
straight into the fused op, with the float64 row ``(a_j, b_j + c_j / sigma_j, -c_j / sigma_j)``:
one model call and one :func:`belm_kernels.lincomb3_` per step, no eps tensor is ever formed.
Inversion applies :func:`belm_kernels.lincomb3_inverse_` with the same rows and the same
``denoised_j = model(x_j, sigma_j)``, which is why reconstruction is exact up to rounding.

Usage with k-diffusion's conventions::

    from belm_kernels.k_diffusion import sample_obelm, invert_obelm
    x0 = sample_obelm(denoiser, torch.randn(shape) * sigmas[0], sigmas)
    x_T, x_T2 = invert_obelm(denoiser, x0, sigmas)            # N model calls
    x0_again = sample_obelm(denoiser, x_T, sigmas, x_next=x_T2)  # N-1 model calls, == x0

In ComfyUI (EPS or V-prediction models, whose sampler state is VE as above; *not* flow-matching
``CONST`` models, whose state is ``(1 - sigma) x0 + sigma noise``)::

    import comfy.samplers
    sampler = comfy.samplers.KSAMPLER(sample_obelm)   # e.g. returned by a SAMPLER node

ComfyUI's KSAMPLER calls ``sample_obelm(model, noise, sigmas, extra_args=..., callback=...,
disable=...)``; extra keyword options (``x_next``, ``backend``) can be given through its
``extra_options``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import trange

from . import coefficients, multistep
from .multistep import FLOAT64, MODEL_OUTPUT, NOISE, SAMPLE
from .ops import FLOAT_DTYPES, check_like, coef_table, lincomb, lincomb3_, lincomb3_inverse_
from .schedule import StateGrid

__all__ = ["sample_obelm", "invert_obelm", "obelm_rows", "sample_euler",
           "sample_euler_ancestral", "sample_dpmpp_2m"]

Denoiser = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------------------------
# Validation.


def _check_x(x: Any, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a float dtype {FLOAT_DTYPES}, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension (shape (B, ...)), got a 0-d tensor")


def _check_sigmas(sigmas: Any, min_steps: int, why: str) -> torch.Tensor:
    """Validate sigmas and return a float64 CPU copy (the only device sync of a run)."""
    if isinstance(sigmas, torch.Tensor):
        s = sigmas.detach()
    else:
        try:
            s = torch.as_tensor(sigmas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError("sigmas must be a 1-D tensor (or sequence) of noise levels, got "
                            f"{type(sigmas).__name__}") from None
    if s.dtype == torch.bool or s.is_complex():
        raise TypeError(f"sigmas must hold real noise levels, got dtype {s.dtype}")
    if s.dim() != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(s.shape)}")
    s = s.to("cpu", torch.float64)
    if len(s) < min_steps + 1:
        why = f" {why}" if why else ""
        raise ValueError(f"sigmas must have at least {min_steps + 1} entries ({min_steps} "
                         f"step{'s' if min_steps > 1 else ''}){why}, got {len(s)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"sigmas must be finite, got {s.tolist()}")
    if float(s[-1]) != 0.0:
        raise ValueError(f"sigmas must end in exactly 0 (the clean state), got last value "
                         f"{float(s[-1])!r}")
    if not bool((s[1:] < s[:-1]).all()):
        raise ValueError(f"sigmas must be strictly decreasing, got {s.tolist()}")
    return s


def _check_denoised(denoised: Any, x: torch.Tensor, sigma: float) -> torch.Tensor:
    if not isinstance(denoised, torch.Tensor) or not denoised.is_floating_point():
        raise TypeError(f"model must return a float tensor (the denoised x0), got "
                        f"{getattr(denoised, 'dtype', type(denoised).__name__)} at sigma={sigma:g}")
    if denoised.shape != x.shape or denoised.device != x.device:
        raise ValueError(f"model must return a tensor of x's shape {tuple(x.shape)} on "
                         f"{x.device}, got shape {tuple(denoised.shape)} on {denoised.device} "
                         f"at sigma={sigma:g}")
    return denoised


# --------------------------------------------------------------------------------------------
# Coefficients.


def _grid(sig64: torch.Tensor) -> StateGrid:
    # VE grid: alpha = 1, sigma = sbar = sigmas; the "timesteps" of the N model calls are sigmas.
    return StateGrid(timesteps=sig64[:-1], alpha=torch.ones_like(sig64), sigma=sig64)


def _denoised_form(rows: torch.Tensor, sigma_model: torch.Tensor) -> torch.Tensor:
    """(a, b, c) for z = eps  ->  (a, b + c/s, -c/s) for z = denoised, eps = (x - denoised) / s."""
    a, b, c = rows.unbind(1)
    k = c / sigma_model
    return torch.stack([a, b + k, -k], dim=1)


def obelm_rows(sigmas) -> torch.Tensor:
    """(N, 3) float64 rows of the denoised-form O-BELM step for VE ``sigmas`` (ending in 0).

    Step j (sigma_j -> sigma_{j+1}) is ``x_{j+1} = a x_{j-1} + b x_j + c model(x_j, sigma_j)``;
    row 0 is the first-order (Euler/DDIM) step used when there is no previous state.
    """
    sig64 = _check_sigmas(sigmas, 1, "")
    return _denoised_form(coefficients.obelm(_grid(sig64)), sig64[:-1])


# --------------------------------------------------------------------------------------------
# The sampler and its inversion.


def _sigma_fn(sigmas: Any, sig64: torch.Tensor, x: torch.Tensor):
    """sigma_i * s_in as the model receives it (k-diffusion: ``sigmas[i] * x.new_ones([B])``)."""
    s_in = x.new_ones([x.shape[0]])
    src = sigmas.detach() if isinstance(sigmas, torch.Tensor) else sig64.to(x.device)
    return lambda i: src[i] * s_in, src


@torch.no_grad()
def sample_obelm(model: Denoiser, x: torch.Tensor, sigmas, extra_args: dict | None = None,
                 callback: Callable[[dict], Any] | None = None, disable: bool | None = None, *,
                 x_next: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """O-BELM sampling in k-diffusion's convention; returns the clean sample at sigma = 0.

    Args:
        model: the denoiser, ``model(x, sigma * s_in, **extra_args)`` -> denoised x0 of x's
            shape (any float dtype; it is read as is by the fused op).
        x: the noisy state at ``sigmas[0]`` in VE form ``x0 + sigmas[0] * noise`` (for pure noise:
            ``torch.randn(shape) * sigmas[0]``). Not modified.
        sigmas: 1-D VE noise levels, strictly decreasing and ending in exactly 0 (a tensor on any
            device, any float dtype; a float64 CPU copy is taken once for the coefficients). The
            model is never called at sigma = 0. Without ``x_next`` at least 2 entries are needed:
            one step is a plain Euler/DDIM step, and every step after the first is O-BELM
            (second order), so use at least 3. With ``x_next`` at least 3 entries.
        extra_args: keyword arguments forwarded to every model call (conditioning, ...).
        callback: called once per step, before the update, with k-diffusion's dict
            ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` (``i`` indexes sigmas). ``'x'`` is a
            working buffer that is overwritten on the next step: copy it to keep it.
        disable: disables the tqdm progress bar (None: tqdm's default, off when not a TTY).
        x_next: the second state of an exactly inverted pair, at ``sigmas[1]`` (as returned by
            :func:`invert_obelm`); it replaces the first-order first step, so the reconstruction
            is exact and costs N-1 model calls. Same shape, dtype and device as x.
        backend: backend of the fused op ("auto", "torch", "triton", "cuda", "cpu").
    """
    _check_x(x, "x")
    if x_next is not None:
        if not isinstance(x_next, torch.Tensor):
            raise TypeError(f"x_next must be a torch.Tensor or None, got {type(x_next).__name__}")
        check_like(x_next, x, "x_next", "x")
    sig64 = _check_sigmas(sigmas, 1 if x_next is None else 2,
                          "" if x_next is None else "when x_next is given (x, x_next sit at "
                          "sigmas[0] > sigmas[1] > 0)")
    extra_args = {} if extra_args is None else extra_args
    sigma_in, sig_src = _sigma_fn(sigmas, sig64, x)
    n = len(sig64) - 1
    coef = coef_table(_denoised_form(coefficients.obelm(_grid(sig64)), sig64[:-1]), x)

    first = 0 if x_next is None else 1
    prev, cur = x.clone(), (x if x_next is None else x_next).clone()
    for i in trange(first, n, disable=disable):
        denoised = _check_denoised(model(cur, sigma_in(i), **extra_args), cur, float(sig64[i]))
        if callback is not None:
            callback({"x": cur, "i": i, "sigma": sig_src[i], "sigma_hat": sig_src[i],
                      "denoised": denoised})
        # prev <- a prev + b cur + c denoised (row 0 has a = 0: prev is a copy of cur there).
        lincomb3_(prev, cur, denoised, coef[i], backend=backend)
        prev, cur = cur, prev
    return cur


@torch.no_grad()
def invert_obelm(model: Denoiser, x0: torch.Tensor, sigmas, extra_args: dict | None = None,
                 callback: Callable[[dict], Any] | None = None, disable: bool | None = None, *,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact O-BELM inversion: the pair ``(x, x_next)`` at ``(sigmas[0], sigmas[1])``.

    ``sample_obelm(model, x, sigmas, x_next=x_next)`` rebuilds x0 up to rounding. Costs N model
    calls (N = len(sigmas) - 1 >= 2): one first-order (DDIM-inversion) step from x0 to
    ``sigmas[-2]``, evaluating ``model(x0, sigmas[-2])``, which gives the second state of the pair
    there; then N-1 algebraic inverses of the sampling steps, each with the same model call
    ``model(x_j, sigmas[j])`` the sampler makes. Arguments are those of :func:`sample_obelm`;
    the callback is called once per model call with ``i`` counting the inversion steps
    (0 .. N-1) and ``'sigma'`` the noise level given to the model.
    """
    _check_x(x0, "x0")
    sig64 = _check_sigmas(sigmas, 2, "for an inversion (the pair needs two noisy states)")
    extra_args = {} if extra_args is None else extra_args
    sigma_in, sig_src = _sigma_fn(sigmas, sig64, x0)
    n = len(sig64) - 1
    grid = _grid(sig64)
    coef = coef_table(_denoised_form(coefficients.obelm(grid), sig64[:-1]), x0)
    # DDIM inversion of the last step, eps evaluated at the clean state with noise level
    # sigmas[-2]: x_{N-1} = x0 + sigma_{N-1} (x0 - D) / sigma_{N-1}, i.e. row (0, 2, -1).
    first = coef_table(_denoised_form(coefficients.ddim_inverse(grid)[-1:], sig64[-2:-1]), x0)[0]

    prev, cur = x0.clone(), x0.clone()
    for k in trange(n, disable=disable):
        j = n - 1 if k == 0 else n - k  # sigma index of the model call
        denoised = _check_denoised(model(cur, sigma_in(j), **extra_args), cur, float(sig64[j]))
        if callback is not None:
            callback({"x": cur, "i": k, "sigma": sig_src[j], "sigma_hat": sig_src[j],
                      "denoised": denoised})
        if k == 0:
            lincomb3_(prev, cur, denoised, first, backend=backend)  # prev <- x_{N-1}
        else:
            # prev = x_{j+1}, cur = x_j  ->  prev <- x_{j-1}, undoing sampling step j exactly.
            lincomb3_inverse_(prev, cur, denoised, coef[j], backend=backend)
        prev, cur = cur, prev
    return cur, prev


# --------------------------------------------------------------------------------------------
# k-diffusion's samplers, fused.


def _k_sigmas(sigmas: Any) -> tuple[torch.Tensor, list[float]]:
    """``(sigmas as a tensor, their float64 values on the host)``, checked: 1-D, finite, at least
    one entry, every noise level the model sees (all but the last) > 0, the last >= 0. One device
    sync, here."""
    if isinstance(sigmas, torch.Tensor):
        src = sigmas.detach()
    else:
        try:
            src = torch.as_tensor(sigmas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError("sigmas must be a 1-D tensor (or sequence) of noise levels, got "
                            f"{type(sigmas).__name__}") from None
    if not src.is_floating_point():
        raise TypeError(f"sigmas must be a float tensor, got dtype {src.dtype}")
    if src.dim() != 1 or len(src) < 1:
        raise ValueError(f"sigmas must be 1-D with at least one entry, got shape "
                         f"{tuple(src.shape)}")
    host = src.to("cpu", torch.float64)
    if not bool(torch.isfinite(host).all()):
        raise ValueError(f"sigmas must be finite, got {host.tolist()}")
    if not (bool((host[:-1] > 0).all()) and float(host[-1]) >= 0):
        raise ValueError(f"sigmas must be > 0 (the last may be 0), got {host.tolist()}")
    return src, host.tolist()


def _k_run(model: Denoiser, x: torch.Tensor, sigmas, steps: list[dict], extra_args, callback,
           disable, backend: str, noise_sampler=None, sigma_dtype: bool = False) -> torch.Tensor:
    """The loop of k-diffusion's samplers, each step one fused op of ``steps`` (outputs of the
    :mod:`belm_kernels.multistep` builders): ``x`` is the sample, the denoiser's output the model
    output, ``model_output[-1]`` the previous step's. The new x has the dtype k-diffusion gives it:
    x's and the denoiser's promoted, and the sigmas' too with ``sigma_dtype`` (its ``to_d``
    divides by a sigma tensor of x's rank)."""
    if not steps:
        return x  # one sigma: no step (k-diffusion returns its x too)
    with multistep.ieee():
        table = multistep.tabulate(steps)
    flat = coef_table(torch.cat([s.coef.reshape(-1) for s in table]), x)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    offset, old_denoised = 0, None
    for i in trange(len(table), disable=disable):
        step = table[i]
        coef = flat[offset:offset + step.coef.numel()].view(step.coef.shape)
        offset += step.coef.numel()
        sigma = sigmas[i]
        denoised = _check_denoised(model(x, sigma * s_in, **extra_args), x, float(sigma))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        tensors = {SAMPLE: x, MODEL_OUTPUT: denoised, multistep.lag(MODEL_OUTPUT, 1): old_denoised}
        if step.noise:
            tensors[NOISE] = noise_sampler(sigmas[i], sigmas[i + 1])
        dtype = torch.promote_types(x.dtype, denoised.dtype)
        if sigma_dtype:
            dtype = torch.promote_types(dtype, sigmas.dtype)
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        lincomb(x, [tensors[r] for r in step.inputs[1:]], coef, out=[out], backend=backend)
        x, old_denoised = out, denoised
    return x


@torch.no_grad()
def sample_euler(model: Denoiser, x: torch.Tensor, sigmas, extra_args: dict | None = None,
                 callback: Callable[[dict], Any] | None = None, disable: bool | None = None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                 s_noise: float = 1.0, *, backend: str = "auto") -> torch.Tensor:
    """``k_diffusion.sampling.sample_euler`` (Karras et al. 2022, Algorithm 2), each step one fused
    op: ``x + (x - denoised) / sigma * (sigma_next - sigma)``.

    Arguments as k-diffusion's: ``model(x, sigma * s_in, **extra_args)`` returns the denoised x0;
    ``x`` the noisy sample at ``sigmas[0]`` (not modified); ``sigmas`` the noise levels, any device
    and dtype (the model gets them as given; the coefficients are computed from their values in
    float64); ``callback`` gets k-diffusion's dict each step; ``disable`` the progress bar.
    ``s_churn`` must be 0 (``s_tmin``, ``s_tmax``, ``s_noise`` only act with churn); ``backend``
    of the fused op.
    """
    _check_x(x, "x")
    if s_churn:
        raise ValueError(f"s_churn={s_churn!r}: the stochastic churn of sample_euler is not "
                         "implemented by the fused sampler; use k_diffusion.sampling.sample_euler")
    src, sig = _k_sigmas(sigmas)
    with multistep.ieee():
        steps = [multistep.k_euler(FLOAT64, FLOAT64.num(sig[i]), FLOAT64.num(sig[i + 1]))
                 for i in range(len(sig) - 1)]
    return _k_run(model, x, src, steps, extra_args, callback, disable, backend, sigma_dtype=True)


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x: torch.Tensor, sigmas,
                           extra_args: dict | None = None,
                           callback: Callable[[dict], Any] | None = None,
                           disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0,
                           noise_sampler: Callable | None = None, *,
                           backend: str = "auto") -> torch.Tensor:
    """``k_diffusion.sampling.sample_euler_ancestral``, each step one fused op: the Euler step to
    ``sigma_down`` plus ``s_noise * sigma_up`` times noise.

    The noise is ``noise_sampler(sigmas[i], sigmas[i + 1])`` (default: ``torch.randn_like`` of the
    initial x, from the global generator), drawn when ``sigmas[i + 1] > 0`` as k-diffusion draws
    it, so seeded runs get k-diffusion's noise. Other arguments as :func:`sample_euler`.
    """
    _check_x(x, "x")
    src, sig = _k_sigmas(sigmas)
    if noise_sampler is None:
        first = x
        noise_sampler = lambda sigma, sigma_next: torch.randn_like(first)  # noqa: E731
    with multistep.ieee():
        steps = [multistep.k_euler_ancestral(FLOAT64, FLOAT64.num(sig[i]), FLOAT64.num(sig[i + 1]),
                                             eta=eta, s_noise=s_noise)
                 for i in range(len(sig) - 1)]
    return _k_run(model, x, src, steps, extra_args, callback, disable, backend, noise_sampler,
                  sigma_dtype=True)


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas, extra_args: dict | None = None,
                    callback: Callable[[dict], Any] | None = None, disable: bool | None = None,
                    *, backend: str = "auto") -> torch.Tensor:
    """``k_diffusion.sampling.sample_dpmpp_2m`` (DPM-Solver++(2M)), each step one fused op of
    the sample, the denoiser output and the previous step's. Arguments as :func:`sample_euler`."""
    _check_x(x, "x")
    src, sig = _k_sigmas(sigmas)
    with multistep.ieee():
        steps = multistep.k_dpmpp_2m(FLOAT64, sig)
    return _k_run(model, x, src, steps, extra_args, callback, disable, backend)
