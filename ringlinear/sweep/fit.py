"""Power-law fits L(C) = a * (C / C0)^(-b) + e of loss against training FLOPs, with uncertainties.

C0 (a power of ten near the middle of the data) keeps the problem well conditioned; the unnormalised coefficient is
a * C0^b. Uncertainties are the square roots of the diagonal of scipy's curve_fit covariance, scaled by the residual
variance (absolute_sigma=False): with one seed per run the scatter of the points is the only noise estimate.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MIN_POINTS = 4  # three coefficients plus at least one degree of freedom for the uncertainty


@dataclass
class PowerLaw:
    a: float
    b: float
    e: float
    a_err: float
    b_err: float
    e_err: float
    c0: float
    n: int
    rms: float  # residual RMS, nats

    def __call__(self, c):
        return self.a * (c / self.c0) ** (-self.b) + self.e

    def to_dict(self) -> dict:
        return asdict(self)


def fit_power_law(flops: list[float], losses: list[float]) -> PowerLaw:
    """Least-squares fit; raises ValueError with the reason when it cannot be done."""
    import numpy as np
    from scipy.optimize import curve_fit
    c = np.asarray(flops, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if c.size < MIN_POINTS:
        raise ValueError(f"{c.size} points; a fit of 3 coefficients with an uncertainty needs {MIN_POINTS}")
    if not (np.all(np.isfinite(c)) and np.all(c > 0) and np.all(np.isfinite(y))):
        raise ValueError("non-finite or non-positive points")
    if np.unique(c).size < 3:
        raise ValueError("fewer than 3 distinct FLOP values")
    c0 = 10.0 ** round(float(np.mean(np.log10(c))))
    x = c / c0

    def f(x, a, b, e):
        return a * x ** (-b) + e
    lo = float(y.min())
    best = None
    for e0 in (0.5 * lo, 0.8 * lo, 0.95 * lo):  # a few starts: the floor e is the poorly determined coefficient
        a0 = max(float(y.max()) - e0, 1e-3)
        try:
            p, cov = curve_fit(f, x, y, p0=(a0, 0.3, e0), bounds=([0.0, 0.0, 0.0], [np.inf, 5.0, lo]),
                               maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((f(x, *p) - y) ** 2))
        if best is None or sse < best[2]:
            best = (p, cov, sse)
    if best is None:
        raise ValueError("least squares did not converge")
    p, cov, sse = best
    err = [math.sqrt(v) if np.isfinite(v) and v >= 0 else math.inf for v in np.diag(cov)]
    return PowerLaw(float(p[0]), float(p[1]), float(p[2]), err[0], err[1], err[2], c0, int(c.size),
                    math.sqrt(sse / c.size))
