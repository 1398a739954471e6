"""``fuse(scheduler)``: the diffusers scheduler you already use, each step one fused op.

    import belm_kernels as bk
    pipe.scheduler = bk.diffusers.fuse(pipe.scheduler)

``fuse`` returns a scheduler of a subclass of the original's class
(``FusedDPMSolverMultistepScheduler`` for a ``DPMSolverMultistepScheduler``, ...) with the
original's config and state. Everything but
``step`` is the original's own code: ``set_timesteps`` (with the arguments the original takes),
``timesteps``, ``sigmas``, ``init_noise_sigma``, ``order``, ``scale_model_input``, ``add_noise``,
``step_index`` / ``begin_index``. ``set_timesteps`` then builds the float64 coefficient tables of
the run (:mod:`belm_kernels.multistep`) from the grid the original just computed (or keeps the
previous run's, and its history buffers, when the grid and config are the same), and ``step`` is
one :func:`belm_kernels.lincomb` call: one pass over the sample, the model output, the scheduler's
history and (for the stochastic samplers) a noise tensor, writing the new sample, the history entry
and the original's second output (``pred_original_sample``, LCM's ``denoised``) together.

Semantics, as diffusers':

* ``step`` returns fresh tensors and never writes a tensor it returned or was given; the
  multistep history (DPM-Solver's data predictions, UniPC's converted outputs and corrected
  sample) lives in buffers the scheduler owns (a ring with a spare slot), not in
  ``model_outputs`` / ``last_sample``, which stay unset;
* noise is drawn at the point, with the generator, shape, dtype and device the original draws
  it, so seeded runs give the original's noise;
* a step locates its timestep without a device sync when it is an element of ``timesteps`` (what a
  pipeline's loop passes: the index follows from the tensor's storage offset, then diffusers' rule
  for repeated timesteps applies), so a whole sampling loop can be captured in one CUDA graph;
* options the fused step does not implement (thresholding, clipping, learned variance, churn,
  per-token timesteps, ``solver_p``, the deprecated DPM-Solver algorithm types, ...) raise
  :class:`UnsupportedOptionError` naming them -- ``fuse`` never silently changes a result.

Accuracy: each output equals the original's up to float32 rounding, within the bound of
:mod:`belm_kernels.roundoff` (the original's own float32 error, which dominates, plus the fused
op's); ``tests/test_fused_schedulers.py`` checks it against the installed diffusers.

Saving. ``save_config`` writes the original's config under the fused class's name; ``from_config``
of either class reads it. A pipeline saved with a fused scheduler records
``belm_kernels.diffusers.fused`` in ``model_index.json`` and loads back fused once
``belm_kernels.diffusers`` is imported (diffusers only loads from imported modules); to load it
without belm_kernels, pass the plain scheduler::

    plain = DPMSolverMultistepScheduler.from_pretrained(path, subfolder="scheduler")
    pipe = DiffusionPipeline.from_pretrained(path, scheduler=plain)
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteSchedulerOutput,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteSchedulerOutput,
)
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

# SchedulerMixin: diffusers' pipeline loader looks the base class up in the namespace of the
# module that model_index.json names (this one, for a saved pipeline with a fused scheduler).
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput  # noqa: F401
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from .. import multistep
from ..multistep import DENOISED, FLOAT64, MODEL_OUTPUT, NOISE, PRED_ORIGINAL, PREV_SAMPLE, SAMPLE
from ..ops import (
    BACKENDS,
    _apply,
    _kernel_direct,
    _lincomb_ext,
    compute_dtype,
    lincomb,
    lincomb_,
)

logger = logging.get_logger(__name__)

__all__ = ["fuse", "UnsupportedOptionError", "FUSED_SCHEDULERS"]


class UnsupportedOptionError(ValueError):
    """A scheduler option (or ``step`` argument) the fused step does not implement."""


class _Plan(NamedTuple):
    """A step, ready to run. Its operands are indices into ``(sample, model_output, noise, *ring
    slots)``, the run's history rings laid out one after another (see :func:`_ring_layout`):
    ``x`` (None: the update is in place on ``outputs[0]``), the ``terms``, and per output its
    role and index (None: a fresh tensor). ``coef``: on the device in the compute dtype.
    ``in_noise``: the same step written into the noise tensor the scheduler drew (``prev_sample``
    is the noise, updated in place), which saves the allocation of ``prev_sample``."""

    x: int | None
    terms: tuple[int, ...]
    outputs: tuple[tuple[str, int | None], ...]
    roles: tuple[str, ...]  # the outputs' roles, in order
    coef: torch.Tensor
    step: multistep.Step
    in_noise: _Plan | None = None


_ARGS = {SAMPLE: 0, MODEL_OUTPUT: 1, NOISE: 2}


def _randn(shape, generator, device, dtype):
    """``diffusers.utils.torch_utils.randn_tensor``, the same numbers; one op in the common case
    (one generator on the tensor's device, or none)."""
    if generator is None or (not isinstance(generator, list)
                             and generator.device.type == torch.device(device).type):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


class FusedSchedulerMixin:
    """What every fused scheduler shares: the options check, the tables, the sync-free step
    location, the history ring and the fused step. Subclasses name their original's outputs and
    implement ``_check_options``, ``_dtype``, ``fused_steps`` and ``step``."""

    _fused_backend = "auto"
    _fused_grid = None  # set by set_timesteps: the host copy of the grid
    #: The ``step`` arguments the coefficients depend on, at their defaults (DDIM's ``eta``).
    _default_step_args: dict = {}
    #: The outputs of ``step``, in the order of the original's tuple (``return_dict=False``).
    fused_outputs: tuple[str, ...] = (PREV_SAMPLE,)

    # ------------------------------------------------------------------ options
    def _unsupported(self, option: str, value, why: str = "",
                     instead: str = "use the original scheduler for it"
                     ) -> UnsupportedOptionError:
        original = type(self).__bases__[-1].__name__  # (FusedSchedulerMixin, the original)
        return UnsupportedOptionError(
            f"{original} with {option}={value!r} is not implemented by the fused step"
            f"{' (' + why + ')' if why else ''}; {instead}")

    def _refuse_true(self, *options: str) -> None:
        for option in options:
            value = self.config.get(option, False)
            if value:
                raise self._unsupported(option, value)

    def _check_options(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ grid and tables
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        original = cls.__bases__[-1].set_timesteps

        # The original's signature (pipelines inspect it for ``sigmas``, ``timesteps``, ``mu``).
        @functools.wraps(original)
        def set_timesteps(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self._fused_reset()

        cls.set_timesteps = set_timesteps

    def _fused_reset(self) -> None:
        """After the original's ``set_timesteps``: check the options (``mu`` may change the
        config), copy the grid to the host, and drop the tables and history buffers unless the
        grid is the previous one (a pipeline called again with the same number of steps)."""
        self._check_options()
        self._fused_grid = self._grid()
        self._ts_host = self.timesteps.tolist()
        # What the tables are computed from (the config by identity: register_to_config makes a
        # new one).
        source = (self._fused_grid, self._ts_host, self.num_inference_steps, self.config)
        old = getattr(self, "_table_source", None)
        if old is None or old[:3] != source[:3] or old[3] is not source[3]:
            self._table_source = source
            self._plans: dict = {}
            self._slots: tuple[torch.Tensor, ...] = ()
        self._run_start: int | None = None
        self._run_plans: tuple = (None, None)  # ((device, dtype), plans of the run from start)
        self._out_dtypes: dict = {}
        # The tables of a run from the first step, on the timesteps' device: built here, so that
        # the steps of such a run only read them (no copy to the device inside a CUDA graph).
        self._plans_for(0, self.timesteps.device, torch.float32, **self._default_step_args)

    def _grid(self) -> dict:
        return {"sigmas": self.sigmas.double().tolist()}

    def fused_steps(self, F, start: int = 0, **step_args) -> list[dict]:
        """The outputs (``{role: Lin}``) of steps ``start`` .. N-1 of a run that starts at step
        ``start``, in the number system ``F`` (:mod:`belm_kernels.multistep`): ``FLOAT64`` for
        the tables, :class:`belm_kernels.roundoff.Roundoff` for error bounds. ``step_args``: the
        ``step`` arguments the coefficients depend on (DDIM's ``eta``)."""
        raise NotImplementedError

    def fused_table(self, start: int = 0, **step_args) -> list[multistep.Step]:
        """The float64 :class:`~belm_kernels.multistep.Step` table of a run from ``start`` (built
        once per grid)."""
        key = ("table", start, *sorted(step_args.items()))
        table = self._plans.get(key)
        if table is None:
            with multistep.ieee():
                table = self._plans[key] = multistep.tabulate(
                    self.fused_steps(FLOAT64, start, **step_args))
        return table

    def _plans_for(self, start: int, device: torch.device, dtype: torch.dtype,
                   **step_args) -> list[_Plan]:
        key = (start, device, compute_dtype(dtype), *sorted(step_args.items()))
        plans = self._plans.get(key)
        if plans is None:
            table = self.fused_table(start, **step_args)
            plans = self._plans[key] = _make_plans(table, start, device, compute_dtype(dtype))
        return plans

    # ------------------------------------------------------------------ locating a step
    def _view_index(self, timestep) -> int | None:
        """The index in ``timesteps`` of a one-element view of it (what a pipeline's loop yields),
        from storage offsets: no device sync. None for anything else."""
        if not isinstance(timestep, torch.Tensor) or timestep.numel() != 1:
            return None
        ts = self.timesteps
        if (timestep.device != ts.device or timestep.dtype != ts.dtype or ts.dim() != 1
                or timestep.untyped_storage().data_ptr() != ts.untyped_storage().data_ptr()):
            return None
        offset = timestep.storage_offset() - ts.storage_offset()
        i, rem = divmod(offset, ts.stride(0)) if ts.stride(0) else (None, 1)
        return i if rem == 0 and 0 <= i < len(self._ts_host) else None

    def _init_step_index(self, timestep) -> None:
        """As the original's, without a device sync for an element of ``timesteps``: diffusers'
        ``index_for_timestep`` rule (the second of repeated timesteps) applied to the host copy.
        Starts a fused run there."""
        i = self._view_index(timestep) if self._fused_grid is not None else None
        if self.begin_index is None and i is not None:
            value = self._ts_host[i]
            hits = [j for j, t in enumerate(self._ts_host) if t == value]
            self._step_index = hits[1] if len(hits) > 1 else hits[0]
        else:
            super()._init_step_index(timestep)
        self._run_start = self._step_index
        self._run_plans = (None, None)

    def _start_step(self, timestep) -> int:
        """The step index of this call (the first call of a run locates it)."""
        if self.num_inference_steps is None or self._fused_grid is None:
            raise ValueError("Number of inference steps is 'None', you need to run "
                             "'set_timesteps' after creating the scheduler")
        if self.step_index is None:
            self._init_step_index(timestep)
        if self._run_start is None:
            raise ValueError(f"{type(self).__name__} was made from a scheduler in the middle of a "
                             f"run (step_index={self.step_index}); call set_timesteps to start one")
        k = self.step_index
        if not self._run_start <= k < len(self._ts_host):
            raise IndexError(f"step index {k} is past the last of the {len(self._ts_host)} steps "
                             "of this schedule; call set_timesteps to start a new run")
        return k

    # ------------------------------------------------------------------ the fused step
    def _dtype(self, role: str, sample: torch.Tensor, model_output: torch.Tensor) -> torch.dtype:
        """The dtype the original gives output ``role``."""
        raise NotImplementedError

    def _noise_dtype(self, sample: torch.Tensor, model_output: torch.Tensor) -> torch.dtype:
        """The dtype the original draws its noise in (at the steps where it draws any)."""
        return model_output.dtype

    def fused_input_scales(self, start: int = 0) -> torch.Tensor | None:
        """What ``scale_model_input`` does at steps ``start`` ..: it returns ``sample / d[k -
        start]``, dividing by an element of this CPU tensor (as the original does), or the
        sample as it is (None). The batched stepper scales each request's model input with it."""
        return None

    def _run(self, plan: _Plan, sample, model_output, noise=None,
             drawn: bool = False) -> dict[str, torch.Tensor]:
        """One fused op: the outputs of ``plan`` (and their aliases) by role. ``drawn``: the noise
        was drawn here (not given), so ``prev_sample`` may be written into it. Every step runs
        this, so it is kept to a few lookups: on a latent of SD 1.5's size the kernel takes a few
        microseconds."""
        if (drawn and plan.in_noise is not None
                and noise.dtype == self._out_dtype(PREV_SAMPLE, sample, model_output)
                and noise.is_contiguous()):
            plan = plan.in_noise
        operands = (sample, model_output, noise, *self._slots)
        x = None if plan.x is None else operands[plan.x]
        terms = [operands[i] for i in plan.terms]
        # empty_like: a third of the cost of torch.empty(shape, dtype=, device=) here.
        outs = [operands[i] if i is not None else torch.empty_like(
                    sample, dtype=self._out_dtype(role, sample, model_output),
                    memory_format=torch.contiguous_format)
                for role, i in plan.outputs]
        if self._direct_kernel(outs[0] if x is None else x, sample, model_output, noise):
            _lincomb_ext(outs, x, terms, plan.coef, False)
        elif x is None and len(outs) == 1:  # in place on the noise
            lincomb_(outs[0], terms, plan.coef, backend=self._fused_backend)
        elif x is None:  # in place on the noise, more outputs: the op's x is out[0] as it was
            _apply(outs, None, terms, plan.coef, self._fused_backend, False, several=True)
        else:
            lincomb(x, terms, plan.coef, out=outs, backend=self._fused_backend)
        result = dict(zip(plan.roles, outs, strict=True))
        for role, same in plan.step.aliases.items():
            result[role] = result[same] if same in result else operands[_ARGS[same]]
        return result

    def _out_dtype(self, role: str, sample, model_output) -> torch.dtype:
        """``_dtype``, kept per role and operand dtypes (it is asked for every output of every
        step)."""
        key = (role, sample.dtype, model_output.dtype)
        dtype = self._out_dtypes.get(key)
        if dtype is None:
            dtype = self._out_dtypes[key] = self._dtype(role, sample, model_output)
        return dtype

    def _direct_kernel(self, first: torch.Tensor, sample, model_output, noise) -> bool:
        """Whether the step may call the kernel op ``belm::lincomb_ext`` itself (see
        :func:`belm_kernels.ops._kernel_direct`): its outputs are fresh tensors or the
        scheduler's own ring buffers, never given out."""
        return _kernel_direct(self._fused_backend, first,
                              (sample, model_output, noise, *self._slots[:1]))

    def _ring_slots(self, sample, model_output) -> None:
        """The history ring slots of a run from ``_run_start``, at its first step: the previous
        run's when they fit (same layout, shape, dtypes and device), else new ones."""
        sizes = multistep.ring_sizes(self.fused_table(self._run_start))
        dtypes = [self._dtype(name, sample, model_output)
                  for name in sorted(sizes) for _ in range(sizes[name])]
        if [(s.shape, s.dtype, s.device) for s in self._slots] != [
                (sample.shape, dtype, sample.device) for dtype in dtypes]:
            self._slots = tuple(torch.empty(sample.shape, dtype=dtype, device=sample.device)
                                for dtype in dtypes)

    def _fused(self, k: int, sample, model_output, noise=None,
               drawn: bool = False) -> dict[str, torch.Tensor]:
        if k == self._run_start:  # a new run (which may change shape)
            self._ring_slots(sample, model_output)
        key = (sample.device, sample.dtype)
        if self._run_plans[0] != key:  # the run's plans for this device and dtype, kept
            self._run_plans = (key, self._plans_for(self._run_start, *key))
        return self._run(self._run_plans[1][k - self._run_start], sample, model_output, noise,
                         drawn)

    def _single_plan(self, outs: dict, k: int, sample: torch.Tensor) -> _Plan:
        """A plan for a step whose coefficients are not in the run's table (a timestep that is not
        the schedule's at this step)."""
        with multistep.ieee():
            table = multistep.tabulate([outs])
        return _make_plans(table, k, sample.device, compute_dtype(sample.dtype))[0]


def _ring_layout(sizes: dict[str, int]) -> dict[str, int]:
    """Where each history stream's slot 0 is among a step's operands ``(sample, model_output,
    noise, *ring slots)``: the streams' slots one after another, in name order."""
    first, n = {}, len(_ARGS)
    for name in sorted(sizes):
        first[name], n = n, n + sizes[name]
    return first


def _make_plans(table: Sequence[multistep.Step], start: int, device, dtype) -> list[_Plan]:
    """Plans for steps ``start`` .. of a run: ring slots resolved, coefficients moved to
    ``device`` in one copy (each step's a contiguous view)."""
    sizes = multistep.ring_sizes(table)
    first = _ring_layout(sizes)
    layouts = []  # per step: (inputs, outputs, coef) as tabulated, and written into the noise
    for step in table:
        layout = [(step.inputs, step.outputs, step.coef)]
        if step.noise and PREV_SAMPLE in step.outputs:  # (a noise coefficient may be 0)
            ins = (NOISE, *[r for r in step.inputs if r != NOISE])
            outs = (PREV_SAMPLE, *[r for r in step.outputs if r != PREV_SAMPLE])
            full = torch.cat([step.coef, torch.zeros(len(step.outputs), 1, dtype=torch.float64)],
                             dim=1)
            cols = [step.inputs.index(r) if r in step.inputs else -1 for r in ins]
            coef = full[[step.outputs.index(r) for r in outs]][:, cols]
            layout.append((ins, outs, coef))
        layouts.append(layout)
    flat = torch.cat([c.reshape(-1) for layout in layouts for _, _, c in layout]).to(
        device=device, dtype=dtype)
    plans, offset = [], 0

    def plan(k, step, ins, outs, coef, in_place, in_noise=None):
        nonlocal offset

        def source(role):
            name, j = multistep.parse_role(role)
            return _ARGS[role] if j == 0 else first[name] + (k - j) % sizes[name]

        outputs = tuple((role, first[role] + k % sizes[role] if role in sizes else None)
                        for role in outs)
        if in_place:  # x is outputs[0] as it was: the noise
            outputs = ((outs[0], _ARGS[NOISE]), *outputs[1:])
        # one row in place is lincomb_'s (K+1,) coefficients
        shape = coef.shape[1:] if in_place and len(outs) == 1 else coef.shape
        view = flat[offset:offset + coef.numel()].view(shape)
        offset += coef.numel()
        return _Plan(None if in_place else source(ins[0]),
                     tuple(source(r) for r in ins[1:]), outputs, tuple(outs), view, step,
                     in_noise)

    for n, (step, layout) in enumerate(zip(table, layouts, strict=True)):
        main = plan(start + n, step, *layout[0], in_place=False)
        if len(layout) > 1:
            main = main._replace(in_noise=plan(start + n, step, *layout[1], in_place=True))
        plans.append(main)
    return plans


@functools.cache
def _promote_types(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.promote_types(a, b)  # an op call: cached, so that a step dispatches none


def _promote(sample: torch.Tensor, model_output: torch.Tensor) -> torch.dtype:
    return _promote_types(sample.dtype, model_output.dtype)


def _check_integer_timestep(timestep, name: str) -> None:
    """The originals' refusal of integer indices as timesteps (Euler, flow Euler)."""
    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise ValueError(
            "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
            f" `{name}.step()` is not supported. Make sure to pass one of the"
            " `scheduler.timesteps` as a timestep.")


# --------------------------------------------------------------------------------------------
# The schedulers.


class FusedDDIMScheduler(FusedSchedulerMixin, DDIMScheduler):
    """``DDIMScheduler`` with a fused ``step`` (eta 0 or > 0, any prediction type; no clipping or
    thresholding). Outputs ``prev_sample`` and ``pred_original_sample`` in one pass."""

    fused_outputs = (PREV_SAMPLE, PRED_ORIGINAL)
    _default_step_args = {"eta": 0.0, "use_clipped_model_output": False}

    def _check_options(self):
        self._refuse_true("thresholding", "clip_sample")

    def _grid(self):
        return {"alphas_cumprod": self.alphas_cumprod.double().tolist(),
                "final_alpha_cumprod": float(self.final_alpha_cumprod)}

    def _dtype(self, role, sample, model_output):
        return _promote(sample, model_output)

    def _ddim_step(self, F, timestep: int, eta: float, use_clipped_model_output: bool) -> dict:
        grid = self._fused_grid
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prev = (grid["alphas_cumprod"][prev_timestep] if prev_timestep >= 0
                      else grid["final_alpha_cumprod"])
        return multistep.ddim(F, F.num(grid["alphas_cumprod"][timestep]), F.num(alpha_prev),
                              eta=eta, use_clipped_model_output=use_clipped_model_output,
                              prediction_type=self.config.prediction_type)

    def fused_steps(self, F, start=0, eta=0.0, use_clipped_model_output=False):
        """DDIM's steps at ``timesteps[start:]`` (each step depends only on its timestep)."""
        return [self._ddim_step(F, t, eta, use_clipped_model_output)
                for t in self._ts_host[start:]]

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             eta: float = 0.0, use_clipped_model_output: bool = False,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True) -> DDIMSchedulerOutput | tuple:
        """``DDIMScheduler.step``, fused (same arguments and outputs)."""
        if self.num_inference_steps is None or self._fused_grid is None:
            raise ValueError("Number of inference steps is 'None', you need to run "
                             "'set_timesteps' after creating the scheduler")
        i = self._view_index(timestep)
        args = dict(eta=float(eta), use_clipped_model_output=bool(use_clipped_model_output))
        if i is None:  # a number: DDIM's step depends on the timestep's value only
            t = int(timestep)
            i = self._ts_host.index(t) if t in self._ts_host else None
        if i is not None:
            plan = self._plans_for(0, sample.device, sample.dtype, **args)[i]
        else:  # a timestep off the schedule, as the original allows: its own coefficients
            key = ("off", t, *sorted(args.items()), sample.device, sample.dtype)
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plans[key] = self._single_plan(
                    self._ddim_step(FLOAT64, t, **args), 0, sample)
        eta = args["eta"]
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure "
                                 "that either `generator` or `variance_noise` stays `None`.")
            noise = variance_noise if variance_noise is not None else _randn(
                model_output.shape, generator, model_output.device,
                self._noise_dtype(sample, model_output))
        out = self._run(plan, sample, model_output, noise, drawn=variance_noise is None)
        if not return_dict:
            return (out[PREV_SAMPLE], out[PRED_ORIGINAL])
        return DDIMSchedulerOutput(prev_sample=out[PREV_SAMPLE],
                                   pred_original_sample=out[PRED_ORIGINAL])


class FusedDPMSolverMultistepScheduler(FusedSchedulerMixin, DPMSolverMultistepScheduler):
    """``DPMSolverMultistepScheduler`` with a fused ``step``: dpmsolver++ and sde-dpmsolver++,
    orders 1-3, midpoint and heun, every grid option, prediction types epsilon, sample,
    v_prediction and flow_prediction. One pass writes ``prev_sample`` and the data prediction
    kept for the next steps."""

    def _check_options(self):
        cfg = self.config
        if cfg.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            raise self._unsupported("algorithm_type", cfg.algorithm_type,
                                    "deprecated by diffusers; 'dpmsolver++' and "
                                    "'sde-dpmsolver++' are fused")
        if cfg.variance_type is not None:
            raise self._unsupported("variance_type", cfg.variance_type)
        self._refuse_true("thresholding")

    def _dtype(self, role, sample, model_output):
        if self.config.prediction_type == "sample":
            return model_output.dtype
        return _promote(sample, model_output)

    def _noise_dtype(self, sample, model_output):
        return torch.float32

    def fused_steps(self, F, start=0):
        cfg = self.config
        return multistep.dpm_solver(
            F, self._fused_grid["sigmas"], solver_order=cfg.solver_order,
            algorithm_type=cfg.algorithm_type, solver_type=cfg.solver_type,
            prediction_type=cfg.prediction_type, flow=cfg.use_flow_sigmas,
            lower_order_final=cfg.lower_order_final, euler_at_final=cfg.euler_at_final,
            final_sigmas_type=cfg.final_sigmas_type, start=start)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor,
             sample: torch.Tensor, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """``DPMSolverMultistepScheduler.step``, fused (same arguments and outputs)."""
        k = self._start_step(timestep)
        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            if variance_noise is None:
                noise = _randn(model_output.shape, generator, model_output.device,
                               self._noise_dtype(sample, model_output))
            else:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
        prev_sample = self._fused(k, sample, model_output, noise,
                                  drawn=variance_noise is None)[PREV_SAMPLE]
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)


class FusedUniPCMultistepScheduler(FusedSchedulerMixin, UniPCMultistepScheduler):
    """``UniPCMultistepScheduler`` with a fused ``step``: bh1 and bh2, the corrector and the
    predictor of every order, ``predict_x0`` either way, every grid option (the flow sigmas with
    ``flow_shift`` that Wan ships included). One pass writes ``prev_sample``, the converted model
    output and the corrected sample kept for the next steps."""

    def _check_options(self):
        if self.solver_p is not None:
            raise self._unsupported("solver_p", type(self.solver_p).__name__)
        self._refuse_true("thresholding")
        # Where diffusers' own last step to a zero sigma is NaN or infinite (the log-SNR step
        # there is infinite: B_h = h, e^h - 1, or 1 / r_k), there is no result to reproduce.
        cfg = self.config
        if cfg.final_sigmas_type == "zero":
            for option, value, broken in (
                    ("solver_type", "bh1", cfg.solver_type == "bh1"),
                    ("predict_x0", False, not cfg.predict_x0),
                    ("lower_order_final", False, not cfg.lower_order_final
                     and cfg.solver_order > 1)):
                if broken:
                    raise self._unsupported(
                        option, value, "with final_sigmas_type='zero' diffusers' own last step is "
                        "NaN: the log-SNR step to sigma 0 is infinite",
                        "use final_sigmas_type='sigma_min'")

    def _dtype(self, role, sample, model_output):
        if role in (PREV_SAMPLE, "last_sample"):
            return sample.dtype
        if self.config.prediction_type == "sample" and self.config.predict_x0:
            return model_output.dtype
        if self.config.prediction_type == "epsilon" and not self.config.predict_x0:
            return model_output.dtype
        return _promote(sample, model_output)

    def _grid(self):
        # The steps the corrector skips: an attribute a caller may change between runs.
        return {**super()._grid(), "disable_corrector": tuple(self.disable_corrector)}

    def fused_steps(self, F, start=0):
        cfg = self.config
        return multistep.unipc(
            F, self._fused_grid["sigmas"], solver_order=cfg.solver_order,
            solver_type=cfg.solver_type, predict_x0=cfg.predict_x0,
            prediction_type=cfg.prediction_type, flow=cfg.use_flow_sigmas,
            lower_order_final=cfg.lower_order_final,
            disable_corrector=self._fused_grid["disable_corrector"], start=start)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor,
             sample: torch.Tensor, return_dict: bool = True) -> SchedulerOutput | tuple:
        """``UniPCMultistepScheduler.step``, fused (same arguments and outputs)."""
        k = self._start_step(timestep)
        prev_sample = self._fused(k, sample, model_output)[PREV_SAMPLE]
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)


class FusedEulerDiscreteScheduler(FusedSchedulerMixin, EulerDiscreteScheduler):
    """``EulerDiscreteScheduler`` with a fused ``step`` (every grid option: Karras, exponential
    and beta sigmas, ...; no churn). Outputs ``prev_sample`` and ``pred_original_sample``."""

    fused_outputs = (PREV_SAMPLE, PRED_ORIGINAL)

    def _check_options(self):
        pass  # every option of the config only shapes the grid

    def _dtype(self, role, sample, model_output):
        if role == PREV_SAMPLE:
            return model_output.dtype
        return _promote_types(torch.float32, model_output.dtype)

    def fused_input_scales(self, start=0):
        return (self.sigmas[start:len(self.timesteps)] ** 2 + 1) ** 0.5  # as scale_model_input

    def fused_steps(self, F, start=0):
        s = self._fused_grid["sigmas"]
        return [multistep.euler(F, F.num(s[k]), F.num(s[k + 1]),
                                prediction_type=self.config.prediction_type)
                for k in range(start, len(s) - 1)]

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor,
             sample: torch.Tensor, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: torch.Generator | None = None,
             return_dict: bool = True) -> EulerDiscreteSchedulerOutput | tuple:
        """``EulerDiscreteScheduler.step``, fused (same arguments and outputs; ``s_churn`` must be
        0)."""
        _check_integer_timestep(timestep, "EulerDiscreteScheduler")
        if s_churn != 0:
            raise self._unsupported("s_churn", s_churn, "the stochastic churn of Karras et al.")
        if not self.is_scale_input_called:
            logger.warning("The `scale_model_input` function should be called before `step` to "
                           "ensure correct denoising. See `StableDiffusionPipeline` for a usage "
                           "example.")
        k = self._start_step(timestep)
        out = self._fused(k, sample, model_output)
        self._step_index += 1
        if not return_dict:
            return (out[PREV_SAMPLE], out[PRED_ORIGINAL])
        return EulerDiscreteSchedulerOutput(prev_sample=out[PREV_SAMPLE],
                                            pred_original_sample=out[PRED_ORIGINAL])


class FusedEulerAncestralDiscreteScheduler(FusedSchedulerMixin, EulerAncestralDiscreteScheduler):
    """``EulerAncestralDiscreteScheduler`` with a fused ``step``: the noise comes from the
    caller's generator, drawn as the original draws it. Outputs ``prev_sample`` and
    ``pred_original_sample``."""

    fused_outputs = (PREV_SAMPLE, PRED_ORIGINAL)

    def _check_options(self):
        if self.config.prediction_type not in ("epsilon", "v_prediction"):
            raise self._unsupported("prediction_type", self.config.prediction_type,
                                    "diffusers does not implement it either")

    def _dtype(self, role, sample, model_output):
        if role == PREV_SAMPLE:
            return model_output.dtype
        return _promote_types(torch.float32, model_output.dtype)

    def fused_input_scales(self, start=0):
        return (self.sigmas[start:len(self.timesteps)] ** 2 + 1) ** 0.5  # as scale_model_input

    def fused_steps(self, F, start=0):
        s = self._fused_grid["sigmas"]
        return [multistep.euler_ancestral(F, F.num(s[k]), F.num(s[k + 1]),
                                          prediction_type=self.config.prediction_type)
                for k in range(start, len(s) - 1)]

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor,
             sample: torch.Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True) -> EulerAncestralDiscreteSchedulerOutput | tuple:
        """``EulerAncestralDiscreteScheduler.step``, fused (same arguments and outputs)."""
        _check_integer_timestep(timestep, "EulerDiscreteScheduler")
        if not self.is_scale_input_called:
            logger.warning("The `scale_model_input` function should be called before `step` to "
                           "ensure correct denoising. See `StableDiffusionPipeline` for a usage "
                           "example.")
        k = self._start_step(timestep)
        noise = _randn(model_output.shape, generator, model_output.device,
                       self._noise_dtype(sample, model_output))
        out = self._fused(k, sample, model_output, noise, drawn=True)
        self._step_index += 1
        if not return_dict:
            return (out[PREV_SAMPLE], out[PRED_ORIGINAL])
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=out[PREV_SAMPLE],
                                                     pred_original_sample=out[PRED_ORIGINAL])


class FusedLCMScheduler(FusedSchedulerMixin, LCMScheduler):
    """``LCMScheduler`` with a fused ``step``: ``prev_sample`` and ``denoised`` in one pass (the
    last step returns ``denoised`` for both, as the original)."""

    fused_outputs = (PREV_SAMPLE, DENOISED)

    def _check_options(self):
        self._refuse_true("thresholding", "clip_sample")

    def _grid(self):
        return {"alphas_cumprod": self.alphas_cumprod.double().tolist(),
                "final_alpha_cumprod": float(self.final_alpha_cumprod)}

    def _dtype(self, role, sample, model_output):
        return _promote(sample, model_output)

    def _noise_dtype(self, sample, model_output):
        return self._dtype(DENOISED, sample, model_output)

    def _lcm_step(self, F, k: int, timestep: int) -> dict:
        grid, ts = self._fused_grid, self._ts_host
        prev_timestep = ts[k + 1] if k + 1 < len(ts) else timestep
        alpha_prev = (grid["alphas_cumprod"][prev_timestep] if prev_timestep >= 0
                      else grid["final_alpha_cumprod"])
        return multistep.lcm(F, F.num(timestep), F.num(grid["alphas_cumprod"][timestep]),
                             F.num(alpha_prev), last=k == self.num_inference_steps - 1,
                             timestep_scaling=self.config.timestep_scaling,
                             prediction_type=self.config.prediction_type)

    def fused_steps(self, F, start=0):
        return [self._lcm_step(F, k, self._ts_host[k]) for k in range(start, len(self._ts_host))]

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: torch.Generator | None = None,
             return_dict: bool = True) -> LCMSchedulerOutput | tuple:
        """``LCMScheduler.step``, fused (same arguments and outputs)."""
        k = self._start_step(timestep)
        i = self._view_index(timestep)
        t = self._ts_host[i] if i is not None else int(timestep)
        if t == self._ts_host[k]:
            plan = self._plans_for(self._run_start, sample.device, sample.dtype)[
                k - self._run_start]
        else:  # a timestep other than the schedule's at this step: its own coefficients
            plan = self._single_plan(self._lcm_step(FLOAT64, k, t), k, sample)
        noise = None
        if plan.step.noise:
            noise = _randn(model_output.shape, generator, model_output.device,
                           self._noise_dtype(sample, model_output))
        out = self._run(plan, sample, model_output, noise, drawn=True)
        self._step_index += 1
        if not return_dict:
            return (out[PREV_SAMPLE], out[DENOISED])
        return LCMSchedulerOutput(prev_sample=out[PREV_SAMPLE], denoised=out[DENOISED])


class FusedFlowMatchEulerDiscreteScheduler(FusedSchedulerMixin, FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` (SD3, Flux, Wan, ...) with a fused ``step``: every
    grid option (static or dynamic shifting, ``shift_terminal``, Karras / exponential / beta
    sigmas, ``invert_sigmas``) and ``stochastic_sampling``; one sigma per step (no
    ``per_token_timesteps``)."""

    def _check_options(self):
        pass  # every option of the config shapes the grid, or is stochastic_sampling

    def _dtype(self, role, sample, model_output):
        return model_output.dtype

    def _noise_dtype(self, sample, model_output):
        return torch.float32

    def fused_steps(self, F, start=0):
        s = self._fused_grid["sigmas"]
        return [multistep.flow_euler(F, F.num(s[k]), F.num(s[k + 1]),
                                     stochastic=self.config.stochastic_sampling)
                for k in range(start, len(s) - 1)]

    def step(self, model_output: torch.FloatTensor, timestep: float | torch.FloatTensor,
             sample: torch.FloatTensor, s_churn: float = 0.0, s_tmin: float = 0.0,
             s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: torch.Generator | None = None,
             per_token_timesteps: torch.Tensor | None = None,
             return_dict: bool = True) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """``FlowMatchEulerDiscreteScheduler.step``, fused (same arguments and outputs; the
        original ignores ``s_churn`` ... ``s_noise`` too; ``per_token_timesteps`` must be
        None)."""
        _check_integer_timestep(timestep, "FlowMatchEulerDiscreteScheduler")
        if per_token_timesteps is not None:
            raise self._unsupported("per_token_timesteps", "a tensor",
                                    "one sigma per step is fused")
        k = self._start_step(timestep)
        noise = None
        if self.config.stochastic_sampling:
            noise = _randn(sample.shape, generator, sample.device,
                           self._noise_dtype(sample, model_output))
        prev_sample = self._fused(k, sample, model_output, noise, drawn=True)[PREV_SAMPLE]
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


#: original class -> fused class.
FUSED_SCHEDULERS = {
    DDIMScheduler: FusedDDIMScheduler,
    DPMSolverMultistepScheduler: FusedDPMSolverMultistepScheduler,
    UniPCMultistepScheduler: FusedUniPCMultistepScheduler,
    EulerDiscreteScheduler: FusedEulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler: FusedEulerAncestralDiscreteScheduler,
    LCMScheduler: FusedLCMScheduler,
    FlowMatchEulerDiscreteScheduler: FusedFlowMatchEulerDiscreteScheduler,
}


def fuse(scheduler: SchedulerMixin, *, backend: str = "auto") -> SchedulerMixin:
    """The same scheduler with each ``step`` one fused op (see the module docstring).

    Args:
        scheduler: a ``DDIMScheduler``, ``DPMSolverMultistepScheduler``,
            ``UniPCMultistepScheduler``, ``EulerDiscreteScheduler``,
            ``EulerAncestralDiscreteScheduler``, ``LCMScheduler`` or
            ``FlowMatchEulerDiscreteScheduler`` (exactly that class: a subclass may have changed
            the step), or one already fused (returned as it is). It is not modified: the result
            is a copy with its config and state.
        backend: backend of the fused op ("auto", "torch", "triton", "cuda", "cpu").

    Raises:
        TypeError: for another scheduler class.
        UnsupportedOptionError: for an option the fused step does not implement.
    """
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if isinstance(scheduler, FusedSchedulerMixin):
        return scheduler
    fused_cls = FUSED_SCHEDULERS.get(type(scheduler))
    if fused_cls is None:
        names = ", ".join(cls.__name__ for cls in FUSED_SCHEDULERS)
        raise TypeError(f"fuse supports {names}; got {type(scheduler).__name__}")
    fused = copy.deepcopy(scheduler)
    fused.__class__ = fused_cls
    fused._fused_backend = backend
    fused._check_options()
    if getattr(scheduler, "num_inference_steps", None) is not None:
        # The grid is set: a run starts at the next step if the original has not stepped yet,
        # else at the next set_timesteps (diffusers' history is not carried over).
        fused._fused_reset()
    return fused
