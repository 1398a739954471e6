"""FlowSchedule gives diffusers' FlowMatchEulerDiscreteScheduler sigmas and timesteps.

diffusers computes in float32 (custom sigmas are cast to float32 first, the shift and the final
``sigmas * num_train_timesteps`` run in float32); we compute in float64. Each of its float32
operations rounds by at most u = 2^-24 relative, the shift maps have relative condition number
<= 1 on (0, 1] (for mu >= 0), and there are at most 6 such roundings per value (input cast, 1/s,
- 1, + e^mu, division, * num_train_timesteps; the static shift has fewer), so the two agree to
6u = 3 * eps32 relative. The final 0 is exact.
"""

import numpy as np
import pytest
import torch

import belm_kernels as bk

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_calculate_shift  # noqa: E402

RTOL = 3 * torch.finfo(torch.float32).eps
# The flow configs the SD3 and Flux checkpoints ship (scheduler_config.json).
SD3 = dict(num_train_timesteps=1000, shift=3.0)
FLUX = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
            max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
STEPS = [1, 2, 3, 10, 28, 50, 100, 1000]


def assert_matches(ours: torch.Tensor, ref) -> None:
    sig, ts = ref.sigmas.double(), ref.timesteps.double()
    assert ours.dtype == torch.float64 and ours.shape == sig.shape
    assert ours[-1] == 0 and sig[-1] == 0
    torch.testing.assert_close(ours, sig, rtol=RTOL, atol=0)
    torch.testing.assert_close(1000 * ours[:-1], ts, rtol=RTOL, atol=0)


@pytest.mark.parametrize("n", STEPS)
def test_sd3_config(n):
    """SD3's pipeline calls set_timesteps(N) (no custom sigmas) on a static shift of 3."""
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**SD3)
    ref.set_timesteps(n)
    assert_matches(bk.FlowSchedule(shift=3.0).sigmas(n), ref)
    sampler = bk.get_sampler("euler", bk.FlowSchedule(shift=3.0), n)
    assert_matches(sampler.sigmas, ref)
    torch.testing.assert_close(sampler.timesteps, ref.timesteps.double(), rtol=RTOL, atol=0)


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 6144])  # 256^2 .. 1024x1536 images
def test_calculate_shift_is_flux_pipelines(image_seq_len):
    assert bk.calculate_shift(image_seq_len) == flux_calculate_shift(image_seq_len, 256, 4096,
                                                                     0.5, 1.15)
    assert bk.calculate_shift(image_seq_len, 256, 4096, 0.5, 1.16) == flux_calculate_shift(
        image_seq_len, 256, 4096, 0.5, 1.16)


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 6144])
@pytest.mark.parametrize("n", STEPS)
def test_flux_config_with_the_pipelines_sigmas(image_seq_len, n):
    """Flux's pipeline passes sigmas = linspace(1, 1/N, N) and mu = calculate_shift(seq_len)."""
    mu = flux_calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    sigmas = np.linspace(1.0, 1 / n, n)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX)
    ref.set_timesteps(sigmas=sigmas, mu=mu)
    fs = bk.FlowSchedule(shift=3.0, use_dynamic_shifting=True, mu=mu)
    assert_matches(fs.sigmas(sigmas=sigmas), ref)
    assert_matches(fs.sigmas(n, sigmas), ref)
    assert_matches(bk.get_sampler("euler", fs, sigmas=sigmas).sigmas, ref)
    if n >= 2:
        assert_matches(bk.get_sampler("obelm", fs, n, sigmas=list(sigmas)).sigmas, ref)


@pytest.mark.parametrize("n", STEPS)
def test_dynamic_shifting_with_default_sigmas(n):
    mu = 1.15
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX)
    ref.set_timesteps(n, mu=mu)
    assert_matches(bk.FlowSchedule(use_dynamic_shifting=True, mu=mu).sigmas(n), ref)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("sigmas", [[1.0, 0.9, 0.6, 0.25, 0.01], [0.7, 0.3], [1.0],
                                    torch.linspace(1, 0.05, 17), np.linspace(0.9, 0.1, 5)])
def test_custom_sigmas_with_static_shift(shift, sigmas):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(sigmas=np.asarray(sigmas))
    assert_matches(bk.FlowSchedule(shift=shift).sigmas(sigmas=sigmas), ref)


@pytest.mark.parametrize("n", [2, 50])
def test_num_train_timesteps(n):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=500, shift=2.0)
    ref.set_timesteps(n)
    fs = bk.FlowSchedule(shift=2.0, num_train_timesteps=500)
    torch.testing.assert_close(fs.sigmas(n), ref.sigmas.double(), rtol=RTOL, atol=0)
    torch.testing.assert_close(fs.grid(fs.sigmas(n)).timesteps, ref.timesteps.double(),
                               rtol=RTOL, atol=0)


def test_shifts_by_hand():
    """The two maps diffusers documents, written out on three points."""
    s = torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64)
    torch.testing.assert_close(bk.FlowSchedule(shift=3.0).shifted(s),
                               torch.tensor([1.0, 0.75, 0.3 / 1.2], dtype=torch.float64))
    e = np.exp(0.8)
    torch.testing.assert_close(bk.FlowSchedule(use_dynamic_shifting=True, mu=0.8).shifted(s),
                               torch.tensor([1.0, e / (e + 1), e / (e + 9)], dtype=torch.float64))


def test_grid_is_the_flows_own_variables():
    fs = bk.FlowSchedule(shift=3.0)
    sigmas = fs.sigmas(10)
    grid = fs.grid(sigmas)
    assert grid.num_steps == 10
    assert torch.equal(grid.alpha, torch.ones(11, dtype=torch.float64))
    assert torch.equal(grid.sigma, sigmas) and torch.equal(grid.sbar, sigmas)
    assert torch.equal(grid.timesteps, 1000 * sigmas[:-1])
    assert sigmas[0] == 1 and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())


def test_repr():
    assert repr(bk.FlowSchedule(shift=3.0)) == "FlowSchedule(shift=3.0, num_train_timesteps=1000)"
    assert "use_dynamic_shifting=True, mu=1.15" in repr(bk.FlowSchedule(use_dynamic_shifting=True,
                                                                        mu=1.15))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(shift=0.0), ValueError, "shift must be > 0, got 0.0"),
    (dict(shift=-3.0), ValueError, "shift must be > 0"),
    (dict(shift=float("nan")), ValueError, "shift must be a finite float"),
    (dict(shift="3"), ValueError, "shift must be a finite float"),
    (dict(shift=True), ValueError, "shift must be a finite float"),
    (dict(use_dynamic_shifting=True), ValueError, "use_dynamic_shifting=True needs mu"),
    (dict(shift=3.0, mu=1.15), ValueError, r"mu=1.15 is only used with use_dynamic_shifting=True"),
    (dict(use_dynamic_shifting=1, mu=1.0), TypeError, "use_dynamic_shifting must be a bool"),
    (dict(use_dynamic_shifting=True, mu=float("inf")), ValueError, "mu must be a finite float"),
    (dict(num_train_timesteps=1), ValueError, "num_train_timesteps must be an int >= 2"),
])
def test_bad_schedule(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        bk.FlowSchedule(**kwargs)


FS = bk.FlowSchedule(shift=3.0)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_steps=0), ValueError, "num_steps must be an int >= 1, got 0"),
    (dict(num_steps=2.0), ValueError, "num_steps must be an int"),
    (dict(num_steps=None), ValueError, "num_steps must be an int"),
    (dict(sigmas=[1.0, 0.5, 0.6]), ValueError,
     r"strictly decreasing, but sigmas\[2\] = 0.6 follows sigmas\[1\] = 0.5"),
    (dict(sigmas=[1.0, 0.5, 0.5]), ValueError, r"sigmas\[2\] = 0.5 follows"),
    (dict(sigmas=[1.2, 0.5]), ValueError, r"sigmas\[0\] = 1.2 is outside \(0, 1\]"),
    (dict(sigmas=[1.0, 0.5, 0.0]), ValueError, r"sigmas\[2\] = 0.0 is outside \(0, 1\]"),
    (dict(sigmas=[1.0, float("nan")]), ValueError, r"sigmas\[1\] = nan is outside"),
    (dict(sigmas=[[1.0, 0.5]]), ValueError, "sigmas must be a 1-D sequence"),
    (dict(sigmas=[]), ValueError, "sigmas must not be empty"),
    (dict(sigmas="1.0"), TypeError, "sigmas must be a 1-D sequence of floats"),
    (dict(num_steps=3, sigmas=[1.0, 0.5]), ValueError, "num_steps=3 but 2 sigmas were given"),
])
def test_bad_sigmas(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FS.sigmas(**kwargs)


@pytest.mark.parametrize("sigmas,match", [
    ([1.0, 0.5], "sigmas must end in 0"),
    ([1.0, 0.5, 0.7, 0.0], r"sigmas\[2\] = 0.7 follows sigmas\[1\] = 0.5"),
    ([2.0, 0.5, 0.0], r"sigmas\[0\] = 2.0 is outside \(0, 1\]"),
    ([0.0], "at least 2 entries"),
])
def test_bad_grid(sigmas, match):
    with pytest.raises(ValueError, match=match):
        FS.grid(sigmas)
