"""Command line: ``belm-kernels demo`` (accuracy study + step times), ``build``, ``backends``."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import bulk, ops
from .accuracy import DTYPES, format_table, plot_convergence, run_study
from .samplers import FLOW_SAMPLERS, SAME_STEP, SAMPLERS
from .schedule import FlowSchedule


def _csv(kind, choices=None):
    def parse(text: str):
        items = [kind(v.strip()) for v in text.split(",") if v.strip()]
        bad = [v for v in items if choices is not None and v not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {choices or kind.__name__}, got {text!r}")
        return items
    return parse


def op_step_time(backend: str, shape, dtype: torch.dtype, device: str, repeats: int = 50) -> float:
    """Median seconds of one lincomb3_ call (a sampler step without the model)."""
    x, y, z = (torch.randn(shape, device=device).to(dtype) for _ in range(3))
    coef = torch.tensor([0.9, 0.1, -0.05], device=device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(5):
        ops.lincomb3_(x, y, z, coef, backend=backend)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        ops.lincomb3_(x, y, z, coef, backend=backend)
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _methods(names, table) -> list[str]:
    """The requested samplers that exist for one kind of schedule; DDIM and Euler, the same step,
    stand for each other (``--method obelm,ddim`` runs Euler on the flow schedule)."""
    return list(dict.fromkeys(n if n in table else SAME_STEP[n] for n in names))


def demo(args) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    try:
        flow = (FlowSchedule(use_dynamic_shifting=True, mu=args.mu) if args.mu is not None
                else FlowSchedule(shift=args.shift))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    study = dict(steps=args.steps, dtypes=args.dtype, batch=args.batch, device=args.device,
                 backend=args.backend)
    rows = []
    if "vp" in args.schedule:
        vp_rows = run_study(methods=_methods(args.method, SAMPLERS), **study)
        print(f"Accuracy on the analytic Gaussian-mixture model (8-D, 4 components, batch "
              f"{args.batch}, SD scaled_linear schedule, linspace spacing, device {args.device}, "
              f"backend {args.backend}):\n")
        print(format_table(vp_rows))
        rows += vp_rows
    if "flow" in args.schedule:
        flow_rows = run_study(methods=_methods(args.method, FLOW_SAMPLERS), schedule=flow, **study)
        if rows:
            print()
        print(f"Rectified flow on the same model (exact velocity "
              f"v = E[noise - data | x], {flow!r}, error vs the exact flow-ODE solution from "
              f"sigma = 1, device {args.device}, backend {args.backend}):\n")
        print(format_table(flow_rows))
        rows += flow_rows
    if args.plot:
        how = f"mu={flow.mu}" if flow.use_dynamic_shifting else f"shift={flow.shift}"
        note = {"vp": "VP: SD scaled_linear schedule", "flow": f"flow: FlowSchedule({how})"}
        plot_convergence(rows, args.plot, note="; ".join(note[k] for k in args.schedule))
        print(f"\nconvergence plot written to {args.plot}")
    shape = tuple(args.latent_shape)
    print(f"\nStep time of the fused update (median of 50 calls), latents {shape} on "
          f"{args.device}:\n")
    print("| backend | " + " | ".join(args.dtype) + " |")
    print("|---|" + "---|" * len(args.dtype))
    for backend in ops.available_backends(args.device):
        cells = []
        for name in args.dtype:
            if DTYPES[name] not in ops.get_backend(backend).dtypes:
                cells.append("n/a")
                continue
            cells.append(f"{op_step_time(backend, shape, DTYPES[name], args.device) * 1e6:.0f} us")
        print(f"| {backend} | " + " | ".join(cells) + " |")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0


def build(args) -> int:
    from . import extension

    results = extension.build(verbose=not args.quiet)
    # The CUDA extension only applies where torch sees a GPU; elsewhere its reason is no failure.
    applies = {"cpu": True, "cuda": torch.cuda.is_available()}
    failed = False
    for name, reason in results.items():
        if reason is None:
            print(f"{name}: {extension.origin(name)}")
        elif not applies.get(name, True):
            print(f"{name}: skipped ({reason})")
        else:
            print(f"{name}: FAILED: {reason}")
            failed = True
    return 1 if failed else 0


def backends(args) -> int:
    """One line per device and backend: available (for the compiled ones, from where) or why not."""
    from . import extension

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for name in ops.BACKENDS:
            reason = ops._reason(name, torch.device(device))
            where = extension.origin(name) if name in ("cpu", "cuda") else None
            status = "unavailable: " + reason if reason is not None else \
                "available" + (f" ({where})" if where else "")
            print(f"{device:5s} {name:7s} {status}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="belm-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo",
                       help="accuracy study on the analytic model and per-backend step time")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", type=_csv(str, tuple(DTYPES)), default=list(DTYPES),
                   help="latent dtypes for the round trip and the step time (default: all four)")
    p.add_argument("--steps", type=_csv(int), default=[10, 20, 50, 100],
                   help="numbers of model steps N (default: 10,20,50,100)")
    p.add_argument("--method", type=_csv(str, tuple({**SAMPLERS, **FLOW_SAMPLERS})),
                   default=list(SAMPLERS),
                   help=f"samplers, comma separated (default: {','.join(SAMPLERS)}; on the "
                        "flow schedule ddim means euler and vice versa)")
    p.add_argument("--schedule", type=_csv(str, ("vp", "flow")), default=["vp", "flow"],
                   help="which studies: vp (eps model, SD's schedule), flow (velocity model, "
                        "rectified flow) (default: vp,flow)")
    p.add_argument("--shift", type=float, default=3.0,
                   help="static shift of the flow schedule (default: 3.0, SD3's)")
    p.add_argument("--mu", type=float, default=None,
                   help="use Flux-style dynamic shifting with this mu instead of --shift")
    p.add_argument("--backend", default="auto", choices=ops.BACKENDS + ("auto",))
    p.add_argument("--batch", type=int, default=64, help="samples in the study (default: 64)")
    p.add_argument("--latent-shape", type=_csv(int), default=[1, 4, 64, 64],
                   help="latent shape for the step time (default: 1,4,64,64)")
    p.add_argument("--plot", metavar="FILE.png", help="write a log-log convergence plot")
    p.set_defaults(func=demo)

    p = sub.add_parser("build", help="build the C++/CUDA extensions now instead of at first use")
    p.add_argument("--quiet", action="store_true", help="do not echo the compiler output")
    p.set_defaults(func=build)

    p = sub.add_parser("backends", help="list the op backends and why any is unavailable")
    p.set_defaults(func=backends)

    bulk.add_commands(sub)  # invert-dataset, regenerate-dataset, generate-dataset

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
