"""The convergence notebook's tools on what ships (issue #19 item 8): the runtime's graph and learnt eq. 5 weights,
the exact stability limit, the certified Lipschitz bound and the whole eq. 4 step of `consensus_step`."""

import math

import numpy as np
import pytest
import torch

from rapo_nb.config import load_config
from rapo_nb.consensus import ConsensusEngine, QuadraticObjective, adaptive_weights, consensus_step, make_topology
from rapo_nb.convergence import (
    eq4_fixed_point,
    geometric_prediction,
    lipschitz_upper_bound,
    run_eq4,
    runtime_topology,
    simulate_exchanges,
    stability_limit,
    stationary_distribution,
    step_spectrum,
    worst_step_growth,
)
from rapo_nb.state import StateBank


@pytest.fixture(scope="module")
def cfg():
    return load_config("quick")


def learnt(cfg, n=40, seed=0, rounds=300):
    "A runtime graph and the weights an engine learns from uneven simulated handoffs (float64, rows renormalised)."
    t = runtime_topology(cfg, n, seed)
    eng = ConsensusEngine(cfg, t, "cpu")
    p = torch.where(torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) < 0.5, 0.05, 0.95)
    w = simulate_exchanges(eng, p, rounds=rounds, batch=n, seed=seed).double()
    return t, eng, w / torch.zeros(n, dtype=torch.float64).index_add_(0, t.rows, w)[t.rows]


def test_runtime_topology_is_the_orchestrators(cfg):
    from rapo_nb.runtime import Orchestrator

    for n in (5, cfg.evaluation.n_agents, 40):
        orch = Orchestrator(cfg, "rapo", seed=3, n_agents=n)
        assert torch.equal(orch.engine.topo.edge_keys(), runtime_topology(cfg, n, seed=3).edge_keys()), n


def test_simulated_weights_are_the_ones_the_engine_steps_with(cfg):
    t, eng, _ = learnt(cfg)
    w = eng.weights()
    bank = StateBank.create(t.n, cfg, seed=0)
    P0 = bank.P.clone()
    eng.step(bank)
    ref = consensus_step(P0, t, w, cfg.consensus.alpha, trust_region=cfg.consensus.trust_region)
    assert torch.equal(bank.P, ref.P)
    assert float(w.max()) > 0.3 and float(w.min()) < 1e-3  # uneven histories give uneven weights


def test_stationary_distribution_dense_and_sparse_agree(cfg):
    t, _, w = learnt(cfg)
    pi = stationary_distribution(t, w)
    assert torch.allclose(pi, stationary_distribution(t, w, dense=False), atol=1e-11)
    assert torch.allclose(pi @ t.to_dense(w), pi, atol=1e-13) and math.isclose(float(pi.sum()), 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_lipschitz_upper_bound_holds_and_is_not_vacuous(cfg, seed):
    t, _, w = learnt(cfg, seed=seed)
    L = float(np.linalg.norm(np.eye(t.n) - t.to_dense(w).numpy(), 2))
    assert L <= lipschitz_upper_bound(t, w) + 1e-12 <= lipschitz_upper_bound(t) + 1e-12
    # a star whose leaves listen only to the hub: the bound 1 + √(n − 1) is within a factor 1.5 of the true L
    star = make_topology("star", 50)
    w_star = adaptive_weights(star, torch.ones(star.n_edges, dtype=torch.float64))
    L_star = float(np.linalg.norm(np.eye(50) - star.to_dense(w_star).numpy(), 2))
    assert lipschitz_upper_bound(star, w_star) == pytest.approx(1 + math.sqrt(49))
    assert L_star <= lipschitz_upper_bound(star, w_star) <= 1.5 * L_star


def test_stability_limit_separates_decay_from_growth(cfg):
    t, _, w = learnt(cfg, rounds=600)
    mu = step_spectrum(t, w)
    a = stability_limit(mu)
    assert a >= 1 - 1e-9  # row-stochastic W: every α ≤ 1 is stable
    pi = stationary_distribution(t, w)
    P0 = torch.randn(t.n, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    star = (pi @ P0).expand_as(P0)
    for factor, decays in ((0.95, True), (1.05, False)):
        r = run_eq4(P0, t, w, factor * a, 300, star, pi=pi, trust_region=None)
        assert (r["V_euclid"][-1] < r["V_euclid"][0]) == decays, factor


def test_worst_step_growth_is_attained_and_never_beaten(cfg):
    t, _, w = learnt(cfg, rounds=600)
    pi = stationary_distribution(t, w)
    ge, gp = worst_step_growth(t, w, 0.1, pi)
    M = np.eye(t.n) - 0.1 * (np.eye(t.n) - t.to_dense(w).numpy())
    rng = np.random.default_rng(0)
    E = rng.standard_normal((t.n, 2000))
    E -= np.outer(np.ones(t.n), pi.numpy() @ E)  # πᵀe = 0
    ratios = np.linalg.norm(M @ E, axis=0) / np.linalg.norm(E, axis=0)
    assert ratios.max() <= ge + 1e-12 and ge <= 1.1
    s = np.sqrt(pi.numpy())
    ratios_pi = np.linalg.norm(s[:, None] * (M @ E), axis=0) / np.linalg.norm(s[:, None] * E, axis=0)
    assert ratios_pi.max() <= gp + 1e-12 and gp <= 1 + 1e-12  # the π-weighted error never grows


def test_fixed_point_is_a_fixed_point_of_consensus_step(cfg):
    t, _, w = learnt(cfg)
    Y = torch.randn(t.n, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    Ps = eq4_fixed_point(t, w, 0.1, 0.01, Y)
    step = consensus_step(Ps, t, w, 0.1, grad_q=Y - Ps, beta=0.01, trust_region=None, grad_clip=None)
    assert torch.allclose(step.P, Ps, atol=1e-12) and step.update_norm < 1e-12
    moved = consensus_step(Y, t, w, 0.1, grad_q=torch.zeros_like(Y), beta=0.01, trust_region=None, grad_clip=None)
    assert moved.update_norm > 1e-3  # a point that is not the fixed point moves


def test_whole_step_converges_with_trust_region_and_clipping(cfg):
    t, _, w = learnt(cfg)
    cc = cfg.consensus
    P0 = StateBank.create(t.n, cfg, seed=0).P[:, :16].double()  # 16 of the role-PCA columns suffice
    Y = P0 + 8.0 / math.sqrt(P0.shape[1])  # every gradient starts at norm 8 > τ_g
    Ps = eq4_fixed_point(t, w, cc.alpha, 0.05, Y)
    r = run_eq4(
        P0,
        t,
        w,
        cc.alpha,
        600,
        Ps,
        objective=QuadraticObjective(Y),
        beta=0.05,
        trust_region=cc.trust_region,
        grad_clip=cc.grad_clip,
    )
    assert r["trust_binds"][:3].all() and (r["clipped_rows"][:3] == t.n).all()
    assert r["V_euclid"][-1] / r["V_euclid"][0] < 1e-12
    assert float(torch.linalg.vector_norm(Y - Ps, dim=1).max()) < cc.grad_clip  # the dense P* is the right one


def test_runtime_step_keeps_the_pi_mean_and_never_raises_v_pi(cfg):
    t, _, w = learnt(cfg)
    pi = stationary_distribution(t, w)
    P0 = torch.randn(t.n, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    star = (pi @ P0).expand_as(P0)
    r = run_eq4(P0, t, w, 0.9, 50, star, pi=pi, trust_region=0.1)  # from a random start the trust region binds
    assert r["trust_binds"][:3].all() and not r["trust_binds"][-1]
    assert torch.allclose(pi @ r["P"], pi @ P0, atol=1e-12)
    assert (np.diff(r["V_pi"]) <= 1e-12 * r["V_pi"][0]).all()


def test_geometric_prediction_with_and_without_beta():
    mu = np.array([0.0, 0.5, 1.5])
    assert geometric_prediction(mu, 0.1, 1e-4) == pytest.approx(np.log(1e-4) / (2 * np.log(0.95)))
    assert geometric_prediction(mu, 0.1, 1e-4, beta=0.02) == pytest.approx(np.log(1e-4) / (2 * np.log(0.98)))
    assert geometric_prediction(mu, 2.0, 1e-4) == np.inf  # |1 − 2·1.5| = 2: diverges


def test_bad_input_names_the_field(cfg):
    t, eng, w = learnt(cfg, n=10, rounds=5)
    with pytest.raises(ValueError, match="receiver_success"):
        simulate_exchanges(eng, torch.full((10,), 1.5), 1, 1)
    with pytest.raises(ValueError, match="rounds"):
        simulate_exchanges(eng, torch.full((10,), 0.5), -1, 1)
    with pytest.raises(ValueError, match="weights"):
        lipschitz_upper_bound(t, 3 * w)
    with pytest.raises(ValueError, match="beta"):
        eq4_fixed_point(t, w, 0.1, 0.0, torch.zeros(10, 2))
