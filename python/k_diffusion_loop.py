"""O-BELM in a k-diffusion loop: sample, invert exactly, regenerate.

The denoiser is the analytic Gaussian-mixture model, so this runs offline in a second; swap in
any k-diffusion / ComfyUI denoiser ``model(x, sigma, **extra_args) -> denoised`` (VE state).
k-diffusion is not needed (its ``get_sigmas_karras`` is used when installed).

    python python/k_diffusion_loop.py
"""

import torch

import belm_kernels as bk
from belm_kernels.k_diffusion import invert_obelm, sample_obelm

try:
    from k_diffusion.sampling import get_sigmas_karras
except ImportError:
    def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
        """Karras et al. (2022) noise levels, then a final 0 (same as k-diffusion's)."""
        ramp = torch.linspace(0, 1, n, device=device)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = (hi + ramp * (lo - hi)) ** rho
        return torch.cat([sigmas, sigmas.new_zeros(1)])

# A toy denoiser. The data is a Gaussian mixture in 64 dimensions; for it the optimal noise
# prediction eps* is known in closed form. k-diffusion's state is VE (x = x0 + sigma * noise),
# the analytic model's is VP: x_vp = alpha * x with alpha = 1 / sqrt(1 + sigma^2).
gm = bk.GaussianMixture.random(dim=64, num_components=8, std=0.3, seed=0)


def denoiser(x, sigma, cond_scale=1.0):  # extra_args arrive as keyword arguments
    s = sigma.double().reshape(-1, 1)
    alpha = 1 / torch.sqrt(1 + s * s)
    eps = gm.eps(x * alpha, alpha.flatten(), (s * alpha).flatten())
    return (x.double() - cond_scale * s * eps).to(x.dtype)


torch.manual_seed(0)
sigmas = get_sigmas_karras(25, sigma_min=0.03, sigma_max=14.6)  # float32, like k-diffusion's
noise = torch.randn(16, 64)

# 1. Sample: x starts as pure noise at sigma_max; 25 model calls.
steps = []
x0 = sample_obelm(denoiser, noise * sigmas[0], sigmas, extra_args={"cond_scale": 1.0},
                  callback=lambda d: steps.append(d["i"]), disable=True)
print(f"sampled {tuple(x0.shape)} in {len(steps)} steps, sigma {float(sigmas[0]):.2f} -> 0")

# 2. Invert exactly: the pair of the two noisiest states (25 model calls).
x_T, x_T2 = invert_obelm(denoiser, x0, sigmas, extra_args={"cond_scale": 1.0}, disable=True)
print(f"inverted to the pair at sigma {float(sigmas[0]):.2f}, {float(sigmas[1]):.2f} "
      f"(not the starting noise: sampling from noise alone began with a first-order step)")

# 3. Regenerate from the pair (24 model calls): x0 comes back up to float32 rounding.
x0_again = sample_obelm(denoiser, x_T, sigmas, x_next=x_T2, extra_args={"cond_scale": 1.0},
                        disable=True)
err = ((x0_again - x0).abs().max() / x0.abs().max()).item()
print(f"reconstruction: max relative error {err:.2e} in {x0.dtype}")

# 4. Edit: regenerate with another conditioning from the same inverted pair.
edited = sample_obelm(denoiser, x_T, sigmas, x_next=x_T2, extra_args={"cond_scale": 0.9},
                      disable=True)
print(f"edit (cond_scale 0.9): mean |change| {(edited - x0).abs().mean():.3f}")
assert err < 1e-4
