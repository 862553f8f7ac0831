"""Paired statistics for "A beats B" claims: over test images and over seeds.

Every comparison here is *paired*: the two methods answer the same images, so the
difference is taken image by image (or seed by seed) before any interval is drawn.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

__all__ = ["paired_bootstrap", "mcnemar_exact", "seed_interval", "T_975"]

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
