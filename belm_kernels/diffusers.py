"""Drop-in diffusers schedulers running O-BELM, and exact invert -> regenerate for SD pipelines.

``BELMScheduler`` is a diffusers scheduler (``SchedulerMixin`` + ``ConfigMixin``) that samples with
O-BELM, the second-order exact-inversion sampler (DESIGN.md section 2): the first step of a run is
a DDIM step, every later one combines the previous state, the current state and the model output
in one fused :func:`belm_kernels.lincomb3_` call. ``BELMInverseScheduler`` walks the same grid the
other way (ascending timesteps, like diffusers' ``DDIMInverseScheduler``), but exactly: it applies
:func:`belm_kernels.lincomb3_inverse_` with the same coefficients, so sampling from the pair of
states it ends with gives back the input up to rounding.

Swap it into any pipeline whose loop calls ``scheduler.step``::

    from belm_kernels.diffusers import BELMScheduler, invert
    pipe.scheduler = BELMScheduler.from_config(pipe.scheduler.config)
    image = pipe("a cat", num_inference_steps=50).images[0]

Exact inversion and regeneration (or editing: regenerate the same pair with another prompt)::

    pair = invert(pipe, image=photo, prompt="a cat", num_inference_steps=50, guidance_scale=7.5)
    pipe.scheduler.set_latent_pair(pair)
    same = pipe("a cat", latents=pair.x_T2, num_inference_steps=50, guidance_scale=7.5).images[0]
    pipe.scheduler.set_latent_pair(pair)           # a pair is used by one run only
    edit = pipe("a dog", latents=pair.x_T2, num_inference_steps=50, guidance_scale=7.5).images[0]

How the pair reaches the scheduler. Exact reconstruction needs the two noisiest states
(x_T, x_T2), and sampling from them skips the first (DDIM) step. ``set_latent_pair`` arms the
scheduler for its next run: ``set_timesteps(N)`` (which the pipeline calls) then exposes only the
N-1 timesteps after the first one, so the pipeline's loop makes N-1 model calls and starts at
x_T2 -- which is why the pipeline gets ``latents=x_T2``; the scheduler keeps x_T itself, as the
"previous state" of its first step. The first step checks that the pipeline's latents equal the
armed x_T2 (one comparison per run) and raises otherwise, and ``set_timesteps`` checks that the
grid is the one the pair was made on (same ``num_inference_steps`` and scheduler config; the
:class:`LatentPair` that :func:`invert` returns records it). The pair is consumed by that run;
later runs sample normally (the pipeline's progress bar shows N-1 of N steps for a pair run).
Classifier-free guidance must be the same in :func:`invert` and in the pipeline call (same prompt
embeddings, negative prompt and guidance scale), so that both evaluate the same eps.

Precision of the kept states (``state_dtype``). In the latents' own dtype (the default for
sampling) each regenerated state differs from the inverted one by rounding, and the model (times
the guidance scale) amplifies that from step to step: a float32 round trip through a UNet at 20
steps lands around 1e-6..3e-5 relative, depending on the guidance scale. :func:`invert` therefore
keeps its two states in float64 (``state_dtype="float64"``) and hands them over in the pair
(``pair.state``); a scheduler armed with such a pair keeps float64 states for that run and gives
the pipeline float32 roundings of them. Inversion and regeneration then evaluate the model on the
same float32 inputs, and the latents come back bit for bit in practice. Pass the pair itself to
``set_latent_pair`` (``set_latent_pair(x_T, x_T2)`` works too, without the float64 states). The
config key ``state_dtype`` ("float32" or "float64") does the same for every run, e.g. float32
states for a float16 pipeline; it costs a cast per step and the two wide buffers.

The previous state. O-BELM is a two-step method: besides the ``sample`` the pipeline passes, the
scheduler keeps the state before it. Every step overwrites that older buffer in place with the
new state and returns it, so a steady-state step costs one fused op and no allocation (with a
wider ``state_dtype``: one fused op on the wide buffers plus the cast of the result). In exchange:

* ``step`` checks that ``sample`` is the ``prev_sample`` it returned last (same tensor, not modified
  in place -- by the version counter, or under ``torch.inference_mode`` by a float64 sum); a
  tensor that is not the same object but holds the same values is accepted. Anything else (a
  callback that replaced or edited the latents, a step skipped or repeated) raises a ValueError
  that says so: the stored previous state would no longer belong to the sample.
* a returned ``prev_sample`` is a scheduler-owned buffer that the step after next rewrites. If
  anything else still holds that tensor (or a view of it) at that point, the scheduler notices
  (reference counts) and writes into a fresh buffer instead, so kept latents stay intact.

Config. The same keys as ``DDIMScheduler``'s (``from_config`` of the usual SD schedulers'
configs works; their other keys are kept in the config but unused), plus ``backend`` for the
fused op ("auto", "torch", "triton", "cuda", "cpu") and ``state_dtype``. Alphas come from
:meth:`belm_kernels.Schedule.from_betas` (or ``trained_betas``), timesteps from
:meth:`belm_kernels.Schedule.timesteps` (``timestep_spacing`` and ``steps_offset`` honoured; the
same integers as ``DDIMScheduler``), coefficients from :mod:`belm_kernels.coefficients`.
``prediction_type`` "epsilon", "v_prediction" and "sample" are supported: the conversion to eps
at the timestep the model was called with is folded into the coefficient row (float64), so it
costs nothing at run time. Treated differently from DDIM:

* ``set_alpha_to_one``: ignored (kept in the config). The last state is always the clean one
  (alpha = 1, sigma = 0), which is DDIM with ``set_alpha_to_one=True``; ``final_alpha_cumprod``
  is 1. With ``False`` DDIM's last step lands on the noise level of timestep 0 instead (sigma
  about 0.03 for SD) -- O-BELM's exactness does not depend on the choice.
* ``clip_sample`` / ``thresholding``: never applied (clipping x0 would break exact inversion;
  latent-diffusion configs disable it anyway).
* ``rescale_betas_zero_snr=True``: rejected (alpha = 0 at the last training timestep puts the
  first state at infinite sbar = sigma / alpha, where the BELM grid is undefined).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import (KarrasDiffusionSchedulers, SchedulerMixin,
                                                   SchedulerOutput)
from tqdm.auto import tqdm

from . import coefficients
from .ops import (BACKENDS, BackendUnavailableError, available_backends, check_like,
                  compute_dtype, lincomb3_, lincomb3_inverse_)
from .schedule import BETA_SCHEDULES, SPACINGS, Schedule, StateGrid

__all__ = ["BELMScheduler", "BELMInverseScheduler", "LatentPair", "invert",
           "tiny_stable_diffusion_pipeline"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
STATE_DTYPES = (None, "float32", "float64")
_COMPATIBLES = [e.name for e in KarrasDiffusionSchedulers] + ["DDIMInverseScheduler"]


# --------------------------------------------------------------------------------------------
# Who else holds a tensor: decides whether a returned buffer may be rewritten in place.


def _storage_uses(t: torch.Tensor) -> int:
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except Exception:  # an internal API; without it only the reference count is checked
        return 0


def _holders(t: torch.Tensor) -> tuple[int, int]:
    return sys.getrefcount(t), _storage_uses(t)


def _calibrate() -> tuple[int, int]:
    t = torch.empty(1)  # held by exactly one local variable, as in _BELMBase._writable_prev
    return _holders(t)


_ALONE = _calibrate()


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# The latent pair.


class LatentPair(tuple):
    """``(x_T, x_T2)``: the two noisiest states, from which :class:`BELMScheduler` regenerates.

    A plain 2-tuple (``x_T, x_T2 = pair`` works) that also remembers the timesteps of the grid it
    was made on, so that :meth:`BELMScheduler.set_latent_pair` can refuse a mismatched grid, and,
    when the inversion kept its state in a wider dtype (``state_dtype``), those two states
    (``pair.state``), from which a scheduler with the same ``state_dtype`` continues.
    """

    def __new__(cls, x_T: torch.Tensor, x_T2: torch.Tensor, timesteps: Sequence[int] | None = None,
                state: tuple[torch.Tensor, torch.Tensor] | None = None):
        pair = super().__new__(cls, (x_T, x_T2))
        pair.timesteps = None if timesteps is None else tuple(int(t) for t in timesteps)
        pair.state = None if state is None else tuple(state)
        return pair

    @property
    def x_T(self) -> torch.Tensor:
        return self[0]

    @property
    def x_T2(self) -> torch.Tensor:
        return self[1]


def _check_float_tensor(t: Any, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")


def _check_pair(x_T: Any, x_T2: Any) -> None:
    _check_float_tensor(x_T, "x_T")
    _check_float_tensor(x_T2, "x_T2")
    check_like(x_T2, x_T, "the second latent x_T2", "x_T")


# --------------------------------------------------------------------------------------------
# Shared scheduler machinery.


def _fold(rows: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
          prediction_type: str) -> torch.Tensor:
    """Rows (a, b, c) of ``a prev + b x + c eps`` rewritten for the raw model output.

    eps = p * model_output + q * x at the timestep the model was called with (alpha, sigma):
    v_prediction p = alpha, q = sigma; sample p = -alpha / sigma, q = 1 / sigma. Epsilon rows are
    returned unchanged (bit for bit the core tables).
    """
    if prediction_type == "epsilon":
        return rows.clone()
    a, b, c = rows.unbind(1)
    if prediction_type == "v_prediction":
        p, q = alpha, sigma
    else:  # "sample"
        p, q = -alpha / sigma, 1 / sigma
    return torch.stack([a, b + c * q, c * p], dim=1)


def _custom_timesteps(timesteps, num_train_timesteps: int) -> torch.Tensor:
    ts = torch.as_tensor(timesteps).detach().cpu()
    if ts.dim() != 1 or ts.numel() < 1 or ts.is_floating_point() or ts.is_complex():
        raise ValueError(f"timesteps must be a non-empty 1-D sequence of integers, got "
                         f"{timesteps!r}")
    ts = ts.to(torch.long)
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"custom timesteps must be strictly decreasing, got {ts.tolist()}")
    if int(ts.min()) < 0 or int(ts.max()) >= num_train_timesteps:
        raise ValueError(f"custom timesteps must lie in [0, {num_train_timesteps - 1}], "
                         f"got {ts.tolist()}")
    return ts


class _BELMBase(SchedulerMixin, ConfigMixin):
    """Config, grid, coefficient tables on the device and the checked two-buffer state."""

    _compatibles = _COMPATIBLES
    order = 1
    _direction = "sampling"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        rescale_betas_zero_snr: bool = False,
        backend: str = "auto",
        state_dtype: str | None = None,
    ):
        if rescale_betas_zero_snr:
            raise ValueError(
                f"{type(self).__name__} does not support rescale_betas_zero_snr=True: zero "
                "terminal SNR puts the first state at alpha = 0 (infinite sigma/alpha), where the "
                "O-BELM coefficients are undefined")
        if trained_betas is not None:
            betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
            if betas.dim() != 1 or betas.numel() != num_train_timesteps:
                raise ValueError(f"trained_betas must hold num_train_timesteps="
                                 f"{num_train_timesteps} values, got shape {tuple(betas.shape)}")
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
            self._schedule = Schedule(alphas_cumprod)
        else:
            if beta_schedule not in BETA_SCHEDULES:
                raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got "
                                 f"{beta_schedule!r}")
            self._schedule = Schedule.from_betas(beta_start, beta_end, beta_schedule,
                                                 num_train_timesteps)
        self._check_options()
        # diffusers-style attributes (float32, as the DDIM scheduler has them)
        self.alphas_cumprod = self._schedule.alphas_cumprod.to(torch.float32)
        self.final_alpha_cumprod = torch.tensor(1.0)  # the last state is always clean
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)
        self._grid: StateGrid | None = None
        self._pending_pair: LatentPair | None = None
        self._reset_run()

    # ---------------------------------------------------------------------------- config
    def _check_options(self) -> None:
        cfg = self.config
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r}: "
                             f"{type(self).__name__} supports {PREDICTION_TYPES}")
        if cfg.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got "
                             f"{cfg.timestep_spacing!r}")
        if cfg.backend != "auto" and cfg.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {cfg.backend!r}")
        if cfg.state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {cfg.state_dtype!r}")

    def _state_dtype(self, sample: torch.Tensor,
                     given: torch.Tensor | None = None) -> torch.dtype | None:
        """The dtype of the kept states: the widest of ``state_dtype`` and the dtype of the
        ``given`` state (a latent pair's), if it is wider than the sample's; else None."""
        candidates = [sample.dtype]
        if self.config.state_dtype is not None:
            candidates.append(getattr(torch, self.config.state_dtype))
        if given is not None:
            candidates.append(given.dtype)
        widest = max(candidates, key=lambda dtype: torch.finfo(dtype).bits)
        return None if torch.finfo(widest).bits <= torch.finfo(sample.dtype).bits else widest

    # ---------------------------------------------------------------------------- run state
    def _reset_run(self) -> None:
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._prev: torch.Tensor | None = None      # the state before the current sample
        self._prev_owned = False                    # True when we allocated _prev
        self._returned: torch.Tensor | None = None  # what the last step returned
        self._returned_version: int | None = None
        self._returned_fp: torch.Tensor | None = None
        self._armed: LatentPair | None = None       # the pair this run starts from
        self._hi: torch.dtype | None = None         # state_dtype of this run (when wider)
        self._prev_hi = self._cur_hi = None         # the two states in that dtype
        self._num_copies = 0                        # buffers cloned (copy-on-write); for tests

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next step (None before the first step of a run)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first step, set by the pipeline with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at ``timesteps[begin_index]`` (img2img pipelines call this)."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, int) or begin_index < 0:
            raise ValueError(f"begin_index must be a non-negative int, got {begin_index!r}")
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """The model input needs no scaling (DDIM-style schedulers); returns ``sample``."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process sqrt(ac[t]) x0 + sqrt(1 - ac[t]) noise, as DDIMScheduler computes it."""
        if self.alphas_cumprod.device != original_samples.device:
            self.alphas_cumprod = self.alphas_cumprod.to(original_samples.device)
        ac = self.alphas_cumprod.to(original_samples.dtype)[timesteps.to(original_samples.device)]
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        scale = (ac**0.5).flatten().reshape(shape)
        noise_scale = ((1 - ac) ** 0.5).flatten().reshape(shape)
        return scale * original_samples + noise_scale * noise

    # ---------------------------------------------------------------------------- grid
    def set_timesteps(self, num_inference_steps: int | None = None,
                      device: str | torch.device | None = None,
                      timesteps: Sequence[int] | torch.Tensor | None = None) -> None:
        """Build the grid of ``num_inference_steps`` model timesteps (or the given descending
        ``timesteps``) plus the clean state, move the coefficient tables to ``device`` once, and
        start a new run."""
        self._check_options()
        T = self.config.num_train_timesteps
        if timesteps is not None:
            if num_inference_steps is not None:
                raise ValueError("pass either num_inference_steps or timesteps, not both")
            ts = _custom_timesteps(timesteps, T)
        elif num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps (or custom timesteps)")
        else:
            ts = self._schedule.timesteps(num_inference_steps, self.config.timestep_spacing,
                                          self.config.steps_offset)
        self._grid = self._schedule.grid(ts)
        self._grid_ts = tuple(ts.tolist())
        self.num_inference_steps = len(ts)
        # resolved ("cuda" -> "cuda:0"), so that it equals the device of the samples
        self._device = torch.empty(0, device=device).device
        self._rows64 = self._tables(self._grid, self.config.prediction_type)
        self._row_cache: dict[tuple[torch.device, torch.dtype], dict[str, list[torch.Tensor]]] = {}
        self._rows(self._device, torch.float32)
        backend = self.config.backend
        if backend != "auto" and backend not in available_backends(self._device):
            raise BackendUnavailableError(
                f"backend {backend!r} is not available on {self._device} (available: "
                f"{available_backends(self._device)}); use backend='auto' or one of those")
        self._expose()

    def _expose(self) -> None:
        """Publish ``timesteps`` for the next run and reset the run state."""
        self._reset_run()
        host = self._exposed_timesteps()
        self._ts_host = host
        self.timesteps = torch.tensor(host, dtype=torch.long, device=self._device)

    def _rows(self, device: torch.device, dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
        """Coefficient rows on ``device`` in the op's compute dtype, as a list of (3,) views."""
        key = (device, compute_dtype(dtype))
        rows = self._row_cache.get(key)
        if rows is None:
            rows = {}
            for kind, table in self._rows64.items():
                table = table.to(device=device, dtype=key[1]).contiguous()
                rows[kind] = list(table.unbind(0))
            self._row_cache[key] = rows
        return rows

    # ---------------------------------------------------------------------------- stepping
    def _locate(self, timestep) -> tuple[int | None, int]:
        """``(index, value)`` of ``timestep``; index is known when it is a 0-d view of
        ``self.timesteps`` (what a pipeline's loop yields), resolved from its storage offset
        with no device sync. Other values are read (``.item()``) and compared by value.
        """
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single value, got a tensor of shape "
                                 f"{tuple(timestep.shape)}")
            ts = self.timesteps
            if (timestep.device == ts.device and timestep.dtype == ts.dtype
                    and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()):
                i = timestep.storage_offset() - ts.storage_offset()
                if 0 <= i < len(self._ts_host):
                    return i, self._ts_host[i]
            timestep = timestep.item()
        if isinstance(timestep, float):
            if not timestep.is_integer():
                raise ValueError(self._not_in_schedule(timestep))
            timestep = int(timestep)
        try:
            return None, int(timestep)
        except (TypeError, ValueError):
            raise TypeError(f"timestep must be an int or a tensor, got "
                            f"{type(timestep).__name__}") from None

    def _resolve_step(self, timestep) -> int:
        """The index of this step in ``timesteps``, after checking it is the expected one."""
        index, value = self._locate(timestep)
        host = self._ts_host
        k = self._step_index
        if k is None:  # first step of the run
            k = self._begin_index
            if k is None:
                if index is not None:
                    k = index
                elif value in host:
                    k = host.index(value)
                else:
                    raise ValueError(self._not_in_schedule(value))
        if k >= len(host):
            raise ValueError(f"all {len(host)} steps of this schedule are done (step_index={k}); "
                             "call set_timesteps to start a new run")
        if (index == k) if index is not None else (value == host[k]):
            return k
        if value not in host:
            raise ValueError(self._not_in_schedule(value))
        raise ValueError(
            f"timestep {value} is not the next one of the schedule: step {k} of {len(host)} "
            f"expects timestep {host[k]}. O-BELM is a two-step method, so steps must follow the "
            "timesteps in order; call set_timesteps to restart")

    def _not_in_schedule(self, value) -> str:
        return (f"timestep {value} is not in the schedule set by set_timesteps "
                f"(timesteps {list(self._ts_host)})")

    def _check_sample(self, sample: torch.Tensor) -> None:
        """Raise unless ``sample`` is (a value-identical copy of) the last returned tensor."""
        ret = self._returned
        restart = "call set_timesteps to restart the run"
        if self._returned_version is not None:
            modified = ret._version != self._returned_version
        elif self._returned_fp is not None:
            modified = not bool(_fingerprint(ret) == self._returned_fp)
        else:
            modified = False
        if modified:
            raise ValueError(
                "the prev_sample returned by the previous step() was modified in place (by a "
                "pipeline callback?): O-BELM keeps the state before it, which no longer belongs "
                "to the modified sample, so continuing would silently give a wrong result; "
                f"{restart}")
        if sample is ret:
            return
        if (sample.shape != ret.shape or sample.dtype != ret.dtype or sample.device != ret.device
                or not torch.equal(sample, ret)):
            what = ("different values" if sample.shape == ret.shape and sample.dtype == ret.dtype
                    and sample.device == ret.device else
                    f"shape {tuple(sample.shape)}, dtype {sample.dtype}, device {sample.device} "
                    f"instead of {tuple(ret.shape)}, {ret.dtype}, {ret.device}")
            raise ValueError(
                "the sample passed to step() is not the prev_sample returned by the previous step "
                f"({what}; was it modified or replaced by a callback?). O-BELM keeps the previous "
                "state, which does not belong to this sample, so continuing would silently give "
                f"a wrong result; {restart}")

    def _check_model_output(self, model_output, sample) -> None:
        _check_float_tensor(sample, "sample")
        _check_float_tensor(model_output, "model_output")
        if model_output.shape != sample.shape or model_output.device != sample.device:
            raise ValueError(f"model_output must have the sample's shape {tuple(sample.shape)} "
                             f"and device {sample.device}, got {tuple(model_output.shape)} on "
                             f"{model_output.device}")

    def _writable_prev(self) -> torch.Tensor:
        """Take the previous state to be overwritten; clone it unless it is ours alone."""
        prev, owned = self._prev, self._prev_owned
        self._prev = None
        if not owned or any(h > a for h, a in zip(_holders(prev), _ALONE)):
            prev = prev.clone()
            self._num_copies += 1
        return prev

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor,
             sample: torch.Tensor, return_dict: bool = True) -> SchedulerOutput | tuple:
        """One step from ``sample`` at ``timestep`` with the model's output there.

        Returns ``SchedulerOutput(prev_sample)`` (or a 1-tuple with ``return_dict=False``). Unless
        ``state_dtype`` is wider than the sample's dtype, the returned tensor is rewritten by the
        step after next (see the module docstring).
        """
        if self._grid is None:
            raise ValueError(f"{type(self).__name__}.step() was called before set_timesteps(): "
                             "call set_timesteps(num_inference_steps, device) first")
        self._check_model_output(model_output, sample)
        k = self._resolve_step(timestep)
        first = self._step_index is None
        if first:
            kind, j, prev, prev_hi, cur_hi = self._start(k, sample)
            self._hi = self._state_dtype(sample, prev_hi)
        else:
            self._check_sample(sample)
            kind, j = self._plan(k)
        op = lincomb3_inverse_ if self._direction == "inversion" and kind == "two" else lincomb3_
        hi = self._hi
        if hi is None:
            if first:
                self._prev, self._prev_owned = prev, False
            out = self._writable_prev()
            try:
                op(out, sample, model_output, self._rows(sample.device, sample.dtype)[kind][j],
                   backend=self.config.backend)
            except BaseException:  # the op checks before writing: keep the state, allow a retry
                self._prev, self._prev_owned = out, True
                raise
            # the sample becomes the previous state: ours if it is what we returned last time
            self._prev_owned = not first and sample is self._returned
        else:
            if first:
                wide = dict(device=sample.device, dtype=hi, copy=True)
                x = (prev if prev_hi is None else prev_hi).to(**wide)
                cur = (sample if cur_hi is None else cur_hi).to(**wide)
            else:
                x, cur = self._prev_hi, self._cur_hi
            op(x, cur, model_output, self._rows(sample.device, hi)[kind][j],
               backend=self.config.backend)
            self._prev_hi, self._cur_hi = cur, x
            out = x.to(sample.dtype)  # a fresh tensor each step: nothing of ours is exposed
        if first:
            self._armed = self._pending_pair = None  # a latent pair is consumed by its run
        self._prev = sample
        self._returned = out
        if out.is_inference():
            self._returned_version, self._returned_fp = None, _fingerprint(out)
        else:
            self._returned_version, self._returned_fp = out._version, None
        self._step_index = k + 1
        if not return_dict:
            return (out,)
        return SchedulerOutput(prev_sample=out)

    # Subclasses: the exposed timesteps, the float64 tables and which row each step uses.
    def _exposed_timesteps(self) -> list[int]:
        raise NotImplementedError

    def _tables(self, grid: StateGrid, prediction_type: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _start(self, k: int, sample: torch.Tensor):
        """First step of a run: (table, row, previous state, its wide copy or None, the
        sample's wide copy or None)."""
        raise NotImplementedError

    def _plan(self, k: int) -> tuple[str, int]:
        """Later steps: (table, row)."""
        raise NotImplementedError


class BELMScheduler(_BELMBase):
    """O-BELM sampling as a diffusers scheduler (first step DDIM, then the two-step update).

    Config keys as ``DDIMScheduler`` (see the module docstring for ``set_alpha_to_one``,
    ``clip_sample`` and ``rescale_betas_zero_snr``) plus ``backend`` for the fused op.
    ``set_latent_pair(pair)`` arms the next run to regenerate exactly from an inverted pair.
    """

    def set_latent_pair(self, x_T: torch.Tensor | LatentPair, x_T2: torch.Tensor | None = None,
                        *, timesteps: Sequence[int] | None = None) -> None:
        """Arm the next run to start from the pair ``(x_T, x_T2)`` made by :func:`invert` or
        :class:`BELMInverseScheduler`.

        The next ``set_timesteps(N)`` then exposes N-1 timesteps (the first step is skipped) and
        the run must be started with ``sample == x_T2`` (``pipe(..., latents=x_T2)``); x_T stays
        here as the previous state. Given a :class:`LatentPair` as the only argument, its
        timesteps are checked against the grid (or pass ``timesteps``) and its wide states
        (``pair.state``, from ``invert``) are continued in their dtype, for a bit-exact result.
        """
        state = None
        if x_T2 is None:
            if not isinstance(x_T, tuple) or len(x_T) != 2:
                raise TypeError("set_latent_pair takes (x_T, x_T2) or a LatentPair")
            if timesteps is None:
                timesteps = getattr(x_T, "timesteps", None)
            state = getattr(x_T, "state", None)
            x_T, x_T2 = x_T
        _check_pair(x_T, x_T2)
        if state is not None:
            _check_pair(*state)
            if state[0].shape != x_T.shape:
                raise ValueError(f"the pair's state has shape {tuple(state[0].shape)}, its "
                                 f"latents {tuple(x_T.shape)}")
        self._pending_pair = LatentPair(x_T, x_T2, timesteps, state)
        if self._grid is not None:
            self._expose()

    def _exposed_timesteps(self) -> list[int]:
        pair = self._pending_pair
        if pair is None:
            self._offset = 0
            return list(self._grid_ts)
        if len(self._grid_ts) < 2:
            raise ValueError("a latent pair needs at least 2 timesteps")
        if pair.timesteps is not None and pair.timesteps != self._grid_ts:
            raise ValueError(
                f"the latent pair was made on the timesteps {list(pair.timesteps)} "
                f"({len(pair.timesteps)} steps) but the scheduler is set to {list(self._grid_ts)} "
                f"({len(self._grid_ts)} steps): invert and regenerate with the same "
                "num_inference_steps and scheduler config")
        self._offset = 1
        return list(self._grid_ts[1:])

    def _expose(self) -> None:
        super()._expose()
        self._armed = self._pending_pair

    def _tables(self, grid, prediction_type):
        n = grid.num_steps
        alpha, sigma = grid.alpha[:n], grid.sigma[:n]  # of the timestep each row's model call uses
        return {"first": _fold(coefficients.ddim(grid), alpha, sigma, prediction_type),
                "two": _fold(coefficients.obelm(grid), alpha, sigma, prediction_type)}

    def _start(self, k, sample):
        pair = self._armed
        if pair is None:  # no previous state: a DDIM step (its row has a zero leading coefficient)
            return "first", k, sample, None, None
        if k != 0:
            raise ValueError(f"a run armed with set_latent_pair must start at the first step, "
                             f"got step {k} (set_begin_index and a latent pair do not mix)")
        x_T, x_T2 = pair
        for what in ("shape", "dtype"):
            if getattr(sample, what) != getattr(x_T2, what):
                raise ValueError(f"the sample of the first step must be the x_T2 given to "
                                 f"set_latent_pair (pass latents=x_T2 to the pipeline): its {what} "
                                 f"is {getattr(sample, what)}, x_T2's is {getattr(x_T2, what)}")
        if not torch.equal(sample, x_T2.to(sample.device)):
            raise ValueError("the sample of the first step is not the x_T2 given to "
                             "set_latent_pair: pass latents=x_T2 to the pipeline (not x_T) "
                             "and keep num_inference_steps and the scheduler config of invert()")
        state = pair.state or (None, None)
        return "two", k + self._offset, x_T.to(sample.device), state[0], state[1]

    def _plan(self, k):
        return "two", k + self._offset


class BELMInverseScheduler(_BELMBase):
    """Exact O-BELM inversion as a diffusers scheduler: the mirror of ``DDIMInverseScheduler``.

    For a grid t_0 > ... > t_{N-1} (the same as :class:`BELMScheduler` with this config and
    ``num_inference_steps``) it runs N steps from the clean latent. ``timesteps`` ascend:
    ``[t_{N-1}, t_{N-1}, t_{N-2}, ..., t_1]`` -- the first step is a DDIM inversion step that
    evaluates the model on the clean latent at t_{N-1} (as DDIMInverseScheduler does), each later
    one the exact inverse of an O-BELM step, evaluating the model at its own state and timestep
    (so t_{N-1} appears twice and t_0 not at all). After the last step, ``latent_pair`` holds
    ``(x_T, x_T2)``; the last ``prev_sample`` is x_T.
    """

    _direction = "inversion"

    def _exposed_timesteps(self) -> list[int]:
        ts = self._grid_ts
        return [ts[-1]] + list(ts[:0:-1])

    def _tables(self, grid, prediction_type):
        n = grid.num_steps
        alpha, sigma = grid.alpha[:n], grid.sigma[:n]
        first = _fold(coefficients.ddim_inverse(grid), alpha, sigma, prediction_type)
        return {"first": first[n - 1:], "two": _fold(coefficients.obelm(grid), alpha, sigma,
                                                      prediction_type)}

    def _start(self, k, sample):
        if k != 0:
            raise ValueError(f"{type(self).__name__} must start at the clean state (step 0), got "
                             f"step {k}")
        return "first", 0, sample, None, None

    def _plan(self, k):
        return "two", len(self._ts_host) - k

    @property
    def latent_pair(self) -> LatentPair:
        """``(x_T, x_T2)`` after the last step of the inversion, ready for
        :meth:`BELMScheduler.set_latent_pair`."""
        n = len(self._ts_host) if self._grid is not None else 0
        if self._grid is None or self._step_index != n:
            done = self._step_index or 0
            raise ValueError(f"the inversion is not finished ({done} of {n} steps done): "
                             "latent_pair is available after the last step")
        state = None if self._hi is None else (self._cur_hi, self._prev_hi)
        return LatentPair(self._returned, self._prev, self._grid_ts, state)


# --------------------------------------------------------------------------------------------
# Inversion through a Stable Diffusion pipeline.


def _batch_size(prompt, prompt_embeds) -> int:
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, (list, tuple)):
        return len(prompt)
    if prompt_embeds is None:
        raise ValueError("invert needs prompt or prompt_embeds (the conditioning used to "
                         "regenerate)")
    return prompt_embeds.shape[0]


@torch.no_grad()
def invert(pipe, image=None, latents: torch.Tensor | None = None, prompt=None,
           prompt_embeds: torch.Tensor | None = None, negative_prompt=None,
           negative_prompt_embeds: torch.Tensor | None = None, num_inference_steps: int = 50,
           guidance_scale: float = 7.5, generator: torch.Generator | None = None,
           height: int | None = None, width: int | None = None, backend: str | None = None,
           state_dtype: str | None = "float64", progress: bool = True) -> LatentPair:
    """Invert an image (or its latents) exactly with O-BELM through ``pipe``'s UNet.

    Works with ``StableDiffusionPipeline`` and pipelines with the same components (``unet``,
    ``vae``, ``encode_prompt``). ``image`` goes through ``pipe.image_processor`` and the VAE
    encoder (posterior mean times ``scaling_factor``; drawn with ``generator`` if one is given);
    or pass clean ``latents``. Classifier-free guidance is applied exactly as the pipeline's loop
    does (``guidance_scale > 1``: the batch [negative, positive], ``uncond + g * (text - uncond)``,
    no guidance rescale), so the regeneration evaluates the same eps. The grid is the one
    ``pipe.scheduler.config`` gives for ``num_inference_steps``; ``backend`` defaults to that
    config's (or "auto"). ``state_dtype`` is the dtype the inversion keeps its two states in
    (float64 by default; None: the latents' dtype): the pair carries them (``pair.state``) and a
    :class:`BELMScheduler` armed with the pair continues in that dtype, which makes the
    regeneration exact to the last bit in practice. N model calls.

    Returns the :class:`LatentPair` ``(x_T, x_T2)`` in the pipeline's latent dtype; regenerate
    with ``pipe.scheduler.set_latent_pair(pair)`` (a :class:`BELMScheduler`) and
    ``pipe(prompt, latents=pair.x_T2, num_inference_steps=..., guidance_scale=...)``.
    """
    if (image is None) == (latents is None):
        raise ValueError("invert needs exactly one of image or latents")
    device = pipe._execution_device
    do_cfg = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
    if image is not None:
        pixels = pipe.image_processor.preprocess(image, height=height, width=width)
        pixels = pixels.to(device=device, dtype=pipe.vae.dtype)
        dist = pipe.vae.encode(pixels).latent_dist
        latents = dist.mean if generator is None else dist.sample(generator)
        shift = getattr(pipe.vae.config, "shift_factor", None)
        if shift:
            latents = latents - shift
        latents = latents * pipe.vae.config.scaling_factor
    _check_float_tensor(latents, "latents")
    batch = _batch_size(prompt, prompt_embeds)
    if latents.shape[0] % batch:
        raise ValueError(f"the latents' batch {latents.shape[0]} is not a multiple of the prompt "
                         f"batch {batch}")
    per_prompt = latents.shape[0] // batch
    cond, uncond = pipe.encode_prompt(prompt, device, per_prompt, do_cfg, negative_prompt,
                                      prompt_embeds=prompt_embeds,
                                      negative_prompt_embeds=negative_prompt_embeds)
    embeds = torch.cat([uncond, cond]) if do_cfg else cond
    latents = latents.to(device=device, dtype=cond.dtype)

    timestep_cond = None
    if pipe.unet.config.time_cond_proj_dim is not None:  # guidance-distilled UNets (LCM)
        w = torch.tensor(guidance_scale - 1).repeat(latents.shape[0])
        timestep_cond = pipe.get_guidance_scale_embedding(
            w, embedding_dim=pipe.unet.config.time_cond_proj_dim).to(device=device,
                                                                     dtype=latents.dtype)

    options = {} if backend is None else {"backend": backend}
    inverse = BELMInverseScheduler.from_config(pipe.scheduler.config, state_dtype=state_dtype,
                                               **options)
    inverse.set_timesteps(num_inference_steps, device=device)
    with tqdm(total=len(inverse.timesteps), disable=not progress, desc="O-BELM inversion",
              unit="step") as bar:
        for t in inverse.timesteps:
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = inverse.scale_model_input(model_input, t)
            noise_pred = pipe.unet(model_input, t, encoder_hidden_states=embeds,
                                   timestep_cond=timestep_cond, return_dict=False)[0]
            if do_cfg:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
            latents = inverse.step(noise_pred, t, latents, return_dict=False)[0]
            bar.update()
    return inverse.latent_pair


# --------------------------------------------------------------------------------------------
# A tiny random Stable Diffusion pipeline, built offline (tests, examples, CI).


def _tiny_tokenizer():
    import string

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + "!?.,'-":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_stable_diffusion_pipeline(seed: int = 0, *, scheduler=None, sample_size: int = 16,
                                   dtype: torch.dtype = torch.float32, device="cpu"):
    """A ``StableDiffusionPipeline`` of tiny random components (no download, a few MB).

    UNet (block_out_channels (32, 64), cross_attention_dim 32), a 2x VAE (images are
    ``2 * sample_size`` pixels square; its scaling_factor gives latents of about unit std), a
    2-layer CLIP text encoder and a character-level CLIP tokenizer built in memory
    (model_max_length 77), so text prompts work. The default scheduler
    is a DDIMScheduler with SD 1.x's betas and steps_offset. Seeded; the global RNG is untouched.
    Images are noise-like (the weights are random): use it to check plumbing and exactness.
    """
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            norm_num_groups=32)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=32, sample_size=2 * sample_size,
            scaling_factor=4.0)  # like SD's 0.18215: image latents of about unit std
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
            pad_token_id=1, layer_norm_eps=1e-5))
    if scheduler is None:
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)
