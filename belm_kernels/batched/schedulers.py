"""The plug-in of the fused diffusers schedulers (:func:`belm_kernels.diffusers.fuse`): DDIM (eta 0
or > 0), DPM-Solver++ (orders 1-3, ODE and SDE), UniPC, Euler, Euler ancestral, LCM and
flow-matching Euler, fused or not, each request at its own number of steps.

A request runs its scheduler's float64 step table (``fused_table``, :mod:`belm_kernels.multistep`)
in one :class:`~.plugin.Layout` for all its steps: the union of the roles its steps read and write
(zero where a step does not), in the tables' canonical order, so each step's chain of
multiply-adds is the one the fused scheduler runs alone -- the same terms in the same order, and
zero terms add exactly nothing. Its history (DPM-Solver's data predictions, UniPC's converted
outputs and corrected sample) lives in the stepper's per-stream rings; its noise is drawn from
the request's own generator at the steps, in the dtype and with the function the fused scheduler
draws it with, and where the fused scheduler writes its step into the noise it drew (the noise
is then the op's first input), the layout puts "noise" first too. Euler-type schedulers call the
model on ``scale_model_input(x)``: the plan carries the divisor of each step
(``fused_input_scales``), which the stepper applies per sample. So a request's result is the
fused scheduler's alone on it, bit for bit, whenever the model returns the stepper's dtype, its
output for one sample does not depend on the batch, and the op computes each chain the same way
whatever its layout (see :class:`~belm_kernels.batched.BatchedStepper`).

The model time of a request is its scheduler's timestep on a VP stepper (the stepper's schedule
must have the scheduler's ``alphas_cumprod``: a timestep must mean the same noise level), its sigma
on a FlowSchedule stepper (flow-matching Euler, and DPM-Solver / UniPC with ``use_flow_sigmas``).
"""

from __future__ import annotations

import copy

import torch

from ..multistep import NOISE, PREV_SAMPLE, RESULTS, SAMPLE, parse_role, role_order
from ..schedule import FlowSchedule, Schedule
from .plugin import Layout, Plan, Plugin, check_noise_levels

# The tables' roles as the stepper's buffers (history entries keep their names).
_BUFFERS = {SAMPLE: "cur", "model_output": "model_output", NOISE: "noise"}


def _buffer(role: str) -> str:
    name, j = parse_role(role)
    name = _BUFFERS.get(name, name) if j == 0 else ("cur" if name == SAMPLE else name)
    return name if j == 0 else f"{name}[-{j}]"


def table_layout(table, noise_first: bool) -> tuple[Layout, torch.Tensor]:
    """One layout for every step of ``table`` and its float64 (N, M, K+1) coefficients.

    Outputs: the new state (``prev_sample``, also where it is an alias of another output or an
    input) and the history streams; the other results (``pred_original_sample``, ``denoised``)
    are not computed. Inputs: every role a kept output reads anywhere in the table, in the
    canonical order (:func:`belm_kernels.multistep.role_order`), with "noise" first when
    ``noise_first`` (and present whenever a step draws)."""
    history: list[str] = []
    for step in table:
        history += [o for o in step.outputs if o not in RESULTS and o not in history]
    outputs = [PREV_SAMPLE, *history]
    rows, inputs = [], {SAMPLE}
    for step in table:
        by_output = {o: dict(zip(step.inputs, step.coef[m].tolist(), strict=True))
                     for m, o in enumerate(step.outputs)}
        alias = step.aliases.get(PREV_SAMPLE)
        if alias is not None:
            by_output[PREV_SAMPLE] = by_output.get(alias, {alias: 1.0})
        kept = {o: by_output[o] for o in outputs if o in by_output}
        inputs |= {r for row in kept.values() for r, c in row.items() if c != 0}
        rows.append(kept)
    if any(step.noise for step in table):
        inputs.add(NOISE)
    order = sorted(inputs, key=role_order)
    if noise_first:
        order.remove(NOISE)
        order.insert(0, NOISE)
    coef = torch.zeros(len(table), len(outputs), len(order), dtype=torch.float64)
    for n, kept in enumerate(rows):
        for o, row in kept.items():
            for r, c in row.items():
                coef[n, outputs.index(o), order.index(r)] = c
    layout = Layout(x=_buffer(order[0]), terms=tuple(_buffer(r) for r in order[1:]),
                    history=tuple(history))
    return layout, coef


def _flow(scheduler) -> bool:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return (isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
            or bool(scheduler.config.get("use_flow_sigmas", False)))


class SchedulerPlugin(Plugin):
    description = ("the diffusers schedulers that belm_kernels.diffusers.fuse supports "
                   "(DDIM, DPM-Solver++, UniPC, Euler, Euler ancestral, LCM, flow-matching "
                   "Euler; fused or not)")

    def accepts(self, sampler) -> bool:
        return hasattr(sampler, "set_timesteps") and (
            hasattr(sampler, "fused_table") or type(sampler).__module__.startswith("diffusers."))

    def plan(self, stepper, who, sampler, direction, *, from_pair, generator, options) -> Plan:
        from ..diffusers.fused import _randn

        if direction != "sample":
            raise ValueError(f"{who}: a diffusers scheduler only samples (direction='sample'); "
                             "exact inversion needs a two-step sampler ('obelm', 'bdia')")
        if from_pair:
            raise ValueError(f"{who}: x_T2 (the second state of an inverted pair) is for "
                             "two-step samplers; a diffusers scheduler starts from x alone")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"{who}: generator must be a torch.Generator (one per request) "
                                f"or None, got {type(generator).__name__}")
            if generator.device.type not in ("cpu", stepper.device.type):
                raise ValueError(f"{who}: its generator is on {generator.device}; the stepper "
                                 f"on {stepper.device} draws with a CPU generator or one on "
                                 "its device")
        sched, step_args = self._prepared(who, sampler, options)
        flow = _flow(sched)
        schedule = stepper.schedule
        name = type(sched).__bases__[-1].__name__  # (FusedSchedulerMixin, the original)
        n = len(sched.timesteps)
        start = getattr(sched, "begin_index", None) or 0
        if isinstance(schedule, FlowSchedule):
            if not flow:
                raise ValueError(f"{who}: {name} gives a VP model's timesteps, but the stepper's "
                                 "model takes the sigmas of a FlowSchedule")
            times = sched.sigmas[start:n].double().tolist()
        elif isinstance(schedule, Schedule):
            if flow:
                raise ValueError(f"{who}: {name} with flow sigmas gives sigmas, but the "
                                 "stepper's model takes the timesteps of a VP Schedule (run it "
                                 "on a stepper with a FlowSchedule)")
            if sched.config.get("timestep_type", "discrete") != "discrete":
                raise ValueError(f"{who}: {name} with timestep_type="
                                 f"{sched.config.timestep_type!r} gives its model other times "
                                 "than the training timesteps of the stepper's schedule")
            check_noise_levels(who, schedule, sched.alphas_cumprod)
            times = sched.timesteps[start:].tolist()
        else:
            raise ValueError(f"{who}: a diffusers scheduler runs on a stepper with a Schedule or "
                             f"a FlowSchedule, not a {type(schedule).__name__}")
        table = sched.fused_table(start, **step_args)
        probe = torch.empty(0, dtype=stepper.dtype)
        noise_dtype = sched._noise_dtype(probe, probe)
        draws = [step.noise for step in table]
        # The fused step writes into the noise it drew when that has the new state's dtype.
        noise_first = any(draws) and noise_dtype == sched._dtype(PREV_SAMPLE, probe, probe)
        try:
            layout, coef = table_layout(table, noise_first)
        except ValueError as exc:
            raise ValueError(f"{who}: {name} does not fit a tick of the stepper: {exc}") from None
        draw = None
        if any(draws):
            def draw(out: torch.Tensor) -> None:
                if out.dtype == noise_dtype and (generator is None
                                                 or generator.device.type == out.device.type):
                    torch.randn(out.shape, generator=generator, out=out)  # as _randn draws
                else:
                    out.copy_(_randn(out.shape, generator, out.device, noise_dtype))
        return Plan(kind=name, layout=layout, times=times, coef=coef,
                    scales=sched.fused_input_scales(start), noise=draws if draw else (),
                    draw=draw, sampler=sched)

    @staticmethod
    def _prepared(who: str, sampler, options: dict):
        """The fused scheduler with its timesteps set (a copy when ``options`` set them: the
        caller's scheduler is not changed), and the step arguments among ``options``."""
        from ..diffusers.fused import FusedSchedulerMixin, UnsupportedOptionError, fuse

        try:
            sched = sampler if isinstance(sampler, FusedSchedulerMixin) else fuse(sampler)
            defaults = sched._default_step_args
            step_args = {k: type(defaults[k])(v) for k, v in options.items() if k in defaults}
            grid_args = {k: v for k, v in options.items() if k not in defaults}
            if grid_args:
                sched = copy.deepcopy(sched) if sched is sampler else sched
                sched.set_timesteps(**grid_args)
        except UnsupportedOptionError as exc:
            raise UnsupportedOptionError(f"{who}: {exc}") from None
        except TypeError as exc:
            raise TypeError(f"{who}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{who}: {exc}") from None
        if sched.num_inference_steps is None or sched._fused_grid is None:
            raise ValueError(f"{who}: its scheduler has no timesteps yet: pass "
                             "num_inference_steps=... (or call its set_timesteps first)")
        return sched, step_args
