"""The study's statistics (jfe_jax.eval.stats) against closed forms and constructed cases."""

import numpy as np
import pytest

from jfe_jax.eval import stats

Z95 = 1.959963984540054


def _wald(p_hat: float, n: int) -> tuple[float, float]:
    half = Z95 * np.sqrt(p_hat * (1 - p_hat) / n)
    return p_hat - half, p_hat + half


@pytest.mark.parametrize("p, queries", [(0.3, 400), (0.85, 600)])
def test_bootstrap_interval_matches_the_binomial_closed_form(p, queries):
    # One seed: the bootstrap over queries of a mean of Bernoulli hits is, for n this large,
    # the normal (Wald) interval p_hat +- 1.96 sqrt(p_hat (1 - p_hat) / n). Its width is about
    # 0.09 here; Monte-Carlo error of the 2.5% quantile with 8000 replicates is about 0.001,
    # the lattice step of a mean of n hits 1/n.
    rng = np.random.default_rng(1)
    hits = (rng.random((1, queries)) < p).astype(float)
    result = stats.compare_systems({"a": {"task": hits}}, replicates=8000)
    interval = result["systems"]["a"]["tasks"]["task"]
    low, high = _wald(hits.mean(), queries)
    assert interval["estimate"] == pytest.approx(hits.mean())
    assert interval["low"] == pytest.approx(low, abs=0.006)
    assert interval["high"] == pytest.approx(high, abs=0.006)


def test_fixed_seeds_combine_like_one_sample_of_all_queries():
    # Every seed kept in every replicate: the mean over S seeds of Q queries each has the
    # binomial variance of S*Q independent hits.
    rng = np.random.default_rng(2)
    hits = (rng.random((3, 200)) < 0.4).astype(float)
    result = stats.compare_systems({"a": {"task": hits}}, replicates=8000, resample_seeds=False)
    interval = result["systems"]["a"]["tasks"]["task"]
    low, high = _wald(hits.mean(), hits.size)
    assert interval["low"] == pytest.approx(low, abs=0.006)
    assert interval["high"] == pytest.approx(high, abs=0.006)


def test_resampling_seeds_widens_the_interval_when_seeds_disagree():
    rng = np.random.default_rng(3)
    # Three seeds whose models differ a lot (0.2, 0.5, 0.8): the seed-level spread must show.
    hits = np.stack([(rng.random(300) < p).astype(float) for p in (0.2, 0.5, 0.8)])
    both = stats.compare_systems({"a": {"t": hits}}, replicates=4000)["systems"]["a"]["tasks"]
    queries_only = stats.compare_systems({"a": {"t": hits}}, replicates=4000, resample_seeds=False)[
        "systems"
    ]["a"]["tasks"]
    width = lambda i: i["t"]["high"] - i["t"]["low"]  # noqa: E731
    assert width(both) > 3 * width(queries_only)


def test_identical_systems_differ_by_an_interval_containing_zero():
    rng = np.random.default_rng(4)
    hits = {f"task{i}": (rng.random((3, 200)) < 0.5).astype(float) for i in range(4)}
    result = stats.compare_systems({"a": hits, "b": {t: v.copy() for t, v in hits.items()}})
    diff = result["differences"]["b"]
    for interval in [*diff["tasks"].values(), diff["average"]]:
        assert interval["low"] <= 0 <= interval["high"]
        assert interval["decision"] == "no decision"


def test_two_systems_with_the_same_skill_give_no_decision():
    # Independent hits at the same rate: the paired interval must contain zero (this is the
    # coverage the 95% level promises; the seeds are fixed so the test is deterministic).
    rng = np.random.default_rng(5)
    a = {"t": (rng.random((3, 300)) < 0.6).astype(float)}
    b = {"t": (rng.random((3, 300)) < 0.6).astype(float)}
    diff = stats.compare_systems({"a": a, "b": b})["differences"]["b"]["tasks"]["t"]
    assert diff["low"] < 0 < diff["high"]
    assert diff["decision"] == "no decision"


def test_pairing_narrows_the_difference_of_correlated_systems():
    # b agrees with a on all but 3% of queries: paired, the difference is known to within a few
    # points; an unpaired comparison would see two independent binomial means (width ~0.14).
    rng = np.random.default_rng(6)
    a = (rng.random((2, 400)) < 0.5).astype(float)
    b = a.copy()
    flip = rng.random(a.shape) < 0.03
    b[flip] = 1 - b[flip]
    diff = stats.compare_systems({"a": {"t": a}, "b": {"t": b}}, resample_seeds=False)
    interval = diff["differences"]["b"]["tasks"]["t"]
    assert interval["high"] - interval["low"] < 0.03
    assert interval["estimate"] == pytest.approx(b.mean() - a.mean())


def test_win_rule():
    assert stats.decide(stats.Interval(0.02, 0.001, 0.04), ("early", "late")) == "early wins"
    assert stats.decide(stats.Interval(-0.02, -0.04, -0.001), ("early", "late")) == "late wins"
    assert stats.decide(stats.Interval(0.02, -0.001, 0.04), ("early", "late")) == "no decision"
    assert stats.decide(stats.Interval(0.0, 0.0, 0.0), ("early", "late")) == "no decision"
    rng = np.random.default_rng(7)
    strong = {"t": (rng.random((3, 200)) < 0.8).astype(float)}
    weak = {"t": (rng.random((3, 200)) < 0.3).astype(float)}
    result = stats.compare_systems({"late": weak, "early": strong}, reference="late")
    assert result["differences"]["early"]["tasks"]["t"]["decision"] == "early wins"
    assert result["differences"]["early"]["average"]["decision"] == "early wins"
    result = stats.compare_systems({"early": strong, "late": weak}, reference="early")
    assert result["differences"]["late"]["tasks"]["t"]["decision"] == "early wins"


def test_groups_average_their_tasks():
    hits = {
        "a_task0": np.ones((2, 50)),
        "b_task1": np.zeros((2, 50)),
        "c_task2": np.full((2, 50), 0.5),
    }
    result = stats.compare_systems(
        {"s": hits}, groups={"g": ["a_task0", "b_task1"], "empty": ["zzz"]}, replicates=100
    )
    summary = result["systems"]["s"]
    assert summary["groups"]["g"]["estimate"] == pytest.approx(0.5)
    assert "empty" not in summary["groups"]
    assert summary["average"]["estimate"] == pytest.approx(0.5)


def test_mismatched_studies_are_refused_with_the_reason():
    a = {"t": np.ones((2, 10))}
    with pytest.raises(ValueError, match="same seeds and test queries"):
        stats.compare_systems({"a": a, "b": {"t": np.ones((3, 10))}})
    with pytest.raises(ValueError, match="same tasks"):
        stats.compare_systems({"a": a, "b": {"u": np.ones((2, 10))}})
    with pytest.raises(ValueError, match=r"\[seeds, queries\]"):
        stats.compare_systems({"a": {"t": np.ones(10)}})


def test_slope_recovers_a_linear_relation_and_its_sign():
    # Per-task differences that grow with the fusion need (slope 0.5), measured with noise.
    rng = np.random.default_rng(8)
    needs = np.linspace(0.0, 0.6, 8)
    boot = stats.Bootstrap(2000, seed=0)
    x, y, xr, yr = {}, {}, {}, {}
    for i, need in enumerate(needs):
        task = f"task{i}"
        need_hits = (rng.random((3, 300)) < need).astype(float)
        diff_hits = (rng.random((3, 300)) < 0.1 + 0.5 * need).astype(float)
        x[task], xr[task] = need_hits.mean(), boot.replicate_means(task + "x", need_hits)
        y[task], yr[task] = diff_hits.mean(), boot.replicate_means(task + "y", diff_hits)
    fit = stats.slope_with_interval(x, y, xr, yr)
    assert fit["slope"]["low"] < 0.5 < fit["slope"]["high"]
    assert fit["slope"]["decision"] == "positive"
    with pytest.raises(ValueError, match="at least 3 tasks"):
        stats.slope_with_interval({"a": 0, "b": 1}, {"a": 0, "b": 1}, xr, yr)
