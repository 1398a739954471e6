"""The plug-in contract of the batched stepper: what a sampler kind tells the stepper about one
request.

The stepper core (:mod:`.stepper`) knows slots, buffers per role, per-slot tables of coefficients,
model times and model-input scales, a device-side step index, and groups of requests that share a
:class:`Layout` (one fused op per group and tick). It knows no sampler. A *plug-in* turns one
request -- its sampler, direction and options -- into a :class:`Plan`: the layout of its op, a
coefficient matrix and a model time per step, the scale of its model input, when it draws noise
and how, and how its result is read out. The plug-ins: :mod:`.two_step` (the BELM two-step
samplers, sampling and exact inversion) and :mod:`.schedulers` (the fused diffusers schedulers,
from their step tables).

Roles name the stepper's buffers, per slot:

    "prev"           the state buffer the model does not read this tick; the new state is written
                     into it (in place when it is also the op's x). At a request's first tick it
                     holds the request's x.
    "cur"            the state the model reads this tick: x, or x_T2 for sampling from a pair
    "model_output"   the model's output this tick
    "noise"          the request's noise for this tick, drawn from its own generator
    "name[-j]"       history stream ``name`` as this request wrote it j ticks ago (0 before that)

After every tick "prev" and "cur" swap, for every request at once: a two-step sampler's
``prev <- a prev + b cur + c eps`` is the op in place on "prev"; a multistep sampler reads "cur"
and writes "prev" out of place, and its history streams beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..multistep import parse_role
from ..ops import MAX_OUTPUTS, MAX_TERMS

#: The roles of the stepper's own buffers (history roles are ``"name[-j]"``).
ROLES = ("prev", "cur", "model_output", "noise")


@dataclass(frozen=True)
class Layout:
    """The fused op a group of requests runs each tick over its slots.

    ``outputs[0] = coef[:, 0, 0] * x + sum_k coef[:, 0, k] * terms[k-1]`` is written into "prev";
    ``outputs[1 + i]`` (same with row ``1 + i``) into history stream ``history[i]``; with
    ``inverse`` the op is ``lincomb_inverse_`` (one output, in place: ``x`` must be "prev").
    ``x == "prev"`` is the op in place on the new state's buffer.
    """

    x: str = "prev"
    terms: tuple[str, ...] = ("cur", "model_output")
    history: tuple[str, ...] = ()
    inverse: bool = False

    def __post_init__(self):
        for role in (self.x, *self.terms):
            name, j = parse_role(role)
            if not j and role not in ROLES:
                raise ValueError(f"layout role {role!r} is not one of {ROLES} or a history "
                                 "entry 'name[-j]'")
            if j and name in ROLES:
                raise ValueError(f"layout role {role!r}: the stepper keeps no history of "
                                 f"{name!r} (only of the streams a layout writes)")
        for name in self.history:
            if name in ROLES or parse_role(name)[1]:
                raise ValueError(f"history stream {name!r} must be a plain name other than "
                                 f"{ROLES}")
        if not 1 <= len(self.terms) <= MAX_TERMS:
            raise ValueError(f"a layout reads x and 1 to {MAX_TERMS} terms, got {self.terms}")
        if len(self.history) >= MAX_OUTPUTS:
            raise ValueError(f"a layout writes the state and at most {MAX_OUTPUTS - 1} history "
                             f"streams, got {self.history}")
        if self.inverse and (self.x != "prev" or self.history):
            raise ValueError("an inverse layout updates 'prev' in place and writes nothing else")

    @property
    def shape(self) -> tuple[int, int]:
        """(M, K+1): outputs and inputs of the op."""
        return 1 + len(self.history), 1 + len(self.terms)

    def reads(self) -> dict[str, int]:
        """History streams read, with the deepest lag of each."""
        lags: dict[str, int] = {}
        for role in (self.x, *self.terms):
            name, j = parse_role(role)
            if j:
                lags[name] = max(lags.get(name, 0), j)
        return lags


    def inputs(self) -> tuple[str, ...]:
        return (self.x, *self.terms)

    def outputs(self) -> tuple[str, ...]:
        return ("prev", *self.history)


#: The two-step samplers' layouts.
TWO_STEP = Layout()
TWO_STEP_INVERSE = Layout(inverse=True)

# Orders of the roles in which every layout the plug-ins make lists its inputs: the tables'
# canonical order (noise after the model output, or first where the op starts from it), with
# "prev" -- only ever the op's x, as it is also written -- before all.
_ORDERS = ({"prev": 0, "cur": 1, "model_output": 2, "noise": 3},
           {"prev": 0, "noise": 1, "cur": 2, "model_output": 3})


def merged(a: Layout, b: Layout) -> Layout | None:
    """The smallest forward layout that runs both ``a`` and ``b`` with the same chains of
    multiply-adds (zero where one of them does not read or write a role), or None.

    Each layout's inputs stay in their order within the merged one, so a request of either
    computes in it what it computes alone: a zero term adds exactly nothing, and a zero
    leading coefficient gives a zero start (its buffer must hold finite values)."""
    if a == b:
        return a
    if a.inverse or b.inverse:
        return None
    for rank in _ORDERS:
        def key(role, rank=rank):
            name, j = parse_role(role)
            return (rank[role], "", 0) if not j else (4, name, j)

        if all(list(c) == sorted(c, key=key) for c in (a.inputs(), b.inputs())):
            roles = sorted(set(a.inputs()) | set(b.inputs()), key=key)
            history = a.history + tuple(s for s in b.history if s not in a.history)
            try:
                return Layout(x=roles[0], terms=tuple(roles[1:]), history=history)
            except ValueError:  # more terms or outputs than one op takes
                return None
    return None


def relayout(coef: torch.Tensor, src: Layout, dst: Layout) -> torch.Tensor:
    """Coefficients (..., M, K+1) of layout ``src`` as those of ``dst``: the same numbers at the
    places of the roles both have, zeros elsewhere. ``dst`` must hold every role ``src`` gives a
    nonzero coefficient (it holds all of them when it is merged from ``src``; a group narrowed
    to its members' layouts drops only zero columns and rows)."""
    if src == dst:
        return coef
    outs, ins = dst.outputs(), dst.inputs()
    rows = [(i, outs.index(r)) for i, r in enumerate(src.outputs()) if r in outs]
    cols = [(j, ins.index(r)) for j, r in enumerate(src.inputs()) if r in ins]
    (si, di), (sj, dj) = (torch.tensor(pairs).T for pairs in (rows, cols))
    out = coef.new_zeros(*coef.shape[:-2], *dst.shape)
    out[..., di[:, None], dj] = coef[..., si[:, None], sj]
    return out


@dataclass(frozen=True)
class Plan:
    """One request, as the stepper runs it: N ticks, tick k calling the model at ``times[k]``
    on ``cur / scales[k]`` (``cur`` itself without scales) and then applying ``coef[k]`` in the
    request's ``layout``.

    kind: what it runs, for messages (``"obelm"``, ``"DPMSolverMultistepScheduler"``).
    coef: float64 (N, M, K+1), rows and columns in the layout's order.
    times: the N model times (ints: a VP model's timesteps; floats: e.g. flow sigmas).
    scales: None, or the (N,) tensor whose elements ``scale_model_input`` divides by, as the
        original divides (a CPU tensor; see ``BatchedStepper`` for how it is applied).
    noise: per step, whether the request draws noise before that step's op (empty: never).
    draw: ``draw(out)`` fills ``out`` (one slot of the stepper's noise buffer) with the request's
        next draw, from its own generator, as the original draws it.
    result: "sample" (the final state) or "pair" (the final (cur, prev): an inverted pair).
    sampler: the object the request runs (``Request.sampler``).
    """

    kind: str
    layout: Layout
    times: Sequence
    coef: torch.Tensor
    scales: torch.Tensor | None = None
    noise: Sequence[bool] = ()
    draw: Callable[[torch.Tensor], None] | None = None
    result: str = "sample"
    sampler: object = None

    @property
    def num_steps(self) -> int:
        return len(self.times)

    def check(self) -> None:
        """Raise ValueError unless the parts fit together (a plug-in's bug, not the caller's)."""
        n = self.num_steps
        if n < 1:
            raise ValueError(f"{self.kind}: a plan needs at least one step")
        if self.coef.dtype != torch.float64 or self.coef.shape != (n, *self.layout.shape):
            raise ValueError(f"{self.kind}: coef must be float64 of shape "
                             f"{(n, *self.layout.shape)}, got {self.coef.dtype} "
                             f"{tuple(self.coef.shape)}")
        if self.scales is not None and self.scales.shape != (n,):
            raise ValueError(f"{self.kind}: scales must have shape ({n},)")
        if ("noise" in (self.layout.x, *self.layout.terms)) != bool(self.draw):
            raise ValueError(f"{self.kind}: a layout reads 'noise' exactly when the plan draws")
        if self.draw is not None and len(self.noise) != n:
            raise ValueError(f"{self.kind}: noise must say for each of the {n} steps whether "
                             "it draws")
        if self.result not in ("sample", "pair"):
            raise ValueError(f"{self.kind}: result must be 'sample' or 'pair'")


class Plugin:
    """A sampler kind of the stepper. ``accepts(sampler)`` says whether it runs that sampler;
    ``plan(...)`` checks the request against the stepper (raising TypeError / ValueError that
    name the request, before anything changes) and returns its :class:`Plan`."""

    #: For the stepper's message when no plug-in accepts a sampler: what this one runs.
    description = ""

    def accepts(self, sampler) -> bool:
        raise NotImplementedError

    def hint(self, sampler) -> str:
        """Why a sampler of a related kind is not accepted ("" if nothing to say)."""
        return ""

    def plan(self, stepper, who: str, sampler, direction: str, *, from_pair: bool,
             generator: torch.Generator | None, options: dict) -> Plan:
        raise NotImplementedError


def check_noise_levels(who: str, stepper_schedule, alphas_cumprod: torch.Tensor) -> None:
    """A VP request's timesteps mean the noise levels of ``alphas_cumprod``: raise unless they are
    the stepper's model's."""
    mine = stepper_schedule.alphas_cumprod
    theirs = alphas_cumprod.detach().to("cpu", torch.float64)
    if not (theirs.shape == mine.shape and torch.equal(theirs, mine)):
        diff = (f"num_train_timesteps={len(theirs)}, the model's is {len(mine)}"
                if theirs.shape != mine.shape else "alphas_cumprod differ from the model's")
        raise ValueError(f"{who}: its sampler's schedule does not fit the stepper's model "
                         f"({diff}): its timesteps would mean other noise levels")
