"""``FlowMatchBELMScheduler``: O-BELM sampling on a rectified-flow grid (SD3, Flux), and the flow
schedule it shares with ``FlowMatchBELMInverseScheduler``.

The flow ODE dx/ds = v already has the form the BELM steps are derived in (DESIGN.md section 2b),
so the rows are the shared coefficient functions on the flow grid of
:class:`belm_kernels.FlowSchedule` (alpha = 1, sigma = s): the first step of a run is
FlowMatchEulerDiscreteScheduler's Euler step x + (s_next - s) v, every later one is O-BELM,
``a x_prev + (1 - a) x + c v`` with a = h_j^2 / h_{j-1}^2 and c = -h_j (h_j + h_{j-1}) / h_{j-1}
(h_j = s_j - s_{j+1}), in one fused :func:`belm_kernels.lincomb3_`. The model output is the
velocity as SD3 and Flux predict it; nothing is converted.

Config. The keys of ``FlowMatchEulerDiscreteScheduler`` (``from_config`` of the configs SD3,
Flux, HunyuanVideo, LTX-Video, Qwen-Image and Chroma ship works), plus ``backend`` and
``state_dtype`` as in :class:`BELMScheduler`. The sigmas are ``FlowSchedule``'s: a static
``shift`` (SD3), or dynamic shifting (Flux: ``use_dynamic_shifting``, with ``mu`` passed to
``set_timesteps``, which the pipelines compute from the image size and ``base_shift``,
``max_shift``, ``base_image_seq_len``, ``max_image_seq_len``), stretched to ``shift_terminal``
when set (LTX-Video, Qwen-Image); custom ``sigmas`` as the pipelines pass them. They equal
FlowMatchEulerDiscreteScheduler's up to its float32 rounding (they are float64 here);
``timesteps`` are ``num_train_timesteps * sigma`` in float32, computed as
FlowMatchEulerDiscreteScheduler computes them. As there, ``mu`` is ignored without dynamic
shifting (FluxPipeline passes it to FLUX.1-schnell's static config too).

The flow sigmas of ``UniPCMultistepScheduler`` (Wan's configs: ``use_flow_sigmas=True``,
``flow_shift``, ``prediction_type="flow_prediction"``) are reproduced too: the unshifted sigmas
``linspace(1, 1 / num_train_timesteps, N + 1)[:-1]`` shifted by ``flow_shift`` (or by ``mu`` with
dynamic shifting), a first sigma of 1 lowered by 1e-6 as UniPC does, and integer timesteps
``int(num_train_timesteps * sigma)``, so that the model sees the timesteps and the states the
sigmas of Wan's own scheduler (the same floats; only the solver differs). DPM-Solver's flow
sigmas (Sana) are spaced differently: a config with their ``algorithm_type`` is refused.

Options of FlowMatchEulerDiscreteScheduler that ``FlowSchedule`` does not implement are refused
when set (``UNSUPPORTED_OPTIONS``): each one changes the sigmas or the step, so ignoring it would
silently generate something else than the config asks for (and exact inversion of stochastic
sampling is impossible). Custom ``timesteps`` are refused too (pass ``sigmas``).

``sigmas`` (float32, on the device, as FlowMatchEulerDiscreteScheduler has them) hold the noise
level of the sample each published step receives, then the one the last step returns:
``sigmas[i]`` belongs to the sample of ``timesteps[i]``. A run armed with a latent pair publishes
the N-1 steps after the first (see :class:`~belm_kernels.diffusers.LatentPair`), and both lists
start one state later.

The grid record a latent pair carries holds the float64 sigmas and ``mu``: a pair is refused by
a scheduler set to other sigmas (another number of steps, shift, image size, ...) or by a
variance-preserving ``BELMScheduler`` (and a VP pair by this one).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config

# SchedulerMixin: diffusers' pipeline loader looks the base class up in the namespace of the
# module that model_index.json names (this one, for a saved pipeline with this scheduler).
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from .. import coefficients
from ..schedule import FlowSchedule, _vector
from .scheduling_utils import BELMSamplingMixin, BELMSchedulerMixin

# FlowMatchEulerDiscreteScheduler options FlowSchedule does not implement:
# option -> (the values that leave it off, what it would do)
UNSUPPORTED_OPTIONS = {
    "invert_sigmas": ((False,), "sigmas running from 0 to 1 (Mochi)"),
    "use_karras_sigmas": ((False,), "Karras sigmas"),
    "use_exponential_sigmas": ((False,), "exponential sigmas"),
    "use_beta_sigmas": ((False,), "beta-distribution sigmas"),
    "time_shift_type": (("exponential",), "a linear dynamic time shift"),
    "stochastic_sampling": ((False,), "fresh noise at every step, which no inversion can undo"),
    "final_sigmas_type": (("zero",), "a last state that is not clean (UniPC's sigma_min)"),
}
#: The prediction types of a velocity model (FlowMatchEuler configs have no prediction_type)
FLOW_PREDICTION_TYPES = (None, "flow_prediction")
#: UniPC lowers a first sigma of 1 by this much (its log(1 - sigma) would be infinite)
UNIPC_SIGMA_NUDGE = 1e-6


def _timesteps_f32(sigmas: torch.Tensor, num_train_timesteps: int) -> list[float]:
    """num_train_timesteps * sigma in float32, as FlowMatchEulerDiscreteScheduler computes its
    timesteps from its float32 sigmas (Python floats of float32 values)."""
    return (sigmas.to(torch.float32) * num_train_timesteps).tolist()


def _timesteps_int(sigmas: torch.Tensor, num_train_timesteps: int) -> list[int]:
    """int64(num_train_timesteps * sigma) from the float64 sigmas (truncated), as UniPC's flow
    sigmas give its timesteps."""
    return (sigmas * num_train_timesteps).to(torch.int64).tolist()


class FlowScheduleMixin(BELMSchedulerMixin, ConfigMixin):
    """The rectified-flow schedule of :class:`FlowMatchBELMScheduler` and
    ``FlowMatchBELMInverseScheduler``: config, ``set_timesteps``, coefficient tables, ``sigmas``
    and ``scale_noise``."""

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    # (the text is part of the grid records stored by the bulk jobs: changing it would make
    # their folders look like another grid)
    _grid_kind = "rectified-flow (flow matching: SD3, Flux)"
    _timestep_dtype = torch.float32

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        prediction_type: str | None = None,
        algorithm_type: str | None = None,
        backend: str = "auto",
        state_dtype: str | None = None,
    ):
        self._check_options()
        for name, value in (("use_dynamic_shifting", use_dynamic_shifting),
                            ("use_flow_sigmas", use_flow_sigmas)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        # FlowSchedule validates shift, shift_terminal and num_train_timesteps (mu comes with
        # set_timesteps); UniPC's flow sigmas are shifted by flow_shift
        static = FlowSchedule(shift=flow_shift if use_flow_sigmas else shift,
                              num_train_timesteps=num_train_timesteps,
                              shift_terminal=shift_terminal or None)
        # UniPC publishes integer timesteps, FlowMatchEuler float32 ones
        self._timestep_dtype = torch.int64 if use_flow_sigmas else torch.float32
        self.init_noise_sigma = 1.0
        # Until set_timesteps: the training schedule, as FlowMatchEulerDiscreteScheduler has it
        # (shifted by a static shift; dynamic shifting needs mu, so unshifted).
        s = torch.linspace(1.0, 1 / num_train_timesteps, num_train_timesteps, dtype=torch.float64)
        if not use_dynamic_shifting:
            s = static.shifted(s)
        self.sigmas = s.to(torch.float32)
        self.timesteps = torch.tensor(_timesteps_f32(s, num_train_timesteps))
        self._init_run_state()

    def _check_options(self) -> None:
        cfg = self.config
        for option, (off, what) in UNSUPPORTED_OPTIONS.items():
            value = getattr(cfg, option)
            if value not in off:
                raise ValueError(
                    f"{type(self).__name__} does not support {option}={value!r} ({what}): "
                    "FlowSchedule implements FlowMatchEulerDiscreteScheduler's static shift and "
                    f"exponential dynamic shifting only; leave {option} at {off[0]!r}, or use "
                    "FlowMatchEulerDiscreteScheduler for this config")
        if cfg.prediction_type not in FLOW_PREDICTION_TYPES:
            raise ValueError(
                f"{type(self).__name__} takes a velocity model (prediction_type "
                f"'flow_prediction'), got prediction_type={cfg.prediction_type!r}: that config "
                "is a variance-preserving model's, whose BELM scheduler is BELMScheduler")
        # algorithm_type is a key of DPM-Solver's (and DEIS') configs only, not of UniPC's
        if cfg.use_flow_sigmas and cfg.algorithm_type is not None:
            raise ValueError(
                f"{type(self).__name__} reproduces UniPCMultistepScheduler's flow sigmas "
                "(use_flow_sigmas=True, as Wan ships them); DPMSolverMultistepScheduler's (Sana) "
                "are spaced differently and are not supported")
        self._check_common_options()

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _schedule(self, mu) -> tuple[FlowSchedule, float | None]:
        """The FlowSchedule of the config (and the mu it uses: None without dynamic shifting)."""
        cfg = self.config
        common = dict(num_train_timesteps=cfg.num_train_timesteps,
                      shift_terminal=cfg.shift_terminal or None)
        if not cfg.use_dynamic_shifting:  # as FlowMatchEulerDiscreteScheduler: mu is not used
            shift = cfg.flow_shift if cfg.use_flow_sigmas else cfg.shift
            return FlowSchedule(shift=shift, **common), None
        if mu is None:
            raise ValueError(
                f"{type(self).__name__} has use_dynamic_shifting=True, so set_timesteps needs mu: "
                "pass mu=belm_kernels.calculate_shift(image_seq_len, base_image_seq_len, "
                "max_image_seq_len, base_shift, max_shift) with the config's values and the "
                "image's number of latent tokens, as the Flux and SD3 pipelines do (they pass it "
                "themselves)")
        if isinstance(mu, numbers.Real) and not isinstance(mu, bool):  # numpy floats too
            mu = float(mu)
        schedule = FlowSchedule(use_dynamic_shifting=True, mu=mu, **common)
        return schedule, schedule.mu

    def set_timesteps(self, num_inference_steps: int | None = None,
                      device: str | torch.device | None = None,
                      sigmas: list[float] | np.ndarray | torch.Tensor | None = None,
                      mu: float | None = None, timesteps=None) -> None:
        """Build the grid of ``num_inference_steps`` sigmas (or the N given unshifted ``sigmas``,
        strictly decreasing in (0, 1], without the final 0), shifted by the config's ``shift`` or,
        with dynamic shifting, by ``mu``; then the clean state sigma = 0. Moves the coefficient
        tables to ``device`` once and starts a new run. Arguments as
        ``FlowMatchEulerDiscreteScheduler.set_timesteps``, except that custom ``timesteps`` are
        not supported (pass ``sigmas``). A config with UniPC's ``use_flow_sigmas`` gets UniPC's
        sigmas and integer timesteps (see the module docstring)."""
        self._check_options()
        cfg = self.config
        if timesteps is not None:
            raise ValueError(
                f"{type(self).__name__} does not take custom timesteps (its timesteps are always "
                "num_train_timesteps * sigma); pass the unshifted sigmas= instead")
        if num_inference_steps is None and sigmas is None:
            raise ValueError("set_timesteps needs num_inference_steps or sigmas")
        schedule, mu = self._schedule(mu)
        if sigmas is not None:
            sigmas = _vector(sigmas, "sigmas")
        if sigmas is not None and len(sigmas) and float(sigmas[-1]) == 0:
            raise ValueError(
                "set_timesteps takes the sigmas of the model calls, without the final 0 (it is "
                "appended here, as FlowMatchEulerDiscreteScheduler does); drop the last entry")
        if cfg.use_flow_sigmas and sigmas is None:
            n = num_inference_steps
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"num_inference_steps must be an int >= 1, got {n!r}")
            # UniPC's unshifted flow sigmas (numpy's linspace: the same float64 values)
            sigmas = np.linspace(1, 1 / cfg.num_train_timesteps, n + 1)[:-1]
        s = schedule.sigmas(num_inference_steps, sigmas)
        if cfg.use_flow_sigmas and abs(float(s[0]) - 1) < UNIPC_SIGMA_NUDGE:
            s[0] -= UNIPC_SIGMA_NUDGE
        grid = schedule.grid(s)
        self._check_steps(grid.num_steps)  # before anything changes
        tables = {"first": coefficients.ddim(grid),  # the Euler step, and its inversion
                  "first_inverse": coefficients.ddim_inverse(grid),
                  "two": coefficients.obelm(grid)}
        as_timesteps = _timesteps_int if cfg.use_flow_sigmas else _timesteps_f32
        host = tuple(as_timesteps(s[:-1], cfg.num_train_timesteps))
        # what a latent pair must match: mu (with dynamic shifting) and the float64 sigmas
        record = {"mu": mu, "sigmas": tuple(s.tolist()), "timesteps": host}
        self._grid_sigmas = s
        self._set_grid(host, tables, device, record)

    def _expose(self) -> None:
        super()._expose()
        states = self._exposed_states()
        self.sigmas = self._grid_sigmas[states].to(device=self._device, dtype=torch.float32)

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
        """The flow's forward process sigma * noise + (1 - sigma) * sample, as
        FlowMatchEulerDiscreteScheduler computes it (img2img pipelines start with it): sigma of
        ``begin_index`` (before the first step; after it, of ``step_index``), or without a begin
        index of each value in ``timestep`` (the second match of a repeated one)."""
        if self._grid_ts is None:
            raise ValueError("scale_noise needs the sigmas of set_timesteps: call it first")
        timestep = torch.as_tensor(timestep).reshape(-1)
        if self.begin_index is None:
            indices = [self._index_for_timestep(t) for t in timestep.tolist()]
        else:
            index = self.begin_index if self.step_index is None else self.step_index
            indices = [index] * len(timestep)
        sigma = self.sigmas.to(device=sample.device, dtype=sample.dtype)[indices].flatten()
        sigma = sigma.reshape(sigma.shape + (1,) * (sample.dim() - 1))
        return sigma * noise + (1.0 - sigma) * sample

    def _index_for_timestep(self, value: float) -> int:
        matches = [i for i, t in enumerate(self._ts_host) if t == value]
        if not matches:
            raise ValueError(self._not_in_schedule(value))
        return matches[1] if len(matches) > 1 else matches[0]


class FlowMatchBELMScheduler(BELMSamplingMixin, FlowScheduleMixin):
    """O-BELM sampling on a rectified-flow grid: a drop-in for ``FlowMatchEulerDiscreteScheduler``
    in the SD3 and Flux pipelines (and their img2img variants).

    The first step of a run is FlowMatchEulerDiscreteScheduler's Euler step; every later one
    combines the previous state, the current one and the velocity in one fused
    :func:`belm_kernels.lincomb3_` (second order, where Euler is first order).
    ``set_latent_pair(pair)`` arms the next run to regenerate exactly from a pair made by
    :func:`~belm_kernels.diffusers.invert` or ``FlowMatchBELMInverseScheduler``. Config keys as
    ``FlowMatchEulerDiscreteScheduler`` plus ``backend`` and ``state_dtype`` (see the module
    docstring for what is refused).
    """
