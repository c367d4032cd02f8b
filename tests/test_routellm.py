"Issue #20: the shipped RouteLLM outcome table, RouteLLM's metrics on hand-made curves, and no look-ahead in routing."

import numpy as np
import pytest

from rapo_nb.config import load_config
from rapo_nb.routellm import (
    apgr,
    cpt,
    curve_metrics,
    load_outcomes,
    outcome01,
    plain_accuracy,
    price_config,
    price_load,
    request_state,
    route_stream,
    threshold_curve,
    warm_pools,
)
from rapo_nb.routing import RapoRouter


@pytest.fixture(scope="module")
def everything():
    return load_outcomes(keep_contaminated=True)


def test_loader_matches_plain_accuracies(everything):
    acc = plain_accuracy(everything)
    assert acc.loc["mmlu", "weak"] == pytest.approx(0.681, abs=5e-4)
    assert acc.loc["mmlu", "strong"] == pytest.approx(0.806, abs=5e-4)
    assert acc.loc["gsm8k", "weak"] == pytest.approx(0.638, abs=5e-4)
    assert acc.loc["gsm8k", "strong"] == pytest.approx(0.857, abs=5e-4)
    assert acc.prompts.tolist() == [14042, 1319, 80]


def test_loader_drops_contaminated(everything):
    clean = load_outcomes()
    assert len(everything) - len(clean) == 5 + 12 + 8
    assert clean.contaminated.sum() == 0


def test_loader_names_missing_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("benchmark,prompt_id\nmmlu,x\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_outcomes(bad)


def test_every_prompt_has_a_task_type(everything):
    cfg = load_config("quick")
    task, modality = request_state(everything, cfg)
    assert task.min() >= 0 and task.max() < cfg.state.n_tasks
    assert set(modality.tolist()) == {0, 1, 2}


def test_random_line_scores_half():
    c = np.linspace(0, 1, 21)
    m = curve_metrics(c, 0.6 + 0.2 * c, 0.6, 0.8)
    assert m["apgr"] == pytest.approx(0.5)
    assert m["cpt50"] == pytest.approx(0.5)
    assert m["cpt80"] == pytest.approx(0.8)


def test_perfect_ramp():
    c = np.linspace(0, 1, 21)
    q = np.minimum(0.6 + 0.8 * c, 0.8)  # reaches the strong model's quality at 25 % strong calls
    assert cpt(c, q, 0.6, 0.8, 0.5) == pytest.approx(0.125)
    assert cpt(c, q, 0.6, 0.8, 0.8) == pytest.approx(0.2)
    assert apgr(c, q, 0.6, 0.8) == pytest.approx(0.875)


def test_worse_than_random_and_unreached_target():
    assert apgr([0, 0.5, 1], [0.6, 0.62, 0.8], 0.6, 0.8) == pytest.approx(0.3)
    assert np.isnan(cpt([0, 1], [0.6, 0.7], 0.6, 0.8, 0.8))


def test_threshold_curve_oracle_on_hand_made_outcomes():
    w, s = np.array([1, 0, 0, 1, 0.0]), np.array([1, 1, 0, 0, 1.0])
    orc = threshold_curve(s - w, w, s, [0, 0.2, 0.4, 1.0], at_most=True)
    assert orc.quality.tolist() == pytest.approx([0.4, 0.6, 0.8, 0.8])


def _stream(n=600, warm=400):
    cfg = load_config("quick")
    sub = load_outcomes()
    sub = sub[sub.benchmark == "mmlu"].iloc[: n + warm]
    t, m = request_state(sub, cfg)
    w, s = outcome01(sub.weak, sub.benchmark, cfg), outcome01(sub.strong, sub.benchmark, cfg)
    return cfg, t, m, w, s


@pytest.mark.parametrize("k", [64, 200, 333])
def test_no_router_reads_future_outcomes(k):
    cfg, t, m, w, s = _stream()
    n, tick = 600, 32
    pc = price_config(cfg)
    perm = np.concatenate([np.arange(k), k + np.random.default_rng(k).permutation(n - k)])

    def run(wn, sn):
        pools = warm_pools(cfg, t[n:], m[n:], w[n:], s[n:])
        return route_stream(pools, RapoRouter(pc), t[:n], m[:n], wn, sn, tick, price_load(pools, 0.1))

    base, shuffled = run(w[:n], s[:n]), run(w[:n][perm], s[:n][perm])
    upto = (k // tick + 1) * tick
    np.testing.assert_array_equal(base[:upto], shuffled[:upto])


def test_future_outcomes_do_change_later_decisions():
    "The look-ahead test above could not pass vacuously: outcomes do steer later decisions."
    cfg, t, m, w, s = _stream()
    n = 600
    pc = price_config(cfg)
    pools = warm_pools(cfg, t[n:], m[n:], w[n:], s[n:])
    base = route_stream(pools, RapoRouter(pc), t[:n], m[:n], w[:n], s[:n], 32, price_load(pools, 0.1))
    pools = warm_pools(cfg, t[n:], m[n:], w[n:], s[n:])
    flipped = route_stream(pools, RapoRouter(pc), t[:n], m[:n], 1 - w[:n], 1 - s[:n], 32, price_load(pools, 0.1))
    assert (base != flipped).any()


def test_capacity_run_reads_outcomes_only_after_completion():
    "In the capacity run an outcome reaches the bank when its request completes: permuting later outcomes changes no earlier decision."
    from rapo_nb.routellm import capacity_run

    cfg, t, m, w, s = _stream()
    n, k = 600, 240
    arrivals, hold = cfg.routellm.arrivals_per_tick, cfg.routellm.hold_ticks
    perm = np.concatenate([np.arange(k), k + np.random.default_rng(7).permutation(n - k)])

    def run(wn, sn):
        pools = warm_pools(cfg, t[n:], m[n:], w[n:], s[n:])
        return capacity_run(pools, RapoRouter(cfg), cfg, t[:n], m[:n], wn, sn)

    base, shuffled = run(w[:n], s[:n]), run(w[:n][perm], s[:n][perm])
    start = np.arange(n) // arrivals + base.wait_ticks.to_numpy()
    # requests from k on arrive at tick k // arrivals; their outcomes can steer nothing decided before they complete
    early = start < k // arrivals + hold
    assert early.sum() > k // 2
    np.testing.assert_array_equal(base.agent.to_numpy()[early], shuffled.agent.to_numpy()[early])
    assert (base.agent.to_numpy() != shuffled.agent.to_numpy()).any()
