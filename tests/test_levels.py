"""The paper's equations on their boundary values."""

from __future__ import annotations

import numpy as np
import pytest

from imatch import levels


@pytest.mark.parametrize(
    "score, level, letter",
    [
        (1.0, 1, "a"),
        (5.0, 15, "o"),
        (2.0, 5, "e"),  # 4.5 rounds half-up to 5 (Python's round would give 4)
        (3.0, 8, "h"),
        (4.0, 12, "l"),  # 11.5 -> 12 (round() would give 12 here, banker's rounds to even)
        (1 + 4 * 0.5 / 14, 2, "b"),  # exactly on the 1.5 boundary
        (1 + 4 * 0.5 / 14 - 1e-6, 1, "a"),  # just below it
        (7 / 3, 6, "f"),  # a three-annotator mean: 5.666 -> 6
    ],
)
def test_overall_level_eq3(score, level, letter):
    assert levels.overall_level(score) == level
    assert levels.overall_letter(level) == letter


def test_overall_levels_cover_a_to_o_and_invert():
    lv = np.arange(1, 16)
    assert [levels.overall_letter(v) for v in lv] == list("abcdefghijklmno")
    assert np.array_equal(levels.overall_level(levels.level_to_total(lv)), lv)
    assert levels.level_to_total(1) == 1 and levels.level_to_total(15) == 5 and levels.level_to_total(8) == 3


@pytest.mark.parametrize(
    "score, level",
    [(0.0, 1), (1.0, 7), (0.5, 4), (0.25, 3), (1 / 12, 2), (1 / 3, 3), (2 / 3, 5), (0.75, 6), (0.24, 2)],
)
def test_element_level_eq4(score, level):
    # 0.25 * 6 = 1.5 -> 2 (half-up) + 1 = 3; 1/12 * 6 = 0.5 -> 1 + 1 = 2
    assert levels.element_level(score) == level


def test_hit_threshold_is_strictly_greater_than_tau():
    assert list(levels.is_hit([3, 3.0001, 4, 2.9])) == [False, True, True, False]
    assert list(levels.is_hit([4, 5], tau=4)) == [False, True]


def test_out_of_range_scores_are_refused():
    with pytest.raises(ValueError):
        levels.overall_level(5.5)
    with pytest.raises(ValueError):
        levels.element_level(-0.1)
    with pytest.raises(ValueError):
        levels.overall_level(float("nan"))


def test_expected_level_is_the_softmax_expectation_eq5_7():
    logits = np.full(15, -50.0)
    logits[4] = 0.0  # all mass on 'e'
    assert levels.expected_level(logits) == pytest.approx(5.0)
    assert levels.expected_level(np.zeros(15)) == pytest.approx(8.0)  # uniform -> mean of 1..15
    two = np.full(15, -np.inf)
    two[[0, 14]] = np.log([0.25, 0.75])
    assert levels.expected_level(two) == pytest.approx(0.25 * 1 + 0.75 * 15)
    # shift invariance of the closed-set softmax
    x = np.random.default_rng(0).normal(size=(3, 15))
    assert np.allclose(levels.expected_level(x), levels.expected_level(x + 100))


def test_perturbation_eq17_moves_by_epsilon_and_clips():
    lv = np.array([1, 2, 3, 4, 5, 6, 7] * 200)
    out, delta = levels.perturb_levels(lv, epsilon=1, rate=1.0, seed=0)
    assert set(np.unique(out - lv)) <= {-1, 0, 1}
    assert out.min() == 1 and out.max() == 7
    inner = (lv > 1) & (lv < 7)
    assert np.all(np.abs(delta[inner]) == 1)  # every element perturbed, none clipped inside
    assert np.all(delta[lv == 1] >= 0) and np.all(delta[lv == 7] <= 0)  # ends move inwards or stay
    assert 0.45 < np.mean(delta[inner] > 0) < 0.55  # symmetric
    again, _ = levels.perturb_levels(lv, epsilon=1, rate=1.0, seed=0)
    assert np.array_equal(out, again)
    part, d = levels.perturb_levels(lv, epsilon=2, rate=0.3, seed=1)
    assert 0.25 < np.mean(np.abs(levels.perturb_levels(lv, epsilon=2, rate=0.3, seed=1)[1][inner]) > 0) < 0.35
    assert set(np.unique(np.abs(d))) <= {0, 1, 2}
    with pytest.raises(ValueError):
        levels.perturb_levels(lv, epsilon=0.5, rate=1.0, seed=0)


def test_out_of_range_messages_name_the_first_three_bad_values():
    with pytest.raises(ValueError) as err:
        levels.overall_level([3, 0.5, 6, float("nan"), 7])
    assert str(err.value) == "total score outside [1, 5]: [0.5 6.  nan]"
    with pytest.raises(ValueError) as err:
        levels.element_level([0.5, -0.5, 1.5, float("nan"), 2])
    assert str(err.value) == "element score outside [0, 1]: [-0.5  1.5  nan]"
    for bad in (1.0001, 1.5, float("nan")):
        with pytest.raises(ValueError, match="element score outside"):
            levels.element_level(bad)
    for bad in (0.9999, 5.0001):
        with pytest.raises(ValueError, match="total score outside"):
            levels.overall_level(bad)
    assert levels.overall_level([1, 5]).tolist() == [1, 15] and levels.element_level([0, 1]).tolist() == [1, 7]
    # values on the ends of the scale are not listed as out of range
    for f, values, listed in [(levels.overall_level, [1.0, 0.5], "[0.5]"), (levels.overall_level, [5.0, 6.0], "[6.]"),
                              (levels.element_level, [0.0, -0.5], "[-0.5]"), (levels.element_level, [1.0, 2.0], "[2.]")]:
        with pytest.raises(ValueError) as err:
            f(values)
        assert str(err.value).endswith(": " + listed)


def test_object_and_integer_arrays_give_the_same_integer_levels():
    """pandas nullable columns arrive as object arrays (`Float64.to_numpy()`): read as numbers."""
    obj = np.array([0.25, 0.75], dtype=object)
    assert levels.element_level(obj).tolist() == [3, 6] and levels.element_level(obj).dtype.kind == "i"
    assert levels.overall_level(np.array([2.0, 5.0], dtype=object)).tolist() == [5, 15]
    assert levels.round_half_up(np.array([2.5, 4.5], dtype=object)).tolist() == [3, 5]
    assert levels.round_half_up([2.5, -0.5]).dtype.kind == "i"
    assert levels.level_to_total(np.array([1, 8], dtype=object)).dtype == np.float64
    assert levels.is_hit(np.array([3.5, 3], dtype=object)).dtype == bool
    assert levels.expected_level(np.array([[0.0, 0.0]], dtype=object)).tolist() == [1.5]
    out, delta = levels.perturb_levels(np.array([2.0, 3.0]), epsilon=1, rate=1.0, seed=0)
    assert out.dtype.kind == "i" and delta.dtype.kind == "i"


def test_expected_level_normalises_each_row_and_never_overflows():
    # two rows on very different logit scales: each is its own softmax (Eq. 6) and expectation (Eq. 7)
    logits = np.array([[0.0, np.log(3.0)], [-2000.0, -2000.0], [1000.0, 1000.0 + np.log(3.0)]])
    assert levels.expected_level(logits) == pytest.approx([1.75, 1.5, 1.75])
    assert levels.expected_level(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 50.0]])) == pytest.approx([2.0, 3.0])


def test_perturbation_is_the_seeded_draw_and_epsilon_zero_changes_nothing():
    # golden draws of numpy's PCG64 (seed 0 and 3): a fixed seed must keep giving the same targets
    assert [v.tolist() for v in levels.perturb_levels([4] * 8, epsilon=1, rate=1.0, seed=0)] == [
        [5, 5, 5, 5, 3, 5, 5, 3], [1, 1, 1, 1, -1, 1, 1, -1]]
    assert [v.tolist() for v in levels.perturb_levels([4] * 8, epsilon=2, rate=0.5, seed=3)] == [
        [6, 6, 4, 4, 2, 2, 6, 6], [2, 2, 0, 0, -2, -2, 2, 2]]
    out, delta = levels.perturb_levels([1, 4, 7], epsilon=0, rate=1.0, seed=0)
    assert out.tolist() == [1, 4, 7] and delta.tolist() == [0, 0, 0]
    out, delta = levels.perturb_levels([1, 4, 7] * 10, epsilon=3, rate=0.0, seed=0)
    assert delta.tolist() == [0] * 30
    for bad in (-1, 0.5):
        with pytest.raises(ValueError) as err:
            levels.perturb_levels([4], epsilon=bad, rate=1.0, seed=0)
        assert str(err.value) == f"epsilon must be a whole number of levels >= 0, got {bad}"


def test_letters_and_digits_of_the_levels():
    assert levels.OVERALL_LETTERS == list("abcdefghijklmno")
    assert levels.ELEMENT_DIGITS == list("1234567")
    assert [levels.element_digit(v) for v in (1, 4, 7)] == ["1", "4", "7"] and levels.DEFAULT_TAU == 3
    assert levels.overall_letter(np.int64(15)) == "o" and levels.element_digit(np.float64(2.0)) == "2"
