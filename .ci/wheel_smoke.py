"""Smoke test of an installed belm-kernels (run by .ci/wheel_smoke.sh from outside the checkout).

    python wheel_smoke.py prebuilt|jit

Checks that the package comes from the environment's site-packages, that the compiled CPU backend
is available and came from the expected place (the library prebuilt into the wheel, or a build
just in time from the sources the wheel ships), and that an O-BELM inversion and reconstruction
on the analytic Gaussian-mixture model, through that backend, gives back its input to float64
rounding.
"""

import sys
import sysconfig
from pathlib import Path

import torch

import belm_kernels as bk
from belm_kernels import extension

expected = {"prebuilt": "prebuilt library", "jit": "built just in time"}[sys.argv[1]]
site = Path(sysconfig.get_paths()["purelib"]).resolve()
assert Path(bk.__file__).resolve().is_relative_to(site), f"imported {bk.__file__}, not from {site}"

listed = bk.available_backends("cpu")
assert listed[0] == "cpu", f"cpu backend unavailable: {extension._load('cpu')}"
origin = extension.origin("cpu")
assert origin.startswith(expected), origin

sched = bk.Schedule.from_betas(beta_start=0.00085, beta_end=0.012,
                               beta_schedule="scaled_linear", num_train_timesteps=1000)
sampler = bk.get_sampler("obelm", sched, num_steps=50)
model = bk.GaussianMixture.random(dim=8, seed=0)
eps_fn = model.eps_fn(sched)
x0 = model.sample_data(16, generator=torch.Generator().manual_seed(1))
pair = sampler.invert(eps_fn, x0, backend="cpu")
rebuilt = sampler.sample(eps_fn, *pair, backend="cpu")
error = ((rebuilt - x0).norm() / x0.norm()).item()
# Exact inversion is off only by the float64 roundings of 2 x 49 steps (measured 2.6e-15, README
# 2.5e-15); 1e-12 (~5000 ulp) leaves room for them and still fails any real defect: a float32
# path is off by ~1e-7 (README), a wrong coefficient by far more.
assert x0.dtype == torch.float64 and error < 1e-12, error
print(f"smoke ok: backends {listed}; cpu: {origin}; O-BELM round trip error {error:.1e}")
