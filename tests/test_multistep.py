"""belm_kernels.multistep (the step tables every fused sampler uses) and belm_kernels.roundoff
(their error model), on their own: roles and tables, history pruning, ring sizes, the uniform
layout the batched stepper uses, and the rounding bounds against float32 evaluations."""

import math

import numpy as np
import pytest
import torch

from belm_kernels import multistep as m
from belm_kernels.roundoff import Approx, Roundoff, unit_roundoff


def test_a_table_is_the_linear_combination_of_its_formula():
    with m.ieee():
        (step,) = m.tabulate([m.k_euler(m.FLOAT64, m.FLOAT64.num(2.0), m.FLOAT64.num(0.5))])
    # x + (x - D) / 2 * (0.5 - 2) = 0.25 x + 0.75 D
    assert step.inputs == (m.SAMPLE, m.MODEL_OUTPUT) and step.outputs == (m.PREV_SAMPLE,)
    assert step.coef.dtype == torch.float64 and step.coef.tolist() == [[0.25, 0.75]]
    assert not step.noise and not step.aliases


def test_aliases_noise_flags_and_zero_columns():
    F = m.FLOAT64
    with m.ieee():
        # "sample" prediction: pred_original_sample is the model output itself (an alias)
        (ddim,) = m.tabulate([m.ddim(F, F.num(0.5), F.num(0.9), prediction_type="sample")])
        # LCM's last step returns denoised as prev_sample (an alias of another output)
        (lcm,) = m.tabulate([m.lcm(F, F.num(19), F.num(0.9), F.num(1.0), last=True)])
        # Euler ancestral into sigma 0: a noise draw of coefficient 0 (drawn, not read)
        (ancestral,) = m.tabulate([m.euler_ancestral(F, F.num(0.5), F.num(0.0))])
    assert ddim.aliases == {m.PRED_ORIGINAL: m.MODEL_OUTPUT}
    assert ddim.outputs == (m.PREV_SAMPLE,)
    assert lcm.aliases == {m.DENOISED: m.PREV_SAMPLE} and lcm.outputs == (m.PREV_SAMPLE,)
    assert not lcm.noise
    assert ancestral.noise and m.NOISE not in ancestral.inputs


def test_history_is_kept_only_where_a_later_step_reads_it():
    sigmas = [14.6, 5.0, 2.0, 0.8, 0.2, 0.0]
    with m.ieee():
        order3 = m.tabulate(m.dpm_solver(m.FLOAT64, sigmas, solver_order=3))
        order1 = m.tabulate(m.dpm_solver(m.FLOAT64, sigmas, solver_order=1))
    assert [s.outputs for s in order3] == [("prev_sample", "x0")] * 3 + [("prev_sample",)] * 2
    assert [s.inputs[2:] for s in order3] == [(), ("x0[-1]",), ("x0[-1]", "x0[-2]"),
                                               ("x0[-1]",), ()]
    assert m.ring_sizes(order3) == {"x0": 3}
    assert all(s.outputs == ("prev_sample",) for s in order1) and m.ring_sizes(order1) == {}
    with m.ieee():
        unipc = m.tabulate(m.unipc(m.FLOAT64, sigmas, solver_order=2))
    assert m.ring_sizes(unipc) == {"x0": 3, "last_sample": 2}
    assert m.parse_role("last_sample[-1]") == ("last_sample", 1) and m.lag("x0", 2) == "x0[-2]"


def test_the_uniform_layout_holds_every_step():
    with m.ieee():
        table = m.tabulate(m.unipc(m.FLOAT64, [14.6, 5.0, 2.0, 0.8, 0.2, 0.0], solver_order=3))
    inputs, outputs, coef = m.uniform(table)
    assert inputs[0] == m.SAMPLE and coef.shape == (len(table), len(outputs), len(inputs))
    for n, step in enumerate(table):
        for row, role in enumerate(step.outputs):
            for col, name in enumerate(step.inputs):
                assert coef[n, outputs.index(role), inputs.index(name)] == step.coef[row, col]
        assert int((coef[n] != 0).sum()) == int((step.coef != 0).sum())  # nothing else


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_approx_bounds_the_float_evaluation_it_models(dtype):
    """Expressions of the kind the schedulers evaluate (log-SNR steps, expm1, sqrt, quotients),
    evaluated in ``dtype`` by numpy: each lands within its Approx bound of the float64 value."""
    F = Roundoff(dtype)
    npd = np.float32 if dtype == torch.float32 else np.float16
    rng = np.random.default_rng(0)
    for _ in range(300):
        a, b = (float(npd(v)) for v in rng.uniform(0.01, 20.0, 2))
        x, y = F.num(a), F.num(b)
        exprs = [
            (lambda p, q: (F.log(p) - F.log(q)) / (p * q + 1),
             lambda p, q: (np.log(p) - np.log(q)) / (p * q + npd(1))),
            (lambda p, q: F.expm1(-(p / q)) * (p ** 0.5),
             lambda p, q: np.expm1(-(p / q)) * np.sqrt(p)),
            (lambda p, q: 1 / ((p ** 2 + 1) ** 0.5) - q / (q + 1),
             lambda p, q: npd(1) / np.sqrt(p * p + npd(1)) - q / (q + npd(1))),
        ]
        for model, floats in exprs:
            bound = model(x, y)
            with np.errstate(all="ignore"):
                got = float(floats(npd(a), npd(b)))
            assert abs(got - bound.v) <= bound.e, (a, b, got, bound)


def test_approx_keeps_ieee_infinities_exact():
    F = Roundoff(torch.float32)
    zero = F.num(0.0)
    lam = F.log(F.num(1.0)) - F.log(zero)
    assert lam.v == math.inf and lam.e == 0
    assert F.exp(-lam).v == 0 and F.exp(-lam).e == 0
    assert F.expm1(-lam).v == -1 and F.expm1(-lam).e == 0
    assert unit_roundoff(torch.float32) == 2.0 ** -24
    assert isinstance(F.const(0.1), Approx) and F.const(0.1).e > 0 and F.const(0.5).e == 0
