"""Accuracy study on the analytic Gaussian-mixture model: truncation error against the exact ODE
solution, measured convergence order, round-trip (invert then sample) error per latent dtype, and
model calls. The CLI prints it; tests assert the paper's claims from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .models import GaussianMixture
from .samplers import SAMPLERS, get_sampler
from .schedule import Schedule

DTYPES = {"float64": torch.float64, "float32": torch.float32,
          "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_schedule() -> Schedule:
    """Stable Diffusion's schedule (scaled_linear, 0.00085 .. 0.012, 1000 steps)."""
    return Schedule.from_betas(0.00085, 0.012, "scaled_linear", 1000)


@dataclass
class Row:
    method: str
    steps: int
    error: float                 # relative L2 error of sample(x_T) against the exact ODE solution
    calls_sample: int            # model calls of sample(x_T)
    calls_pair: int              # model calls of sample(x_T, x_T2), i.e. of a reconstruction
    roundtrip: dict[str, float] = field(default_factory=dict)  # dtype -> relative L2 error


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def run_study(methods=tuple(SAMPLERS), steps=(10, 20, 50, 100), dtypes=tuple(DTYPES),
              batch: int = 64, device: str = "cpu", backend: str = "auto",
              model: GaussianMixture | None = None, schedule: Schedule | None = None,
              seed: int = 0) -> list[Row]:
    """One Row per (method, steps). Everything runs on ``device`` through ``backend``."""
    model = model or GaussianMixture.random(dim=8, num_components=4, seed=seed)
    schedule = schedule or default_schedule()
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, model.dim, generator=g, dtype=torch.float64)
    x0_data = model.sample_data(batch, generator=g)
    rows = []
    exact: dict[int, torch.Tensor] = {}  # exact x0 per first timestep (spacing may differ with N)
    for method in methods:
        for n in steps:
            sampler = get_sampler(method, schedule, n)
            t0 = int(sampler.timesteps[0])
            if t0 not in exact:
                ac = float(schedule.alphas_cumprod[t0])
                exact[t0] = model.ode_solution(x_T, math.sqrt(ac), math.sqrt(1 - ac))
            eps64 = _Counter(model.eps_fn(schedule))
            x0 = sampler.sample(eps64, x_T.to(device), backend=backend)
            row = Row(method, n, _rel(x0.cpu(), exact[t0]), eps64.calls, 0)
            for name in dtypes:
                dtype = DTYPES[name]
                data = x0_data.to(device, dtype)
                eps = model.eps_fn(schedule)
                pair = sampler.invert(eps, data, backend=backend)
                counter = _Counter(eps)
                rebuilt = sampler.sample(counter, *pair, backend=backend)
                row.calls_pair = counter.calls
                row.roundtrip[name] = _rel(rebuilt.cpu(), data.cpu())
            rows.append(row)
    return rows


def convergence_order(rows: list[Row], method: str) -> float:
    """Least-squares slope of -log(error) against log(steps) for one method."""
    pts = [(r.steps, r.error) for r in rows if r.method == method]
    n, e = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(-np.polyfit(n, e, 1)[0])


def format_table(rows: list[Row]) -> str:
    """A markdown table of the study plus the measured order per method."""
    dtypes = list(rows[0].roundtrip) if rows else []
    head = (["method", "N", "calls x_T", "calls pair", "error vs exact ODE"]
            + [f"round trip {d}" for d in dtypes])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.method, str(r.steps), str(r.calls_sample), str(r.calls_pair), f"{r.error:.2e}"]
        cells += [f"{r.roundtrip[d]:.1e}" for d in dtypes]
        lines.append("| " + " | ".join(cells) + " |")
    methods = list(dict.fromkeys(r.method for r in rows))
    if len({r.steps for r in rows}) > 1:
        orders = ", ".join(f"{m} {convergence_order(rows, m):.2f}" for m in methods)
        lines += ["", f"Measured convergence order (slope of error vs N): {orders}"]
    return "\n".join(lines)


def plot_convergence(rows: list[Row], path: str) -> None:
    """Log-log plot of error vs steps, one line per method (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in dict.fromkeys(r.method for r in rows):
        pts = [(r.steps, r.error) for r in rows if r.method == m]
        ax.loglog(*zip(*pts), marker="o", label=f"{m} (order {convergence_order(rows, m):.2f})")
    ax.set_xlabel("model steps N")
    ax.set_ylabel("relative error vs exact ODE solution")
    ax.set_title("Convergence on the analytic Gaussian-mixture model")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
