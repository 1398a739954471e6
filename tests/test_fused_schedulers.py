"""``belm_kernels.diffusers.fuse``: each fused scheduler against the installed diffusers, step by
step on the configs that SD 1.5, SDXL, SD3, Flux, Wan and LCM ship and through ``pipe(...)`` on the
tiny pipelines, plus what it refuses, its API and state, and saving.

Error model (``belm_kernels.roundoff``; derived, not fitted). A fused step and the original compute
the same linear combination ``sum_r c_r t_r`` of the tensors the step reads (sample, model output,
noise, history) with coefficients from the same float32 grid; they differ only in arithmetic. For
every output of every step:

    |original - exact| <= B_orig = sum_r err_r |t_r| + sum_h |c_h| B_h
    |fused - exact|    <= B_fused = sum_r (((K + 2) u + u_out) |c_r| + err64_r) |t_r|
                                    + sum_h |c_h| B_h

where ``err_r`` and ``mag_r`` come from running the scheduler's own step formula (written as
diffusers writes it, in ``belm_kernels.multistep``) in ``Roundoff(float32)`` numbers: first-order
running error analysis of diffusers' float32 evaluation, u = 2^-24 per scalar and tensor operation,
4u for log / exp / expm1 / pow, the LU backward error for UniPC's small solves; ``err64_r`` is the
float64 table's own coefficient error (the same analysis in float64); K + 1 is the number of tensors
the fused op reads; B_h the bounds of the history entries read (propagated from the step that
wrote them). Each test asserts ``|fused - original| <= B_fused + B_orig`` elementwise, and that each
is within its own bound of the float64 reference, so a wrong coefficient (a formula that is not
diffusers') fails even where both agree.

Per scheduler, the bound is dominated by diffusers' own float32 arithmetic. Largest bound over the
steps of the runs below, relative to the largest output of the step (``-s`` prints it per case,
with the measured difference; the README has the table):

    DDIM (SD 1.5; eta, v, sample)            ~1e-6   a handful of rounded tensor ops
    Euler, Euler a (SDXL, SD 1.5)            ~2e-6   idem, on the sigmas' quotients
    LCM                                      ~1e-6   idem
    flow Euler (SD3, Flux dev / schnell)     ~5e-7   one multiply-add
    DPM-Solver++ 2M (SD 1.5, SDXL Karras)    ~1e-5   lambda_t - lambda_s and exp(-h) - 1 cancel
    DPM-Solver++ 3M, beta sigmas + heun      ~3e-4 to 1e-3   as 2M, with r0, r1 and D2
    UniPC order 2 (SD 1.5, Wan 480p / 720p)  ~1e-3 to 5e-3   the h_phi_k recursion cancels like
                                                             u / h^k; the corrector's own state
                                                             carries errors from step to step
    UniPC order 3 (SDXL; SD 1.5 Karras)      ~7e-2; 2e-3   idem, through a 3x3 Vandermonde solve

These are worst cases (every rounding aligned): the measured differences stay near 1e-7 to 2e-6,
but reach 8% to 55% of the bound at their worst element in every run.
"""

from __future__ import annotations

import functools
import inspect
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from torch.utils._python_dispatch import TorchDispatchMode

import belm_kernels as bk
from belm_kernels import multistep
from belm_kernels.diffusers import fuse
from belm_kernels.diffusers.fused import FUSED_SCHEDULERS, UnsupportedOptionError
from belm_kernels.roundoff import Roundoff, fused_error, original_error, reference

# ----------------------------------------------------------------------------------------------
# The configs the models ship (scheduler_config.json of their diffusers repositories).

SD15 = dict(  # runwayml/stable-diffusion-v1-5 (PNDMScheduler); users swap in others from it
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
    num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    trained_betas=None)
SDXL = dict(  # stabilityai/stable-diffusion-xl-base-1.0 (EulerDiscreteScheduler)
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
    interpolation_type="linear", num_train_timesteps=1000, prediction_type="epsilon",
    sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
    timestep_spacing="leading", trained_betas=None, use_karras_sigmas=False)
SD3 = dict(num_train_timesteps=1000, shift=3.0)  # stabilityai/stable-diffusion-3-medium-diffusers
FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
FLUX_SCHNELL = dict(  # black-forest-labs/FLUX.1-schnell
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
WAN = dict(  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers (flow_shift 3.0 for 480p, 5.0 for 720p)
    beta_end=0.02, beta_schedule="linear", beta_start=0.0001, disable_corrector=[],
    dynamic_thresholding_ratio=0.995, final_sigmas_type="zero", flow_shift=3.0,
    lower_order_final=True, num_train_timesteps=1000, predict_x0=True,
    prediction_type="flow_prediction", rescale_betas_zero_snr=False, sample_max_value=1.0,
    solver_order=2, solver_p=None, solver_type="bh2", steps_offset=0, thresholding=False,
    timestep_spacing="linspace", trained_betas=None, use_beta_sigmas=False,
    use_exponential_sigmas=False, use_flow_sigmas=True, use_karras_sigmas=False)
LCM = dict(  # SimianLuo/LCM_Dreamshaper_v7 (and the LCM-LoRA repositories)
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
    clip_sample_range=1.0, num_train_timesteps=1000, original_inference_steps=50,
    prediction_type="epsilon", rescale_betas_zero_snr=False, set_alpha_to_one=True,
    steps_offset=1, thresholding=False, timestep_scaling=10.0, timestep_spacing="leading",
    trained_betas=None)


def flux_timesteps(n, seq_len=4096):
    """What FluxPipeline passes to set_timesteps for an image of ``seq_len`` tokens."""
    return dict(sigmas=np.linspace(1.0, 1 / n, n), mu=bk.calculate_shift(seq_len))


# (id, class, config, overrides, set_timesteps kwargs, step kwargs, steps)
CASES = [
    ("ddim-sd15", DDIMScheduler, SD15, {}, {}, {}, 50),
    ("ddim-sd15-eta", DDIMScheduler, SD15, {}, {}, {"eta": 0.7}, 20),
    ("ddim-v-trailing", DDIMScheduler, SD15,
     dict(prediction_type="v_prediction", timestep_spacing="trailing"), {}, {}, 10),
    ("ddim-sample-clipped", DDIMScheduler, SD15, dict(prediction_type="sample"), {},
     {"use_clipped_model_output": True}, 10),
    ("dpm2m-sd15", DPMSolverMultistepScheduler, SD15, {}, {}, {}, 25),
    ("dpm2m-karras-sdxl", DPMSolverMultistepScheduler, SDXL, dict(use_karras_sigmas=True), {},
     {}, 30),
    ("dpm2m-karras-10", DPMSolverMultistepScheduler, SD15, dict(use_karras_sigmas=True), {}, {},
     10),
    ("dpm1", DPMSolverMultistepScheduler, SD15, dict(solver_order=1), {}, {}, 12),
    ("dpm3m-sd15", DPMSolverMultistepScheduler, SD15, dict(solver_order=3), {}, {}, 20),
    ("dpm3m-exponential", DPMSolverMultistepScheduler, SD15,
     dict(solver_order=3, use_exponential_sigmas=True), {}, {}, 12),
    ("dpm2m-beta-heun", DPMSolverMultistepScheduler, SD15,
     dict(use_beta_sigmas=True, solver_type="heun"), {}, {}, 20),
    ("dpm2m-lu-euler-final", DPMSolverMultistepScheduler, SDXL,
     dict(use_lu_lambdas=True, euler_at_final=True), {}, {}, 20),
    ("dpm2m-sigma-min", DPMSolverMultistepScheduler, SD15,
     dict(final_sigmas_type="sigma_min", lower_order_final=False), {}, {}, 20),
    ("dpm2m-v", DPMSolverMultistepScheduler, SD15,
     dict(prediction_type="v_prediction", timestep_spacing="trailing"), {}, {}, 20),
    ("dpm2m-sample", DPMSolverMultistepScheduler, SD15, dict(prediction_type="sample"), {}, {},
     15),
    ("dpm2m-flow", DPMSolverMultistepScheduler, SD15,
     dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0), {}, {}, 20),
    ("dpm-sde-2m-karras", DPMSolverMultistepScheduler, SD15,
     dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), {}, {}, 20),
    ("dpm-sde-2m-heun", DPMSolverMultistepScheduler, SD15,
     dict(algorithm_type="sde-dpmsolver++", solver_type="heun"), {}, {}, 12),
    ("dpm-sde-3m", DPMSolverMultistepScheduler, SD15,
     dict(algorithm_type="sde-dpmsolver++", solver_order=3), {}, {}, 20),
    ("unipc-sd15", UniPCMultistepScheduler, SD15, {}, {}, {}, 20),
    ("unipc-bh1-3-karras", UniPCMultistepScheduler, SD15,
     dict(solver_type="bh1", solver_order=3, use_karras_sigmas=True,
          final_sigmas_type="sigma_min"), {}, {}, 15),
    ("unipc-bh2-3-sdxl", UniPCMultistepScheduler, SDXL, dict(solver_order=3), {}, {}, 25),
    ("unipc-predict-eps", UniPCMultistepScheduler, SD15,
     dict(predict_x0=False, final_sigmas_type="sigma_min"), {}, {}, 12),
    ("unipc-disable-corrector", UniPCMultistepScheduler, SD15,
     dict(disable_corrector=[0, 3, 7], lower_order_final=False, final_sigmas_type="sigma_min"),
     {}, {}, 10),
    ("unipc-wan-480p", UniPCMultistepScheduler, WAN, {}, {}, {}, 50),
    ("unipc-wan-720p", UniPCMultistepScheduler, WAN, dict(flow_shift=5.0), {}, {}, 30),
    ("euler-sdxl", EulerDiscreteScheduler, SDXL, {}, {}, {}, 30),
    ("euler-karras-sdxl", EulerDiscreteScheduler, SDXL, dict(use_karras_sigmas=True), {}, {}, 25),
    ("euler-v-trailing", EulerDiscreteScheduler, SD15,
     dict(prediction_type="v_prediction", timestep_spacing="trailing"), {}, {}, 10),
    ("euler-a-sd15", EulerAncestralDiscreteScheduler, SD15, {}, {}, {}, 30),
    ("euler-a-v", EulerAncestralDiscreteScheduler, SDXL, dict(prediction_type="v_prediction"),
     {}, {}, 10),
    ("lcm-4", LCMScheduler, LCM, {}, {}, {}, 4),
    ("lcm-8-v", LCMScheduler, LCM, dict(prediction_type="v_prediction"), {}, {}, 8),
    ("flow-sd3", FlowMatchEulerDiscreteScheduler, SD3, {}, {}, {}, 28),
    ("flow-flux-dev", FlowMatchEulerDiscreteScheduler, FLUX_DEV, {}, flux_timesteps(28), {}, 28),
    ("flow-flux-schnell", FlowMatchEulerDiscreteScheduler, FLUX_SCHNELL, {}, flux_timesteps(4),
     {}, 4),
    ("flow-stochastic", FlowMatchEulerDiscreteScheduler, SD3, dict(stochastic_sampling=True), {},
     {}, 10),
]

SHAPE = (2, 4, 8, 8)


def make(cls, config, **overrides):
    return cls.from_config({**config, **overrides})


def takes(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


# ----------------------------------------------------------------------------------------------
# Running an original and its fused scheduler side by side, checking every step.


class Lockstep:
    """Steps ``original`` and ``fused`` on the same inputs (the fused scheduler's output is the
    next sample of both) and checks each output against the error model of the module docstring.
    History entries are followed in a float64 reference run, with their bounds."""

    def __init__(self, original, fused, step_kwargs=None):
        self.original, self.fused = original, fused
        # the fused methods, bound now: a pipeline test routes the instance's own through here
        self._set, self._scale, self._step = (
            fused.set_timesteps, getattr(fused, "scale_model_input", None), fused.step)
        self.step_kwargs = dict(step_kwargs or {})
        self.worst = 0.0  # largest |fused - original| / bound seen
        self.relative = [0.0, 0.0]  # largest bound and |fused - original|, over max |output|
        self.steps = 0

    def set_timesteps(self, *args, **kwargs):
        self.original.set_timesteps(*args, **kwargs)
        self._set(*args, **kwargs)
        self.history: dict = {}
        self.tracked: dict = {}

    def scale_model_input(self, sample, *args, **kwargs):
        if self._scale is None:
            return sample
        self.original.scale_model_input(sample, *args, **kwargs)
        return self._scale(sample, *args, **kwargs)

    def _formulas(self, timestep, dtype, kwargs):
        """(float64 table entry, Roundoff(float32) outputs, Roundoff(float64) outputs) of the
        step the fused scheduler just took."""
        fused = self.fused
        if isinstance(fused, DDIMScheduler):  # each step depends on its timestep's value only
            i = fused._view_index(timestep)
            t = fused._ts_host[i] if i is not None else int(timestep)
            args = dict(eta=float(kwargs.get("eta", 0.0)),
                        use_clipped_model_output=kwargs.get("use_clipped_model_output", False))
            f32, f64 = (fused._ddim_step(F, t, **args) for F in (
                Roundoff(torch.float32, dtype), Roundoff(torch.float64)))
            with multistep.ieee():
                return multistep.tabulate([fused._ddim_step(multistep.FLOAT64, t, **args)])[0], \
                    f32, f64
        k, start = fused.step_index - 1, fused._run_start
        key = (start, dtype)
        if key not in self.tracked:
            self.tracked[key] = [fused.fused_steps(F, start) for F in (
                Roundoff(torch.float32, dtype), Roundoff(torch.float64))]
        f32, f64 = self.tracked[key]
        return fused.fused_table(start)[k - start], f32[k - start], f64[k - start]

    def step(self, model_output, timestep, sample, **kwargs):
        kwargs = {**self.step_kwargs, **kwargs}
        generator = kwargs.pop("generator", None)
        states = generator.get_state() if generator is not None else None
        if takes(self.original.step, "generator"):
            ours = self._step(model_output, timestep, sample, generator=generator, **kwargs)
            kwargs["generator"] = None if states is None else torch.Generator().set_state(states)
        else:
            ours = self._step(model_output, timestep, sample, **kwargs)
        theirs = self.original.step(model_output, timestep, sample, **kwargs)
        named = [dict(zip(self.fused.fused_outputs, out, strict=True)) if isinstance(out, tuple)
                 else dict(out) for out in (ours, theirs)]
        self._check(*named, model_output, timestep, sample, states, kwargs)
        self.steps += 1
        return ours

    def _check(self, ours, theirs, model_output, timestep, sample, states, kwargs):
        fused = self.fused
        step, f32, f64 = self._formulas(timestep, sample.dtype, kwargs)
        k = timestep if isinstance(fused, DDIMScheduler) else fused.step_index - 1
        values = {multistep.SAMPLE: sample.double(), multistep.MODEL_OUTPUT: model_output.double()}
        if step.noise:
            g = torch.Generator().manual_seed(0) if states is None else (
                torch.Generator().set_state(states))
            noise = kwargs.get("variance_noise")
            if noise is None:
                noise = torch.randn(sample.shape, generator=g)
            values[multistep.NOISE] = noise.double()
        bounds = {"orig": {}, "fused": {}, "ref": {}}
        checked = [f32[o] for o in step.outputs]
        for role in {r for lin in checked for r in lin.coef}:
            name, j = multistep.parse_role(role)
            if j and (name, k - j) not in self.history:  # not stored: it must not matter
                assert not any(lin.coef.get(role) or lin.mag.get(role) or lin.err.get(role)
                               for lin in checked), role
                values[role] = torch.zeros(())
            elif j:
                ref, b_orig, b_fused, b_ref = self.history[name, k - j]
                values[role] = ref
                bounds["orig"][role], bounds["fused"][role], bounds["ref"][role] = (
                    b_orig, b_fused, b_ref)
        names = list(theirs)
        for row, role in enumerate(step.outputs):
            ref = reference(step, row, values)
            out_dtype = (ours[role].dtype if role in names
                         else fused._dtype(role, sample, model_output))  # its history dtype
            b_orig = original_error(f32[role], values, bounds["orig"])
            b_fused = fused_error(step, row, f64[role], values, out_dtype, bounds["fused"])
            b_ref = fused_error(step, row, f64[role], values, torch.float64, bounds["ref"],
                                compute_dtype=torch.float64)
            if role in names:
                mine, other = ours[role].double(), theirs[role].double()
                diff = (mine - other).abs()
                assert bool((diff <= b_fused + b_orig).all()), (
                    f"step {k} {role}: |fused - diffusers| {diff.max():.3g} exceeds the bound "
                    f"{(b_fused + b_orig).min():.3g}")
                assert bool(((other - ref).abs() <= b_orig + b_ref).all()), (
                    f"step {k} {role}: diffusers is {(other - ref).abs().max():.3g} from the "
                    "float64 table's value: the formula is not diffusers'")
                assert bool(((mine - ref).abs() <= b_fused + b_ref).all()), (
                    f"step {k} {role}: the fused op is {(mine - ref).abs().max():.3g} from the "
                    "float64 table's value")
                scale = (b_fused + b_orig).clamp_min(1e-300)
                self.worst = max(self.worst, float((diff / scale).max()))
                size = float(ref.abs().max())
                self.relative = [max(self.relative[0], float((b_fused + b_orig).max()) / size),
                                 max(self.relative[1], float(diff.max()) / size)]
            else:  # a history stream: keep the reference value and its bounds
                self.history[role, k] = (ref, b_orig, b_fused, b_ref)
        for role, same in step.aliases.items():  # the original returns that very tensor too
            if role in names and same in names:
                assert ours[role] is ours[same] and theirs[role] is theirs[same]
            elif role in names:
                source = {multistep.MODEL_OUTPUT: model_output, multistep.SAMPLE: sample}[same]
                assert ours[role] is source and theirs[role] is source


def model_output_for(sample, i, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + i)
    return (0.9 * torch.randn(sample.shape, generator=g) + 0.1 * sample).to(dtype)


def run_lockstep(cls, config, overrides, ts_kwargs, step_kwargs, n, *, seed=0):
    lock = Lockstep(make(cls, config, **overrides), fuse(make(cls, config, **overrides)),
                    step_kwargs)
    lock.set_timesteps(n, **ts_kwargs)
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(SHAPE, generator=g) * float(getattr(lock.original, "init_noise_sigma", 1))
    gen = torch.Generator().manual_seed(seed + 1)
    for i, t in enumerate(lock.fused.timesteps):
        model_input = lock.scale_model_input(sample, t)
        out = lock.step(model_output_for(model_input, i), t, sample, generator=gen)
        sample = out.prev_sample
    return lock, sample


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_step_equals_diffusers_within_the_error_model(case):
    _, cls, config, overrides, ts_kwargs, step_kwargs, n = case
    lock, sample = run_lockstep(cls, config, overrides, ts_kwargs, step_kwargs, n)
    assert torch.isfinite(sample).all()
    assert lock.worst <= 1.0
    print(f"\n{case[0]}: bound {lock.relative[0]:.1e}, |fused - diffusers| "
          f"{lock.relative[1]:.1e} (of max |output|, worst step); at most {lock.worst:.2f} of the "
          "bound")


def test_runs_from_a_begin_index_as_img2img_pipelines_start_them():
    """set_begin_index(k): the multistep warm-up starts at step k, as diffusers' does."""
    for cls, config in ((DPMSolverMultistepScheduler, dict(SD15, solver_order=3)),
                        (UniPCMultistepScheduler, dict(SD15, solver_order=3)),
                        (EulerDiscreteScheduler, SD15)):
        lock = Lockstep(make(cls, config), fuse(make(cls, config)))
        lock.set_timesteps(20)
        for s in (lock.original, lock.fused):
            s.set_begin_index(7)
        sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
        for i, t in enumerate(lock.fused.timesteps[7:]):
            lock.scale_model_input(sample, t)
            sample = lock.step(model_output_for(sample, i), t, sample).prev_sample
        assert lock.fused._run_start == 7 and lock.steps == 13 and lock.worst <= 1


def test_fp16_latents_within_the_float16_error_model():
    """Half-precision latents: the same check with u = 2^-11 for diffusers' tensor operations and
    the float16 rounding of each fused output."""
    for cls, config in ((DPMSolverMultistepScheduler, SD15), (EulerDiscreteScheduler, SDXL),
                        (FlowMatchEulerDiscreteScheduler, SD3)):
        lock = Lockstep(make(cls, config), fuse(make(cls, config)))
        lock.set_timesteps(12)
        sample = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
                  * float(getattr(lock.original, "init_noise_sigma", 1))).half()
        for i, t in enumerate(lock.fused.timesteps):
            lock.scale_model_input(sample, t)
            out = lock.step(model_output_for(sample.float(), i, torch.float16), t, sample)
            assert out.prev_sample.dtype == torch.float16
            sample = out.prev_sample
        assert lock.worst <= 1


# ----------------------------------------------------------------------------------------------
# Through pipelines: the tiny random pipelines, each step checked against a shadow original.


def shadowed(pipe, original_scheduler):
    """Put the fused version of ``original_scheduler`` into ``pipe``, its ``set_timesteps``,
    ``scale_model_input`` and ``step`` routed through a :class:`Lockstep` with the original, so
    that every step the pipeline takes is checked as above."""
    fused = fuse(original_scheduler)
    lock = Lockstep(type(original_scheduler).from_config(original_scheduler.config), fused)
    def routed(method, target):
        @functools.wraps(method)  # the signature pipelines inspect
        def call(*args, **kwargs):
            return target(*args, **kwargs)
        return call

    for name in ("set_timesteps", "scale_model_input", "step"):
        method = getattr(fused, name, None)
        if method is not None:
            setattr(fused, name, routed(method, getattr(lock, name)))
    pipe.scheduler = fused
    return lock


PIPELINE_CASES = [
    ("sd", DDIMScheduler, SD15, dict(eta=0.5)),
    ("sd", DPMSolverMultistepScheduler, dict(SD15, use_karras_sigmas=True), {}),
    ("sd", UniPCMultistepScheduler, SD15, {}),
    ("sd", EulerAncestralDiscreteScheduler, SD15, {}),
    ("sd", LCMScheduler, LCM, {}),
    ("sdxl", EulerDiscreteScheduler, SDXL, {}),
    ("sdxl", DPMSolverMultistepScheduler, dict(SDXL, algorithm_type="sde-dpmsolver++"), {}),
    ("sd3", FlowMatchEulerDiscreteScheduler, SD3, {}),
    ("flux", FlowMatchEulerDiscreteScheduler, FLUX_DEV, {}),
]


@pytest.mark.parametrize("kind, cls, config, call", PIPELINE_CASES,
                         ids=[f"{k}-{c.__name__}" for k, c, _, _ in PIPELINE_CASES])
def test_pipelines_run_the_fused_scheduler_step_by_step_as_diffusers(
        kind, cls, config, call, sd_pipe, sdxl_pipe, sd3_pipe, flux_pipe):
    pipe = {"sd": sd_pipe, "sdxl": sdxl_pipe, "sd3": sd3_pipe, "flux": flux_pipe}[kind]
    lock = shadowed(pipe, make(cls, config))
    n = 4 if cls is LCMScheduler else 8
    out = pipe("a red fox", num_inference_steps=n, output_type="latent",
               generator=torch.Generator().manual_seed(0), **call).images
    assert torch.isfinite(out).all()
    assert lock.steps == n and lock.worst <= 1


def test_wan_runs_its_fused_unipc_step_by_step_as_diffusers(tiny_pipe):
    """Wan 2.1's text-to-video pipeline with the UniPC it ships (flow sigmas, flow_shift 3.0,
    final sigma 0), fused: every step of a guided run within the error model of the original's."""
    pipe = tiny_pipe("tiny_wan_pipeline")
    shipped = pipe.scheduler
    try:
        lock = shadowed(pipe, make(UniPCMultistepScheduler, WAN))
        out = pipe("a red fox", negative_prompt="blurry", height=32, width=32, num_frames=9,
                   num_inference_steps=8, guidance_scale=5.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).frames
    finally:
        pipe.scheduler = shipped  # the tiny pipeline is shared by the session
    assert torch.isfinite(out).all()
    assert lock.steps == 8 and lock.worst <= 1


def test_a_seeded_ancestral_run_draws_the_originals_noise(sd_pipe):
    """Euler ancestral through a pipeline: the fused and the original scheduler, each with a
    generator seeded alike, end within the error model of each other and far from a run with
    another seed (so the noise is the original's, drawn in its order)."""
    def run(scheduler, seed):
        sd_pipe.scheduler = scheduler
        return sd_pipe("a red fox", num_inference_steps=6, output_type="latent",
                       generator=torch.Generator().manual_seed(seed)).images
    original = make(EulerAncestralDiscreteScheduler, SD15)
    a, b = run(original, 0), run(fuse(original), 0)
    other = run(fuse(original), 1)
    assert (a - b).abs().max() < 1e-3 * a.abs().max()
    assert (a - other).abs().max() > 0.1 * a.abs().max()


# ----------------------------------------------------------------------------------------------
# API, state and semantics.


@pytest.mark.parametrize("cls", list(FUSED_SCHEDULERS))
def test_fuse_keeps_the_config_class_api_and_the_originals_state(cls):
    config = {DDIMScheduler: SD15, LCMScheduler: LCM, FlowMatchEulerDiscreteScheduler: SD3}.get(
        cls, SD15)
    original = make(cls, config)
    original.set_timesteps(10)
    fused = fuse(original)
    assert isinstance(fused, cls) and type(fused) is FUSED_SCHEDULERS[cls]
    assert dict(fused.config) == dict(original.config)
    assert torch.equal(fused.timesteps, original.timesteps)
    for name in ("sigmas", "alphas_cumprod"):
        if hasattr(original, name):
            assert torch.equal(getattr(fused, name), getattr(original, name))
    assert fused.order == original.order
    assert getattr(fused, "init_noise_sigma", None) == getattr(original, "init_noise_sigma", None)
    assert inspect.signature(fused.step).parameters.keys() == inspect.signature(
        original.step).parameters.keys()
    assert inspect.signature(fused.set_timesteps) == inspect.signature(original.set_timesteps)
    assert fuse(fused) is fused
    again = type(fused).from_config(fused.config)
    assert dict(again.config) == dict(original.config)
    assert cls.from_config(fused.config).config == original.config


def test_steps_return_new_tensors_and_never_write_their_inputs():
    for cls, config in ((DPMSolverMultistepScheduler, dict(SD15, solver_order=3)),
                        (UniPCMultistepScheduler, SD15), (LCMScheduler, LCM)):
        s = fuse(make(cls, config))
        s.set_timesteps(6)
        sample = torch.randn(SHAPE)
        returned = []
        for i, t in enumerate(s.timesteps):
            mo = model_output_for(sample, i)
            before = (sample.clone(), mo.clone(), sample._version, mo._version)
            out = s.step(mo, t, sample)
            assert torch.equal(sample, before[0]) and torch.equal(mo, before[1])
            assert (sample._version, mo._version) == before[2:]
            for r in returned:
                assert r[0]._version == r[1]
            for tensor in out.values():
                assert tensor.data_ptr() not in (sample.data_ptr(), mo.data_ptr())
            returned += [(tensor, tensor._version) for tensor in out.values()]
            sample = out.prev_sample


def test_runs_again_on_the_same_grid_reuse_the_tables_and_equal_a_fresh_scheduler(monkeypatch):
    """A pipeline called again calls set_timesteps with the same grid: the tables and history
    buffers of the previous run are kept (no table is built again), and every run -- the same
    grid again, another shape, a start at a begin index, another grid, a changed config -- gives
    bit for bit what a newly made scheduler gives."""

    def run(s, steps, shape, begin=None, **step_kwargs):
        s.set_timesteps(steps)
        if begin is not None:
            s.set_begin_index(begin)
        sample = torch.randn(shape, generator=torch.Generator().manual_seed(steps))
        if takes(s.step, "generator"):
            step_kwargs = dict(step_kwargs, generator=torch.Generator().manual_seed(1))
        outs = []
        for i, t in enumerate(s.timesteps[begin or 0:]):
            s.scale_model_input(sample, t)
            out = s.step(model_output_for(sample, i), t, sample, **step_kwargs)
            outs += list(out.values())
            sample = out.prev_sample
        return outs

    for cls, config, step_kwargs in (
            (DPMSolverMultistepScheduler, dict(SD15, solver_order=3), {}),
            (UniPCMultistepScheduler, SD15, {}),
            (DDIMScheduler, SD15, {"eta": 1.0}),
            (EulerAncestralDiscreteScheduler, SD15, {})):
        s = fuse(make(cls, config))
        built, original = [], type(s).fused_steps

        def counted(self, *args, built=built, original=original, **kwargs):
            built.append(args[1:])
            return original(self, *args, **kwargs)

        monkeypatch.setattr(type(s), "fused_steps", counted)
        wide = (3, *SHAPE[1:])
        late = 3 if hasattr(s, "set_begin_index") else None  # (DDIM has no step index)
        for steps, shape, begin in ((8, SHAPE, None), (8, SHAPE, None), (8, wide, None),
                                    (8, SHAPE, late), (5, SHAPE, None), (8, SHAPE, None)):
            built.clear()
            ours = run(s, steps, shape, begin, **step_kwargs)
            fresh = run(fuse(make(cls, config)), steps, shape, begin, **step_kwargs)
            assert len(ours) == len(fresh)
            assert all(torch.equal(a, b) for a, b in zip(ours, fresh, strict=True)), (
                cls.__name__, steps, shape, begin)
        # The same grid again builds nothing.
        built.clear()
        run(s, 8, SHAPE, **step_kwargs)
        assert built == [], cls.__name__
        if cls is UniPCMultistepScheduler:  # an attribute the tables depend on, changed
            s.disable_corrector = [2]
            fresh = fuse(make(cls, config, disable_corrector=[2]))
            assert all(torch.equal(a, b) for a, b in zip(
                run(s, 8, SHAPE), run(fresh, 8, SHAPE), strict=True))
            s.disable_corrector = []
        # A changed config is a new grid's tables.
        s.register_to_config(prediction_type="v_prediction")
        ours = run(s, 8, SHAPE, **step_kwargs)
        assert built, cls.__name__
        fresh = run(fuse(make(cls, config, prediction_type="v_prediction")), 8, SHAPE,
                    **step_kwargs)
        assert all(torch.equal(a, b) for a, b in zip(ours, fresh, strict=True)), cls.__name__


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_step_inputs_are_refused_before_anything_changes(backend):
    """On the compiled backends the step calls the kernel's op directly (its checks in C++), on
    the others the public op: either way a model output of another shape, dtype kind or device
    is refused, and the scheduler's state and the caller's tensors are left as they were."""
    s = fuse(make(DPMSolverMultistepScheduler, SD15), backend=backend)
    s.set_timesteps(6)
    sample = torch.randn(SHAPE)
    t = s.timesteps[0]
    sample = s.step(model_output_for(sample, 0), t, sample).prev_sample
    t = s.timesteps[1]
    good = model_output_for(sample, 1)
    bad = [(torch.randn(SHAPE[0] + 1, *SHAPE[1:]), "shape"), (good.to(torch.int32), "float"),
           (good.to("meta"), "meta|device")]
    for model_output, what in bad:
        before = (sample.clone(), s.step_index, s.lower_order_nums)
        with pytest.raises((ValueError, TypeError, RuntimeError, NotImplementedError),
                           match=what):
            s.step(model_output, t, sample)
        assert torch.equal(sample, before[0]) and (s.step_index, s.lower_order_nums) == before[1:]
    # And the step still runs.
    assert torch.isfinite(s.step(good, t, sample).prev_sample).all()


def test_a_step_autograd_records_equals_the_plain_step_bit_for_bit():
    """With a model output that requires grad the step goes through the public op (its autograd
    rule); the result is the same kernel's, bit for bit, and carries the gradient."""
    results = []
    for grad in (False, True):
        s = fuse(make(UniPCMultistepScheduler, SD15))
        s.set_timesteps(5)
        sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for i, t in enumerate(s.timesteps):
            mo = model_output_for(sample.detach(), i).requires_grad_(grad)
            sample = s.step(mo, t, sample).prev_sample
        assert sample.requires_grad == grad
        results.append(sample.detach())
    assert torch.equal(*results)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("cls", list(FUSED_SCHEDULERS))
def test_a_step_is_one_fused_op_with_no_host_sync(cls, backend):
    """No .item() (aten._local_scalar_dense), no nonzero: a loop of steps is capturable in one
    CUDA graph; the step's only compute op is the fused one, next to at most two others (output
    allocations, the noise draw): the compiled kernel's op itself where the CPU extension is
    built, else the public op."""
    config = {LCMScheduler: LCM, FlowMatchEulerDiscreteScheduler: SD3}.get(cls, SD15)
    s = fuse(make(cls, config), backend=backend)
    direct = backend == "auto" and "cpu" in bk.available_backends()
    fused_op = "belm.lincomb_ext" if direct else "belm.lincomb_"
    s.set_timesteps(6)
    kwargs = {"eta": 0.5} if cls is DDIMScheduler else {}
    sample = torch.randn(SHAPE)
    for i, t in enumerate(s.timesteps):
        mo = model_output_for(sample, i)
        model_input = getattr(s, "scale_model_input", lambda x, t: x)(sample, t)
        with _Ops() as ops:
            sample = s.step(mo, t, model_input, **kwargs).prev_sample
        assert "aten._local_scalar_dense" not in ops.names and "aten.nonzero" not in ops.names
        if i:  # (the first step of a run allocates the history, DDIM's eta > 0 its table)
            compute = [n for n in ops.names if n not in ("aten.empty", "aten.empty_like",
                                                         "aten.randn")]
            assert compute == [fused_op], ops.names
            assert len(ops.names) <= 3, ops.names


def test_the_step_is_located_as_diffusers_locates_it():
    """A timestep view gives diffusers' index with no sync, including its rule for a repeated
    timestep (the second occurrence); other timesteps go through the original's search."""
    s = fuse(make(FlowMatchEulerDiscreteScheduler, SD3))
    orig = make(FlowMatchEulerDiscreteScheduler, SD3)
    ts = [1000.0, 800.0, 800.0, 500.0]
    for x in (s, orig):
        x.set_timesteps(timesteps=ts, sigmas=[1.0, 0.8, 0.8, 0.5])
    for i in range(4):
        s._step_index = orig._step_index = None
        s._init_step_index(s.timesteps[i])
        orig._init_step_index(orig.timesteps[i])
        assert s.step_index == orig.step_index
    s._step_index = None
    s._init_step_index(torch.tensor(500.0))  # not a view: the original's search
    assert s.step_index == 3


def test_fuse_refuses_other_classes_and_bad_arguments():
    with pytest.raises(TypeError, match="fuse supports DDIMScheduler.*got PNDMScheduler"):
        fuse(PNDMScheduler())

    class Custom(EulerDiscreteScheduler):
        pass

    with pytest.raises(TypeError, match="got Custom"):
        fuse(Custom())
    with pytest.raises(ValueError, match="backend must be one of"):
        fuse(EulerDiscreteScheduler(), backend="gpu")


REFUSED = [
    (DDIMScheduler, dict(SD15, clip_sample=True), "clip_sample"),
    (DDIMScheduler, dict(SD15, thresholding=True), "thresholding"),
    (DPMSolverMultistepScheduler, dict(SD15, thresholding=True), "thresholding"),
    (DPMSolverMultistepScheduler, dict(SD15, variance_type="learned_range"), "variance_type"),
    (DPMSolverMultistepScheduler,
     dict(SD15, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), "algorithm_type"),
    (UniPCMultistepScheduler, dict(SD15, thresholding=True), "thresholding"),
    (UniPCMultistepScheduler, dict(SD15, solver_type="bh1"), "solver_type"),  # NaN in diffusers
    (UniPCMultistepScheduler, dict(SD15, predict_x0=False), "predict_x0"),  # NaN in diffusers
    (UniPCMultistepScheduler, dict(WAN, lower_order_final=False), "lower_order_final"),  # NaN
    (EulerAncestralDiscreteScheduler, dict(SD15, prediction_type="sample"), "prediction_type"),
    (LCMScheduler, dict(LCM, clip_sample=True), "clip_sample"),
    (LCMScheduler, dict(LCM, thresholding=True), "thresholding"),
]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("cls, config, option", REFUSED, ids=[r[2] + "-" + r[0].__name__[:8]
                                                              for r in REFUSED])
def test_options_the_fused_step_does_not_implement_are_refused_by_name(cls, config, option):
    original = make(cls, config)
    with pytest.raises(UnsupportedOptionError, match=f"{cls.__name__} with {option}="):
        fuse(original)
    fused_cls = FUSED_SCHEDULERS[cls]
    with pytest.raises(UnsupportedOptionError, match=option):  # from_config: at set_timesteps
        fused_cls.from_config(config).set_timesteps(4)


def test_solver_p_and_step_arguments_not_implemented_are_refused_before_anything_changes():
    with pytest.raises(UnsupportedOptionError, match="solver_p"):
        fuse(UniPCMultistepScheduler(solver_p=DPMSolverMultistepScheduler()))
    for s, kwargs, option in (
            (fuse(make(EulerDiscreteScheduler, SDXL)), dict(s_churn=1.0), "s_churn"),
            (fuse(make(FlowMatchEulerDiscreteScheduler, SD3)),
             dict(per_token_timesteps=torch.ones(2, 16)), "per_token_timesteps")):
        s.set_timesteps(5)
        sample = torch.randn(SHAPE)
        before = sample.clone()
        with pytest.raises(UnsupportedOptionError, match=option):
            s.step(torch.randn(SHAPE), s.timesteps[0], sample, **kwargs)
        assert s.step_index is None and torch.equal(sample, before)


def test_step_before_set_timesteps_and_past_the_end():
    s = fuse(make(DPMSolverMultistepScheduler, SD15))
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.randn(SHAPE), 999, torch.randn(SHAPE))
    s.set_timesteps(3)
    x = torch.randn(SHAPE)
    for t in s.timesteps:
        x = s.step(torch.randn(SHAPE), t, x).prev_sample
    with pytest.raises(IndexError, match="past the last of the 3 steps"):
        s.step(torch.randn(SHAPE), s.timesteps[-1], x)
    original = make(DPMSolverMultistepScheduler, SD15)
    original.set_timesteps(3)
    original.step(torch.randn(SHAPE), original.timesteps[0], x)
    mid = fuse(original)  # mid-run: diffusers' history is not carried over
    with pytest.raises(ValueError, match="middle of a run.*set_timesteps"):
        mid.step(torch.randn(SHAPE), mid.timesteps[1], x)
    mid.set_timesteps(3)
    mid.step(torch.randn(SHAPE), mid.timesteps[0], x)


def test_save_and_load_a_pipeline_with_a_fused_scheduler(sd_pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    sd_pipe.scheduler = fuse(make(DPMSolverMultistepScheduler, SD15))
    sd_pipe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "FusedDPMSolverMultistepScheduler"
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler).__name__ == "FusedDPMSolverMultistepScheduler"
    assert public(loaded.scheduler.config) == public(sd_pipe.scheduler.config)
    plain = DPMSolverMultistepScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, scheduler=plain)
    assert type(loaded.scheduler) is DPMSolverMultistepScheduler
    assert public(plain.config) == public(sd_pipe.scheduler.config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls, config", [(DPMSolverMultistepScheduler, SD15),
                                         (UniPCMultistepScheduler, WAN),
                                         (FlowMatchEulerDiscreteScheduler, SD3)])
def test_a_whole_sampling_loop_replays_as_one_cuda_graph(cls, config):
    device = torch.device("cuda")
    s = fuse(make(cls, config))
    s.set_timesteps(10, device=device)
    x_T = torch.randn(SHAPE, device=device)
    outputs = [model_output_for(x_T.cpu(), i).to(device) for i in range(10)]

    def loop(x):
        s.set_begin_index(0)
        s._step_index = None
        for i, t in enumerate(s.timesteps):
            x = s.step(outputs[i], t, x).prev_sample
        return x

    eager = loop(x_T.clone())
    static = x_T.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = loop(static)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_the_example_runs_as_written(monkeypatch, capsys):
    """python/fused_scheduler.py, offline on its tiny pipeline (in this process)."""
    script = Path(__file__).resolve().parent.parent / "python" / "fused_scheduler.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--scheduler", "euler_a", "--steps", "4"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "FusedEulerAncestralDiscreteScheduler: 4 steps" in out and "us fused" in out, out


def test_ddim_takes_any_timestep_as_the_original_does():
    """DDIM's step depends on the timestep's value only: plain ints, on or off the schedule, give
    the original's step (within the error model)."""
    for eta in (0.0, 0.5):
        lock = Lockstep(make(DDIMScheduler, SD15), fuse(make(DDIMScheduler, SD15)))
        lock.set_timesteps(50)
        for t in (981, 500, 37):  # 981 is on SD 1.5's 50-step leading grid, the others are not
            sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
            lock.step(model_output_for(sample, 0), t, sample, eta=eta,
                      generator=torch.Generator().manual_seed(t))
        assert lock.steps == 3 and lock.worst <= 1
