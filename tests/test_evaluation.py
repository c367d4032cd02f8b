"""rapo_nb.evaluation: each metric on hand-made DataFrames, ROUGE-L against rouge-score itself."""
import numpy as np
import pandas as pd
import pytest
from rouge_score import rouge_scorer
from rapo_nb.config import load_config
from rapo_nb.state import HashedTextEncoder
from rapo_nb.evaluation import (TURN_COLUMNS, CONV_COLUMNS, check_frames, lcs_length, rouge_l_pair, rouge_l_f,
                                handoff_metrics, conversation_metrics, toy_frames, summarise, sliding_windows, table1,
                                error_shares, context_by_turn, breakpoint_fit, SYSTEMS, equalised_specs,
                                resolve_systems, contrast_weights, factorial_effects, factorial_anova, cell_rates,
                                factorial_specs, FACTOR_COLUMNS, EQUALISED_POLICIES, evaluate_benchmark)
from rapo_nb.systems import SYSTEM_SPECS, FACTORS

CFG = load_config("quick")


def _lcs_dp(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            t[i + 1][j + 1] = t[i][j] + 1 if x == y else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def test_lcs_matches_dynamic_programming():
    rng = np.random.default_rng(0)
    for _ in range(300):
        a = list(rng.integers(0, 6, rng.integers(0, 120)).astype(str))
        b = list(rng.integers(0, 6, rng.integers(0, 120)).astype(str))
        assert lcs_length(a, b) == _lcs_dp(a, b)


def test_rouge_l_equals_rouge_score():
    sc = rouge_scorer.RougeScorer(["rougeL"])
    rng = np.random.default_rng(1)
    words = ["Alpha", "beta", "gamma-2", "delta,", "the", "of", "relates", "to", "X9", "!"]
    pairs = [(" ".join(rng.choice(words, rng.integers(0, 70))), " ".join(rng.choice(words, rng.integers(0, 70)))) for _ in range(200)]
    pairs += [("", ""), ("only punctuation !!", "?? ,,"), ("Same Text", "same text")]
    a, b = zip(*pairs)
    ref = [sc.score(x, y)["rougeL"].fmeasure for x, y in pairs]
    np.testing.assert_allclose(rouge_l_f(a, b), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rouge_l_f(a, b, method="rouge_score"), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(rouge_l_f(a, b, n_jobs=2, min_pairs_per_job=50), ref, rtol=0, atol=1e-12)   # process pool
    assert rouge_l_pair("Same Text", "same text") == 1.0


def test_rouge_l_by_hand():
    # tokens a b c d / a c d: LCS 3, P = 3/3, R = 3/4 → F = 6/7
    assert rouge_l_pair("a b c d", "a c d") == pytest.approx(6 / 7)
    assert rouge_l_pair("a b", "c d") == 0.0
    with pytest.raises(ValueError, match="method"): rouge_l_f(["a"], ["a"], method="bleu")


def test_handoff_metrics_hand_made():
    turns, convs = toy_frames()
    h = handoff_metrics(turns, CFG)
    assert len(h) == 2 and h.turn.tolist() == [2, 2]
    enc = HashedTextEncoder.from_config(CFG)
    for i, row in h.iterrows():
        src = turns[(turns.conv_id == row.conv_id) & (turns.turn == 2)].iloc[0]
        v = enc.encode([src.prev_response, src.response])
        assert row.cosine == pytest.approx(float(v[0] @ v[1]), abs=1e-5)
        assert row.context_score == pytest.approx(rouge_l_pair(src.prev_response, src.response))
    assert h.handoff_ok.tolist() == [True, False] and h.context_break.tolist() == [False, True]


def test_handoff_needs_both_cosine_and_no_clarification():
    turns, convs = toy_frames()
    t2 = turns.copy()
    t2.loc[(t2.conv_id == 0) & (t2.turn == 2), "clarification"] = True     # same text, but asked to clarify
    h = handoff_metrics(t2, CFG)
    assert h.handoff_ok.tolist() == [False, False]
    assert h.context_break.tolist() == [False, True]                          # clarification alone is no break
    # thresholds come from config: a stricter threshold fails the good handoff too
    strict = load_config("quick", evaluation__handoff_cosine=0.9999)
    assert not handoff_metrics(turns, strict).handoff_ok.any()


def test_task_success_is_rule_and_no_break():
    turns, convs = toy_frames()
    c2 = convs.copy(); c2.loc[0, "rule_success"] = False; c2.loc[0, "failure_type"] = "agent_selection"
    m = conversation_metrics(turns, c2, CFG)
    assert m.task_success.tolist() == [False, False]
    assert m.error_type.tolist() == ["agent_selection", "context_loss"]
    # a conversation with no handoff has no context score and cannot break context
    t3 = turns.copy(); t3["handoff"] = False
    m3 = conversation_metrics(t3, convs, CFG)
    assert m3.context_score.isna().all() and not m3.context_break.any() and m3.task_success.all()


def test_history_reference_changes_cosine():
    turns, convs = toy_frames()
    a = handoff_metrics(turns, CFG, reference="prev_response")
    b = handoff_metrics(turns, CFG, reference="history")
    assert not np.allclose(a.cosine, b.cosine)
    np.testing.assert_allclose(a.context_score, b.context_score)   # ROUGE-L always uses the §5.2 pair
    with pytest.raises(ValueError, match="reference"): handoff_metrics(turns, CFG, reference="last")


def test_missing_columns_named():
    turns, convs = toy_frames()
    with pytest.raises(ValueError, match="clarification"): check_frames(turns.drop(columns="clarification"), convs)
    with pytest.raises(ValueError, match="rule_success"): check_frames(turns, convs.drop(columns="rule_success"))
    with pytest.raises(ValueError, match="turns"): check_frames([], convs)


def _fake_conv(system, n, success, rt, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(dict(system=system, seed=seed, conv_id=np.arange(n), n_handoffs=rng.integers(0, 12, n),
                             response_time_ms=rt + rng.normal(0, 1, n), context_score=0.5,
                             task_success=rng.random(n) < success, handoffs_scored=2, handoffs_ok=1,
                             overhead_ms=1.0, service_ms=9.0))


def test_summary_p95_pooled_handoffs_and_windows():
    df = pd.DataFrame(dict(system="x", seed=0, conv_id=range(100), response_time_ms=np.arange(1, 101, dtype=float),
                           n_handoffs=[0] * 50 + [2] * 50,
                           context_score=[np.nan] * 50 + [0.4] * 50, task_success=[True] * 30 + [False] * 70,
                           handoffs_scored=[0] * 50 + [4] * 50, handoffs_ok=[0] * 50 + [1] * 50,
                           overhead_ms=1.0, service_ms=3.0))
    s = summarise(df).iloc[0]
    assert s.response_time_ms == pytest.approx(50.5)
    assert s.response_time_p95_ms == pytest.approx(np.percentile(np.arange(1, 101), 95))
    assert s.context_score == pytest.approx(0.4)            # conversations without handoff excluded
    assert s.handoff_success == pytest.approx(0.25)          # pooled over handoffs
    assert s.task_success == pytest.approx(0.3) and s.overhead_share == pytest.approx(0.25)
    assert s.task_success_no_handoff == pytest.approx(0.6)   # the 30 successes are all among the 50 without a handoff
    assert s.task_success_handoff == 0.0 and s.share_with_handoff == pytest.approx(0.5)
    w = sliding_windows(df, 10)
    assert len(w) == 91 and w.task_success.iloc[0] == 1.0 and w.task_success.iloc[-1] == 0.0
    assert w.task_success.iloc[25] == pytest.approx(0.5)     # conversations 25..34: 5 successes
    with pytest.raises(ValueError, match="window"): sliding_windows(df, 0)


def test_table1_mean_sd_over_seeds_and_paper_columns():
    df = pd.concat([_fake_conv(s, 150, 0.5 + 0.1 * k, 200 - 10 * k, seed=sd)
                    for sd in (0, 1) for k, s in enumerate(SYSTEMS)], ignore_index=True)
    t = table1(df, CFG).set_index("system")
    per = df.groupby(["system", "seed"]).task_success.mean()
    assert t.loc["rapo", "task_success"] == pytest.approx(per["rapo"].mean())
    assert t.loc["rapo", "task_success sd"] == pytest.approx(per["rapo"].std(ddof=1))
    assert t.loc["rapo", "paper task_success"] == 0.87 and t.loc["sequential", "paper response_time_ms"] == 245
    assert (t.seeds == 2).all()
    with pytest.raises(ValueError, match="system 'rapo'"): table1(df[df.system != "rapo"], CFG)


def test_error_shares_and_context_by_turn():
    df = pd.DataFrame(dict(system="s", conv_id=range(5), task_success=[True, False, False, False, False],
                           error_type=[None, "context_loss", "context_loss", "resource", "unattributed"]))
    e = error_shares(df).set_index("error_type")
    assert e.loc["context_loss", "share"] == pytest.approx(0.5) and e.loc["ambiguous_query", "count"] == 0
    assert e.loc["unattributed", "count"] == 1
    turns, _ = toy_frames()
    c = context_by_turn(turns, max_turn=1)
    assert c.k.tolist() == [1, 1]
    assert c.rouge_l.iloc[0] == pytest.approx(rouge_l_pair(turns.response[0], turns.response[1]))


def test_breakpoint_fit_recovers_knee():
    x = np.repeat(np.arange(0, 16), 3).astype(float)
    y = np.where(x <= 10, 0.8, 0.8 - 0.05 * (x - 10)) + np.random.default_rng(0).normal(0, 0.005, x.size)
    bp = breakpoint_fit(x, y)
    assert bp["breakpoint"] == 10 and bp["slope_before"] == pytest.approx(0, abs=0.005)
    assert bp["slope_after"] == pytest.approx(-0.05, abs=0.01) and bp["sse"] < bp["sse_one_line"]


def test_evaluate_benchmark_end_to_end():
    """Tiny real run through rapo_nb.runtime: contract columns, metric identities, determinism."""
    from rapo_nb.evaluation import evaluate_benchmark
    cfg = load_config("quick")
    one, turns = evaluate_benchmark(cfg, systems=("sequential", "rapo"), seeds=(0,), n_conversations=6, return_turns=True)
    assert len(one) == 12 and set(one.system) == {"sequential", "rapo"}
    check_frames(turns, one)
    assert (one.task_success == (one.rule_success & ~one.context_break)).all()
    assert np.allclose(one.response_time_ms, one.service_ms + one.overhead_ms)
    assert (one.handoffs_scored == one.n_handoffs).all()
    assert len(one.attrs["runs"]) == 2
    two = evaluate_benchmark(cfg, systems=("sequential", "rapo"), seeds=(0,), n_conversations=6)
    cols = ["system", "conv_id", "n_handoffs", "rule_success", "task_success", "context_score", "handoff_success"]
    pd.testing.assert_frame_equal(one[cols].reset_index(drop=True), two[cols].reset_index(drop=True))
    with pytest.raises(ValueError, match="systems"): evaluate_benchmark(cfg, systems=("gpt",), seeds=(0,), n_conversations=2)


# ---- issue 19: conditional success, one context policy for every system, the factorial's statistics ----

def test_success_conditional_on_a_handoff_in_table1():
    rows = []
    for sd in (0, 1):   # 40 conversations without a handoff (75 % succeed), 60 with one (10 % succeed)
        rows += [dict(n_handoffs=0, task_success=i < 30, seed=sd, conv_id=i) for i in range(40)]
        rows += [dict(n_handoffs=3, task_success=i < 6, seed=sd, conv_id=40 + i) for i in range(60)]
    df = pd.DataFrame(rows).assign(system="rapo", response_time_ms=1.0, context_score=0.5, handoffs_scored=1,
                                   handoffs_ok=1, overhead_ms=1.0, service_ms=1.0)
    t = table1(df, CFG, systems=("rapo",)).iloc[0]
    assert t.task_success == pytest.approx(0.36)
    assert t.task_success_handoff == pytest.approx(0.1) and t.task_success_no_handoff == pytest.approx(0.75)
    assert t.share_with_handoff == pytest.approx(0.6)
    with pytest.raises(ValueError, match="n_handoffs"): summarise(df.drop(columns="n_handoffs"))


@pytest.mark.parametrize("policy", EQUALISED_POLICIES)
def test_equalised_table1_gives_every_system_the_same_context_policy(policy):
    specs = equalised_specs(policy)
    assert [s.context_policy for s in specs] == [policy] * len(SYSTEMS)
    for s, name in zip(specs, SYSTEMS):   # nothing but the policy changes
        own = SYSTEM_SPECS[name]
        assert (s.router, s.consensus, s.hand_over_state, s.prompt_style) == (
            own.router, own.consensus, own.hand_over_state, own.prompt_style)
        assert (s.name == name) == (own.context_policy == policy)   # a system already on `policy` is itself
    assert len({s.name for s in specs}) == len(specs)


def test_resolve_systems_refuses_unknown_and_clashing():
    with pytest.raises(ValueError, match="systems: unknown .gpt."): resolve_systems(["gpt"])
    with pytest.raises(ValueError, match="two different"):     # a paper name on another spec
        resolve_systems([SYSTEM_SPECS["rapo"].__class__("rapo", "random", "last_turn", False, "plain")])
    clash = SYSTEM_SPECS["rapo"].__class__("rapo", "random", "last_turn", False, "plain")
    with pytest.raises(ValueError, match="two different"): resolve_systems(["rapo", clash])
    assert list(resolve_systems(["rapo", SYSTEM_SPECS["rapo"]])) == ["rapo"]


def test_factorial_specs_full_design_and_half_fraction():
    specs = factorial_specs()
    assert len(specs) == len(FACTORS["router"]) * len(FACTORS["context_policy"]) * 4
    combos = {(s.router, s.context_policy, s.consensus, s.hand_over_state) for s in specs}
    assert len(combos) == len(specs) and len({s.name for s in specs}) == len(specs)
    half = pd.DataFrame([(s.router, s.context_policy, s.consensus, s.hand_over_state) for s in factorial_specs(fraction=2)],
                        columns=["router", "context_policy", "consensus", "hand_over_state"])
    assert len(half) == len(specs) // 2 and set(map(tuple, half.to_numpy())) <= combos
    import itertools
    for a, b in itertools.combinations(half.columns, 2):     # every two factors fully crossed and balanced
        n = half.groupby([a, b]).size()
        assert len(n) == half[a].nunique() * half[b].nunique() and n.nunique() == 1
    with pytest.raises(ValueError, match="fraction"): factorial_specs(fraction=3)


def test_half_fraction_recovers_main_effects_and_two_way_interactions():
    pol = ("last_turn", "summary", "full_history", "last_k")
    d = _design(policies=pol)
    keep = {(s.router, s.context_policy, s.consensus, s.hand_over_state)
            for s in factorial_specs(routers=("random", "rapo", "least_loaded", "similarity"), policies=pol, fraction=2)}
    half = d[[tuple(r) in keep for r in d[["router", "context_policy", "consensus", "hand_over_state"]].to_numpy()]]
    assert 0 < len(half) < len(d)
    e = factorial_effects(half, "task_success").set_index(["term", "contrast"])
    inter = e.loc[("context_policy × consensus", "(full_history vs last_turn) × (True vs False)")]
    assert inter.ci_low < 0.06 < inter.ci_high and inter.ci_low > 0
    assert e.loc[("hand_over_state", "True vs False")].ci_low < 0 < e.loc[("hand_over_state", "True vs False")].ci_high
    a = factorial_anova(half, "task_success", order=2).set_index("term")
    assert a.loc["consensus", "p"] < 1e-6 and "router × context_policy × consensus" not in a.index


def _design(seed=0, planted=0.1, noise=0.02, seeds=5, policies=("last_turn", "summary", "full_history")):
    rng = np.random.default_rng(seed)
    lv = dict(router=["random", "rapo", "least_loaded", "similarity"], context_policy=list(policies),
              consensus=[False, True], hand_over_state=[False, True])
    import itertools
    d = pd.DataFrame([dict(zip(lv, c), seed=s) for c in itertools.product(*lv.values()) for s in range(seeds)])
    d["task_success"] = (0.3 + planted * d.consensus + 0.06 * ((d.context_policy == "full_history") & d.consensus)
                         + rng.normal(0, noise, len(d)))
    return d


def test_contrast_weights_are_marginal_mean_differences():
    d = _design().drop_duplicates(["router", "context_policy", "consensus", "hand_over_state"]).reset_index(drop=True)
    w = contrast_weights(d, {"consensus": (True, False)})
    assert w.sum() == pytest.approx(0) and w[w > 0].sum() == pytest.approx(1) and (w != 0).all()
    # equals the plain difference of the two marginal means on the cell values
    assert w @ d.task_success == pytest.approx(d[d.consensus].task_success.mean() - d[~d.consensus].task_success.mean())
    wi = contrast_weights(d, {"consensus": (True, False), "context_policy": ("full_history", "last_turn")})
    assert wi.sum() == pytest.approx(0) and (wi[d.context_policy == "summary"] == 0).all()
    with pytest.raises(ValueError, match="no cell"): contrast_weights(d, {"router": ("oracle", "random")})


def test_factorial_effects_recover_a_planted_effect():
    e = factorial_effects(_design(), "task_success").set_index(["term", "contrast"])
    cons = e.loc[("consensus", "True vs False")]
    assert cons.ci_low < 0.1 + 0.06 / 3 < cons.ci_high and cons.ci_low > 0.05     # planted main effect (marginal)
    inter = e.loc[("context_policy × consensus", "(full_history vs last_turn) × (True vs False)")]
    assert inter.ci_low < 0.06 < inter.ci_high and inter.ci_low > 0               # planted interaction
    for term, contrast in [("hand_over_state", "True vs False"), ("router", "rapo vs random")]:
        assert e.loc[(term, contrast)].ci_low < 0 < e.loc[(term, contrast)].ci_high
    # the ANOVA's F of a two-level factor is the contrast's t squared (balanced full design), and pingouin's
    # ANOVA gives the same F as ours (statsmodels): three routes agree
    import pingouin as pg
    from scipy import stats
    a = factorial_anova(_design(), "task_success").set_index("term")
    t = cons.estimate / ((cons.ci_high - cons.ci_low) / 2 / stats.t.ppf(0.975, cons.resid_df))
    assert a.loc["consensus", "F"] == pytest.approx(t ** 2, rel=1e-6)
    d = _design().assign(consensus=lambda x: x.consensus.astype(str), hand_over_state=lambda x: x.hand_over_state.astype(str))
    p = pg.anova(data=d, dv="task_success", between=["router", "context_policy", "consensus", "hand_over_state"],
                 ss_type=2).set_index("Source")
    assert a.loc["consensus", "F"] == pytest.approx(p.loc["consensus", "F"], rel=1e-6)
    assert a.loc["context_policy × consensus", "F"] == pytest.approx(p.loc["context_policy * consensus", "F"], rel=1e-6)


def test_factorial_effects_find_nothing_in_shuffled_outcomes():
    found = 0
    for k in range(20):
        d = _design(seed=k)
        d["task_success"] = np.random.default_rng(100 + k).permutation(d.task_success.to_numpy())
        e = factorial_effects(d, "task_success")
        m = e[(e.kind == "main") & (e.term == "consensus")].iloc[0]
        found += bool(m.ci_low > 0 or m.ci_high < 0)
    assert found <= 3       # 95 % CIs: about 1 of 20 shuffles by chance; a real effect would show in all 20


def test_factorial_on_real_runs_keeps_factors_and_finds_no_hand_over_effect():
    """A small real factorial: factor columns survive, and state hand-over, which acts only when an agent crashed
    (none are injected here), has exactly no effect: the world gives it no lever."""
    specs = factorial_specs(routers=("random", "rapo"), policies=("last_turn", "full_history"))
    conv = evaluate_benchmark(CFG, systems=specs, seeds=(0, 1), n_conversations=6, n_workers=2)
    assert set(FACTOR_COLUMNS) <= set(conv.columns) and len(conv) == len(specs) * 2 * 6
    for s in specs:
        row = conv[conv.system == s.name].iloc[0]
        assert (row.router, row.context_policy, row.consensus, row.hand_over_state) == (
            s.router, s.context_policy, s.consensus, s.hand_over_state)
    rates = cell_rates(conv)
    e = factorial_effects(rates, "task_success").set_index(["term", "contrast"])
    assert e.loc[("hand_over_state", "True vs False"), "estimate"] == pytest.approx(0, abs=1e-12)
    # the worker-scored path equals scoring all turns at once
    one, _ = evaluate_benchmark(CFG, systems=specs[:2], seeds=(0,), n_conversations=6, return_turns=True)
    two = evaluate_benchmark(CFG, systems=specs[:2], seeds=(0,), n_conversations=6)
    cols = ["system", "conv_id", "task_success", "context_score", "handoff_success", *FACTOR_COLUMNS]
    pd.testing.assert_frame_equal(one[cols], two[cols])
