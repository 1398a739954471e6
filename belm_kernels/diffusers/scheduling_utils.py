"""What every BELM scheduler shares, whatever its noise schedule.

* :class:`LatentPair`, the two noisiest states that an exact inversion ends with;
* :class:`BELMSchedulerMixin`, the two-step state and ``step``: one fused op per step, the checks on
  what a pipeline passes in, the optional wide (float64) states;
* the two directions: :class:`BELMSamplingMixin` (sampling, optionally from a latent pair) and
  :class:`BELMInversionMixin` (exact inversion, ending with a latent pair).

A scheduler is a family (the config, ``set_timesteps`` and the coefficient tables of one kind of
noise schedule, e.g. :class:`~belm_kernels.diffusers.scheduling_belm.VPScheduleMixin`) combined with
a direction::

    class BELMScheduler(BELMSamplingMixin, VPScheduleMixin): ...
    class BELMInverseScheduler(BELMInversionMixin, VPScheduleMixin): ...

The family's ``set_timesteps`` computes three float64 (N, 3) tables of rows (a, b, c) for
``a * prev + b * sample + c * model_output`` -- ``"first"`` (the one-step method that starts a run,
DDIM), ``"first_inverse"`` (its inversion) and ``"two"`` (O-BELM) -- and hands them to
:meth:`BELMSchedulerMixin._set_grid` together with the model timesteps and a record of the grid
(what a latent pair must match; ``_set_grid`` adds the family's ``_grid_kind``, so that a pair
made by one kind of scheduler is refused by another). Its config must have the keys ``backend``
and ``state_dtype``.

The previous state. O-BELM is a two-step method: besides the ``sample`` the pipeline passes,
``step`` needs the state before it. The scheduler keeps a reference to the previous ``sample``
(it never writes into it) and writes each new state into a fresh tensor: one pass of the compiled
kernel over the previous state, the sample and the model output (on the torch and Triton backends,
or when autograd records: a copy of the previous state updated in place by
:func:`belm_kernels.lincomb3_`; the same bits). That is one latent-sized allocation per step, and
no tensor the scheduler has returned or been given is ever modified.
With a wider ``state_dtype`` the two states live in scheduler-owned wide buffers that are
updated in place (they are never handed out) and each step returns a fresh cast.

Because the kept previous state belongs to the sample the scheduler returned, ``step`` checks that
it gets that sample back: the same tensor, not modified in place (its version counter; under
``torch.inference_mode``, where tensors have none, a float64 checksum), or a tensor with the same
values. Anything else -- a callback that edited or replaced the latents, a skipped or repeated
step -- raises a ValueError that says so, instead of silently continuing from a state that no
longer belongs to the sample.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from ..ops import (
    BACKENDS,
    BackendUnavailableError,
    _check_invertible,
    _kernel_direct,
    _lincomb_ext,
    available_backends,
    check_like,
    coef_table,
    compute_dtype,
    lincomb3_,
    lincomb3_inverse_,
)

STATE_DTYPES = (None, "float32", "float64")

#: An inversion with wide states starts from the clean latents scaled by 1 + this times the eps
#: of the latents' dtype (float32 latents: ~6e-10). Regeneration gives back the inversion's wide
#: states only up to their rounding (float64: ~1e-14), so the two runs feed the model the same
#: roundings unless a state lies that close to a rounding boundary of the latents' dtype. Random
#: states do so with odds ~1e-7 per element and step, but states built from the latents' own
#: values with simple coefficients (the Euler step x + v / 112 from the clean latents that ends
#: SD3's grid, or the leapfrog x + 2 h v of equal flow steps) often land exactly on one: the low
#: bits this factor puts into every state prevent that. At 1/200 of the latents' rounding unit it
#: leaves the final state rounding back to the clean latents; and the first step is not undone by
#: a regeneration (which starts from the pair), so it costs no exactness.
WIDE_START_DITHER = 0.6180339887498949 / 128


class LatentPair(tuple):
    """``(x_T, x_T2)``: the two noisiest states, from which a BELM scheduler regenerates exactly.

    A plain 2-tuple (``x_T, x_T2 = pair`` works) that also carries

    * ``grid``: a record of the grid it was made on (``"kind"``, the kind of scheduler that made
      it, ``"timesteps"`` and the family's own keys: the VP noise levels, the flow sigmas and mu),
      so that
      :meth:`BELMSamplingMixin.set_latent_pair` refuses to regenerate on another grid;
      ``timesteps=`` is shorthand for ``grid={"timesteps": ...}``;
    * ``state``: when the inversion kept its states in a wider dtype (``state_dtype``), those two
      states, from which a scheduler continues in that dtype, for a bit-exact regeneration;
    * ``pipeline`` and ``sizes``: from :func:`~belm_kernels.diffusers.invert`, the class name of
      the pipeline that made the pair and the size arguments (``height``, ``width``,
      ``num_frames``, ...) its call was given, which
      :func:`~belm_kernels.diffusers.regenerate` checks and passes again.
    """

    def __new__(cls, x_T: torch.Tensor, x_T2: torch.Tensor, timesteps: Sequence[int] | None = None,
                state: tuple[torch.Tensor, torch.Tensor] | None = None,
                grid: Mapping[str, Any] | None = None, pipeline: str | None = None,
                sizes: Mapping[str, Any] | None = None):
        pair = super().__new__(cls, (x_T, x_T2))
        pair.grid = dict(grid or {})
        if timesteps is not None:
            pair.grid["timesteps"] = tuple(int(t) for t in timesteps)
        pair.state = None if state is None else tuple(state)
        pair.pipeline = pipeline
        pair.sizes = dict(sizes or {})
        return pair

    def __reduce__(self):  # pickle / torch.save / copy: rebuild with the records and the state
        return (type(self), (self[0], self[1], None, self.state, self.grid, self.pipeline,
                             self.sizes))

    @property
    def x_T(self) -> torch.Tensor:
        return self[0]

    @property
    def x_T2(self) -> torch.Tensor:
        return self[1]

    @property
    def timesteps(self) -> tuple | None:
        """The model timesteps of the grid the pair was made on (None if not recorded)."""
        return self.grid.get("timesteps")


def check_float_tensor(t: Any, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")


def _check_pair(x_T: Any, x_T2: Any) -> None:
    check_float_tensor(x_T, "x_T")
    check_float_tensor(x_T2, "x_T2")
    check_like(x_T2, x_T, "the second latent x_T2", "x_T")


def _checksum(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dtype=torch.float64)


def _step_out_of_place(prev, sample, model_output, coef, inverse: bool,
                       backend: str) -> torch.Tensor:
    """A new contiguous tensor: ``lincomb3_`` (``lincomb3_inverse_``) of ``prev``, ``sample`` and
    ``model_output``. On the compiled kernels one pass that reads ``prev`` (the output is fresh,
    so the kernel op's own checks suffice; see ``ops._kernel_direct``); otherwise a copy of
    ``prev`` updated in place by the public op, which also explains bad input."""
    if prev.dtype == sample.dtype and _kernel_direct(backend, prev, (sample, model_output, coef)):
        if inverse and coef.device.type == "cpu":
            _check_invertible(coef)
        out = torch.empty_like(prev, memory_format=torch.contiguous_format)
        _lincomb_ext([out], prev, [sample, model_output], coef, inverse)
        return out
    out = prev.clone(memory_format=torch.contiguous_format)
    (lincomb3_inverse_ if inverse else lincomb3_)(out, sample, model_output, coef, backend=backend)
    return out


class _Step(NamedTuple):
    """What one step does: ``out <- lincomb3_(previous state, sample, model_output,
    tables[table][row])`` (``lincomb3_inverse_`` if ``inverse``). A first step gives that state
    (``prev``; None: there is none, the row's leading coefficient is 0) and a latent pair's wide
    states (``wide``)."""

    inverse: bool
    table: str
    row: int
    prev: torch.Tensor | None = None
    wide: tuple[torch.Tensor, torch.Tensor] | None = None


class BELMSchedulerMixin(SchedulerMixin):
    """The two-step state and ``step`` of the BELM schedulers (see the module docstring)."""

    order = 1
    _timestep_dtype = torch.long  # dtype of the published ``timesteps``
    _grid_kind: str  # the family's kind of schedule, named in the grid record and its errors
    _min_steps = 1  # model calls a grid needs (beyond the pair's start, see _set_grid)

    def _init_run_state(self) -> None:
        """Call at the end of the family's ``__init__``: no grid yet."""
        self.num_inference_steps = None
        self._grid_ts: tuple | None = None
        self._grid_record: dict[str, Any] = {}
        self._reset_run()

    def _check_common_options(self) -> None:
        cfg = self.config
        if cfg.backend != "auto" and cfg.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {cfg.backend!r}")
        if cfg.state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {cfg.state_dtype!r}")

    # ---------------------------------------------------------------------------- run state
    def _reset_run(self) -> None:
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._prev: torch.Tensor | None = None      # the state before the current sample
        self._returned: torch.Tensor | None = None  # what the last step returned
        self._returned_version: int | None = None
        self._returned_checksum: torch.Tensor | None = None
        self._wide: torch.dtype | None = None       # state_dtype of this run, when wider
        self._prev_wide = self._cur_wide = None     # the two states in that dtype

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
        """The model input needs no scaling; returns ``sample``."""
        return sample

    # ---------------------------------------------------------------------------- grid
    def _set_grid(self, timesteps: Sequence, tables: dict[str, torch.Tensor],
                  device: str | torch.device | None, record: dict[str, Any],
                  pair_start: int = 0) -> None:
        """Install a new grid: its model timesteps (descending), the float64 coefficient tables,
        and the record a latent pair must match; then start a new run.

        ``pair_start`` is the grid state (0: the noisiest) where a latent pair starts: 0, or 1 on
        a grid whose noisiest state has zero SNR (alpha = 0, pure noise). There the O-BELM step
        after the first one does not depend on the noise (its leading coefficient is 0: the limit
        of an infinite previous step), so it cannot be inverted; the pair is then the next two
        states, and a regeneration from it makes N-2 model calls."""
        self._check_steps(len(timesteps), pair_start)
        self._pair_start = pair_start
        self._grid_ts = tuple(timesteps)
        self._grid_record = {"kind": self._grid_kind, **record}
        self.num_inference_steps = len(self._grid_ts)
        # resolved ("cuda" -> "cuda:0"), so that it equals the device of the samples
        self._device = torch.empty(0, device=device).device
        self._tables64 = tables
        self._row_cache: dict[tuple[torch.device, torch.dtype], dict[str, list[torch.Tensor]]] = {}
        self._rows(self._device, torch.float32)  # moved to the device once, here
        backend = self.config.backend
        if backend != "auto" and backend not in available_backends(self._device):
            raise BackendUnavailableError(
                f"backend {backend!r} is not available on {self._device} (available: "
                f"{available_backends(self._device)}); use backend='auto' or one of those")
        self._expose()

    def _check_steps(self, n: int, pair_start: int = 0) -> None:
        """Refuse a grid of ``n`` model calls that is too short for this scheduler."""
        if n < self._min_steps + pair_start:
            zero_snr = " after the zero-SNR state" if pair_start else ""
            raise ValueError(f"{type(self).__name__} needs at least {self._min_steps + pair_start} "
                             f"steps (an exact inversion ends with a pair of states{zero_snr}), "
                             f"got {n}")

    def _expose(self) -> None:
        """Publish ``timesteps`` for the next run and reset the run state."""
        self._reset_run()
        self._ts_host = list(self._exposed_timesteps())
        self.timesteps = torch.tensor(self._ts_host, dtype=self._timestep_dtype,
                                      device=self._device)

    def _rows(self, device: torch.device, dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
        """Coefficient rows on ``device`` in the op's compute dtype, as lists of (3,) views."""
        key = (device, compute_dtype(dtype))
        rows = self._row_cache.get(key)
        if rows is None:
            like = torch.empty(0, device=device, dtype=dtype)
            rows = {name: list(coef_table(table, like).unbind(0))
                    for name, table in self._tables64.items()}
            self._row_cache[key] = rows
        return rows

    # ---------------------------------------------------------------------------- checks
    def _locate(self, timestep) -> tuple[int | None, Any]:
        """``(index, value)`` of ``timestep``. The index is known when it is a 0-d view of
        ``self.timesteps`` (what a pipeline's loop yields), from its storage offset with no
        device sync; other values are read and compared by value."""
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
        if isinstance(timestep, bool) or not isinstance(timestep, numbers.Real):
            raise TypeError(f"timestep must be a number (int, float, numpy scalar) or a "
                            f"one-element tensor, got {type(timestep).__name__} {timestep!r}")
        return None, timestep

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
        else:
            modified = not bool(_checksum(ret) == self._returned_checksum)
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
        check_float_tensor(sample, "sample")
        check_float_tensor(model_output, "model_output")
        if model_output.shape != sample.shape or model_output.device != sample.device:
            raise ValueError(f"model_output must have the sample's shape {tuple(sample.shape)} "
                             f"and device {sample.device}, got {tuple(model_output.shape)} on "
                             f"{model_output.device}")

    def _wide_dtype(self, sample: torch.Tensor, given) -> torch.dtype | None:
        """The dtype of the kept states: the widest of ``state_dtype`` and the dtype of the
        ``given`` wide states (a latent pair's), if it is wider than the sample's; else None."""
        candidates = [sample.dtype]
        if self.config.state_dtype is not None:
            candidates.append(getattr(torch, self.config.state_dtype))
        if given is not None:
            candidates.append(given[0].dtype)
        widest = max(candidates, key=lambda dtype: torch.finfo(dtype).bits)
        return None if torch.finfo(widest).bits <= torch.finfo(sample.dtype).bits else widest

    # ---------------------------------------------------------------------------- stepping
    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor,
             sample: torch.Tensor, return_dict: bool = True) -> SchedulerOutput | tuple:
        """One step from ``sample`` at ``timestep`` with the model's output there.

        Returns ``SchedulerOutput(prev_sample)`` (or a 1-tuple with ``return_dict=False``), a new
        tensor. The next call must get that tensor (or one with the same values) as ``sample``.
        """
        if self._grid_ts is None:
            raise ValueError(f"{type(self).__name__}.step() was called before set_timesteps(): "
                             "call set_timesteps(num_inference_steps, device) first")
        self._check_model_output(model_output, sample)
        k = self._resolve_step(timestep)
        first = self._step_index is None
        if first:
            plan = self._first_step(k, sample)
            prev = sample if plan.prev is None else plan.prev  # no previous state: a zero row
            wide = self._wide_dtype(sample, plan.wide)
        else:
            self._check_sample(sample)
            plan = self._next_step(k)
            prev, wide = self._prev, self._wide
        coef = self._rows(sample.device, wide or sample.dtype)[plan.table][plan.row]
        backend = self.config.backend
        # The op validates before it writes, so a failed step leaves the run as it was. States
        # are always in the contiguous memory format: a model's output bits can depend on its
        # input's layout (CPU and GPU convolutions pick other kernels for channels-last), and a
        # stored pair (safetensors) comes back contiguous, so the regeneration must feed the
        # model the layout the inversion fed it.
        if wide is None:
            out = _step_out_of_place(prev, sample, model_output, coef, plan.inverse, backend)
        else:
            if first:
                like = dict(device=sample.device, dtype=wide, copy=True,
                            memory_format=torch.contiguous_format)
                prev, cur = plan.wide or (prev, sample)
                x, cur = prev.to(**like), cur.to(**like)
            else:
                x, cur = self._prev_wide, self._cur_wide
            (lincomb3_inverse_ if plan.inverse else lincomb3_)(x, cur, model_output, coef,
                                                               backend=backend)
            self._prev_wide, self._cur_wide = cur, x
            out = x.to(sample.dtype)
        if first:
            self._wide = wide
            self._started()
        self._prev = sample
        self._returned = out
        if out.is_inference():  # inference tensors have no version counter
            self._returned_version, self._returned_checksum = None, _checksum(out)
        else:
            self._returned_version, self._returned_checksum = out._version, None
        self._step_index = k + 1
        if not return_dict:
            return (out,)
        return SchedulerOutput(prev_sample=out)

    # The direction: the published timesteps and what each step does.
    def _exposed_timesteps(self) -> list:
        raise NotImplementedError

    def _first_step(self, k: int, sample: torch.Tensor) -> _Step:
        raise NotImplementedError

    def _next_step(self, k: int) -> _Step:
        raise NotImplementedError

    def _started(self) -> None:
        """Called once the first step of a run has succeeded."""


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"{list(value)} ({len(value)} values)"
    return repr(value)


class BELMSamplingMixin(BELMSchedulerMixin):
    """Sampling: a one-step start (DDIM), then O-BELM; or, armed with a latent pair, O-BELM from
    the pair (the first step skipped)."""

    _pending_pair: LatentPair | None = None

    def set_latent_pair(self, x_T: torch.Tensor | LatentPair, x_T2: torch.Tensor | None = None,
                        *, timesteps: Sequence[int] | None = None) -> None:
        """Arm the next run to start from the pair ``(x_T, x_T2)`` made by
        :func:`~belm_kernels.diffusers.invert` or an inverse BELM scheduler.

        The next ``set_timesteps(N)`` then exposes N-1 timesteps (the first step is skipped) and
        the run must be started with ``sample == x_T2`` (``pipe(..., latents=x_T2)``); x_T stays
        here as the previous state. Given a :class:`LatentPair` as the only argument, its grid
        record is checked against the grid (or pass ``timesteps``) and its wide states
        (``pair.state``, from ``invert``) are continued in their dtype, for a bit-exact result.
        A pair is used by one run; arm it again for the next.
        """
        state, grid = None, None
        if x_T2 is None:
            if not isinstance(x_T, tuple) or len(x_T) != 2:
                raise TypeError("set_latent_pair takes (x_T, x_T2) or a LatentPair")
            state = getattr(x_T, "state", None)
            grid = getattr(x_T, "grid", None)
            x_T, x_T2 = x_T
        _check_pair(x_T, x_T2)
        kind = self._kind_mismatch(grid or {})
        if kind:  # no grid can fix this one: refuse now
            raise ValueError(kind)
        if state is not None:
            _check_pair(*state)
            if state[0].shape != x_T.shape:
                raise ValueError(f"the pair's state has shape {tuple(state[0].shape)}, its "
                                 f"latents {tuple(x_T.shape)}")
        pair = LatentPair(x_T, x_T2, timesteps, state, grid)
        self._pending_pair = pair
        if self._grid_ts is not None:
            if self._grid_mismatch(pair) is None:
                self._expose()  # the grid is already set: publish the N-1 timesteps now
            else:  # a grid from an earlier run: the pair's run needs set_timesteps first
                self._grid_ts = None

    def _kind_mismatch(self, grid: Mapping[str, Any]) -> str | None:
        made = grid.get("kind")
        if made is None or made == self._grid_kind:
            return None
        return (f"the latent pair was made by a {made} scheduler, but {type(self).__name__} is a "
                f"{self._grid_kind} scheduler: the two kinds walk different grids (and their "
                "models predict different things), so regenerate with the kind of scheduler, "
                "and the pipeline, that made the pair")

    def _grid_mismatch(self, pair: LatentPair) -> str | None:
        kind = self._kind_mismatch(pair.grid)
        if kind:
            return kind
        for key, made in pair.grid.items():
            if key not in self._grid_record:
                return (f"the latent pair was made on a grid with {key} {_show(made)}, which "
                        f"{type(self).__name__}'s grid does not have (a pair made by another "
                        "kind of scheduler?)")
            here = self._grid_record[key]
            if here != made:
                return (f"the latent pair was made on the {key} {_show(made)} but the scheduler "
                        f"is set to {_show(here)}: invert and regenerate with the same "
                        "num_inference_steps and scheduler config")
        return None

    def _exposed_timesteps(self) -> list:
        pair = self._armed = self._pending_pair
        self._offset = 0
        if pair is None:
            return list(self._grid_ts)
        start = self._pair_start + 1  # the state of x_T2, where the run starts
        if len(self._grid_ts) < start + 1:
            raise ValueError(f"a latent pair needs at least {start + 1} timesteps")
        mismatch = self._grid_mismatch(pair)
        if mismatch:
            raise ValueError(mismatch)
        self._offset = start
        return list(self._grid_ts[start:])

    def _exposed_states(self) -> list[int]:
        """The grid states (0: the noisiest, N: the clean one) of the samples the published run
        walks through, in order: the sample of step i and what that step returns are states
        ``[i]`` and ``[i + 1]`` of this list."""
        return list(range(self._offset, len(self._grid_ts) + 1))

    def _first_step(self, k, sample):
        pair = self._armed
        if pair is None:  # no previous state: a one-step (DDIM) start from state k
            return _Step(False, "first", k)
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
        return _Step(False, "two", k + self._offset, x_T.to(sample.device), pair.state)

    def _next_step(self, k):
        return _Step(False, "two", k + self._offset)

    def _started(self):
        self._armed = self._pending_pair = None  # a latent pair is consumed by its run


class BELMInversionMixin(BELMSchedulerMixin):
    """Exact inversion: ascending timesteps from the clean state, ending with a latent pair.

    For a grid t_0 > ... > t_{N-1} it runs N steps; ``timesteps`` are
    ``[t_{N-1}, t_{N-1}, t_{N-2}, ..., t_1]``: the first step inverts the one-step method with the
    model evaluated on the clean latent at t_{N-1} (as diffusers' ``DDIMInverseScheduler`` does),
    each later one is the exact inverse of an O-BELM step, evaluating the model at its own state
    and timestep (so t_{N-1} appears twice and t_0 not at all). After the last step
    ``latent_pair`` holds ``(x_T, x_T2)``; the last ``prev_sample`` is x_T. On a grid whose
    noisiest state has zero SNR the inversion stops one state earlier (N-1 steps, ending at
    t_2; see ``_set_grid``).
    """

    _min_steps = 2

    def _exposed_timesteps(self) -> list:
        ts = self._grid_ts
        return [ts[-1]] + list(ts[self._pair_start + 1:][::-1])

    def _exposed_states(self) -> list[int]:
        """From the clean state N to the pair's x_T (see ``BELMSamplingMixin._exposed_states``)."""
        return list(range(len(self._grid_ts), self._pair_start - 1, -1))

    def _first_step(self, k, sample):
        if k != 0:
            raise ValueError(f"{type(self).__name__} must start at the clean state (step 0), got "
                             f"step {k}")
        wide = self._wide_dtype(sample, None)
        start = None
        if wide is not None:  # the clean state, widened and dithered (see WIDE_START_DITHER)
            x = sample.to(wide) * (1 + WIDE_START_DITHER * torch.finfo(sample.dtype).eps)
            start = (x, x)
        return _Step(False, "first_inverse", len(self._grid_ts) - 1, wide=start)

    def _next_step(self, k):
        return _Step(True, "two", len(self._grid_ts) - k)

    @property
    def latent_pair(self) -> LatentPair:
        """``(x_T, x_T2)`` after the last step of the inversion, ready for ``set_latent_pair``."""
        n = len(self._ts_host) if self._grid_ts is not None else 0
        if self._grid_ts is None or self._step_index != n:
            done = self._step_index or 0
            raise ValueError(f"the inversion is not finished ({done} of {n} steps done): "
                             "latent_pair is available after the last step")
        state = None if self._wide is None else (self._cur_wide, self._prev_wide)
        return LatentPair(self._returned, self._prev, state=state, grid=self._grid_record)
