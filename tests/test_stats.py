"""Bootstrap intervals against closed forms: the normal interval of Bernoulli means and, for a tiny
sample, the exact bootstrap distribution enumerated by brute force."""

import itertools
import math

import numpy as np
import pytest

from stages.stats import bootstrap, bootstrap_ratio, paired


def test_single_task_matches_the_normal_interval_of_a_bernoulli():
    rng = np.random.default_rng(123)
    x = 100.0 * (rng.random(4000) < 0.3)
    p = x.mean() / 100
    half = 196.0 * math.sqrt(p * (1 - p) / x.size)
    ci = bootstrap({"t": x}, resamples=4000, seed=1)
    assert ci.estimate == pytest.approx(100 * p)
    assert ci.low == pytest.approx(100 * p - half, abs=0.1 * half)
    assert ci.high == pytest.approx(100 * p + half, abs=0.1 * half)


def test_average_over_tasks_resamples_each_task_on_its_own():
    rng = np.random.default_rng(7)
    a, b = 100.0 * (rng.random(3000) < 0.2), 100.0 * (rng.random(1000) < 0.7)
    pa, pb = a.mean() / 100, b.mean() / 100
    sd = 100 * math.sqrt(pa * (1 - pa) / a.size + pb * (1 - pb) / b.size) / 2
    ci = bootstrap({"a": a, "b": b}, resamples=4000, seed=2)
    assert ci.estimate == pytest.approx(50 * (pa + pb))
    assert ci.low == pytest.approx(ci.estimate - 1.96 * sd, abs=0.1 * 1.96 * sd)
    assert ci.high == pytest.approx(ci.estimate + 1.96 * sd, abs=0.1 * 1.96 * sd)


def test_tiny_sample_agrees_with_the_enumerated_bootstrap_distribution():
    x = [0.0, 10.0, 40.0, 100.0]
    means = np.array([np.mean(s) for s in itertools.product(x, repeat=len(x))])  # all 4^4 resamples, equally likely
    ci = bootstrap({"t": x}, resamples=20000, seed=3, level=0.8)
    # the bootstrap quantiles sit within one atom of the exact distribution's quantiles
    atoms = np.unique(means)
    exact_low, exact_high = np.quantile(means, [0.1, 0.9])
    step = np.diff(atoms).max()
    assert abs(ci.low - exact_low) <= step and abs(ci.high - exact_high) <= step
    assert ci.estimate == pytest.approx(np.mean(x))


def test_paired_difference_cancels_what_both_methods_share():
    rng = np.random.default_rng(5)
    a = {"t1": rng.normal(50, 20, 200), "t2": rng.normal(30, 20, 100)}
    b = {t: v - 3.0 for t, v in a.items()}  # B = A - 3 on every example
    diff = paired(a, b)
    assert diff.estimate == pytest.approx(3.0) and diff.low == pytest.approx(3.0) and diff.high == pytest.approx(3.0)
    assert diff.excludes_zero()
    unpaired_width = bootstrap(a).high - bootstrap(a).low
    assert unpaired_width > 3.0  # about 2 x 1.96 x 1.22 for these scores on their own


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="task 'x' has no per-example scores"):
        bootstrap({"x": []})
    with pytest.raises(ValueError, match="task 't' has 2 vs 3 examples"):
        paired({"t": [1, 2]}, {"t": [1, 2, 3]})
    with pytest.raises(ValueError, match="tasks differ"):
        paired({"t": [1]}, {"u": [1]})


def test_ratio_interval_matches_the_delta_method():
    rng = np.random.default_rng(11)
    den = rng.integers(20, 200, 3000).astype(float)  # tokens per prompt
    num = rng.binomial(den.astype(int), 0.8).astype(float)  # correctly routed tokens
    ci = bootstrap_ratio(num, den, resamples=4000, seed=4)
    r = num.sum() / den.sum()
    # delta method: var(R) = sum((num - r den)^2) / (sum den)^2
    sd = math.sqrt(((num - r * den) ** 2).sum()) / den.sum()
    assert ci.estimate == pytest.approx(r)
    assert ci.low == pytest.approx(r - 1.96 * sd, abs=0.1 * 1.96 * sd)
    assert ci.high == pytest.approx(r + 1.96 * sd, abs=0.1 * 1.96 * sd)
