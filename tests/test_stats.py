"""speedrun.stats: the Student-t tail against tabulated values and (where installed) scipy, and the Welch test."""

import math

import pytest

from speedrun import stats

# (t, dof, P(T > t)) from standard t tables: the one-sided critical values at 5%, 2.5%, 1% and 0.5%
TABLE = [(6.314, 1, 0.05), (12.706, 1, 0.025), (2.920, 2, 0.05), (6.965, 2, 0.01), (2.353, 3, 0.05),
         (4.541, 3, 0.01), (2.015, 5, 0.05), (4.032, 5, 0.005), (1.812, 10, 0.05), (2.764, 10, 0.01),
         (1.697, 30, 0.05), (2.750, 30, 0.005)]


@pytest.mark.parametrize("t,dof,p", TABLE)
def test_student_t_tail_matches_the_tables(t, dof, p):
    assert stats.student_t_sf(t, dof) == pytest.approx(p, rel=2e-3)  # the tables print 3 decimals of t


def test_student_t_closed_forms_and_symmetry():
    # dof 1 is the Cauchy distribution, dof 2 has a closed form too
    for t in (-3.0, -0.4, 0.0, 0.7, 5.0, 80.0):
        assert stats.student_t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-12, abs=1e-15)
        assert stats.student_t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-12, abs=1e-15)
        assert stats.student_t_sf(t, 7.3) + stats.student_t_sf(-t, 7.3) == pytest.approx(1.0, abs=1e-14)
    assert stats.student_t_sf(math.inf, 3) == 0.0 and stats.student_t_sf(-math.inf, 3) == 1.0
    assert stats.student_t_sf(1.0, math.inf) == pytest.approx(0.5 * math.erfc(1 / math.sqrt(2)))
    with pytest.raises(ValueError):
        stats.student_t_sf(1.0, 0)


def test_incomplete_beta_known_values():
    assert stats.regularized_incomplete_beta(1, 1, 0.3) == pytest.approx(0.3, rel=1e-13)  # uniform
    assert stats.regularized_incomplete_beta(2, 3, 0.4) == pytest.approx(0.5248, rel=1e-12)  # a polynomial
    assert stats.regularized_incomplete_beta(0.5, 0.5, 0.5) == pytest.approx(0.5, rel=1e-13)
    with pytest.raises(ValueError):
        stats.regularized_incomplete_beta(1, 1, 1.5)


def test_student_t_against_scipy():
    # (beyond ~1e5 degrees of freedom lgamma differences cost digits; a Welch test of a few seeds never gets there)
    scipy_stats = pytest.importorskip("scipy.stats")
    for t in (-40.0, -5.0, -1.3, -0.01, 0.0, 0.2, 1.0, 2.5, 9.0, 60.0):
        for dof in (0.3, 1.0, 1.7, 2.0, 3.5, 7.81, 12.0, 50.0, 1e3, 1e4):
            expected = float(scipy_stats.t.sf(t, dof))
            assert stats.student_t_sf(t, dof) == pytest.approx(expected, rel=1e-9, abs=1e-300), (t, dof)


def test_welch_test_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    new, prev, margin = [3.00, 3.02, 2.99, 3.01], [3.05, 3.07, 3.06], 0.005
    ours = stats.welch_test(new, prev, margin)
    theirs = scipy_stats.ttest_ind([p - margin for p in prev], new, equal_var=False, alternative="greater")
    assert ours.t == pytest.approx(theirs.statistic, rel=1e-12)
    assert ours.p == pytest.approx(theirs.pvalue, rel=1e-9)


def test_mean_std_and_degenerate_samples():
    assert stats.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert stats.mean_std([4.0]) == (4.0, None)
    flat = stats.welch_test([1.0, 1.0], [2.0, 2.0], 0.0)  # no spread: the sign of the difference decides
    assert flat.p == 0.0 and flat.t == math.inf
    with pytest.raises(ValueError):
        stats.welch_test([], [1.0], 0.0)
