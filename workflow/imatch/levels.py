"""The paper's discretisations (Eq. 3, 4, 17) and their inverses (Eq. 5-7), in one place.

Rounding is half-up, as the paper's examples need it: S_total = 2.0 gives 4.5 -> level 5 (`e`),
where Python's round() (banker's rounding) would give 4. Annotator means are ratios of small
integers, so a tolerance of 1e-9 keeps values that are mathematically on a .5 boundary (e.g.
0.25 * 6 = 1.5) from falling below it through floating-point error.
"""

from __future__ import annotations

import numpy as np

OVERALL_LETTERS = [chr(ord("a") + i) for i in range(15)]  # a..o  <-> levels 1..15
ELEMENT_DIGITS = [str(i) for i in range(1, 8)]  # "1".."7"     <-> levels 1..7
DEFAULT_TAU = 3  # an element is a hit when its level is > tau (paper, Sec. 3.1.2)
_EPS = 1e-9


def round_half_up(x):
    return np.floor(np.asarray(x, dtype=float) + 0.5 + _EPS).astype(int)


def overall_level(total_score):
    """Eq. 3: S' = round((S - 1) / 4 * 14 + 1), S in [1, 5] -> level in 1..15."""
    s = np.asarray(total_score, dtype=float)
    if np.any((s < 1) | (s > 5)) or np.any(np.isnan(s)):
        raise ValueError(f"total score outside [1, 5]: {s[(s < 1) | (s > 5) | np.isnan(s)][:3]}")
    return round_half_up((s - 1) / 4 * 14 + 1)


def overall_letter(level) -> str:
    return OVERALL_LETTERS[int(level) - 1]


def level_to_total(level):
    """Inverse of Eq. 3 for a level or an expected level: (l - 1) / 14 * 4 + 1."""
    return (np.asarray(level, dtype=float) - 1) / 14 * 4 + 1


def element_level(score):
    """Eq. 4: S'_e = round(S_e * 6) + 1, S_e in [0, 1] -> level in 1..7."""
    s = np.asarray(score, dtype=float)
    if np.any((s < 0) | (s > 1)) or np.any(np.isnan(s)):
        raise ValueError(f"element score outside [0, 1]: {s[(s < 0) | (s > 1) | np.isnan(s)][:3]}")
    return round_half_up(s * 6) + 1


def element_digit(level) -> str:
    return ELEMENT_DIGITS[int(level) - 1]


def is_hit(level, tau: float = DEFAULT_TAU):
    """Eq. 2: an element is matched when its (expected) level is greater than tau."""
    return np.asarray(level, dtype=float) > tau


def expected_level(logits) -> np.ndarray:
    """Eq. 6-7: closed-set softmax over the level tokens' logits, then the expected level (1-based)."""
    z = np.asarray(logits, dtype=float)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return p @ np.arange(1, z.shape[-1] + 1)


def perturb_levels(levels, *, epsilon: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 17 score perturbation: S_perturbed = S_discrete + delta, delta uniform in {-eps, +eps}.

    The paper perturbs the discretised level; we keep it discrete by requiring a whole-number
    epsilon (a fractional one would need a second rounding, which half-up would bias upwards)
    and clip the result to 1..7, so a level at an end moves inwards or stays. `rate` is the
    seeded fraction of elements perturbed (1.0 = every element, the paper's reading).
    Returns (perturbed levels, delta applied per element).
    """
    levels = np.asarray(levels, dtype=int)
    if epsilon < 0 or int(epsilon) != epsilon:
        raise ValueError(f"epsilon must be a whole number of levels >= 0, got {epsilon}")
    rng = np.random.default_rng(seed)
    chosen = rng.random(len(levels)) < rate
    sign = rng.choice([-1, 1], size=len(levels))
    delta = np.where(chosen, sign * int(epsilon), 0)
    perturbed = np.clip(levels + delta, 1, 7)
    return perturbed, perturbed - levels
