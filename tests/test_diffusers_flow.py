"""diffusers on rectified flow (SD3, Flux): FlowMatchBELMScheduler / FlowMatchBELMInverseScheduler
on the analytic model, and invert -> regenerate through real StableDiffusion3Pipeline and
FluxPipeline loops.

The schedulers are checked against the core flow O-BELM sampler in float64 and against
FlowMatchEulerDiscreteScheduler's sigmas, timesteps and forward process. Through tiny random
pipelines (fixtures ``sd3_pipe`` / ``flux_pipe`` in conftest.py), exactness is asserted on the
float64-state path that ``invert`` uses by default (the latents come back bit for bit); the
float32-state figure is printed, not asserted; the baseline is FlowMatchEulerDiscreteScheduler
inverted by hand (its Euler steps run backwards from the clean latents through the same
pipeline loop). The figures are printed by

    python -m pytest tests/test_diffusers_flow.py -k roundtrip -s -q
"""

import json
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
)
from PIL import Image

import belm_kernels as bk
from belm_kernels.accuracy import roundtrip_bound
from belm_kernels.diffusers import (
    BELMInverseScheduler,
    BELMScheduler,
    FlowMatchBELMInverseScheduler,
    FlowMatchBELMScheduler,
    image_latents,
    invert,
)
from belm_kernels.diffusers.scheduling_flow_match_belm import UNSUPPORTED_OPTIONS

ROOT = Path(__file__).resolve().parent.parent
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
MODEL = bk.GaussianMixture.random(dim=16, num_components=4, seed=0)
SHAPE = (3, 16)

# The scheduler configs the models ship (scheduler/scheduler_config.json)
SD3 = dict(shift=3.0)  # stable-diffusion-3-medium, 3.5-medium / large
FLUX_DEV = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL = dict(FLUX_DEV, shift=1.0, use_dynamic_shifting=False)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def noise(dtype=torch.float64, seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).to(dtype)


def data(dtype=torch.float64, seed=1):
    return MODEL.sample_data(SHAPE[0], torch.Generator().manual_seed(seed)).to(dtype)


def flow_schedule(config, mu=None):
    if config.get("use_dynamic_shifting"):
        return bk.FlowSchedule(use_dynamic_shifting=True, mu=mu)
    return bk.FlowSchedule(shift=config.get("shift", 1.0))


def sigma_of(sigmas64):
    """t -> the float64 sigma of a published timestep (a float32 rounding of 1000 * sigma)."""
    published = (torch.as_tensor(sigmas64).float() * 1000).tolist()
    table = dict(zip(published, sigmas64.tolist(), strict=True))
    return lambda t: table[float(t)]


def velocity(sigmas64):
    """The exact velocity, at the float64 sigma of each published timestep."""
    sigma = sigma_of(sigmas64)
    return lambda x, t: MODEL.velocity(x, sigma(t)).to(x.dtype)


def run(scheduler, fn, x):
    for t in scheduler.timesteps:
        x = scheduler.step(fn(x, t), t, x).prev_sample
    return x


def made(cls, config, n=None, mu=None, sigmas=None, **options):
    s = cls(**config, **options)
    s.set_timesteps(n, sigmas=sigmas, mu=mu)
    return s


# ------------------------------------------------------------------ config and grid

@pytest.mark.parametrize("config,mu", [(SD3, None), (FLUX_DEV, bk.calculate_shift(4096)),
                                       (FLUX_SCHNELL, bk.calculate_shift(1024))])
def test_from_config_of_the_sd3_and_flux_configs(config, mu, tmp_path):
    euler = FlowMatchEulerDiscreteScheduler(**config)
    s = FlowMatchBELMScheduler.from_config(euler.config)
    assert all(s.config[k] == v for k, v in config.items())
    assert s.order == 1 and s.init_noise_sigma == 1.0 and len(s) == 1000
    schedule = flow_schedule(config, mu)
    for n, sigmas in ((28, None), (None, np.linspace(1.0, 1 / 28, 28))):
        euler.set_timesteps(n, sigmas=sigmas, mu=mu)
        s.set_timesteps(n, sigmas=sigmas, mu=mu)
        assert s.timesteps.dtype == s.sigmas.dtype == torch.float32
        # FlowSchedule's float64 sigmas, published in float32 as diffusers has them; diffusers
        # computes them in float32 (custom sigmas) or rounds once: equal up to a few roundings
        core = bk.get_sampler("obelm", schedule, n, sigmas=sigmas)
        assert torch.equal(s.sigmas, core.sigmas.float())
        assert float((s.sigmas - euler.sigmas).abs().max()) <= 4 * EPS32
        assert bool(((s.timesteps - euler.timesteps).abs() <= 4 * EPS32 * euler.timesteps).all())
        assert s.timesteps.tolist() == (s.sigmas[:-1] * 1000).tolist()  # float32, as diffusers
    s.save_config(tmp_path)
    back = FlowMatchBELMScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(s.config)
    assert FlowMatchEulerDiscreteScheduler.from_config(s.config).config.shift == config["shift"]
    assert "FlowMatchEulerDiscreteScheduler" in [c.__name__ for c in s.compatibles]


@pytest.mark.parametrize("option,value", [
    ("invert_sigmas", True), ("final_sigmas_type", "sigma_min"), ("use_karras_sigmas", True),
    ("use_exponential_sigmas", True), ("use_beta_sigmas", True), ("time_shift_type", "linear"),
    ("stochastic_sampling", True)])
@pytest.mark.parametrize("cls", [FlowMatchBELMScheduler, FlowMatchBELMInverseScheduler])
def test_options_flow_schedule_does_not_implement_are_refused(cls, option, value):
    assert set(UNSUPPORTED_OPTIONS) == {"invert_sigmas", "final_sigmas_type", "use_karras_sigmas",
                                        "use_exponential_sigmas", "use_beta_sigmas",
                                        "time_shift_type", "stochastic_sampling"}
    msg = f"{cls.__name__} does not support {option}={value!r}"
    with pytest.raises(ValueError, match=msg):
        cls(**{option: value})
    # a FlowMatchEulerDiscreteScheduler config (built as a dict: use_beta_sigmas needs scipy)
    config = {k: v for k, v in FlowMatchEulerDiscreteScheduler().config.items()
              if not k.startswith("_")} | {option: value}
    with pytest.raises(ValueError, match=msg):
        cls.from_config(config)
    cls(shift_terminal=0.0)  # diffusers' "off" values are accepted


def test_dynamic_shifting_needs_mu_and_a_static_shift_ignores_it():
    s = FlowMatchBELMScheduler(**FLUX_DEV)
    with pytest.raises(ValueError, match=r"use_dynamic_shifting=True, so set_timesteps needs mu: "
                                         r"pass mu=belm_kernels.calculate_shift\("):
        s.set_timesteps(4)
    s.set_timesteps(4, mu=np.float32(0.75))  # numpy floats are floats
    with pytest.raises(ValueError, match="mu must be a finite float"):
        s.set_timesteps(4, mu=float("nan"))
    # FluxPipeline passes mu to FLUX.1-schnell's static config too: ignored, as in diffusers
    a, b = made(FlowMatchBELMScheduler, FLUX_SCHNELL, 4), made(FlowMatchBELMScheduler,
                                                               FLUX_SCHNELL, 4, mu=0.9)
    assert torch.equal(a.sigmas, b.sigmas)


# Wan's scheduler configs: UniPC with flow sigmas (2.1 T2V 480p: flow_shift 3; 720p and I2V: 5)
WAN = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
# LTX-Video's and Qwen-Image's FlowMatchEuler configs: dynamic shifting stretched to a terminal
LTX = dict(shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
           base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
QWEN = dict(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02)


@pytest.mark.parametrize("config,mu", [(WAN, None), (dict(WAN, flow_shift=5.0), None),
                                       (dict(WAN, flow_shift=12.0, shift_terminal=0.1), None),
                                       (dict(WAN, use_dynamic_shifting=True), 0.8)])
def test_unipc_flow_sigmas_as_wan_ships_them(config, mu):
    """from_config of a UniPCMultistepScheduler config with use_flow_sigmas: UniPC's sigmas
    (float32, the first one lowered by 1e-6) and its integer timesteps, exactly."""
    from diffusers import UniPCMultistepScheduler

    unipc = UniPCMultistepScheduler(**config)
    for cls in (FlowMatchBELMScheduler, FlowMatchBELMInverseScheduler):
        s = cls.from_config(unipc.config)
        assert s.config.use_flow_sigmas and s.config.flow_shift == config["flow_shift"]
        for n, sigmas in ((1, None), (4, None), (50, None), (None, np.array([1.0, 0.7, 0.4, 0.1]))):
            if n == 1 and (cls is FlowMatchBELMInverseScheduler or "shift_terminal" in config):
                if "shift_terminal" in config:  # one sigma of 1 cannot be stretched (nan there)
                    with pytest.raises(ValueError, match="a last sigma of 1 cannot"):
                        s.set_timesteps(1, mu=mu)
                continue
            unipc.set_timesteps(n, sigmas=sigmas, mu=mu)
            s.set_timesteps(n, sigmas=sigmas, mu=mu)
            ts = unipc.timesteps
            if cls is FlowMatchBELMScheduler:
                assert s.timesteps.dtype == torch.int64 and torch.equal(s.timesteps, ts)
                assert torch.equal(s.sigmas, unipc.sigmas)
            else:  # ascending from the clean state, as every inverse scheduler
                assert s.timesteps.tolist() == [ts[-1].item()] + ts[1:].flip(0).tolist()
                assert torch.equal(s.sigmas, unipc.sigmas.flip(0))


@pytest.mark.parametrize("config,mu", [(LTX, bk.calculate_shift(3 * 16 * 22, 1024, 4096, 0.95,
                                                                 2.05)),
                                       (QWEN, bk.calculate_shift(4096, 256, 8192, 0.5, 0.9))])
def test_shift_terminal_as_flow_match_euler(config, mu):
    euler = FlowMatchEulerDiscreteScheduler(**config)
    s = FlowMatchBELMScheduler.from_config(euler.config)
    for n in (6, 40):
        sigmas = np.linspace(1.0, 1 / n, n)  # as the LTX and Qwen-Image pipelines pass them
        euler.set_timesteps(sigmas=sigmas, mu=mu)
        s.set_timesteps(sigmas=sigmas, mu=mu)
        assert float((s.sigmas - euler.sigmas).abs().max()) <= 4 * EPS32
        assert abs(s._grid_sigmas[-2].item() - config["shift_terminal"]) < 1e-15
    schedule = bk.FlowSchedule(use_dynamic_shifting=True, mu=mu,
                               shift_terminal=config["shift_terminal"])
    assert "shift_terminal=" in repr(schedule)
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="shift_terminal must"):
            bk.FlowSchedule(shift_terminal=bad)


def test_configs_of_other_kinds_of_models_are_refused():
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    # keys given explicitly, as a saved scheduler_config.json has them all (diffusers'
    # from_config skips the keys a scheduler built in memory left at their defaults)
    sana = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       flow_shift=3.0, algorithm_type="dpmsolver++")
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler's \\(Sana\\) are spaced "
                                         "differently"):
        FlowMatchBELMScheduler.from_config(sana.config)
    with pytest.raises(ValueError, match="takes a velocity model .* got "
                                         "prediction_type='epsilon'.* BELMScheduler"):
        FlowMatchBELMScheduler.from_config(UniPCMultistepScheduler(prediction_type="epsilon")
                                           .config)


def test_bad_set_timesteps_arguments_leave_the_grid_as_it_was():
    s = made(FlowMatchBELMScheduler, SD3, 5)
    before = s.timesteps.clone()
    for kwargs, message in [
        (dict(sigmas=[1.0, 0.5, 0.5]), r"strictly decreasing, but sigmas\[2\] = 0.5"),
        (dict(sigmas=[1.0, 0.6, 0.7]), r"strictly decreasing, but sigmas\[2\] = 0.7"),
        (dict(sigmas=[1.5, 0.5]), r"sigmas\[0\] = 1.5 is outside \(0, 1\]"),
        (dict(sigmas=[1.0, -0.5]), r"sigmas\[1\] = -0.5 is outside \(0, 1\]"),
        (dict(sigmas=[1.0, 0.5, 0.0]), "without the final 0"),
        (dict(sigmas=[]), "must not be empty"),
        (dict(sigmas=[[1.0, 0.5]]), "1-D sequence"),
        (dict(num_inference_steps=3, sigmas=[1.0, 0.5]), "num_steps=3 but 2 sigmas"),
        (dict(num_inference_steps=0), "num_steps must be an int >= 1"),
        (dict(timesteps=[1000.0, 500.0]), "does not take custom timesteps.*pass the unshifted "
                                          "sigmas= instead"),
        (dict(), "needs num_inference_steps or sigmas"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            s.set_timesteps(**kwargs)
        assert torch.equal(s.timesteps, before)
    with pytest.raises(ValueError, match="FlowMatchBELMInverseScheduler needs at least 2 steps"):
        made(FlowMatchBELMInverseScheduler, SD3, 1)
    for kwargs, message in [(dict(shift=0.0), "shift must be > 0"),
                            (dict(num_train_timesteps=1), "num_train_timesteps must be an int"),
                            (dict(state_dtype="float16"), "state_dtype must be one of"),
                            (dict(backend="gpu"), "backend must be one of"),
                            (dict(use_dynamic_shifting="yes"), "use_dynamic_shifting must be a "
                                                               "bool")]:
        with pytest.raises((ValueError, TypeError), match=message):
            FlowMatchBELMScheduler(**kwargs)


# ------------------------------------------------------------------ exactness (analytic model)

GRIDS = [pytest.param(SD3, dict(n=12), id="sd3-shift3"),
         pytest.param(FLUX_DEV, dict(sigmas=np.linspace(1.0, 1 / 9, 9), mu=0.7), id="flux-mu")]


@pytest.mark.parametrize("config,grid", GRIDS)
def test_matches_the_core_flow_obelm_sampler_float64(config, grid):
    """Sampling (from noise and from a pair) and inversion equal the core sampler's,
    bk.get_sampler("obelm", FlowSchedule(...)), on the exact velocity, in float64."""
    core = bk.get_sampler("obelm", flow_schedule(config, grid.get("mu")), grid.get("n"),
                          sigmas=grid.get("sigmas"))
    v_fn, fn = MODEL.v_fn(), velocity(core.sigmas)
    x_T, x0 = noise(), data()
    tol = 8 * EPS64
    s = made(FlowMatchBELMScheduler, config, **grid)
    assert rel(run(s, fn, x_T), core.sample(v_fn, x_T)) <= tol

    inv = made(FlowMatchBELMInverseScheduler, config, **grid)
    assert inv.sigmas.tolist() == s.sigmas.flip(0).tolist()  # from the clean state up
    run(inv, fn, x0)
    pair, (c_T, c_T2) = inv.latent_pair, core.invert(v_fn, x0)
    assert rel(pair.x_T, c_T) <= tol and rel(pair.x_T2, c_T2) <= tol
    assert pair.grid["sigmas"] == tuple(core.sigmas.tolist())
    assert pair.grid["mu"] == grid.get("mu")

    s.set_latent_pair(pair)
    s.set_timesteps(**{"num_inference_steps" if k == "n" else k: v for k, v in grid.items()})
    assert len(s.timesteps) == core.num_steps - 1 and len(s.sigmas) == core.num_steps
    assert s.sigmas.tolist() == core.sigmas[1:].float().tolist()  # starts at x_T2's state
    rebuilt = run(s, fn, pair.x_T2)
    assert rel(rebuilt, core.sample(v_fn, c_T, c_T2)) <= tol
    assert rel(rebuilt, x0) <= roundtrip_bound(core, torch.float64)


@pytest.mark.parametrize("config,grid", GRIDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_in_the_latents_dtype_and_through_float64_states(config, grid, dtype):
    """float32 / bfloat16 latents: with float64 states (what invert uses) they come back bit for
    bit; float32 states stay within the rounding error model of the core sampler."""
    core = bk.get_sampler("obelm", flow_schedule(config, grid.get("mu")), grid.get("n"),
                          sigmas=grid.get("sigmas"))
    fn, x0 = velocity(core.sigmas), data(dtype)
    inv = made(FlowMatchBELMInverseScheduler, config, state_dtype="float64", **grid)
    run(inv, fn, x0)
    pair = inv.latent_pair
    assert pair.x_T.dtype == dtype and pair.state[0].dtype == torch.float64
    s = FlowMatchBELMScheduler(**config)
    s.set_latent_pair(pair)
    s.set_timesteps(grid.get("n"), sigmas=grid.get("sigmas"), mu=grid.get("mu"))
    assert torch.equal(run(s, fn, pair.x_T2), x0)
    if dtype == torch.float32:
        inv = made(FlowMatchBELMInverseScheduler, config, **grid)
        run(inv, fn, x0)
        s.set_latent_pair(inv.latent_pair)
        s.set_timesteps(grid.get("n"), sigmas=grid.get("sigmas"), mu=grid.get("mu"))
        assert rel(run(s, fn, inv.latent_pair.x_T2), x0) <= roundtrip_bound(core, dtype)


@pytest.mark.parametrize("config,n", [(SD3, 6), (FLUX_SCHNELL, 7)])
@pytest.mark.parametrize("seed", [0, 1])
def test_structured_grids_still_round_trip_bit_for_bit(config, n, seed):
    """SD3's grid ends with sigma = 1/112 (its shift applied twice to 1/1000), so the first
    inversion step x + v / 112 from float32 latents lands exactly halfway between two float32
    numbers for about 1.5% of the elements; FLUX.1-schnell's equal steps make the leapfrog
    x + 2 h v. A regeneration within 1e-14 of such a state rounds it either way, and a model
    whose output moves with its input by O(1) turns that into another result: the dithered wide
    start (scheduling_utils.WIDE_START_DITHER) keeps the states off those ties. (Without it, this
    test fails for both grids.)"""
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigma = sigma_of(bk.get_sampler("obelm", flow_schedule(config), n).sigmas)

    def fn(x, t):  # a velocity as sensitive to its input as a network's
        return (torch.tanh(x.double() @ w + sigma(t)) - x.double()).to(x.dtype)

    x0 = torch.randn(256, 16, generator=torch.Generator().manual_seed(seed))
    inv = made(FlowMatchBELMInverseScheduler, config, n, state_dtype="float64")
    run(inv, fn, x0)
    s = FlowMatchBELMScheduler(**config)
    s.set_latent_pair(inv.latent_pair)
    s.set_timesteps(n)
    assert torch.equal(run(s, fn, inv.latent_pair.x_T2), x0)


def test_a_single_step_is_flow_match_eulers_step():
    x, v = noise(torch.float32), noise(torch.float32, seed=3)
    for config, mu in [(SD3, None), (FLUX_DEV, 1.1)]:
        euler = FlowMatchEulerDiscreteScheduler(**config)
        euler.set_timesteps(1, mu=mu)
        s = made(FlowMatchBELMScheduler, config, 1, mu=mu)
        assert torch.equal(s.timesteps, euler.timesteps)
        t = s.timesteps[0]
        assert torch.equal(s.step(v, t, x).prev_sample, euler.step(v, t, x).prev_sample)


# ------------------------------------------------------------------ pairs, steps, scale_noise


def test_a_pair_on_other_sigmas_or_another_mu_is_refused():
    inv = made(FlowMatchBELMInverseScheduler, FLUX_DEV, 6, mu=0.7)
    run(inv, MODEL.v_fn(), data())  # any model will do
    pair = inv.latent_pair
    s = FlowMatchBELMScheduler(**FLUX_DEV)
    s.set_latent_pair(pair)
    with pytest.raises(ValueError, match=r"made on the mu 0.7 but the scheduler is set to 0.8"):
        s.set_timesteps(6, mu=0.8)
    with pytest.raises(ValueError, match=r"made on the sigmas \[1.0, .* \(7 values\) but the "
                                         r"scheduler is set to .* \(8 values\)"):
        s.set_timesteps(7, mu=0.7)
    with pytest.raises(ValueError, match=r"made on the sigmas"):  # same N, custom sigmas
        s.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=0.7)
    s.set_timesteps(6, mu=0.7)
    assert len(s.timesteps) == 5
    sd3 = made(FlowMatchBELMInverseScheduler, SD3, 6)
    run(sd3, MODEL.v_fn(), data())
    t = FlowMatchBELMScheduler(shift=2.0)
    t.set_latent_pair(sd3.latent_pair)
    with pytest.raises(ValueError, match=r"made on the sigmas"):
        t.set_timesteps(6)


def test_a_pair_of_the_other_kind_of_scheduler_is_refused_naming_both():
    vp = BELMInverseScheduler(beta_schedule="scaled_linear", timestep_spacing="linspace")
    vp.set_timesteps(6)
    x0 = data(torch.float32)
    run(vp, lambda x, t: torch.zeros_like(x), x0)
    flow = made(FlowMatchBELMInverseScheduler, SD3, 6)
    run(flow, MODEL.v_fn(), x0)
    for pair, scheduler, made_by, here in [
            (vp.latent_pair, FlowMatchBELMScheduler(**SD3), "variance-preserving",
             "FlowMatchBELMScheduler is a rectified-flow"),
            (flow.latent_pair, BELMScheduler(), "rectified-flow",
             "BELMScheduler is a variance-preserving")]:
        with pytest.raises(ValueError, match=f"made by a {made_by} .* scheduler, but {here}"):
            scheduler.set_latent_pair(pair)
        assert scheduler._pending_pair is None  # refused before anything changed


def test_steps_out_of_order_or_off_the_schedule():
    s = made(FlowMatchBELMScheduler, SD3, 6)
    x, fn = noise(), MODEL.v_fn()
    ts = s.timesteps
    x = s.step(fn(x, 1.0), ts[0], x).prev_sample
    with pytest.raises(ValueError, match=f"timestep {ts[2].item()} is not the next one"):
        s.step(fn(x, 0.5), ts[2], x)
    with pytest.raises(ValueError, match="timestep 500.5 is not in the schedule"):
        s.step(fn(x, 0.5), 500.5, x)
    x = s.step(fn(x, 0.5), float(ts[1]), x).prev_sample  # a float equal to the next timestep
    assert s.step_index == 2


def test_scale_noise_is_flow_match_eulers_forward_process():
    x0, eps = data(torch.float32), noise(torch.float32)
    euler = FlowMatchEulerDiscreteScheduler(**SD3)
    euler.set_timesteps(10)
    s = made(FlowMatchBELMScheduler, SD3, 10)
    for begin in (None, 4):  # by timestep value, and img2img's begin index
        if begin is not None:
            euler.set_begin_index(begin)
            s.set_begin_index(begin)
        t = s.timesteps[4:5].repeat(3)
        out = s.scale_noise(x0, t, eps)
        sigma = s.sigmas[4]
        assert torch.equal(out, sigma * eps + (1.0 - sigma) * x0)
        assert rel(out, euler.scale_noise(x0, euler.timesteps[4:5].repeat(3), eps)) <= 4 * EPS32
    with pytest.raises(ValueError, match="scale_noise needs the sigmas of set_timesteps"):
        FlowMatchBELMScheduler().scale_noise(x0, t, eps)
    s = made(FlowMatchBELMScheduler, SD3, 10)
    with pytest.raises(ValueError, match="timestep 123.0 is not in the schedule"):
        s.scale_noise(x0, torch.tensor([123.0]), eps)


# ------------------------------------------------------------------ pipelines


class EulerInverse(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler run backwards, the usual hand inversion: from the clean
    latents, x <- x + (sigma_j - sigma_{j+1}) v(x, t_j) for j = N-1, ..., 0 (the velocity at the
    less noisy state, with the timestep of the state the step goes to, as DDIM inversion does),
    through the pipeline's own loop and conditioning."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None,
                      timesteps=None):
        super().set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)
        self.timesteps, self.sigmas = self.timesteps.flip(0), self.sigmas.flip(0)


def euler_round_trip(pipe, x0, n, **call):
    flow = pipe.scheduler
    try:
        pipe.scheduler = EulerInverse.from_config(flow.config)
        x_T = pipe(latents=x0, num_inference_steps=n, output_type="latent", **call).images
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(flow.config)
        return pipe(latents=x_T, num_inference_steps=n, output_type="latent", **call).images
    finally:
        pipe.scheduler = flow


def regenerate(pipe, pair, n, **call):
    pipe.scheduler.set_latent_pair(pair)
    return pipe(latents=pair.x_T2, num_inference_steps=n, output_type="latent", **call).images


def check_round_trip(pipe, x0, n, call, label, image=None):
    """invert (float64 states, and float32 states) -> regenerate through the pipeline, and the
    hand-inverted FlowMatchEuler baseline; prints the three relative errors. Asserts the
    float64-state path bit-exact with N-1 model calls, and Euler's inversion far off."""
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *a, calls=calls: calls.append(1))
    try:
        source = dict(image=image) if image is not None else dict(latents=x0)
        errors = {}
        for state_dtype in ("float64", None):
            pair = invert(pipe, **source, num_inference_steps=n, state_dtype=state_dtype,
                          progress=False, **call)
            calls.clear()
            out = regenerate(pipe, pair, n, **call)
            assert len(calls) == (n - 1) * (2 if call.get("true_cfg_scale", 1) > 1 else 1)
            errors[state_dtype] = rel(out, x0)
            if state_dtype == "float64":
                # The regeneration feeds the model the same roundings of (within ~1e-14) the
                # same float64 states as the inversion, and ends within ~1e-14 of x0, a float32
                # itself: bit for bit (see scheduling_utils.WIDE_START_DITHER for the odds).
                assert torch.equal(out, x0)
    finally:
        hook.remove()
    err_euler = rel(euler_round_trip(pipe, x0, n, **call), x0)
    print(f"\n{label}: BELM {errors['float64']:.2e} (invert default, float64 states)  "
          f"BELM {errors[None]:.2e} (float32 states)  "
          f"FlowMatchEuler inverted by hand {err_euler:.2e}")
    # Euler's inversion error is truncation, O(h): orders of magnitude above rounding
    assert err_euler > 1e-3 and err_euler > 100 * errors[None]


def vae_latents(pipe, image):
    """The image's latents, computed here independently of invert."""
    cfg = pipe.vae.config
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image)
        x = (pipe.vae.encode(pixels).latent_dist.mean - cfg.shift_factor) * cfg.scaling_factor
    return x


IMAGE = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
SD3_CALL = dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=5.0,
                max_sequence_length=32)
FLUX_CALL = dict(prompt="a photo of a cat", guidance_scale=3.5, max_sequence_length=32)


def test_sd3_roundtrip_exact(sd3_pipe):
    """Three text encoders, pooled projections, classifier-free guidance: invert an image ->
    regenerate through StableDiffusion3Pipeline, float32, 10 steps, SD3's shift 3."""
    n = 10
    x0 = vae_latents(sd3_pipe, IMAGE)
    assert torch.equal(image_latents(sd3_pipe, IMAGE), x0)
    label = f"SD3 latent round trip, float32 pipeline, {n} steps, guidance 5.0"
    check_round_trip(sd3_pipe, x0, n, SD3_CALL, label, image=IMAGE)


def test_flux_roundtrip_exact(flux_pipe):
    """Packed latents, latent image and text ids, distilled guidance, mu from the image size:
    invert an image -> regenerate through FluxPipeline, float32, 10 steps."""
    n = 10
    x0 = vae_latents(flux_pipe, IMAGE)
    x0 = flux_pipe._pack_latents(x0, *x0.shape)
    assert x0.shape == (1, 16, 16) and torch.equal(image_latents(flux_pipe, IMAGE), x0)
    label = f"Flux latent round trip, float32 pipeline, {n} steps, guidance 3.5 (distilled)"
    check_round_trip(flux_pipe, x0, n, FLUX_CALL, label, image=IMAGE)
    # the distilled guidance reaches the transformer: another scale regenerates another image
    pair = invert(flux_pipe, latents=x0, num_inference_steps=n, progress=False, **FLUX_CALL)
    assert rel(regenerate(flux_pipe, pair, n, **{**FLUX_CALL, "guidance_scale": 2.0}), x0) > 1e-4


def test_flux_true_cfg_roundtrip_exact(flux_pipe):
    """FluxPipeline's true classifier-free guidance (a negative prompt and true_cfg_scale > 1:
    two transformer calls per step)."""
    n = 6
    call = dict(FLUX_CALL, negative_prompt="blurry", true_cfg_scale=2.0)
    x0 = image_latents(flux_pipe, IMAGE)
    label = f"Flux latent round trip, float32 pipeline, {n} steps, true CFG 2.0"
    check_round_trip(flux_pipe, x0, n, call, label)
    plain = invert(flux_pipe, latents=x0, num_inference_steps=n, progress=False, **FLUX_CALL)
    cfg = invert(flux_pipe, latents=x0, num_inference_steps=n, progress=False, **call)
    assert not torch.equal(plain.x_T, cfg.x_T)


def test_edits_from_the_same_pair(sd3_pipe, flux_pipe):
    """Another prompt (SD3) or other prompt embeddings (Flux) regenerate an edit from the pair."""
    n = 6
    for pipe, call, edit in [
            (sd3_pipe, SD3_CALL, dict(SD3_CALL, prompt="a photo of a dog")),
            (flux_pipe, FLUX_CALL, dict(FLUX_CALL, prompt=None,
                                        prompt_embeds=torch.randn(1, 12, 64),
                                        pooled_prompt_embeds=torch.randn(1, 32)))]:
        x0 = image_latents(pipe, IMAGE)
        pair = invert(pipe, latents=x0, num_inference_steps=n, progress=False, **call)
        pipe.scheduler.set_latent_pair(pair)
        image = pipe(latents=pair.x_T2, num_inference_steps=n, output_type="np", **edit).images
        assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
        assert rel(regenerate(pipe, pair, n, **edit), x0) > 1e-3  # another image


def test_sd3_precomputed_embeddings_give_the_same_pair(sd3_pipe):
    n = 5
    x0 = image_latents(sd3_pipe, IMAGE)
    with torch.no_grad():  # as in the pipeline (T5's attention rounds differently with grad)
        pe, npe, pooled, npooled = sd3_pipe.encode_prompt(
            prompt="a photo of a cat", prompt_2=None, prompt_3=None, negative_prompt="blurry",
            max_sequence_length=32)
    embedded = dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=npooled, guidance_scale=5.0)
    pair = invert(sd3_pipe, latents=x0, num_inference_steps=n, progress=False, **embedded)
    same = invert(sd3_pipe, latents=x0, num_inference_steps=n, progress=False, **SD3_CALL)
    assert torch.equal(pair.x_T, same.x_T) and torch.equal(pair.x_T2, same.x_T2)
    assert torch.equal(regenerate(sd3_pipe, pair, n, **embedded), x0)


def test_sd3_dynamic_shifting_custom_sigmas_and_mu(sd3_pipe):
    """An SD3 pipeline whose scheduler shifts dynamically: invert computes mu from the patch
    count as the pipeline does; custom sigmas and mu are passed to both; another mu is refused."""
    n = 6
    sd3_pipe.scheduler = FlowMatchBELMScheduler.from_config(sd3_pipe.scheduler.config,
                                                            use_dynamic_shifting=True)
    x0 = image_latents(sd3_pipe, IMAGE)
    pair = invert(sd3_pipe, latents=x0, num_inference_steps=n, progress=False, **SD3_CALL)
    assert pair.grid["mu"] == bk.calculate_shift(16)  # (8 / 2) ** 2 patches
    assert torch.equal(regenerate(sd3_pipe, pair, n, **SD3_CALL), x0)
    custom = dict(SD3_CALL, sigmas=[1.0, 0.8, 0.5, 0.3, 0.1], mu=0.4)
    pair = invert(sd3_pipe, latents=x0, progress=False, **custom)
    sd3_pipe.scheduler.set_latent_pair(pair)
    out = sd3_pipe(latents=pair.x_T2, output_type="latent", **custom).images
    assert torch.equal(out, x0)
    with pytest.raises(ValueError, match="made on the mu 0.4 but the scheduler is set to 0.5"):
        regenerate(sd3_pipe, pair, None, **{**custom, "mu": 0.5})


@pytest.mark.parametrize("flux_pipe", [dict(guidance_embeds=False,
                                            scheduler=FlowMatchEulerDiscreteScheduler(
                                                **FLUX_SCHNELL))], indirect=True)
def test_flux_schnell_static_shift(flux_pipe):
    """FLUX.1-schnell: no distilled guidance, a static shift of 1 (equal sigma steps, where
    O-BELM is the leapfrog x_prev - 2 h v), the mu the pipeline passes anyway is ignored."""
    n = 4
    x0 = image_latents(flux_pipe, IMAGE)
    call = dict(FLUX_CALL, guidance_scale=0.0)
    pair = invert(flux_pipe, latents=x0, num_inference_steps=n, progress=False, **call)
    assert pair.grid["mu"] is None and pair.grid["sigmas"] == (1.0, 0.75, 0.5, 0.25, 0.0)
    assert torch.equal(regenerate(flux_pipe, pair, n, **call), x0)


@pytest.mark.parametrize("flux_pipe", [dict(dtype=torch.bfloat16)], indirect=True)
def test_bfloat16_flux_pipeline_roundtrip_exact(flux_pipe):
    """A bfloat16 pipeline: bfloat16 latents come back bit for bit through invert's float64
    states (flow inversion amplifies perturbations by (h_next / h)^2 per step, so bfloat16
    states would not)."""
    n = 8
    x0 = image_latents(flux_pipe, IMAGE)
    assert x0.dtype == torch.bfloat16
    pair = invert(flux_pipe, image=IMAGE, num_inference_steps=n, progress=False, **FLUX_CALL)
    assert pair.x_T.dtype == torch.bfloat16 and pair.state[0].dtype == torch.float64
    out = regenerate(flux_pipe, pair, n, **FLUX_CALL)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x0)


def test_generation_without_a_pair(sd3_pipe, flux_pipe):
    """A drop-in for FlowMatchEulerDiscreteScheduler: one step is Euler's, bit for bit; more
    steps are O-BELM, one model call each."""
    for pipe, call in [(sd3_pipe, SD3_CALL), (flux_pipe, FLUX_CALL)]:
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        ours = pipe(num_inference_steps=1, output_type="latent", generator=gen(), **call).images
        belm = pipe.scheduler
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(belm.config)
        euler = pipe(num_inference_steps=1, output_type="latent", generator=gen(), **call).images
        pipe.scheduler = belm
        assert torch.equal(ours, euler)
        calls = []
        hook = pipe.transformer.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        image = pipe(num_inference_steps=5, output_type="np", generator=gen(), **call).images
        hook.remove()
        assert len(calls) == 5 and image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_img2img_pipelines(sd3_pipe, flux_pipe):
    """StableDiffusion3Img2ImgPipeline and FluxImg2ImgPipeline: set_begin_index, scale_noise."""
    n, strength = 8, 0.5
    for cls, pipe, call in [(StableDiffusion3Img2ImgPipeline, sd3_pipe, SD3_CALL),
                            (FluxImg2ImgPipeline, flux_pipe, FLUX_CALL)]:
        img2img = cls(**pipe.components)
        img2img.set_progress_bar_config(disable=True)
        seen = []

        def record(p, i, t, cb, seen=seen):
            seen.append(float(t))
            return cb

        out = img2img(image=IMAGE, strength=strength, num_inference_steps=n, output_type="np",
                      height=16, width=16,
                      callback_on_step_end=record, generator=torch.Generator().manual_seed(0),
                      **call).images
        s = img2img.scheduler
        assert s.begin_index == n - int(n * strength)
        assert seen == s.timesteps.tolist()[s.begin_index:] and s.step_index == n
        assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()


def test_wrong_latents_for_the_pipeline(sd3_pipe, flux_pipe):
    x0 = image_latents(flux_pipe, IMAGE)  # (1, 16, 16) packed
    unpacked = vae_latents(flux_pipe, IMAGE)  # (1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"FluxPipeline takes packed latents of shape \(batch, "
                                         r"tokens=16, channels=16\), got shape \(1, 4, 8, 8\); "
                                         r"pack .* pipe._pack_latents\(latents"):
        invert(flux_pipe, latents=unpacked, num_inference_steps=4, **FLUX_CALL)
    with pytest.raises(ValueError, match=r"packed latents of 32x32 have shape \(batch, "
                                         r"tokens=64, channels=16\), got \(1, 16, 16\): pass "
                                         r"the height and width"):
        invert(flux_pipe, latents=x0, height=32, width=32, num_inference_steps=4, **FLUX_CALL)
    with pytest.raises(ValueError, match=r"StableDiffusion3Pipeline takes latents of shape "
                                         r"\(batch, channels=4, height, width\), got shape "
                                         r"\(1, 16, 16\)"):
        invert(sd3_pipe, latents=x0, num_inference_steps=4, **SD3_CALL)
    # a pair made on another pipeline kind is refused by the scheduler
    flux_pair = invert(flux_pipe, latents=x0, num_inference_steps=4, progress=False, **FLUX_CALL)
    with pytest.raises(ValueError, match=r"made on the mu 0.45"):  # Flux's dynamic shift
        regenerate(sd3_pipe, flux_pair, 4, **SD3_CALL)


def test_invert_names_the_arguments_it_takes(sd3_pipe, flux_pipe):
    x0 = image_latents(sd3_pipe, IMAGE)
    with pytest.raises(TypeError, match=r"arguments that StableDiffusion3Pipeline does not take: "
                                        r"\['true_cfg_scale'\]"):
        invert(sd3_pipe, latents=x0, prompt="a cat", true_cfg_scale=2.0)
    with pytest.raises(TypeError, match=r"arguments that FluxPipeline does not take: "
                                        r"\['mu', 'prompt_3'\]"):
        invert(flux_pipe, latents=x0, prompt="a cat", prompt_3="a dog", mu=1.0)


# ------------------------------------------------------------------ the example


@pytest.mark.parametrize("args", [[], ["--tiny", "sd3", "--steps", "6"]])
def test_flow_example_runs_as_written(args, tmp_path, monkeypatch, capsys):
    """python/flow_invert_and_edit.py, offline on its tiny pipelines (in this process)."""
    monkeypatch.chdir(tmp_path)
    script = "flow_invert_and_edit.py"
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(ROOT / "python" / script), run_name="__main__")
    out = capsys.readouterr().out
    assert "O-BELM 0.00e+00" in out, out  # the latents come back exactly
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "belm_flow_edit.png", "belm_flow_reconstruction.png"], out


def test_readme_flow_and_video_snippet_runs_as_written(flux_pipe, tiny_pipe):
    """The README's flow-matching and video code block, with the tiny Flux, Wan and Wan I2V
    pipelines as ``pipe``, ``wan`` and ``wan_i2v``."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("**Flow matching and video: one mechanism for every pipeline.**", 1)[1]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((24, 24, 3)) * 255).astype("uint8"))
    frames = [Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")) for _ in range(5)]
    wan, wan_i2v = tiny_pipe("tiny_wan_pipeline"), tiny_pipe("tiny_wan_i2v_pipeline")
    namespace = {"pipe": flux_pipe, "photo": photo, "wan": wan, "wan_i2v": wan_i2v,
                 "frames": frames}
    exec(compile(block, "README.md", "exec"), namespace)
    x0 = image_latents(flux_pipe, photo)  # the photo at its own size, 24x24
    assert torch.equal(namespace["same"].images, x0)
    assert namespace["edit"].size == (24, 24)
    assert namespace["clip"].shape == (5, 32, 32, 3)  # frames of the video, as numpy
    assert isinstance(flux_pipe.scheduler, FlowMatchBELMScheduler)  # as it was


def test_saved_pipeline_loads_with_its_flow_scheduler(flux_pipe, tmp_path):
    """save_pretrained names the scheduler's module; diffusers finds the class there and through
    belm_kernels' lazy top-level export."""
    assert bk.FlowMatchBELMScheduler is FlowMatchBELMScheduler
    assert bk.FlowMatchBELMInverseScheduler is FlowMatchBELMInverseScheduler
    flux_pipe.scheduler = FlowMatchBELMScheduler.from_config(flux_pipe.scheduler.config,
                                                             state_dtype="float64")
    flux_pipe.save_pretrained(tmp_path)
    index_path = tmp_path / "model_index.json"
    index = json.loads(index_path.read_text())
    assert index["scheduler"] == ["belm_kernels.diffusers.scheduling_flow_match_belm",
                                  "FlowMatchBELMScheduler"]
    for library in (index["scheduler"][0], "belm_kernels"):
        index["scheduler"][0] = library
        index_path.write_text(json.dumps(index))
        loaded = FluxPipeline.from_pretrained(tmp_path)
        assert type(loaded.scheduler) is FlowMatchBELMScheduler
        assert loaded.scheduler.config.state_dtype == "float64"
        assert loaded.scheduler.config.use_dynamic_shifting
