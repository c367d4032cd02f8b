"""The null world (issue 19): where the simulated world gives a mechanism no lever, the machinery must find no effect of
it; where it does (today's world), the same machinery must find the effect (so the null test can fail).

Task success is compared per conversation on the same conversations and seeds (paired), with a 95% percentile
bootstrap CI of the mean difference over conversations (scipy.stats.bootstrap). Small size: 200 conversations.
"""

import numpy as np
import pytest
import scipy.stats as st
from rapo_nb.config import load_config
from rapo_nb.synthetic import generate_conversations
from rapo_nb.runtime import Orchestrator, run_conversations
from rapo_nb.systems import NULL_WORLD, factor_spec

N_CONV, SEED = 200, 0
TODAY = load_config("quick")
# consensus has no lever: reception does not depend on P (the two-field null world of the API contract)
NO_ALIGNMENT = load_config("quick", simulation__reception_alignment=0.0, simulation__skill_visible_share=0.0)
# no mechanism has a lever: also an agent switch loses nothing at reception (else routing that switches agents less
# keeps more facts, a lever routing keeps even when skill is invisible; see test_switch_cost_is_a_routing_lever)
NULL = load_config("quick", **NULL_WORLD)
CONVS = generate_conversations(N_CONV, SEED, TODAY)
_RUNS: dict = {}


def run(cfg_name: str, system="rapo", **kw):
    "Conversation table of one run (cached: several tests compare the same runs)."
    key = (cfg_name, system if isinstance(system, str) else system.name, tuple(sorted(kw.get("ablation", {}))))
    if key not in _RUNS:
        cfg = {"today": TODAY, "no_alignment": NO_ALIGNMENT, "null": NULL}[cfg_name]
        _RUNS[key] = run_conversations(CONVS, system, cfg, seed=SEED, **kw)[1]
    return _RUNS[key]


def diff_ci(a, b) -> tuple[float, float, float]:
    "Mean paired difference of task success a − b over conversations and its 95% bootstrap CI."
    assert list(a.conv_id) == list(b.conv_id)
    d = a.rule_success.to_numpy(float) - b.rule_success.to_numpy(float)
    if np.all(d == d[0]):  # no variation: the CI is the point
        return float(d[0]), float(d[0]), float(d[0])
    r = st.bootstrap((d,), np.mean, n_resamples=2000, method="percentile", random_state=0)
    return float(d.mean()), float(r.confidence_interval.low), float(r.confidence_interval.high)


def includes_zero(ci) -> bool:
    return ci[1] <= 0.0 <= ci[2]


def test_reception_ignores_prompts_at_alignment_0():
    "Fact survival at a handoff between aligned (cos 1) and opposed (cos −1) prompts: equal at alignment 0 only."
    facts = [f"<fact{i:04d}>" for i in range(2000)]
    context = " ".join(facts)
    rates = {}
    for name, cfg in (("today", TODAY), ("null", NO_ALIGNMENT)):
        o = Orchestrator(cfg, "rapo", seed=0, n_agents=3)
        o._Pn = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # the unit prompt rows `_receive` reads
        for dst in (1, 2):
            kept = o._receive(context, facts, 0, dst, np.random.default_rng(dst))
            rates[name, dst] = np.mean([f in kept for f in facts])
    floor = TODAY.simulation.reception_floor
    assert rates["today", 1] == pytest.approx(1.0) and rates["today", 2] == pytest.approx(floor, abs=0.04)
    assert rates["null", 1] == pytest.approx(floor, abs=0.04) and rates["null", 2] == pytest.approx(floor, abs=0.04)


def test_today_world_finds_the_effects():
    "Where the world gives consensus and routing a lever, removing them loses task success (CI excludes 0)."
    rapo = run("today")
    for ablation in ("no_consensus", "random_routing"):
        d, lo, hi = diff_ci(rapo, run("today", ablation={ablation: True}))
        assert lo > 0, f"{ablation}: today's world gives it a lever, yet no loss found ({d:.3f} [{lo:.3f}, {hi:.3f}])"


def test_null_world_consensus_has_no_effect():
    "Reception independent of P: the no_consensus ablation, and consensus off in a factor spec, lose nothing."
    ci = diff_ci(run("no_alignment"), run("no_alignment", ablation={"no_consensus": True}))
    assert includes_zero(ci), f"no_consensus in the null world: {ci}"
    on = run("no_alignment", factor_spec("rapo", "full_history", True, True))
    off = run("no_alignment", factor_spec("rapo", "full_history", False, True))
    assert includes_zero(diff_ci(on, off)), f"consensus on vs off in the null world: {diff_ci(on, off)}"
    assert on.attrs["run"]["consensus_rounds"] > 0 == off.attrs["run"]["consensus_rounds"]  # it did run


def test_null_world_routing_has_no_effect():
    "Skill invisible and agent switches free: random routing loses nothing against RAPO's routing."
    ci = diff_ci(run("null"), run("null", ablation={"random_routing": True}))
    assert includes_zero(ci), f"random_routing in the null world: {ci}"
    ci = diff_ci(run("null"), run("null", ablation={"no_consensus": True}))
    assert includes_zero(ci), f"no_consensus in the null world: {ci}"


def test_switch_cost_is_a_routing_lever():
    """Why the routing null needs free switches: with skill invisible but switches losing facts at the floor rate,
    RAPO's routing still switches agents less often than random routing (its capability score concentrates a
    conversation on fewer agents), which keeps more facts."""
    rapo, rnd = run("no_alignment"), run("no_alignment", ablation={"random_routing": True})
    d = rnd.n_handoffs.to_numpy(float) - rapo.n_handoffs.to_numpy(float)
    r = st.bootstrap((d,), np.mean, n_resamples=2000, method="percentile", random_state=0)
    assert r.confidence_interval.low > 0.5, (
        f"random routing switches agents more: {d.mean():.2f} {r.confidence_interval}"
    )
