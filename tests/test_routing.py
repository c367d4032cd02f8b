"""rapo_nb.routing: eq. 6, the six policies behind one Router protocol, the bounded-wait queue, failure replacement,
two-level scheduling, and every documented error."""
import copy
from dataclasses import replace
from pathlib import Path
import importlib.util

import pytest
import torch

from rapo_nb.config import load_config
from rapo_nb.routing import (NO_AGENT, ROUTERS, AgentLoad, BoundedWaitQueue, LeastLoadedRouter, NoAgentAvailable, RandomRouter,
                             RapoRouter, RoundRobinRouter, Router, SequentialRouter, SimilarityRouter, TwoLevelScheduler,
                             best_agent_probability, capability_matrix, fail_over, hidden_skill, load_coefficients, load_factor,
                             make_router, pools_by_strength, replacement_for, route_with_wait, simulate_routing, simulated_load)
from rapo_nb.state import StateBank

CFG = load_config("quick", device="cpu")
M_, L_ = CFG.state.n_tasks, CFG.state.n_modalities


_TEMPLATES: dict = {}


def make_bank(n: int, seed: int = 0, random_caps: bool = True) -> StateBank:
    "A real StateBank of n agents on CPU (a copy of a cached one: create runs a PCA), with random capabilities unless asked otherwise."
    if n not in _TEMPLATES: _TEMPLATES[n] = StateBank.create(n, CFG, device="cpu", seed=0)
    bank = copy.deepcopy(_TEMPLATES[n])
    if random_caps:
        g = torch.Generator().manual_seed(seed)
        bank.M = torch.rand(bank.M.shape, generator=g)
        bank.capability_score = torch.rand(n, generator=g)
    return bank


def loads(active, alive=None) -> AgentLoad:
    "An AgentLoad with the given active counts, no pending requests, no utilisation."
    a = torch.as_tensor(active, dtype=torch.float32)
    al = torch.ones(a.numel(), dtype=torch.bool) if alive is None else torch.as_tensor(alive)
    return AgentLoad(a, torch.zeros_like(a), torch.zeros_like(a), al)


def one_by_one(router, task, modality, bank, load):
    "Reference: decide requests in arrival order, each adding one active conversation to its agent."
    out, cur = [], load
    for t, m in zip(task.tolist(), modality.tolist()):
        a = int(router.select(torch.tensor([t]), torch.tensor([m]), bank, cur, allow_unassigned=True))
        out.append(a); cur = cur.assign(torch.tensor([a]))
    return torch.tensor(out)


# ---------------------------------------------------------------- eq. 6
def test_load_factor_matches_equation_6():
    rc = CFG.routing
    act, pend, util = torch.tensor([0., 3., 10.]), torch.tensor([0., 7., 50.]), torch.tensor([0., 0.2, 0.8])
    want = rc.load_weights[0] * act / rc.c_max + rc.load_weights[1] * pend / rc.q_max + rc.load_weights[2] * util / rc.r_max
    torch.testing.assert_close(load_factor(act, pend, util, CFG), want)
    torch.testing.assert_close(load_factor(act, pend, util, rc), want)   # RoutingConfig accepted too
    assert float(load_factor([10.], [50.], [0.8], CFG)) == pytest.approx(1.0)


@pytest.mark.parametrize("field,value", [("load_weights", (0.5, 0.3, 0.3)), ("load_weights", (1.2, -0.1, -0.1)),
                                         ("c_max", 0.0), ("q_max", -5.0), ("r_max", 0.0)])
def test_load_factor_rejects_bad_config(field, value):
    bad = replace(CFG.routing, **{field: value})
    with pytest.raises(ValueError, match=field):
        load_factor([1.], [1.], [0.1], bad)
    with pytest.raises(ValueError, match=field):
        RapoRouter(bad)


@pytest.mark.parametrize("args,field", [(([1., 2.], [1.], [0.]), "pending"), (([1.], [1.], [0., 0.]), "utilisation"),
                                        (([-1.], [0.], [0.]), "active"), (([[1.]], [0.], [0.]), "active"),
                                        (([1.], [float("nan")], [0.]), "pending")])
def test_load_factor_rejects_bad_indicators(args, field):
    with pytest.raises(ValueError, match=field):
        load_factor(*args, CFG)


def test_load_factor_rejects_unknown_cfg():
    with pytest.raises(ValueError, match="cfg"):
        load_factor([1.], [1.], [1.], {"c_max": 10})


def test_agent_load_validation_and_assign():
    with pytest.raises(ValueError, match="alive"):
        AgentLoad(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="utilisation"):
        AgentLoad(torch.zeros(3), torch.zeros(3), -torch.ones(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="n"):
        AgentLoad.idle(-1)
    ld = AgentLoad.idle(3).assign(torch.tensor([2, 2, NO_AGENT, 0]))
    assert ld.active.tolist() == [1., 0., 2.]
    with pytest.raises(ValueError, match="agents"):
        AgentLoad.idle(3).assign(torch.tensor([3]))


# ---------------------------------------------------------------- request checks (shared by all policies)
@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("task,modality,field", [([M_], [0], "task"), ([-1], [0], "task"), ([0], [L_], "modality"),
                                                 ([0, 1], [0], "modality"), ([[0]], [[0]], "task"), ([0.5], [0], "task")])
def test_every_policy_rejects_bad_requests(name, task, modality, field):
    bank = make_bank(5)
    with pytest.raises(ValueError, match=field):
        make_router(name, CFG, 0).select(torch.tensor(task), torch.tensor(modality), bank, AgentLoad.idle(5))


@pytest.mark.parametrize("name", ROUTERS)
def test_every_policy_rejects_mismatched_load(name):
    with pytest.raises(ValueError, match="load"):
        make_router(name, CFG, 0).select(torch.tensor([0]), torch.tensor([0]), make_bank(5), AgentLoad.idle(4))


@pytest.mark.parametrize("name", ROUTERS)
def test_every_policy_skips_dead_agents_and_raises_when_none_left(name):
    bank = make_bank(6)
    alive = torch.tensor([False, True, False, True, False, False])
    task, mod = torch.randint(0, M_, (50,)), torch.randint(0, L_, (50,))
    router = make_router(name, CFG, 0)
    assert isinstance(router, Router) and router.name == name
    picks = router.select(task, mod, bank, loads(torch.zeros(6), alive))
    assert set(picks.tolist()) <= {1, 3}
    with pytest.raises(NoAgentAvailable):
        router.select(task, mod, bank, loads(torch.zeros(6), torch.zeros(6, dtype=torch.bool)))
    assert router.select(task, mod, bank, loads(torch.zeros(6), torch.zeros(6, dtype=torch.bool)), allow_unassigned=True).eq(NO_AGENT).all()


def test_make_router_unknown_name():
    with pytest.raises(ValueError, match="name"):
        make_router("fastest", CFG)


# ---------------------------------------------------------------- RAPO
def test_rapo_picks_argmax_capability_times_headroom():
    bank = make_bank(50, seed=3)
    ld = simulated_load(torch.randint(0, 12, (50,), generator=torch.Generator().manual_seed(1)), CFG)
    task, mod = torch.randint(0, M_, (1,)), torch.randint(0, L_, (1,))
    r = RapoRouter(CFG)
    L = ld.factor(CFG)
    want = torch.where(L < 1, capability_matrix(bank, task, mod, CFG.routing.capability_mix)[0] * (1 - L), torch.tensor(float("-inf"))).argmax()
    assert int(r.select(task, mod, bank, ld)) == int(want)
    assert r.scores(task, mod, bank, ld).argmax() == want


def test_rapo_ties_go_to_lowest_id_and_saturated_agents_are_skipped():
    bank = make_bank(5, random_caps=False)                 # M = 0.5, score 0.5 for all: every score ties
    r = RapoRouter(CFG)
    assert r.select(torch.tensor([0]), torch.tensor([0]), bank, AgentLoad.idle(5)).tolist() == [0]
    sat = loads([25., 0., 0., 0., 0.])                       # L_0 = 0.4·25/10 = 1 → saturated
    assert r.select(torch.tensor([0]), torch.tensor([0]), bank, sat).tolist() == [1]
    with pytest.raises(NoAgentAvailable, match="rapo"):
        r.select(torch.tensor([0]), torch.tensor([0]), bank, loads([30.] * 5))


def test_rapo_capability_mix_and_load_switches():
    bank = make_bank(3, random_caps=False)
    bank.M[2, 1, 1] = 1.0; bank.capability_score = torch.tensor([0.9, 0.5, 0.1])
    t, m = torch.tensor([1]), torch.tensor([1])
    assert RapoRouter(CFG, capability_mix=1.0).select(t, m, bank, AgentLoad.idle(3)).tolist() == [2]
    assert RapoRouter(CFG, capability_mix=0.0).select(t, m, bank, AgentLoad.idle(3)).tolist() == [0]
    busy = loads([20., 0., 0.])
    assert RapoRouter(CFG, capability_mix=0.0).select(t, m, bank, busy).tolist() == [1]                  # 0.9·0.2 < 0.5
    assert RapoRouter(CFG, capability_mix=0.0, use_load=False).select(t, m, bank, busy).tolist() == [0]
    with pytest.raises(ValueError, match="capability_mix"):
        RapoRouter(CFG, capability_mix=2.0)


def test_rapo_batch_equals_one_by_one_for_one_key():
    bank = make_bank(200, seed=5)
    ld = simulated_load(torch.randint(0, 6, (200,), generator=torch.Generator().manual_seed(2)), CFG)
    r = RapoRouter(CFG)
    task, mod = torch.full((300,), 4), torch.full((300,), 2)
    assert torch.equal(r.select(task, mod, bank, ld), one_by_one(r, task, mod, bank, ld))


def test_rapo_batch_spreads_load_like_one_by_one():
    bank = make_bank(5, random_caps=False)                  # equal capabilities: the batch must spread, not pile up
    r = RapoRouter(CFG)
    task, mod = torch.arange(10) % M_, torch.arange(10) % L_
    picks = r.select(task, mod, bank, AgentLoad.idle(5))
    assert torch.bincount(picks, minlength=5).tolist() == [2] * 5
    assert torch.bincount(one_by_one(r, task, mod, bank, AgentLoad.idle(5)), minlength=5).tolist() == [2] * 5
    snap = RapoRouter(CFG, load_feedback=False).select(task, mod, bank, AgentLoad.idle(5))
    assert snap.eq(0).all()                                  # without feedback everything sees the same snapshot


def test_rapo_batch_stops_at_saturation():
    bank = make_bank(2, random_caps=False)
    r = RapoRouter(CFG)
    n = 2 * 25 + 5                                           # 25 conversations saturate an idle agent (0.04 each)
    out = r.select(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), bank, AgentLoad.idle(2), allow_unassigned=True)
    assert (out == NO_AGENT).sum() == 5 and torch.bincount(out[out >= 0]).tolist() == [25, 25]


# ---------------------------------------------------------------- baselines
def test_sequential_fixed_table_with_fall_through():
    bank = make_bank(4)
    r = SequentialRouter(CFG)
    t, m = torch.tensor([0, 0, 1, 3]), torch.tensor([0, 1, 2, 3])   # slots 0, 1, 7 % 4 = 3, 18 % 4 = 2
    assert r.select(t, m, bank, AgentLoad.idle(4)).tolist() == [0, 1, 3, 2]
    assert r.select(t, m, bank, loads(torch.zeros(4), torch.tensor([True, True, True, False]))).tolist() == [0, 1, 0, 2]
    assert r.select(t, m, bank, loads([100.] * 4)).tolist() == [0, 1, 3, 2]      # blind to load


def test_round_robin_cursor_persists_and_skips_dead():
    bank = make_bank(4)
    r = RoundRobinRouter(CFG)
    ld = loads(torch.zeros(4), torch.tensor([True, False, True, True]))
    z = torch.zeros(5, dtype=torch.long)
    assert r.select(z, z, bank, ld).tolist() == [0, 2, 3, 0, 2]
    assert r.select(z[:2], z[:2], bank, ld).tolist() == [3, 0]


def test_least_loaded_is_exact_one_by_one_jsq():
    bank = make_bank(30, seed=1)
    ld = simulated_load(torch.randint(0, 9, (30,), generator=torch.Generator().manual_seed(4)), CFG)
    r = LeastLoadedRouter(CFG)
    task, mod = torch.randint(0, M_, (120,)), torch.randint(0, L_, (120,))
    assert torch.equal(r.select(task, mod, bank, ld), one_by_one(r, task, mod, bank, ld))
    assert r.select(task[:1], mod[:1], bank, ld).tolist() == [int(ld.factor(CFG).argmin())]


def test_similarity_with_and_without_query_vector():
    bank = make_bank(6, random_caps=False)
    r = SimilarityRouter(CFG)
    q = bank.P[[4, 1]].clone()
    assert r.select(torch.tensor([0, 0]), torch.tensor([0, 0]), bank, AgentLoad.idle(6), query_vec=q).tolist() == [4, 1]
    bank.M[3, 2, 2] = 1.0
    assert r.select(torch.tensor([2]), torch.tensor([2]), bank, AgentLoad.idle(6)).tolist() == [3]
    with pytest.raises(ValueError, match="query_vec"):
        r.select(torch.tensor([0]), torch.tensor([0]), bank, AgentLoad.idle(6), query_vec=torch.zeros(1, 7))


def test_random_is_seeded_and_uniform_over_alive():
    bank = make_bank(4)
    ld = loads(torch.zeros(4), torch.tensor([True, True, False, True]))
    z = torch.zeros(3000, dtype=torch.long)
    a, b = RandomRouter(7).select(z, z, bank, ld), RandomRouter(7).select(z, z, bank, ld)
    assert torch.equal(a, b) and not torch.equal(a, RandomRouter(8).select(z, z, bank, ld))
    counts = torch.bincount(a, minlength=4)
    assert counts[2] == 0 and counts[[0, 1, 3]].min() > 900


# ---------------------------------------------------------------- bounded wait
def test_bounded_wait_queue_serves_late_and_raises_after_the_wait():
    bank = make_bank(3, random_caps=False)
    r = RapoRouter(CFG)
    full, idle = loads([30.] * 3), AgentLoad.idle(3)
    q = BoundedWaitQueue(1.0)
    ids = q.push(torch.tensor([0, 1]), torch.tensor([0, 0]), now=0.0)
    assert q.dispatch(r, bank, full, now=0.5)[0].numel() == 0 and len(q) == 2
    got_ids, agents = q.dispatch(r, bank, idle, now=0.9)
    assert got_ids.tolist() == ids.tolist() and len(q) == 0 and agents.tolist() == [0, 1]
    q.push(torch.tensor([2]), torch.tensor([1]), now=1.0)
    with pytest.raises(NoAgentAvailable, match="max_wait_s") as e:
        q.dispatch(r, bank, full, now=2.5)
    assert e.value.request_ids.tolist() == [2] and e.value.waited_s == pytest.approx(1.5) and len(q) == 0


def test_route_with_wait_times_out_with_a_clear_error():
    bank = make_bank(3, random_caps=False)
    t = {"now": 0.0}
    clock, sleep = (lambda: t["now"]), (lambda s: t.__setitem__("now", t["now"] + s))
    full = loads([30.] * 3)
    with pytest.raises(NoAgentAvailable):
        route_with_wait(RapoRouter(CFG), torch.tensor([0]), torch.tensor([0]), bank, lambda: full, 0.5, 0.1, clock, sleep)
    t["now"] = 0.0
    freed = lambda: AgentLoad.idle(3) if t["now"] > 0.25 else full
    assert route_with_wait(RapoRouter(CFG), torch.tensor([0]), torch.tensor([0]), bank, freed, 0.5, 0.1, clock, sleep).tolist() == [0]
    with pytest.raises(ValueError, match="max_wait_s"):
        BoundedWaitQueue(float("nan"))
    with pytest.raises(ValueError, match="poll_s"):
        route_with_wait(RapoRouter(CFG), torch.tensor([0]), torch.tensor([0]), bank, lambda: full, 0.5, 0.0, clock, sleep)


# ---------------------------------------------------------------- failure replacement
def test_replacement_by_capability_cosine_not_load():
    bank = make_bank(4, random_caps=False)
    prof = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.2, 0.8]])
    bank.M = prof.repeat_interleave(25, dim=1).reshape(4, M_, L_).contiguous()
    ld = loads([0., 0., 9., 0.])                             # the most similar agent (2) is the busiest
    assert replacement_for(0, bank, ld) == 2
    assert replacement_for(1, bank, ld) == 3
    with pytest.raises(ValueError, match="failed"):
        replacement_for(4, bank, ld)
    with pytest.raises(ValueError, match="failed"):
        replacement_for(True, bank, ld)


def test_fail_over_hands_over_history_and_last_stable_state():
    bank = make_bank(4, random_caps=False)
    bank.M[0, 0, 0] = bank.M[3, 0, 0] = 1.0
    ld = AgentLoad.idle(4)
    stable = bank.snapshot()
    bank.C = bank.C + 5.0                                     # live state drifts after the stable snapshot
    h = fail_over(0, bank, ld, stable, ["u: a", "a0: b"])
    assert h.replacement == 3 and h.history == ["u: a", "a0: b"]
    assert torch.equal(bank.C[3], stable["C"][0]) and torch.equal(h.state["M"], stable["M"][0])
    assert not bool(bank.alive[0]) and not bool(ld.alive[0])
    with pytest.raises(ValueError, match="adopt"):
        fail_over(1, bank, ld, stable, [], adopt=("Q",))
    with pytest.raises(ValueError, match="stable"):
        fail_over(1, bank, ld, [1, 2], [])


def test_replacement_raises_when_nobody_is_left():
    bank = make_bank(2)
    bank.remove_agents(torch.tensor([1]))
    with pytest.raises(NoAgentAvailable, match="failed"):
        replacement_for(0, bank, AgentLoad.idle(2))


# ---------------------------------------------------------------- two-level scheduling
def test_two_level_routes_inside_pools_and_overflows():
    bank = make_bank(6, random_caps=False)
    bank.capability_score = torch.tensor([0.9, 0.2, 0.5, 0.95, 0.3, 0.6])
    pools = pools_by_strength(bank, CFG.routing.n_pools)
    assert pools.tolist() == [2, 0, 1, 2, 0, 1]
    s = TwoLevelScheduler(CFG, pools)
    z = torch.zeros(3, dtype=torch.long)
    assert s.select(z, z, bank, AgentLoad.idle(6), complexity=torch.tensor([0.0, 0.5, 1.0])).tolist() == [4, 5, 3]
    blocked = loads([0., 0., 0., 30., 0., 0.], torch.tensor([False] + [True] * 5))
    assert s.select(z[:1], z[:1], bank, blocked, complexity=torch.tensor([0.9])).tolist() == [5]
    with pytest.raises(NoAgentAvailable):
        TwoLevelScheduler(CFG, pools, overflow=False).select(z[:1], z[:1], bank, blocked, complexity=torch.tensor([0.9]))


@pytest.mark.parametrize("kw,field", [(dict(boundaries=(0.7, 0.2)), "boundaries"), (dict(boundaries=(0.5,)), "boundaries"),
                                      (dict(pool_of_agent=torch.tensor([0, 3])), "pool_of_agent"),
                                      (dict(pool_of_agent=torch.zeros(2, 2)), "pool_of_agent")])
def test_two_level_rejects_bad_setup(kw, field):
    args = dict(pool_of_agent=torch.tensor([0, 1, 2]), **kw) if "pool_of_agent" not in kw else kw
    with pytest.raises(ValueError, match=field):
        TwoLevelScheduler(CFG, **args)


def test_two_level_rejects_bad_complexity():
    bank = make_bank(3)
    s = TwoLevelScheduler(CFG, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="complexity"):
        s.select(torch.tensor([0]), torch.tensor([0]), bank, AgentLoad.idle(3))
    with pytest.raises(ValueError, match="complexity"):
        s.select(torch.tensor([0]), torch.tensor([0]), bank, AgentLoad.idle(3), complexity=torch.tensor([-0.1]))
    with pytest.raises(ValueError, match="complexity"):
        s.select(torch.tensor([0, 1]), torch.tensor([0, 0]), bank, AgentLoad.idle(3), complexity=torch.tensor([0.1]))
    with pytest.raises(ValueError, match="n_pools"):
        pools_by_strength(bank, 0)


# ---------------------------------------------------------------- learning from outcomes (simulated)
def test_rapo_learns_specialists_from_outcomes_and_beats_random():
    skill = hidden_skill(12, M_, L_, seed=3)
    res = {}
    for name in ("rapo", "random"):
        bank = make_bank(12, random_caps=False)
        d = simulate_routing(make_router(name, CFG, 0), bank, skill, 60, 20, CFG, seed=1)
        res[name] = (d.success.iloc[30:].mean(), bank)
    assert res["rapo"][0] > res["random"][0] + 0.15
    assert best_agent_probability(res["rapo"][1], skill, CFG.routing.capability_mix, tol=0.15) > 0.5


def test_simulation_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="n_agents"):
        hidden_skill(0, M_, L_)
    with pytest.raises(ValueError, match="skill"):
        simulate_routing(RapoRouter(CFG), make_bank(3), hidden_skill(4, M_, L_), 1, 1, CFG)


# ---------------------------------------------------------------- benchmark runs at tiny size
def test_benchmark_function_runs_and_reports_every_policy():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_routing.py"
    spec = importlib.util.spec_from_file_location("bench_routing", path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    df = mod.run(n_agents=20, batch=50, single_repeats=3, batch_repeats=1)
    assert sorted(df.policy) == sorted(ROUTERS)
    assert (df.batch_us_per_decision > 0).all() and (df.single_us > 0).all()
    with pytest.raises(ValueError, match="batch"):
        mod.run(n_agents=20, batch=0)


def test_rapo_multi_key_batch_respects_saturation_and_spreads():
    bank = make_bank(3, random_caps=False)
    task, mod = torch.arange(100) % M_, torch.arange(100) % L_     # 10 distinct keys, all agents equal
    out = RapoRouter(CFG).select(task, mod, bank, AgentLoad.idle(3), allow_unassigned=True)
    assert (out == NO_AGENT).sum() == 100 - 3 * 25                   # 25 conversations saturate an idle agent
    assert torch.bincount(out[out >= 0], minlength=3).tolist() == [25, 25, 25]
    served = out[:75]
    assert (served >= 0).all()                                       # the earliest requests are served first


# ---------------------------------------------------------------- fast greedy_rounds == greedy_rounds_reference (hypothesis)
from hypothesis import HealthCheck, given, settings, strategies as st
import numpy as np
import rapo_nb.routing as routing_mod
from rapo_nb.routing import candidate_agents, greedy_rounds, greedy_rounds_reference

SCORE_SETS = {"equal": [0.5], "levels": [0.0, 0.25, 0.5, 1.0], "with_negative": [-0.5, 0.0, 0.5, 1.0]}
INCS = [0.0, 1e-3, 0.04, 0.1, 0.3, 0.7, 1.5]
PROPERTY = settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def rounds_inputs(draw, max_keys=8, max_agents=40, max_batch=120, one_key=False):
    "greedy_rounds arguments: heavy ties (all equal, few levels), float scores, ineligible and saturated agents."
    U = 1 if one_key else draw(st.integers(1, max_keys))
    N, B = draw(st.integers(1, max_agents)), draw(st.integers(0, max_batch))
    kind = draw(st.sampled_from(["equal", "levels", "float", "with_negative"]))
    if kind == "float": vals = draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=U * N, max_size=U * N))
    else: vals = draw(st.lists(st.sampled_from(SCORE_SETS[kind]), min_size=U * N, max_size=U * N))
    ks = torch.tensor(vals, dtype=torch.float32).reshape(U, N)
    if draw(st.booleans()): ks = ks.T.contiguous().T        # the agent-major layout RapoRouter.select passes
    L0 = torch.tensor(draw(st.lists(st.one_of(st.integers(0, 30).map(lambda k: k * 0.04), st.floats(0.0, 1.25, width=32)),
                                    min_size=N, max_size=N)), dtype=torch.float32)
    if draw(st.booleans()): L0 = torch.zeros(N)                 # idle agents: ties everywhere (as in a fresh or idle system)
    elig = torch.tensor(draw(st.lists(st.booleans(), min_size=N, max_size=N)) if draw(st.booleans()) else [True] * N)
    inv = torch.tensor(draw(st.lists(st.integers(0, U - 1), min_size=B, max_size=B)), dtype=torch.long)
    return ks, inv, L0, elig, draw(st.sampled_from(INCS)), draw(st.booleans())


@PROPERTY
@given(rounds_inputs())
def test_greedy_rounds_equals_reference(case):
    ks, inv, L0, elig, inc, fb = case
    assert torch.equal(greedy_rounds(ks, inv, L0, elig, inc, feedback=fb), greedy_rounds_reference(ks, inv, L0, elig, inc, feedback=fb))


@PROPERTY
@given(rounds_inputs(one_key=True, max_agents=12, max_batch=150))
def test_greedy_rounds_equals_reference_one_key_merge_path(case):
    "U = 1: the reference's stable-sort merge (at most ⌈1/inc⌉ + 1 picks per agent), B often > N."
    ks, inv, L0, elig, inc, fb = case
    assert torch.equal(greedy_rounds(ks, inv, L0, elig, inc, feedback=fb), greedy_rounds_reference(ks, inv, L0, elig, inc, feedback=fb))


@PROPERTY
@given(rounds_inputs())
def test_greedy_rounds_never_picks_a_saturated_agent(case):
    "An agent at L0 ≥ 1 is never picked (one key, several, no feedback), whatever the caller's eligible mask says about it."
    ks, inv, L0, elig, inc, fb = case
    for rule in (greedy_rounds, greedy_rounds_reference):
        out = rule(ks, inv, L0, elig, inc, feedback=fb)
        assert torch.equal(out, rule(ks, inv, L0, elig & (L0 < 1.0), inc, feedback=fb))
        assert bool((L0[out[out >= 0]] < 1.0).all())


def test_greedy_rounds_saturated_agent_left_out_with_several_keys():
    "Worked case: agent 0 takes two requests (L 0.9 → 0.96 → 1.02); agent 1 starts saturated (L0 = 1.0), so the third request waits."
    L0, elig = torch.tensor([0.9, 1.0]), torch.ones(2, dtype=torch.bool)
    for inv in (torch.tensor([0, 0, 0]), torch.tensor([0, 1, 0])):
        ks = torch.ones(int(inv.max()) + 1, 2)
        for rule in (greedy_rounds, greedy_rounds_reference):
            assert rule(ks, inv, L0, elig, 0.06).tolist() == [0, 0, NO_AGENT]
            assert rule(ks, inv, L0 + 0.1, elig, 0.06, feedback=False).tolist() == [NO_AGENT] * 3


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds_inputs(max_keys=60, max_agents=15, max_batch=300))
def test_greedy_rounds_equals_reference_many_keys(case):
    ks, inv, L0, elig, inc, fb = case
    assert torch.equal(greedy_rounds(ks, inv, L0, elig, inc, feedback=fb), greedy_rounds_reference(ks, inv, L0, elig, inc, feedback=fb))


@PROPERTY
@given(rounds_inputs(max_batch=1), st.integers(1, 50))
def test_candidate_agents_are_the_k_best_with_ties_to_lowest_id(case, k):
    ks, _, L0, elig, _, _ = case
    ks = ks.abs()
    got = candidate_agents(ks, L0, elig, k)
    v = torch.where(elig[None, :], ks * (1.0 - L0)[None, :], float("-inf"))
    order = torch.sort(v, dim=1, descending=True, stable=True).indices       # stable: equal values keep id order
    for u in range(ks.shape[0]):
        want = [a for a in order[u].tolist() if bool(elig[a])][:k]
        assert got[u].tolist() == want + [NO_AGENT] * (k - len(want))


def test_greedy_rounds_fast_path_runs_and_falls_back(monkeypatch):
    "Valid CPU float32 inputs never call the reference; negative scores, float64 and inc < 0 do (and agree with it)."
    g = torch.Generator().manual_seed(0)
    ks, L0 = torch.rand(5, 300, generator=g), torch.randint(0, 20, (300,), generator=g).float() * 0.04
    elig, inv = torch.rand(300, generator=g) < 0.9, torch.randint(0, 5, (400,), generator=g)
    calls = []
    monkeypatch.setattr(routing_mod, "greedy_rounds_reference", lambda *a, **k: (calls.append(1), greedy_rounds_reference(*a, **k))[1])
    fast = greedy_rounds(ks, inv, L0, elig, 0.04)
    assert calls == [] and (fast >= 0).any()
    assert torch.equal(fast, greedy_rounds_reference(ks, inv, L0, elig, 0.04))
    neg = ks.clone(); neg[2, 7] = -1.0
    for args in ((neg, inv, L0, elig, 0.04), (ks.double(), inv, L0.double(), elig, 0.04), (ks, inv, L0, elig, -0.04)):
        n = len(calls)
        assert torch.equal(greedy_rounds(*args), greedy_rounds_reference(*args)) and len(calls) == n + 1


def test_greedy_rounds_edge_sizes():
    ks, L0, elig = torch.full((3, 4), 0.5), torch.zeros(4), torch.ones(4, dtype=torch.bool)
    assert greedy_rounds(ks, torch.empty(0, dtype=torch.long), L0, elig, 0.04).shape == (0,)                 # B = 0
    big = torch.randint(0, 3, (100,), generator=torch.Generator().manual_seed(1))                             # B > N, saturating
    out = greedy_rounds(ks, big, L0, elig, 0.3)
    assert torch.equal(out, greedy_rounds_reference(ks, big, L0, elig, 0.3))
    assert (out == NO_AGENT).sum() == 100 - 4 * 4                                                            # 4 picks each: 0.3·4 ≥ 1
    assert greedy_rounds(ks, big, L0, torch.zeros(4, dtype=torch.bool), 0.04).eq(NO_AGENT).all()
    none = (torch.empty(1, 0), torch.tensor([0, 0, 0]), torch.empty(0), torch.empty(0, dtype=torch.bool), 0.04)   # no agents at all
    assert torch.equal(greedy_rounds(*none), greedy_rounds_reference(*none)) and greedy_rounds(*none).eq(NO_AGENT).all()


def test_rapo_select_large_bank_matches_reference_routing(monkeypatch):
    "RapoRouter.select over a larger seasoned-like bank (heavy ties) gives the same agents with either algorithm."
    n = 3000
    bank = make_bank(n, random_caps=False)
    g = torch.Generator().manual_seed(5)
    bank.update_capability(torch.arange(n), torch.randint(0, M_, (n,), generator=g), torch.randint(0, L_, (n,), generator=g),
                           (torch.rand(n, generator=g) < 0.8).float())
    ld = simulated_load(torch.randint(0, 4, (n,), generator=g), CFG)
    task, mod = torch.randint(0, M_, (700,), generator=g), torch.randint(0, L_, (700,), generator=g)
    r = RapoRouter(CFG)
    fast = r.select(task, mod, bank, ld)
    monkeypatch.setattr(routing_mod, "greedy_rounds", greedy_rounds_reference)
    assert torch.equal(fast, r.select(task, mod, bank, ld))
    one_t, one_m = torch.full((900,), 1), torch.full((900,), 2)                                              # one key: merge path
    ref_one = r.select(one_t, one_m, bank, ld)
    monkeypatch.setattr(routing_mod, "greedy_rounds", greedy_rounds)
    assert torch.equal(r.select(one_t, one_m, bank, ld), ref_one)


@PROPERTY
@given(rounds_inputs(max_keys=8, max_agents=150, max_batch=36))
def test_greedy_rounds_equals_reference_plentiful_agents(case):
    "Mostly N ≥ 4B: the first try with 2·B_u + 8 candidates per key, checked, and its rerun when the check fails."
    ks, inv, L0, elig, inc, fb = case
    assert torch.equal(greedy_rounds(ks, inv, L0, elig, inc, feedback=fb), greedy_rounds_reference(ks, inv, L0, elig, inc, feedback=fb))


def test_greedy_rounds_small_first_try_and_rerun(monkeypatch):
    "Own specialists per key: the small first try passes its check. All-equal scores: it fails, and the rerun is exact."
    attempts, kernel = [], routing_mod._rounds_on_candidates
    monkeypatch.setattr(routing_mod, "_rounds_on_candidates", lambda *a: (attempts.append(kernel(*a)), attempts[-1])[1])
    z, e, inv = torch.zeros(400), torch.ones(400, dtype=torch.bool), torch.arange(40) % 4
    spec = torch.full((4, 400), 0.5)
    for u in range(4): spec[u, 100 * u + 50:100 * u + 65] = 0.9
    assert torch.equal(greedy_rounds(spec, inv, z, e, 0.04), greedy_rounds_reference(spec, inv, z, e, 0.04)) and attempts == [True]
    attempts.clear()
    flat = torch.full((4, 400), 0.5)
    assert torch.equal(greedy_rounds(flat, inv, z, e, 0.04), greedy_rounds_reference(flat, inv, z, e, 0.04)) and attempts == [False, True]


@st.composite
def idle_plentiful_inputs(draw):
    "An idle system with many more agents than requests (N ≥ 4B) and heavily tied scores: keys compete for the same agents."
    U, B = draw(st.integers(2, 8)), draw(st.integers(10, 40))
    N = draw(st.integers(4 * B, 4 * B + 60))
    ks = torch.full((U, N), 0.5)                                # a fresh bank: M = 0.5 everywhere …
    for u, a in draw(st.lists(st.tuples(st.integers(0, U - 1), st.integers(0, N - 1)), max_size=2 * U)):
        ks[u, a] = 0.75                                         # … but for a few seasoned cells
    elig = torch.ones(N, dtype=torch.bool)
    if draw(st.booleans()): elig[torch.tensor(draw(st.lists(st.integers(0, N - 1), max_size=N // 2)), dtype=torch.long)] = False
    inv = torch.tensor(draw(st.lists(st.integers(0, U - 1), min_size=B, max_size=B)), dtype=torch.long)
    return ks, inv, torch.zeros(N), elig, draw(st.sampled_from([0.04, 0.1, 0.3])), True


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(idle_plentiful_inputs())
def test_greedy_rounds_equals_reference_idle_tied_bank(case):
    "Here the small first try often fails its check (keys share their best agents); the answer must still be the reference's."
    ks, inv, L0, elig, inc, fb = case
    assert torch.equal(greedy_rounds(ks, inv, L0, elig, inc, feedback=fb), greedy_rounds_reference(ks, inv, L0, elig, inc, feedback=fb))



# ---------------------------------------------------------------- the single decision: route_one == route_one_reference (hypothesis)
from rapo_nb.routing import NumpyViews, one_coefficients, route_one, route_one_reference

CELL_SETS = {"equal": [0.5], "levels": [0.0, 0.25, 0.5, 1.0]}


@st.composite
def one_request_inputs(draw, max_agents=40):
    "A bank and load for one request: heavy ties, float values, dead agents (bank or load), saturated agents, odd mixes."
    N = draw(st.integers(1, max_agents))
    bank = make_bank(N, random_caps=False)
    kind = draw(st.sampled_from(["equal", "levels", "float"]))
    size = int(bank.M.numel())
    if kind == "float":
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        bank.M, bank.capability_score = torch.rand(bank.M.shape, generator=g), torch.rand(N, generator=g)
    else:
        vals = st.sampled_from(CELL_SETS[kind])
        bank.M = torch.tensor(draw(st.lists(vals, min_size=size, max_size=size)), dtype=torch.float32).reshape(bank.M.shape)
        bank.capability_score = torch.tensor(draw(st.lists(vals, min_size=N, max_size=N)), dtype=torch.float32)
    if draw(st.booleans()):
        bank.alive = torch.tensor(draw(st.lists(st.booleans(), min_size=N, max_size=N)))
    floats = lambda hi: st.one_of(st.integers(0, int(hi)).map(float), st.floats(0.0, hi, width=32))
    ld = AgentLoad(torch.tensor(draw(st.lists(floats(30), min_size=N, max_size=N)), dtype=torch.float32),
                   torch.tensor(draw(st.lists(floats(80), min_size=N, max_size=N)), dtype=torch.float32),
                   torch.tensor(draw(st.lists(floats(1.0), min_size=N, max_size=N)), dtype=torch.float32),
                   torch.tensor(draw(st.lists(st.booleans(), min_size=N, max_size=N)) if draw(st.booleans()) else [True] * N))
    if draw(st.booleans()):
        ld = AgentLoad.idle(N)                                    # idle: every score ties on C alone
    mix = draw(st.sampled_from([0.0, 0.3, CFG.routing.capability_mix, 1.0]) | st.floats(0.0, 1.0))
    return bank, ld, draw(st.integers(0, M_ - 1)), draw(st.integers(0, L_ - 1)), mix, draw(st.booleans())


@PROPERTY
@given(one_request_inputs())
def test_route_one_equals_reference_and_select(case):
    bank, ld, t, u, mix, use_load = case
    want = route_one_reference(t, u, bank, ld, mix, CFG, use_load)
    assert route_one(t, u, bank, ld, mix, CFG, use_load) == want
    r = RapoRouter(CFG, capability_mix=mix, use_load=use_load)
    assert r.select_one(t, u, bank, ld, allow_unassigned=True) == want
    assert r.select(torch.tensor([t]), torch.tensor([u]), bank, ld, allow_unassigned=True).tolist() == [want]
    # the batch rule's first pick is the single decision (its C and L are the same float32 numbers)
    two = r.select(torch.tensor([t, t]), torch.tensor([u, u]), bank, ld, allow_unassigned=True)
    assert int(two[0]) == want


def test_route_one_nan_and_views_follow_in_place_and_replaced_tensors():
    bank, ld = make_bank(6, random_caps=False), AgentLoad.idle(6)
    r = RapoRouter(CFG)
    assert r.select_one(0, 0, bank, ld) == 0                       # all tie → lowest id
    bank.M[3, 0, 0] = 0.9                                          # in place: the cached numpy view sees it
    assert r.select_one(0, 0, bank, ld) == 3
    ld.active[3] = 30.0                                            # saturated in place
    assert r.select_one(0, 0, bank, ld) == 0
    bank.M = bank.M.clone(); bank.M[4, 0, 0] = 0.95                # a replaced tensor: the views are rebuilt
    assert r.select_one(0, 0, bank, ld) == 4
    bank.M[5, 0, 0] = float("nan")                                  # torch.argmax ranks NaN first; so does the loop
    assert r.select_one(0, 0, bank, ld) == route_one_reference(0, 0, bank, ld, r.mix, CFG) == 5
    ld.active[1] = -1.0                                            # a bad load value: the reference's error, naming the field
    with pytest.raises(ValueError, match="active"):
        r.select_one(0, 0, bank, ld)


def test_route_one_errors_and_fallbacks():
    bank, ld = make_bank(4, seed=2), AgentLoad.idle(4)
    r = RapoRouter(CFG)
    with pytest.raises(ValueError, match="task"):
        r.select_one(M_, 0, bank, ld)
    with pytest.raises(ValueError, match="modality"):
        r.select(torch.tensor([0]), torch.tensor([L_]), bank, ld)
    with pytest.raises(ValueError, match="load"):
        r.select_one(0, 0, bank, AgentLoad.idle(5))
    dead = AgentLoad(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(NoAgentAvailable):
        r.select_one(0, 0, bank, dead)
    assert r.select_one(0, 0, bank, dead, allow_unassigned=True) == NO_AGENT
    half = copy.deepcopy(bank); half.M = half.M.double()             # off the fast path (float64 M): the reference decides
    assert NumpyViews().get((half.M,), (torch.float32,)) is None
    assert route_one(1, 1, half, ld, 0.8, CFG) == route_one_reference(1, 1, bank, ld, 0.8, CFG)
    assert one_coefficients(0.8, CFG).dtype == np.float32 and one_coefficients(0.8, CFG, use_load=False)[2:].tolist() == [0, 0, 0]
