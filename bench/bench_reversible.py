"""Peak memory and time of gradients through a sampling chain against the number of steps N.

Three ways to differentiate the same O-BELM chain (SD's VP schedule) with respect to the initial
latents and every model parameter, for a loss on the sample (forward + backward):

* "full autograd": ``belm_kernels.reversible.sample_autograd``, every model call's activations
  kept for the backward pass;
* "checkpoint per step": the same with every model call wrapped in ``torch.utils.checkpoint``
  (non-reentrant): keeps every call's input latents, recomputes its activations;
* "reversible": ``bk.sample_reversible``, backprop by exact inversion: two states, two adjoints
  and one model call's activations.

Models: an MLP noise predictor on 4x16x16 latents (batch 64, hidden width 1024), and the tiny
random Stable Diffusion UNet with classifier-free guidance (4x16x16 latents; needs diffusers).
Peak memory is the most bytes torch had allocated above the start (CPU: the profiler's memory
events; GPU: ``torch.cuda.max_memory_allocated``), from one run; time is the median of
``--repeats`` interleaved runs. Targets: reversible's peak flat in N (at most 1.1x from N=10 to
N=100) and its time at most 2.5x full autograd's.

Precision (``--part precision``): with float32 or bfloat16 latents the rebuilt states drift at
rounding. For O-BELM, BDIA and EDICT on the VP and the flow (SD3, shift 3) grids, N = 10 and 50,
latents float64 / float32 / bfloat16 with states in their own dtype or wider, on a smaller MLP
and the tiny UNet with guidance: the rebuild drift (max |rebuilt - forward| over the model's
inputs, relative to the largest), the error model's bound for it
(``belm_kernels.reversible.rebuild_bound``), the gradient's relative error against full
autograd through the same chain in the same dtypes (x_T and the parameters), and full autograd's
own error and the reversible one's against the same weights in float64.

Writes bench/results/reversible_<device-slug>.csv, .md and .png, stamped (bench/stamp.py).

    python bench/bench_reversible.py                  # CPU unless a GPU is present
    python bench/bench_reversible.py --device cuda --no-unet
    python bench/bench_reversible.py --part precision
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stamp import device_slug, stamp  # noqa: E402

import belm_kernels as bk  # noqa: E402
from belm_kernels.reversible import peak_memory, rebuild_bound, sample_autograd  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SCHED = bk.Schedule.from_betas(0.00085, 0.012, "scaled_linear")
VARIANTS = {
    "full autograd": sample_autograd,
    "checkpoint per step": lambda *a, **k: sample_autograd(*a, checkpoint=True, **k),
    "reversible": bk.sample_reversible,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimeMLP(torch.nn.Module):
    """eps(x, t): sinusoidal timestep features + a 2-layer MLP over the flattened latents."""

    def __init__(self, shape, hidden):
        super().__init__()
        dim = math.prod(shape)
        self.register_buffer("freqs", torch.exp(-math.log(1e4) * torch.arange(16) / 16))
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 32, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden, dim))

    def forward(self, x, t):
        angles = float(t) * self.freqs.to(x.dtype)
        feats = torch.cat([angles.sin(), angles.cos()]).expand(x.shape[0], -1)
        return self.net(torch.cat([x.flatten(1), feats], dim=1)).view_as(x)


def mlp_case(device):
    torch.manual_seed(0)
    shape = (64, 4, 16, 16)
    return "MLP 64x4x16x16, hidden 1024", TimeMLP(shape[1:], 1024).to(device), shape


def unet_case(device, guidance=3.0):
    from belm_kernels.diffusers import tiny_stable_diffusion_pipeline

    pipe = tiny_stable_diffusion_pipeline(sample_size=16, device=device)
    unet = pipe.unet
    with torch.no_grad():
        text, negative = pipe.encode_prompt("a red fox", device, 1, True, negative_prompt="")
    embeds = torch.cat([negative, text])

    def model(x, t):
        noise = unet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample
        uncond, txt = noise.chunk(2)
        return uncond + guidance * (txt - uncond)

    model.unet = unet  # parameters to differentiate
    return "tiny SD UNet + CFG, 1x4x16x16", model, (1, 4, 16, 16)


def parameters(model):
    return list((model if isinstance(model, torch.nn.Module) else model.unet).parameters())


def one_pass(fn, model, x_T, n):
    """Forward + backward through an n-step O-BELM chain; gradients to x_T and the parameters."""
    sampler = bk.get_sampler("obelm", SCHED, n)
    out = fn(sampler, model, x_T)
    out.square().mean().backward()
    x_T.grad = None
    for p in parameters(model):
        p.grad = None


def measure(case, device, steps, repeats):
    name, model, shape = case
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    x_T.requires_grad_()
    rows = []
    for n in steps:
        times = {v: [] for v in VARIANTS}
        for fn in VARIANTS.values():  # warm-up
            one_pass(fn, model, x_T, n)
        for _ in range(repeats):  # interleaved, so a noisy neighbour slows every variant alike
            for v, fn in VARIANTS.items():
                sync(device)
                t0 = time.perf_counter()
                one_pass(fn, model, x_T, n)
                sync(device)
                times[v].append(time.perf_counter() - t0)
        for v, fn in VARIANTS.items():
            _, peak = peak_memory(lambda fn=fn, n=n: one_pass(fn, model, x_T, n), device)
            rows.append({"model": name, "variant": v, "steps": n, "peak_mb": round(peak / 2**20, 2),
                         "seconds": round(statistics.median(times[v]), 4),
                         "min_seconds": round(min(times[v]), 4)})
            print(f"{name:32s} {v:20s} N={n:4d} peak {peak / 2**20:9.2f} MB  "
                  f"{rows[-1]['seconds']:8.3f} s", flush=True)
    for r in rows:  # ratios against full autograd at the same N, and the variant's own N=first
        base = next(b for b in rows if b["model"] == r["model"] and b["steps"] == r["steps"]
                    and b["variant"] == "full autograd")
        first = next(b for b in rows if b["model"] == r["model"] and b["variant"] == r["variant"])
        r["time_vs_full"] = round(r["seconds"] / base["seconds"], 2)
        r["peak_vs_full"] = round(r["peak_mb"] / base["peak_mb"], 3)
        r["peak_vs_first_n"] = round(r["peak_mb"] / first["peak_mb"], 3)
    return rows


# ------------------------------------------------------------------------------ precision

FLOW = bk.FlowSchedule(shift=3.0)
PRECISIONS = [(torch.float64, torch.float64), (torch.float32, torch.float32),
              (torch.float32, torch.float64), (torch.bfloat16, torch.bfloat16),
              (torch.bfloat16, torch.float32), (torch.bfloat16, torch.float64)]


def _name(dtype):
    return str(dtype).removeprefix("torch.")


def _gradients(fn, sampler, model, params, x_T, state_dtype):
    """Gradients of a fixed loss to x_T and the parameters, and the model's inputs in order."""
    seen = []

    def recorded(x, t):
        seen.append(x.detach().clone())
        return model(x, t)

    x = x_T.detach().requires_grad_()
    out = fn(sampler, recorded, x, state_dtype=state_dtype)
    weight = torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=out.device)
    grads = torch.autograd.grad((out.double().flatten() * weight).sum(), [x, *params])
    return [g.double().flatten() for g in grads], seen


def _rel(got, want):
    num = sum(float((g - w).square().sum()) for g, w in zip(got, want, strict=True))
    den = sum(float(w.square().sum()) for w in want)
    return math.sqrt(num / den)


def precision(case, device, steps):
    name, make, shape = case
    rows = []
    for kind, schedule in (("VP", SCHED), ("flow", FLOW)):
        for method in ("obelm", "bdia", "edict"):
            for n in steps:
                sampler = bk.get_sampler(method, schedule, n)
                model64, params64 = make(torch.float64)
                x64 = torch.randn(shape, generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64).to(device)
                truth, _ = _gradients(sample_autograd, sampler, model64, params64, x64,
                                      torch.float64)
                for dtype, state in PRECISIONS:
                    model, params = make(dtype)
                    x_T = x64.to(dtype)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)  # BDIA's bound warning
                        got, seen = _gradients(bk.sample_reversible, sampler, model, params, x_T,
                                               state)
                    want, _ = _gradients(sample_autograd, sampler, model, params, x_T, state)
                    calls = len(seen) // 2
                    forward, rebuilt = seen[:calls], seen[calls:][::-1]
                    scale = max(float(a.double().abs().max()) for a in forward)
                    drift = max(float((a.double() - b.double()).abs().max())
                                for a, b in zip(forward, rebuilt, strict=True)) / scale
                    rows.append({
                        "model": name, "grid": kind, "method": method, "steps": n,
                        "latents": _name(dtype), "states": _name(state),
                        "drift": f"{drift:.1e}",
                        "bound": f"{rebuild_bound(sampler, state):.1e}",
                        "grad_err_vs_autograd": f"{_rel(got, want):.1e}",
                        "grad_err_vs_float64": f"{_rel(got, truth):.1e}",
                        "autograd_err_vs_float64": f"{_rel(want, truth):.1e}"})
                    print("  ".join(f"{v}" for v in rows[-1].values()), flush=True)
    return rows


def mlp_precision_case(device):
    def make(dtype):
        torch.manual_seed(0)
        model = TimeMLP((4, 8, 8), 256).to(device, dtype)
        return model, list(model.parameters())

    return "MLP 4x4x8x8, hidden 256", make, (4, 4, 8, 8)


def unet_precision_case(device, guidance=3.0):
    from belm_kernels.diffusers import tiny_stable_diffusion_pipeline

    def make(dtype):
        pipe = tiny_stable_diffusion_pipeline(sample_size=8, device=device, dtype=dtype)
        unet = pipe.unet
        unet.requires_grad_(False)
        tuned = [unet.conv_out.weight.requires_grad_()]
        with torch.no_grad():
            text, negative = pipe.encode_prompt("a red fox", device, 1, True,
                                                negative_prompt="")
        embeds = torch.cat([negative, text])

        def model(x, t):
            noise = unet(torch.cat([x, x]), t, encoder_hidden_states=embeds).sample
            uncond, txt = noise.chunk(2)
            return uncond + guidance * (txt - uncond)

        return model, tuned

    return "tiny SD UNet + CFG, 1x4x8x8", make, (1, 4, 8, 8)


# ------------------------------------------------------------------------------ output


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4.2 * len(models)), squeeze=False)
    colours = {"full autograd": "C0", "checkpoint per step": "C1", "reversible": "C3"}
    for row_axes, model in zip(axes, models, strict=True):
        for ax, key, label in zip(row_axes, ("peak_mb", "seconds"),
                                  ("peak memory above the start (MB)", "forward + backward (s)"),
                                  strict=True):
            for v in VARIANTS:
                pts = [(r["steps"], r[key]) for r in rows if r["model"] == model
                       and r["variant"] == v]
                ax.plot(*zip(*pts, strict=True), marker="o", color=colours[v], label=v)
            ax.set_xlabel("steps N")
            ax.set_ylabel(label)
            ax.set_title(model, fontsize=10)
            ax.set_xscale("log")
            ax.set_yscale("log")
            steps = sorted({r["steps"] for r in rows})
            ax.set_xticks(steps, [str(n) for n in steps])
            ax.minorticks_off()
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _csv(path, rows, info):
    with open(path, "w", newline="") as f:
        for key, value in info.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_precision(rows, info, slug, out_dir, command):
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"reversible_precision_{slug}.csv"
    _csv(csv_path, rows, info)
    lines = [f"# Gradients through sampling: rebuild drift and gradient error on {info['device']}",
             "", "  ".join(f"{k}: {v}" for k, v in info.items()), "",
             "`drift`: max |rebuilt - forward| over the model's inputs, relative to the largest "
             "input; `bound`: the error model of the rebuilt states in the states' dtype "
             "(`rebuild_bound`, first order: meaningless for 16-bit states); `grad vs autograd`: "
             "relative L2 error of the gradient (x_T and the parameters together) against full "
             "autograd through the same chain in the same dtypes; `grad vs float64` and "
             "`autograd vs float64`: the reversible and the full autograd gradients against "
             "full autograd with the same weights in float64.", "",
             "| model | grid | method | N | latents | states | drift | bound | grad vs autograd "
             "| grad vs float64 | autograd vs float64 |",
             "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    lines += ["", f"Reproduce: `{command}`", ""]
    md_path = out_dir / f"reversible_precision_{slug}.md"
    md_path.write_text("\n".join(lines))
    return csv_path, md_path


def write(rows, info, slug, out_dir, command):
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"reversible_{slug}.csv"
    _csv(csv_path, rows, info)
    png_path = out_dir / f"reversible_{slug}.png"
    plot(rows, png_path, f"Gradients through an O-BELM chain on {info['device']}")
    lines = [f"# Gradients through sampling: memory and time against N on {info['device']}", "",
             "  ".join(f"{k}: {v}" for k, v in info.items()), "",
             "O-BELM chain (SD's VP schedule), loss on the sample, gradients to x_T and every "
             "parameter (forward + backward). Peak: most bytes allocated above the start, one "
             "run (CPU: profiler memory events; GPU: max_memory_allocated). Time: median of "
             "interleaved runs. Targets: reversible peak at most 1.1x from the smallest to the "
             "largest N, time at most 2.5x full autograd's.", "",
             "| model | variant | N | peak MB | peak vs full | peak vs own smallest N | s | "
             "time vs full |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['variant']} | {r['steps']} | {r['peak_mb']} | "
              f"{r['peak_vs_full']} | {r['peak_vs_first_n']} | {r['seconds']} | "
              f"{r['time_vs_full']} |" for r in rows]
    lines += ["", f"![memory and time against N]({png_path.name})", "",
              f"Reproduce: `{command}`", ""]
    md_path = out_dir / f"reversible_{slug}.md"
    md_path.write_text("\n".join(lines))
    return csv_path, md_path, png_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--part", choices=["memory", "precision"], default="memory",
                        help="memory and time against N, or rebuild drift and gradient error")
    parser.add_argument("--steps", default=None,
                        help="numbers of steps N (default: 10,20,50,100; precision: 10,50)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-unet", action="store_true", help="skip the diffusers UNet model")
    parser.add_argument("--tag", default="", help="suffix for the output file names")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = stamp(device)
    print("  ".join(f"{k}: {v}" for k, v in info.items()))
    default = "10,50" if args.part == "precision" else "10,20,50,100"
    steps = [int(n) for n in (args.steps or default).split(",")]
    command = "python bench/bench_reversible.py " + " ".join(argv if argv is not None
                                                             else sys.argv[1:])
    slug = device_slug(device, info) + args.tag
    rows = []
    if args.part == "precision":
        cases = [mlp_precision_case(device)] + ([] if args.no_unet
                                                else [unet_precision_case(device)])
        for case in cases:
            rows += precision(case, device, steps)
        paths = write_precision(rows, info, slug, args.out_dir, command.strip())
    else:
        cases = [mlp_case(device)] + ([] if args.no_unet else [unet_case(device)])
        for case in cases:
            rows += measure(case, device, steps, args.repeats)
        paths = write(rows, info, slug, args.out_dir, command.strip())
    for path in paths:
        print("wrote", path)


if __name__ == "__main__":
    main()
