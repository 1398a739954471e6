"""The accuracy study's claims (README table), asserted with margins that catch a wrong
coefficient."""

import pytest

from belm_kernels.accuracy import convergence_order, format_table, run_study

STEPS = (10, 20, 50, 100)


@pytest.fixture(scope="module")
def rows():
    return {(r.method, r.steps): r for r in run_study(steps=STEPS)}


def test_obelm_is_second_order(rows):
    assert 1.7 <= convergence_order(list(rows.values()), "obelm") <= 2.6


@pytest.mark.parametrize("method", ["ddim", "bdia"])
def test_ddim_and_bdia_are_first_order(rows, method):
    assert 0.6 <= convergence_order(list(rows.values()), method) <= 1.3


@pytest.mark.parametrize("n", STEPS)
def test_obelm_beats_ddim(rows, n):
    assert rows["obelm", n].error < rows["ddim", n].error


@pytest.mark.parametrize("n", STEPS[1:])
def test_obelm_beats_bdia_and_edict_from_20_steps(rows, n):
    assert rows["obelm", n].error < min(rows["bdia", n].error, rows["edict", n].error)


@pytest.mark.parametrize("method", ["obelm", "edict"])
@pytest.mark.parametrize("n", STEPS)
def test_exact_methods_round_trip_to_machine_precision(rows, method, n):
    rt = rows[method, n].roundtrip
    assert rt["float64"] < 1e-13
    assert rt["float32"] < 1e-5
    # Every step rounds the state to 16 bits; EDICT's mixing lines round twice per step.
    assert rt["float16"] < 3e-2
    assert rt["bfloat16"] < {"obelm": 1e-1, "edict": 2e-1}[method]


@pytest.mark.parametrize("n", STEPS)
def test_ddim_inversion_is_not_exact(rows, n):
    assert rows["ddim", n].roundtrip["float64"] > 1e-3


def test_bdia_round_trip_error_grows_like_inverse_gamma_power(rows):
    # Exact at few steps, but inversion divides by gamma = 0.5 every step.
    assert rows["bdia", 10].roundtrip["float64"] < 1e-13
    assert rows["bdia", 100].roundtrip["float64"] > 1e6 * rows["bdia", 10].roundtrip["float64"]


@pytest.mark.parametrize("n", STEPS)
def test_model_calls(rows, n):
    for method in ("ddim", "bdia", "obelm"):
        assert (rows[method, n].calls_sample, rows[method, n].calls_pair) == (n, n - 1)
    assert (rows["edict", n].calls_sample, rows["edict", n].calls_pair) == (2 * n, 2 * n)


def test_table_lists_every_row_and_the_orders(rows):
    table = format_table(list(rows.values()))
    assert table.count("\n| obelm |") == len(STEPS)
    assert "Measured convergence order" in table and "obelm 2." in table
