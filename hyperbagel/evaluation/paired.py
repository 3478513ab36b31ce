"""The statistic behind a paired comparison of two models scored on the same samples (and noise)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_with_error(differences: Sequence[float]) -> tuple[float, float]:
    """Mean of per-sample differences and its standard error (NaN from a single difference: no variance to
    estimate). Taking the error of the differences, not of each model's score, keeps whatever correlation
    the two models' scores have."""
    if not differences:
        raise ValueError("no differences to average")
    values = np.asarray(differences, dtype=float)
    error = float(values.std(ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return float(values.mean()), error
