"""The flow accuracy study's claims (README's flow table): orders, exactness, model calls.

Round trips are asserted against the error model (``accuracy.roundtrip_bound``: rounding per
step times the growth of O-BELM's parasitic mode, DESIGN.md section 2b) in float64 and float32;
16-bit states are reported in the README table, not asserted (the first-order model does not
hold once eps times that growth approaches 1).
"""

import pytest

from belm_kernels import get_sampler
from belm_kernels.accuracy import (
    DTYPES,
    convergence_order,
    default_flow_schedule,
    format_table,
    roundtrip_bound,
    run_study,
)

STEPS = (10, 20, 50, 100)
# The study (16 sampler configurations, each sampled, inverted and rebuilt in two dtypes, plus a
# 2000-step RK4 reference) takes ~5 s on a quiet 2-core machine, up to ~12 s on a busy one.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows():
    study = run_study(schedule=default_flow_schedule(), steps=STEPS, dtypes=("float64", "float32"))
    return {(r.method, r.steps): r for r in study}


def test_obelm_is_second_order(rows):
    assert 1.7 <= convergence_order(list(rows.values()), "obelm") <= 2.6


@pytest.mark.parametrize("method", ["euler", "bdia"])
def test_euler_and_bdia_are_first_order(rows, method):
    assert 0.6 <= convergence_order(list(rows.values()), method) <= 1.3


@pytest.mark.parametrize("n", STEPS)
def test_obelm_beats_euler_and_from_20_steps_everything(rows, n):
    assert rows["obelm", n].error < rows["euler", n].error
    if n >= 20:
        assert rows["obelm", n].error < min(rows["bdia", n].error, rows["edict", n].error)


@pytest.mark.parametrize("method", ["obelm", "bdia"])
@pytest.mark.parametrize("n", STEPS)
def test_exact_methods_round_trip_within_the_error_model(rows, method, n):
    sampler = get_sampler(method, default_flow_schedule(), n)
    for dtype in ("float64", "float32"):
        assert rows[method, n].roundtrip[dtype] <= roundtrip_bound(sampler, DTYPES[dtype])


@pytest.mark.parametrize("n", STEPS)
def test_euler_inversion_is_not_exact(rows, n):
    assert rows["euler", n].roundtrip["float64"] > 1e-3


@pytest.mark.parametrize("n", STEPS)
def test_model_calls(rows, n):
    for method in ("euler", "bdia", "obelm"):
        assert (rows[method, n].calls_sample, rows[method, n].calls_pair) == (n, n - 1)
    assert (rows["edict", n].calls_sample, rows["edict", n].calls_pair) == (2 * n, 2 * n)


def test_table_lists_every_row_and_the_orders(rows):
    table = format_table(list(rows.values()))
    assert table.count("\n| obelm |") == len(STEPS) and table.count("\n| euler |") == len(STEPS)
    assert "Measured convergence order" in table and "obelm 2." in table
    assert all(r.kind == "flow" for r in rows.values())
