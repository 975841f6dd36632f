"""Tolerances that follow the dtype, not one machine: two computations of the same math in `dtype` that add
in different orders (AVX2 vs AVX-512 / AMX kernels, fused vs looped) differ by a few units of rounding of
the values they sum, so the bound is a multiple of the dtype's machine epsilon times the size of the values
compared (the largest |reference|), never a constant measured on one CPU. A wrong computation (a swapped
weight, a wrong gate, a missed adapter) moves results by a sizeable fraction of that size, far above it."""

from __future__ import annotations

import numpy as np
import torch

#: units of rounding allowed, relative to the largest reference value: a handful of matmuls of width ≤ 512
#: each add O(sqrt(K)) roundings of partial sums at most that large (measured worst across CPUs: ~20)
ULPS = 256


def bound(reference, dtype=torch.float32, ulps: float = ULPS) -> float:
    """The largest difference allowed from `reference` for a result computed in `dtype`."""
    eps = torch.finfo(dtype).eps
    ref = reference.detach().double().abs().max().item() if torch.is_tensor(reference) else \
        float(np.abs(np.asarray(reference, dtype=np.float64)).max())
    return ulps * eps * max(ref, torch.finfo(dtype).tiny)


def assert_close(actual, reference, dtype=torch.float32, ulps: float = ULPS, what: str = "") -> None:
    """|actual - reference| ≤ ulps · eps(dtype) · max|reference| everywhere, with the numbers in the message."""
    if torch.is_tensor(actual):
        diff = (actual.detach().double() - torch.as_tensor(reference).detach().double()).abs().max().item()
    else:
        diff = float(np.abs(np.asarray(actual, np.float64) - np.asarray(reference, np.float64)).max())
    allowed = bound(reference, dtype, ulps)
    assert diff <= allowed, (f"{what + ': ' if what else ''}max |difference| {diff:.3e} exceeds {allowed:.3e} "
                             f"({ulps} × eps({dtype}) × max|reference|)")


#: on the 'sharp' test checkpoints (block weights at std 1/sqrt(fan_in)) a position whose top-k experts are
#: nearly tied can flip under rounding and move further: such a position may sit this far (relative to the
#: largest logit), while the median position must keep to rounding. A wrong export moves every position.
OUTLIER = 0.01


def assert_logits_close(got, want, ulps: float = ULPS, what: str = "") -> None:
    """Logits [P, V] of the same model from two implementations: the median position's largest difference
    within `ulps` roundings of the largest logit (fp32), every position within OUTLIER of it."""
    per_position = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max(-1)
    check_positions(float(np.median(per_position)), float(per_position.max()), float(np.abs(want).max()), ulps,
                    what)


def check_positions(median: float, largest: float, scale: float, ulps: float = ULPS, what: str = "") -> None:
    """The median and largest per-position logit differences against the bounds of assert_logits_close."""
    prefix = what + ": " if what else ""
    assert median <= bound(scale, ulps=ulps), f"{prefix}median position differs by {median:.3e} > {bound(scale, ulps=ulps):.3e}"
    assert largest <= OUTLIER * scale, f"{prefix}a position differs by {largest:.3e} > {OUTLIER * scale:.3e}"
