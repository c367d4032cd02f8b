"""rapo_nb.stats checked against scipy and by hand: Welch t/p, Bonferroni, Cohen's d, bootstrap CIs, Table 3, bands."""
import itertools
import math
import numpy as np
import pandas as pd
import pytest
import scipy.stats
from rapo_nb.config import load_config
from rapo_nb.stats import (welch_test, bonferroni, cohens_d, binary_d_bound, bootstrap_ci, bootstrap_coverage,
                           compare_systems, table3, transition_groups, gains_by_transitions, per_seed_table, SYSTEMS,
                           BASELINES, hinge_fit, knee_test, table3_by_handoffs, MAP_AXES, advantage_table,
                           region_condition, run_advantage_map, map_systems)
from rapo_nb.evaluation import breakpoint_fit


@pytest.mark.parametrize("n1,n2,s2", [(30, 30, 1.0), (30, 30, 3.0), (12, 80, 0.5), (200, 50, 2.0)])
def test_welch_matches_scipy(n1, n2, s2):
    rng = np.random.default_rng(n1 * 7 + n2)
    x, y = rng.normal(0.3, 1.0, n1), rng.normal(0.0, s2, n2)
    w = welch_test(x, y)
    ref = scipy.stats.ttest_ind(x, y, equal_var=False)
    assert w["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert w["p"] == pytest.approx(ref.pvalue, rel=1e-8)
    vx, vy = x.var(ddof=1) / n1, y.var(ddof=1) / n2   # Welch–Satterthwaite by hand
    assert w["dof"] == pytest.approx((vx + vy) ** 2 / (vx ** 2 / (n1 - 1) + vy ** 2 / (n2 - 1)), rel=1e-10)


def test_welch_is_used_even_for_equal_sizes():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, 40), rng.normal(0, 4, 40)
    w = welch_test(x, y)
    student = scipy.stats.ttest_ind(x, y, equal_var=True)
    assert w["dof"] < 78 - 5          # Student would give n1 + n2 − 2 = 78
    assert w["p"] != pytest.approx(student.pvalue, rel=1e-6)


def test_welch_one_sided_and_degenerate():
    rng = np.random.default_rng(1)
    x, y = rng.normal(1, 1, 50), rng.normal(0, 1, 50)
    ref = scipy.stats.ttest_ind(x, y, equal_var=False, alternative="greater")
    assert welch_test(x, y, "greater")["p"] == pytest.approx(ref.pvalue, rel=1e-8)
    assert welch_test([2, 2, 2], [2, 2, 2]) == dict(t=0.0, dof=4.0, p=1.0)
    assert welch_test([3, 3, 3], [2, 2, 2])["t"] == math.inf
    with pytest.raises(ValueError, match="y: need at least 2"): welch_test([1, 2], [1])
    with pytest.raises(ValueError, match="alternative"): welch_test([1, 2], [1, 3], "bigger")


def test_bonferroni_from_config():
    ev = load_config("full").evaluation
    bf = bonferroni([0.0124, 0.0126, 1e-5, 0.5], alpha=ev.alpha, n_comparisons=ev.n_comparisons)
    assert bf["alpha_per_test"] == pytest.approx(0.0125)
    assert bf["reject"].tolist() == [True, False, True, False]
    np.testing.assert_allclose(bf["p_adjusted"], [0.0496, 0.0504, 4e-5, 1.0])
    # fewer p-values than comparisons: still divided by the configured number
    assert bonferroni([0.02], alpha=0.05, n_comparisons=4)["reject"].tolist() == [False]
    with pytest.raises(ValueError, match="pvalues"): bonferroni([])
    with pytest.raises(ValueError, match="alpha"): bonferroni([0.1], alpha=1.5)


def test_cohens_d_by_hand():
    x, y = np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0, 4.0])
    sp = math.sqrt((2 * 4.0 + 3 * (5 / 3)) / 5)   # var(x)=4, var(y)=5/3, pooled over n1+n2−2=5
    assert cohens_d(x, y) == pytest.approx((4.0 - 2.5) / sp, rel=1e-12)
    assert cohens_d(y, x) == pytest.approx(-cohens_d(x, y))
    assert cohens_d([1, 1], [1, 1]) == 0.0
    assert binary_d_bound(0.87, 0.70) == pytest.approx(0.17 / math.sqrt((0.87 * 0.13 + 0.7 * 0.3) / 2))
    with pytest.raises(ValueError, match="p1"): binary_d_bound(1.2, 0.5)


def test_bootstrap_matches_scipy_and_is_reproducible():
    rng = np.random.default_rng(2)
    x = rng.lognormal(0, 1, 80)
    ci = bootstrap_ci(x, n_resamples=5000, seed=0)
    ref = scipy.stats.bootstrap((x,), np.mean, n_resamples=5000, method="percentile", random_state=0).confidence_interval
    width = ref.high - ref.low
    assert abs(ci["low"] - ref.low) < 0.1 * width and abs(ci["high"] - ref.high) < 0.1 * width
    assert ci == bootstrap_ci(x, n_resamples=5000, seed=0, max_block=1000)   # chunking does not change the draw
    y = rng.normal(0, 1, 50)
    d = bootstrap_ci(x, y, n_resamples=2000, seed=1)
    assert d["estimate"] == pytest.approx(x.mean() - y.mean())
    assert d["low"] < d["estimate"] < d["high"]


def test_bootstrap_coverage_on_known_distribution():
    cov = bootstrap_coverage(300, 50, 1000, seed=5)          # exponential(1): true mean 1
    assert 0.88 <= cov <= 0.99
    cov80 = bootstrap_coverage(300, 50, 1000, seed=5, confidence=0.8)
    assert 0.70 <= cov80 <= 0.88 and cov80 < cov


def _toy(rates, n=300, seeds=(0, 1)):
    return pd.concat([pd.DataFrame(dict(system=s, seed=sd, conv_id=np.arange(n),
                                        n_handoffs=np.random.default_rng(99 + sd).integers(0, 20, n),
                                        task_success=(np.random.default_rng(10 * sd + k).random(n) < p).astype(float)))
                      for sd in seeds for k, (s, p) in enumerate(zip(SYSTEMS, rates))], ignore_index=True)


def test_table3_against_scipy_and_paper_columns():
    cfg = load_config("quick")
    df = _toy((0.5, 0.6, 0.7, 0.8, 0.9))
    t = table3(df, cfg, n_resamples=500)
    assert t.comparison.tolist() == [f"rapo vs {b}" for b in SYSTEMS[:4]]
    for _, row in t.iterrows():
        base = row.comparison.split()[-1]
        x, y = df.task_success[df.system == "rapo"], df.task_success[df.system == base]
        assert row.p == pytest.approx(scipy.stats.ttest_ind(x, y, equal_var=False).pvalue, rel=1e-8)
        assert row.mean_diff == pytest.approx(x.mean() - y.mean())
        assert row.p_bonferroni == pytest.approx(min(1.0, 4 * row.p))
    assert list(t["paper mean diff"]) == [0.17, 0.11, 0.08, 0.06]
    from rapo_nb.config import PAPER_TABLE3_CI, PAPER_TABLE3_P      # the paper's CIs and p live in the config
    assert list(t["paper 95% CI"]) == [f"[{PAPER_TABLE3_CI[b][0]:.2f}, {PAPER_TABLE3_CI[b][1]:.2f}]" for b in SYSTEMS[:4]]
    assert list(t["paper 95% CI"])[0] == "[0.15, 0.19]" and (t["paper p"] == PAPER_TABLE3_P).all()
    assert bool(t.significant.iloc[0]) and t.mean_diff.iloc[0] > t.mean_diff.iloc[3]
    with pytest.raises(ValueError, match="context_score"): compare_systems(df, "context_score", cfg)


def test_per_seed_table_counts_seeds():
    cfg = load_config("quick")
    df = _toy((0.5, 0.55, 0.6, 0.88, 0.9), seeds=(0, 1, 2))
    per = per_seed_table(df, cfg, n_resamples=200).set_index("comparison")
    assert per.n_seeds.tolist() == [3, 3, 3, 3]
    assert bool(per.loc["rapo vs sequential", "holds_every_seed"])
    assert not bool(per.loc["rapo vs yao_sim", "holds_every_seed"])   # 0.90 vs 0.88 is not significant at n=300


def test_transition_bands_by_hand():
    hm = pd.DataFrame(dict(system=["rapo"] * 6 + ["sequential"] * 6, n_handoffs=[0, 3, 5, 8, 16, 30] * 2,
                           task_success=[1, 1, 1, 1, 0, 0] + [1, 1, 0, 0, 1, 1]))
    g = gains_by_transitions(hm, kind="paper", baselines=("sequential",), n_resamples=100)
    assert [str(v) for v in g.group] == ["0-4", "5-8", ">15"]     # 9-15 empty: not reported
    np.testing.assert_allclose(g.mean_diff, [0.0, 1.0, -1.0])
    q = transition_groups(pd.Series(np.arange(100)))
    assert q.value_counts().tolist() == [25, 25, 25, 25]
    counts = pd.Series([0] * 50 + [1] * 20 + [2] * 20 + list(range(3, 13)))
    g = transition_groups(counts)
    assert g.groupby(counts).nunique().max() == 1          # tied counts never split across groups
    assert g[counts == 0].iloc[0].endswith("(0-0)")
    with pytest.raises(ValueError, match="kind"): transition_groups(counts, "decile")


def _planted(gain_at, n=300, seed=0):
    "Conversations at 0–20 handoffs: baselines succeed with 0.3, RAPO with 0.3 + gain_at(h)."
    rng = np.random.default_rng(seed)
    return pd.concat([pd.DataFrame(dict(system=s, n_handoffs=h, task_success=(rng.random(n) < p).astype(int)))
                      for h in range(21) for s, p in [("rapo", 0.3 + gain_at(h))] + [(b, 0.3) for b in BASELINES]],
                     ignore_index=True)


@pytest.mark.parametrize("knee", [6, 10, 14])
def test_knee_recovers_a_planted_breakpoint_and_its_ci_covers_it(knee):
    k = knee_test(_planted(lambda h: 0.3 - 0.05 * max(0, h - knee), seed=knee), n_resamples=400, seed=1)
    assert k["breakpoint_low"] <= knee <= k["breakpoint_high"]
    assert abs(k["breakpoint"] - knee) <= 1.5
    assert k["two_segments"] and k["slope_change_high"] < 0
    assert k["breakpoint_high"] - k["breakpoint_low"] <= 6


def test_knee_finds_none_on_a_straight_line_and_hinge_matches_breakpoint_fit():
    assert not knee_test(_planted(lambda h: 0.3 - 0.01 * h, seed=3), n_resamples=400, seed=1)["two_segments"]
    x = np.arange(15.0)
    y = 2 - 0.05 * x + 0.2 * np.maximum(x - 4, 0) + np.random.default_rng(0).normal(0, 0.1, x.size)
    h, b = hinge_fit(x, y, candidates=np.unique(x)[1:-1]), breakpoint_fit(x, y)
    assert h["breakpoint"] == b["breakpoint"] and math.isclose(h["sse"], b["sse"], rel_tol=1e-9)
    with pytest.raises(ValueError, match="binary"):
        knee_test(_planted(lambda h: 0.1).assign(task_success=0.5))


def test_table3_conditional_equals_table3_on_the_subset():
    cfg = load_config("quick")
    rng = np.random.default_rng(0)
    df = pd.concat([pd.DataFrame(dict(system=s, n_handoffs=h, task_success=rng.random(200) < p))
                    for s in SYSTEMS for h, p in ((0, 0.8), (3, 0.4 if s == "rapo" else 0.1))], ignore_index=True)
    t = table3_by_handoffs(df, cfg, n_resamples=200)
    sub = table3(df[df.n_handoffs >= 1], cfg, n_resamples=200)
    np.testing.assert_allclose(t["mean_diff (≥1 handoff)"], sub.mean_diff)
    assert (t["mean_diff (≥1 handoff)"] > t.mean_diff).all()


def _map_rows(rates, n=400, cell=(1.0, 1.0, 0.0), seed=0):
    "Per-conversation rows of one map cell: {(router, policy): success rate}, two seeds, one handoff each."
    rng = np.random.default_rng(seed)
    return pd.concat([pd.DataFrame(dict(router=r, context_policy=pol, seed=np.arange(n) % 2, n_handoffs=1,
                                        task_success=(rng.random(n) < p).astype(int)))
                      for (r, pol), p in rates.items()], ignore_index=True).assign(**dict(zip(MAP_AXES, cell)))


def test_map_best_baseline_is_taken_per_context_policy_and_never_the_oracle():
    df = _map_rows({("rapo", "summary"): 0.7, ("similarity", "summary"): 0.55, ("sequential", "summary"): 0.2,
                    ("rapo", "last_turn"): 0.4, ("sequential", "last_turn"): 0.6, ("similarity", "full_history"): 0.95,
                    ("oracle", "summary"): 1.0})
    t = advantage_table(df, n_resamples=300).query("versus == 'best'").set_index("context_policy")
    assert t.loc["summary", "baseline"] == "similarity" and t.loc["last_turn", "baseline"] == "sequential"
    assert "full_history" not in t.index  # no RAPO with that policy: nothing to compare
    assert t.loc["summary", "holds"] and not t.loc["last_turn", "holds"]
    assert math.isclose(t.loc["summary", "diff"], t.loc["summary", "rate_ours"] - t.loc["summary", "rate_base"])


def test_condition_string_is_derived_from_the_grid():
    def grid(ra, sv, rule):
        g = pd.DataFrame(list(itertools.product(ra, sv, (0.0,))), columns=list(MAP_AXES))
        return g.assign(holds=rule(g))
    rule = lambda g: (g.reception_alignment >= 0.5) & (g.skill_visible_share >= 0.5)
    a = region_condition(grid((0, 0.5, 1), (0, 0.5, 1), rule))["condition"]
    b = region_condition(grid((0, 0.75, 1), (0, 0.5, 1), rule))["condition"]
    assert "reception_alignment ≥ 0.5 and skill_visible_share ≥ 0.5 (exactly" in a
    assert "reception_alignment ≥ 0.75 and skill_visible_share ≥ 0.5 (exactly" in b and a != b
    c = region_condition(grid((0, 0.5, 1), (0, 0.5, 1), lambda g: g.skill_visible_share <= 0))["condition"]
    assert "holds when skill_visible_share ≤ 0 (exactly" in c
    assert "no cell" in region_condition(grid((0, 1), (0, 1), lambda g: g.reception_alignment > 5))["condition"]


def test_advantage_map_runs_the_same_in_parallel_as_in_one_process():
    cfg = load_config("quick", overrides={"sweep.n_conversations": 5, "sweep.reception_alignment": (0.0,),
                                          "sweep.skill_visible_share": (1.0,), "sweep.speed_skill_tradeoff": (0.0,),
                                          "sweep.seeds": (0, 1)})
    one = run_advantage_map(cfg, n_workers=1, progress=False)
    two = run_advantage_map(cfg, n_workers=2, progress=False)
    pd.testing.assert_frame_equal(one, two)
    assert set(one.context_policy) == {cfg.sweep.context_policy}
    assert sorted(one.router.unique()) == sorted(s.router for s in map_systems(cfg.sweep.context_policy))
    assert one.groupby(["seed", "router"]).size().eq(5).all() and (one.reception_alignment == 0.0).all()
