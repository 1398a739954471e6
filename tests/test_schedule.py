import pytest
import torch

from belm_kernels import Schedule

diffusers = pytest.importorskip("diffusers")

CONFIGS = [("linear", 0.0001, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 0, 0)]


@pytest.mark.parametrize("beta_schedule,start,end", CONFIGS)
def test_alphas_cumprod_bit_identical_to_diffusers(beta_schedule, start, end):
    ours = Schedule.from_betas(start, end, beta_schedule)
    ref = diffusers.DDIMScheduler(beta_start=start, beta_end=end, beta_schedule=beta_schedule)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod.double())


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("num_steps", [2, 7, 10, 20, 50, 100, 333, 999, 1000])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_match_diffusers(spacing, num_steps, steps_offset):
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    ref.set_timesteps(num_steps)
    sched = Schedule(ref.alphas_cumprod)
    if spacing == "leading" and steps_offset and int(ref.timesteps.max()) > 999:
        with pytest.raises(ValueError, match="outside"):
            sched.timesteps(num_steps, spacing, steps_offset)
        return
    assert torch.equal(sched.timesteps(num_steps, spacing, steps_offset), ref.timesteps)


def test_grid_ends_in_clean_state():
    sched = Schedule.from_betas()
    grid = sched.grid(sched.timesteps(10))
    assert grid.num_steps == 10 and len(grid.alpha) == 11
    assert grid.alpha[-1] == 1 and grid.sigma[-1] == 0
    torch.testing.assert_close(grid.alpha**2 + grid.sigma**2, torch.ones(11, dtype=torch.float64))
    assert bool((grid.sbar[1:] < grid.sbar[:-1]).all())


@pytest.mark.parametrize("ac,match", [
    ([0.9, 0.95], "strictly decreasing"),
    ([1.5, 0.5], r"\(0, 1\]"),
    ([0.9, 0.0, -0.1], r"\(0, 1\]"),
    ([[0.9, 0.5]], "1-D"),
    ([1, 0], "float"),
])
def test_bad_alphas_cumprod(ac, match):
    with pytest.raises(ValueError, match=match):
        Schedule(torch.tensor(ac))


def test_zero_terminal_snr_only_where_the_grid_does_not_go():
    ac = torch.tensor([0.9, 0.5, 0.1, 0.0], dtype=torch.float64)  # alpha = 0 at the last timestep
    sched = Schedule(ac)
    assert sched.grid(torch.tensor([2, 0])).alpha[0] == 0.1**0.5
    with pytest.raises(ValueError, match="visits timestep 3, where alphas_cumprod is 0"):
        sched.grid(torch.tensor([3, 1]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=1), "num_steps must be an int >= 2"),
    (dict(num_steps=2.0), "num_steps must be an int"),
    (dict(num_steps=1001), "at most num_train_timesteps=1000"),
    (dict(num_steps=10, spacing="karras"), "spacing must be one of"),
    (dict(num_steps=10, spacing="leading", steps_offset=901), "outside"),
])
def test_bad_timesteps(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule.from_betas().timesteps(**kwargs)


def test_bad_beta_schedule():
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        Schedule.from_betas(beta_schedule="cosine")
