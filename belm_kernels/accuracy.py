"""Accuracy study on the analytic Gaussian-mixture model: truncation error against the exact ODE
solution, measured convergence order, round-trip (invert then sample) error per latent dtype, and
model calls, for a VP ``Schedule`` (eps models) or a ``FlowSchedule`` (rectified-flow velocity
models). The CLI prints it; tests assert the paper's claims from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .models import GaussianMixture
from .samplers import FLOW_SAMPLERS, SAMPLERS, get_sampler
from .schedule import FlowSchedule, Schedule

DTYPES = {"float64": torch.float64, "float32": torch.float32,
          "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_schedule() -> Schedule:
    """Stable Diffusion's schedule (scaled_linear, 0.00085 .. 0.012, 1000 steps)."""
    return Schedule.from_betas(0.00085, 0.012, "scaled_linear", 1000)


def default_flow_schedule() -> FlowSchedule:
    """Stable Diffusion 3's flow schedule (FlowMatchEulerDiscreteScheduler with shift 3.0)."""
    return FlowSchedule(shift=3.0)


@dataclass
class Row:
    method: str
    steps: int
    error: float                 # relative L2 error of sample(x_T) against the exact ODE solution
    calls_sample: int            # model calls of sample(x_T)
    calls_pair: int              # model calls of sample(x_T, x_T2), i.e. of a reconstruction
    roundtrip: dict[str, float] = field(default_factory=dict)  # dtype -> relative L2 error
    kind: str = "vp"             # "vp" (eps model, Schedule) or "flow" (v model, FlowSchedule)


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def run_study(methods=None, steps=(10, 20, 50, 100), dtypes=tuple(DTYPES),
              batch: int = 64, device: str = "cpu", backend: str = "auto",
              model: GaussianMixture | None = None,
              schedule: Schedule | FlowSchedule | None = None, seed: int = 0) -> list[Row]:
    """One Row per (method, steps). Everything runs on ``device`` through ``backend``.

    ``schedule``: a VP ``Schedule`` (default: SD's) or a ``FlowSchedule`` (e.g.
    ``default_flow_schedule()``); ``methods`` default to every sampler for that kind.
    """
    model = model or GaussianMixture.random(dim=8, num_components=4, seed=seed)
    schedule = schedule or default_schedule()
    flow = isinstance(schedule, FlowSchedule)
    methods = (FLOW_SAMPLERS if flow else SAMPLERS) if methods is None else methods
    model_fn = model.v_fn() if flow else model.eps_fn(schedule)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, model.dim, generator=g, dtype=torch.float64)
    x0_data = model.sample_data(batch, generator=g)
    rows = []
    exact: dict = {}  # exact x0 per first model time (spacing may differ with N)
    for method in methods:
        for n in steps:
            sampler = get_sampler(method, schedule, n)
            t0 = sampler.model_times[0]
            if t0 not in exact:
                if flow:
                    exact[t0] = model.flow_ode_solution(x_T, t0)
                else:
                    ac = float(schedule.alphas_cumprod[t0])
                    exact[t0] = model.ode_solution(x_T, math.sqrt(ac), math.sqrt(1 - ac))
            counter = _Counter(model_fn)
            x0 = sampler.sample(counter, x_T.to(device), backend=backend)
            row = Row(method, n, _rel(x0.cpu(), exact[t0]), counter.calls, 0,
                      kind="flow" if flow else "vp")
            for name in dtypes:
                data = x0_data.to(device, DTYPES[name])
                pair = sampler.invert(model_fn, data, backend=backend)
                counter = _Counter(model_fn)
                rebuilt = sampler.sample(counter, *pair, backend=backend)
                row.calls_pair = counter.calls
                row.roundtrip[name] = _rel(rebuilt.cpu(), data.cpu())
            rows.append(row)
    return rows


def convergence_order(rows: list[Row], method: str, kind: str | None = None) -> float:
    """Least-squares slope of -log(error) against log(steps) for one method (of one kind)."""
    pts = [(r.steps, r.error) for r in rows if r.method == method and kind in (None, r.kind)]
    n, e = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(-np.polyfit(n, e, 1)[0])


def parasitic_growth(rows: torch.Tensor) -> float:
    """How much a two-step method can amplify a perturbation, in either direction.

    Besides the solution, x_{j+1} = a_j x_{j-1} + b_j x_j + ... with a_j + b_j = 1 carries a
    parasitic mode that sampling multiplies by -a_j per step and inversion by -1/a_j (O-BELM on a
    flow grid: a_j = (h_j / h_{j-1})^2, DESIGN.md section 2b; BDIA: gamma). Returns the largest
    product of consecutive a_j, or of consecutive 1/a_j, over the two-step rows (at least 1).
    """
    log_a = rows[1:, 0].abs().log().tolist()
    worst = 0.0
    for sign in (1, -1):
        run = 0.0
        for v in log_a:  # largest sum of consecutive terms (Kadane)
            run = max(0.0, run + sign * v)
            worst = max(worst, run)
    return math.exp(worst)


def roundtrip_bound(sampler, dtype: torch.dtype, roundings_per_step: float = 4) -> float:
    """Error model of ``sample(*invert(x0))`` relative to x0 for an exact two-step method.

    Each step rounds twice in the fused op (once when inverting, once when sampling) and twice
    in the model output cast to the state dtype, each by at most eps/2; states are up to about
    twice |x0| (x0 vs noise, with the flow's own expansion): about ``roundings_per_step`` eps
    per step, and a rounding error grows by at most ``parasitic_growth`` before the end. To
    first order in eps (so meaningful for float64 and float32, not for 16-bit states):

        |rebuilt - x0| / |x0| <= roundings_per_step * N * eps(dtype) * parasitic_growth(rows)
    """
    return (roundings_per_step * sampler.num_steps * torch.finfo(dtype).eps
            * parasitic_growth(sampler.rows()))


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


def plot_convergence(rows: list[Row], path: str, note: str = "") -> None:
    """Log-log plot of error vs steps, one line per method and kind (needs matplotlib): VP solid
    with circles, flow dashed with squares, one colour per step (DDIM and Euler share one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ddim": "C0", "euler": "C0", "bdia": "C1", "edict": "C2", "obelm": "C3"}
    style = {"vp": ("-", "o", "VP"), "flow": ("--", "s", "flow")}
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for kind, method in dict.fromkeys((r.kind, r.method) for r in rows):
        pts = [(r.steps, r.error) for r in rows if (r.kind, r.method) == (kind, method)]
        line, marker, label = style[kind]
        order = f" (order {convergence_order(rows, method, kind):.2f})" if len(pts) > 1 else ""
        ax.loglog(*zip(*pts, strict=True), line, marker=marker, color=colours.get(method),
                  label=f"{label} {method}{order}")
    # Guides: error ~ N^-1 and N^-2 through the geometric middle of the data.
    steps = sorted({r.steps for r in rows})
    if len(steps) > 1:
        n0 = math.sqrt(steps[0] * steps[-1])
        e0 = math.exp(float(np.mean(np.log([r.error for r in rows]))))
        for order in (1, 2):
            ys = [e0 * (n / n0) ** -order for n in (steps[0], steps[-1])]
            ax.loglog((steps[0], steps[-1]), ys, ":", color="0.6", lw=1)
            ax.annotate(f"slope -{order}", (steps[-1], ys[-1]), color="0.45", fontsize=8,
                        xytext=(4, 0), textcoords="offset points", va="center")
        ax.set_xlim(steps[0] / 1.15, steps[-1] * 1.45)  # room for the guide labels
    ax.set_xticks(steps, [str(n) for n in steps])
    ax.minorticks_off()
    ax.set_xlabel("steps N (model calls: N, EDICT 2N)")
    ax.set_ylabel("relative L2 error vs exact ODE solution")
    ax.set_title("Convergence on the analytic Gaussian-mixture model"
                 + (f"\n{note}" if note else ""), fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
