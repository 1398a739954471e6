"""The raw fused op as the update of your own sampler, with one coefficient row per sample.

    x <- coef[:, 0] * x + coef[:, 1] * y + coef[:, 2] * z        bk.lincomb3_(x, y, z, coef)

Here: a hand-written DDIM loop with "continuous batching": 8 samples share every model call and
every fused update, but each sits at its own step (sample k joins k ticks late), so the op gets a
(B, 3) coefficient table instead of one shared row. The analytic model takes per-sample
(alpha, sigma). Each update is checked against the plain torch expression, and the staggered
result against running every sample on its own.

    python python/raw_op_in_sampler.py
"""

import torch

import belm_kernels as bk

sched = bk.Schedule.from_betas(0.00085, 0.012, "scaled_linear")
gm = bk.GaussianMixture.random(dim=32, num_components=4, std=0.5, seed=0)
N, B = 20, 8
ts = sched.timesteps(N)                         # descending training timesteps
ac = sched.alphas_cumprod[ts]
alpha = torch.cat([ac.sqrt(), torch.ones(1, dtype=torch.float64)])   # N+1 states, last clean
sigma = torch.cat([(1 - ac).sqrt(), torch.zeros(1, dtype=torch.float64)])
# DDIM step j: x_{j+1} = r_j x_j + d_j eps(x_j); as a lincomb3_ row: (r_j, d_j, 0) with y = z = eps.
r = alpha[1:] / alpha[:-1]
d = sigma[1:] - r * sigma[:-1]
rows = torch.stack([r, d, torch.zeros(N, dtype=torch.float64)], 1)   # float64 table, once
idle = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)           # identity: waiting / done

torch.manual_seed(0)
x_T = torch.randn(B, 32)                        # float32 states
x = x_T.clone()
step = -torch.arange(B)                         # sample k starts at tick k
worst = 0.0
for _ in range(N + B - 1):  # one tick each
    active = (step >= 0) & (step < N)
    j = step.clamp(0, N - 1)
    # The model sees each sample at its own noise level (parked samples: any level, unused).
    eps = gm.eps(x, alpha[j], sigma[j]).float()
    coef = torch.where(active[:, None], rows[j], idle).float()   # (B, 3) per-sample rows
    expected = coef[:, :1] * x + coef[:, 1:2] * eps                 # plain torch, same math
    bk.lincomb3_(x, eps, eps, coef)             # in place, one fused pass over the batch
    worst = max(worst, ((x - expected).abs().max() / expected.abs().max()).item())
    step += 1
print(f"{N + B - 1} ticks, {B} staggered samples: fused op vs torch expression, "
      f"max relative difference {worst:.1e}")

# The same samples one at a time with a shared (3,) row per step.
solo = x_T.clone()
for jj in range(N):
    eps = gm.eps(solo, alpha[jj], sigma[jj]).float()
    bk.lincomb3_(solo, eps, eps, rows[jj].float())
diff = (x - solo).abs().max().item()
print(f"staggered batch vs one-sample-at-a-time DDIM: max abs difference {diff:.1e}")
print(f"available backends here: {bk.available_backends()}")
assert worst < 1e-6 and diff < 1e-5
