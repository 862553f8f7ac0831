"""Paired statistics for "A beats B" claims: over test images and over seeds.

Every comparison here is *paired*: the two methods answer the same images, so the
difference is taken image by image (or seed by seed) before any interval is drawn.
The upper convex hull of an accuracy-energy curve is here too: mixing two of its points
per image reaches every point between them, so the hull is what another point must beat.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

__all__ = ["paired_bootstrap", "mcnemar_exact", "seed_interval", "T_975", "upper_hull",
           "hull_mixture"]

#: Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (the 0.975 point).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, resamples: int = 2000,
                     seed: int = 0) -> dict:
    """Mean of ``a - b`` over paired items (per-image correctness, 0/1 or an expected
    value in [0, 1]) with a percentile-bootstrap 95% interval over the items.

    Returns ``{"difference", "ci95": [low, high], "items", "resamples", "excludes_zero"}``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not a.size:
        raise ValueError(f"paired_bootstrap needs two equal, non-empty 1-D sequences; got "
                         f"shapes {a.shape} and {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // d.size)  # keep each block of resampled indices small
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        means[start:start + n] = d[rng.integers(0, d.size, size=(n, d.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"difference": float(d.mean()), "ci95": [float(low), float(high)],
            "items": int(d.size), "resamples": resamples,
            "excludes_zero": bool(low > 0 or high < 0)}


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """Exact (binomial) McNemar test of two classifiers on the same images: the images
    only one of them gets right, ``a_only`` and ``b_only``, are a fair coin under the null.
    Returns the counts and the two-sided p-value."""
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"mcnemar_exact needs two equal 1-D sequences; got shapes "
                         f"{a.shape} and {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    n, k = a_only + b_only, min(a_only, b_only)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"a_only": a_only, "b_only": b_only, "p_value": p}


def seed_interval(differences: Sequence[float]) -> Optional[dict]:
    """Mean over seeds of per-seed paired differences with a Student-t 95% interval
    (``None`` for fewer than 2 seeds: no interval exists)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size < 2:
        return None
    df = d.size - 1
    t = T_975[df - 1] if df <= len(T_975) else 1.96
    half = t * float(d.std(ddof=1)) / math.sqrt(d.size)
    mean = float(d.mean())
    return {"difference": mean, "ci95": [mean - half, mean + half], "seeds": int(d.size),
            "excludes_zero": bool(mean - half > 0 or mean + half < 0)}


# ----------------------------------------------------------------------------- curves
def upper_hull(energy: Sequence[float], top1: Sequence[float]) -> list[int]:
    """Indices of the points on the upper convex hull of ``(energy, top1)``, by energy,
    up to the most accurate point (spending more than it buys nothing)."""
    e = np.asarray(energy, dtype=np.float64)
    a = np.asarray(top1, dtype=np.float64)
    order = sorted(range(len(e)), key=lambda i: (e[i], -a[i]))
    hull: list[int] = []
    for i in order:
        if hull and e[i] == e[hull[-1]]:
            continue  # same energy, not more accurate (sorted)
        while len(hull) >= 2:
            j, k = hull[-2], hull[-1]  # drop k when it lies on or under the line j -> i
            if (a[k] - a[j]) * (e[i] - e[j]) <= (a[i] - a[j]) * (e[k] - e[j]):
                hull.pop()
            else:
                break
        hull.append(i)
    best = max(range(len(hull)), key=lambda n: (a[hull[n]], -n))
    return [int(i) for i in hull[:best + 1]]


def hull_mixture(energy: Sequence[float], top1: Sequence[float],
                 budget: float) -> Optional[list[tuple[int, float]]]:
    """The mixture of two hull points that spends ``budget`` per image: ``[(index,
    weight), ...]`` (one point at weight 1 past the most accurate point); None when
    ``budget`` is below the cheapest point (the curve says nothing there)."""
    hull = upper_hull(energy, top1)
    e = np.asarray(energy, dtype=np.float64)
    if budget < e[hull[0]]:
        return None
    if budget >= e[hull[-1]]:
        return [(hull[-1], 1.0)]
    for j, k in zip(hull, hull[1:]):
        if e[j] <= budget <= e[k]:
            w = float((budget - e[j]) / (e[k] - e[j]))
            return [(j, 1.0 - w), (k, w)]
    raise AssertionError("unreachable: budget inside the hull's range")
