"""The power-law fit recovers known coefficients from synthetic points, and says why when it cannot fit."""
import numpy as np
import pytest

from ringlinear.sweep.fit import fit_power_law


def _law(c, a, b, e, c0=1e15):
    return a * (c / c0) ** (-b) + e


def test_exact_points_recover_the_coefficients():
    a, b, e = 1.3, 0.28, 2.1
    c = np.geomspace(1e14, 1e16, 9)
    f = fit_power_law(c.tolist(), _law(c, a, b, e).tolist())
    assert f.c0 == 1e15
    assert abs(f.a - a) < 1e-5 and abs(f.b - b) < 1e-5 and abs(f.e - e) < 1e-5 and f.rms < 1e-7
    assert abs(f(3e15) - _law(3e15, a, b, e)) < 1e-7


def test_noisy_points_within_their_uncertainty():
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))  # fresh noise every run
    a, b, e = 0.9, 0.35, 2.6
    c = np.repeat(np.geomspace(3e13, 3e16, 8), 3)  # 8 budgets x 3 sizes, as a sweep gives
    y = _law(c, a, b, e) + rng.normal(0, 0.004, c.size)
    f = fit_power_law(c.tolist(), y.tolist())
    for got, err, want in ((f.a, f.a_err, a), (f.b, f.b_err, b), (f.e, f.e_err, e)):
        assert 0 < err < 0.05 and abs(got - want) < 4 * err, (got, err, want)  # ~1e-4 chance to fail
    assert 0.002 < f.rms < 0.008


def test_unfittable_inputs():
    with pytest.raises(ValueError, match="needs 4"):
        fit_power_law([1e14, 1e15, 1e16], [3.0, 2.8, 2.7])
    with pytest.raises(ValueError, match="distinct"):
        fit_power_law([1e14, 1e14, 1e15, 1e15], [3.0, 3.1, 2.8, 2.9])
    with pytest.raises(ValueError, match="non-finite"):
        fit_power_law([1e14, 1e15, 1e16, 0.0], [3.0, 2.8, 2.7, 2.6])
