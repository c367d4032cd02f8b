"""Tests of rapo_nb.consensus: topologies, eq. 5 weights, the eq. 4 step with its constraints, the engine's safeguards.
Property tests (hypothesis) run over random graphs, sizes and seeds."""
import math
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from rapo_nb.config import load_config
from rapo_nb.consensus import (TOPOLOGIES, ConsensusEngine, QuadraticObjective, adaptive_weights, clip_rows, consensus_objective,
                               consensus_residual, consensus_step, csr_from_edges, make_topology, neighbour_pull,
                               segment_sum)
from rapo_nb.convergence import (dense_spectrum, geometric_prediction, iterations_to_eps, lipschitz_estimate, simulate_consensus,
                                  stationary_distribution)
from rapo_nb.state import StateBank

CFG = load_config("quick", device="cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")
kinds = st.sampled_from(TOPOLOGIES)
sizes = st.integers(2, 60)
seeds = st.integers(0, 10_000)
degrees = st.integers(1, 10)


def n_components(t) -> int:
    A = csr_matrix((np.ones(t.n_edges), t.indices.numpy(), t.indptr.numpy()), shape=(t.n, t.n))
    return connected_components(A, directed=False)[0]


@settings(max_examples=60, deadline=None)
@given(kind=kinds, n=sizes, degree=degrees, seed=seeds)
def test_topology_is_valid_csr_symmetric_connected(kind, n, degree, seed):
    t = make_topology(kind, n, degree=degree, seed=seed)
    A = t.to_dense()
    assert torch.equal(A, A.T) and float(A.diagonal().sum()) == 0
    assert t.indptr[0] == 0 and t.indptr[-1] == t.n_edges and bool((t.edge_keys().diff() > 0).all())
    assert n_components(t) == 1
    i = seed % n
    assert t.neighbors(i).tolist() == torch.nonzero(A[i]).flatten().tolist()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(5, 80), half=st.integers(1, 2))
def test_ring_degree_exact(n, half):
    t = make_topology("ring", n, degree=2 * half)
    assert (t.degree() == 2 * half).all()


def test_bad_topology_input():
    with pytest.raises(ValueError, match="kind"): make_topology("mesh", 5)
    with pytest.raises(ValueError, match="degree"): make_topology("ring", 5, degree=-1)
    with pytest.raises(ValueError, match="rewire_p"): make_topology("small_world", 5, rewire_p=2.0)


@settings(max_examples=60, deadline=None)
@given(kind=kinds, n=sizes, seed=seeds)
def test_adaptive_weights_rows_sum_to_one(kind, n, seed):
    t = make_topology(kind, n, degree=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    E = torch.rand(t.n_edges, generator=g) * (torch.rand(t.n_edges, generator=g) > 0.3)
    w = adaptive_weights(t, E)
    assert (w >= 0).all()
    torch.testing.assert_close(segment_sum(w, t), torch.ones(n), atol=1e-5, rtol=0)
    nz = segment_sum(E, t)[t.rows] > 0
    torch.testing.assert_close(w[nz], (E / segment_sum(E, t)[t.rows])[nz])


@settings(max_examples=50, deadline=None)
@given(kind=kinds, n=sizes, seed=seeds, alpha=st.floats(0.0, 1.0), p=st.integers(1, 8))
def test_step_matches_dense_formula_and_is_convex(kind, n, seed, alpha, p):
    t = make_topology(kind, n, degree=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    w = adaptive_weights(t, torch.rand(t.n_edges, generator=g) + 0.1)
    P = torch.randn(n, p, generator=g, dtype=torch.float64)
    P1 = consensus_step(P, t, w.double(), alpha, trust_region=None).P
    W = t.to_dense(w.double())
    # eq. 4 as written, Σ_j w_ij (P_j − P_i), with the float32 weights' row sums r_i (1 up to rounding)
    torch.testing.assert_close(P1, P + alpha * (W @ P - W.sum(1, keepdim=True) * P))
    torch.testing.assert_close(P1, P + alpha * (W @ P - P), atol=1e-5, rtol=0)
    # α ≤ 1 with row-stochastic W: each new row is a convex combination, so the range per coordinate cannot grow
    assert (P1.max(0).values <= P.max(0).values + 1e-9).all() and (P1.min(0).values >= P.min(0).values - 1e-9).all()


@settings(max_examples=40, deadline=None)
@given(kind=kinds, n=st.integers(2, 40), seed=seeds, alpha=st.floats(0.01, 1.0))
def test_uniform_weights_preserve_degree_weighted_mean(kind, n, seed, alpha):
    t = make_topology(kind, n, degree=4, seed=seed)
    w = adaptive_weights(t, torch.ones(t.n_edges)).double()
    P = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pi = t.degree().double() / t.degree().sum()
    P1 = consensus_step(P, t, w, alpha, trust_region=None).P
    torch.testing.assert_close(pi @ P1, pi @ P)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 40), seed=seeds, radius=st.floats(0.001, 0.5), scope=st.sampled_from(["global", "agent"]))
def test_trust_region_and_clip_hold(n, seed, radius, scope):
    t = make_topology("random", n, degree=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    w = adaptive_weights(t, torch.ones(t.n_edges))
    P = torch.randn(n, 6, generator=g); G = 50 * torch.randn(n, 6, generator=g)
    P1 = consensus_step(P, t, w, 3.0, grad_q=G, beta=2.0, trust_region=radius, grad_clip=5.0, trust_scope=scope).P
    d = P1 - P
    if scope == "global": assert float(d.norm()) <= radius * float(P.norm()) * (1 + 1e-4)
    else: assert (d.norm(dim=1) <= radius * P.norm(dim=1) * (1 + 1e-4) + 1e-7).all()
    assert (clip_rows(G, 5.0).norm(dim=1) <= 5.0 + 1e-4).all()


def test_step_rejects_bad_input():
    t = make_topology("ring", 6, degree=2); w = adaptive_weights(t, torch.ones(t.n_edges)); P = torch.zeros(6, 3)
    with pytest.raises(ValueError, match="P"): consensus_step(torch.zeros(5, 3), t, w, 0.1)
    with pytest.raises(ValueError, match="weights"): consensus_step(P, t, w[:3], 0.1)
    with pytest.raises(ValueError, match="alpha"): consensus_step(P, t, w, float("nan"))
    with pytest.raises(ValueError, match="grad_q"): consensus_step(P, t, w, 0.1, grad_q=torch.zeros(6, 2), beta=1.0)
    with pytest.raises(ValueError, match="effectiveness"): adaptive_weights(t, -torch.ones(t.n_edges))


def test_eq4_step_lowers_eq3_objective():
    t = make_topology("ring", 40, degree=4)
    w = adaptive_weights(t, torch.ones(t.n_edges))
    g = torch.Generator().manual_seed(1)
    obj = QuadraticObjective(torch.randn(40, 8, generator=g)); P = torch.randn(40, 8, generator=g)
    P1 = consensus_step(P, t, w, 0.05, grad_q=obj.grad(P), beta=0.05, trust_region=None).P
    J = lambda X: float(consensus_objective(X, P, t, w, obj, 1.0, 0.1))
    assert J(P1) < J(P)


def _engine(n=60, **over):
    cfg = load_config("quick", device="cpu", **over)
    t = make_topology("small_world", n, degree=6, seed=0)
    return cfg, t, StateBank.create(n, cfg, device="cpu"), ConsensusEngine(cfg, t, "cpu")


def test_engine_progress_no_rollback_and_stable_tracks():
    cfg, t, bank, eng = _engine()
    out = [eng.step(bank) for _ in range(30)]
    res = [o["residual"] for o in out]
    assert all(b < a for a, b in zip(res, res[1:])) and eng.rollbacks == 0
    assert torch.equal(eng.stable, bank.P)


def test_engine_rolls_back_after_ten_nonconverging_iterations():
    cfg, t, bank, eng = _engine(consensus__beta_q=1.0)
    for _ in range(5): eng.step(bank, grad_q=torch.zeros_like(bank.P))
    stable = eng.stable.clone()
    w = eng.weights(bank.alive)
    flags = [eng.step(bank, grad_q=-10 * neighbour_pull(bank.P, t, w))["rolled_back"] for _ in range(cfg.consensus.rollback_after)]
    assert flags == [False] * (cfg.consensus.rollback_after - 1) + [True]
    assert eng.rollbacks == 1 and torch.equal(bank.P, stable)


def test_engine_with_quadratic_objective_reaches_fixed_point():
    cfg, t, bank, _ = _engine(consensus__beta_q=0.1)
    g = torch.Generator().manual_seed(3)
    Y = bank.P + 0.05 * torch.randn(bank.P.shape, generator=g)
    eng = ConsensusEngine(cfg, t, "cpu", objective=QuadraticObjective(Y))
    out = [eng.step(bank) for _ in range(300)]
    I = torch.eye(t.n, dtype=torch.float64)
    P_star = torch.linalg.solve(cfg.consensus.alpha * (I - t.to_dense(eng.weights(bank.alive)).double()) + 0.1 * I, 0.1 * Y.double())
    assert eng.rollbacks == 0 and out[-1]["converged"]
    assert float((bank.P.double() - P_star).norm() / P_star.norm()) < 1e-4


def test_engine_literal_rule_rolls_back_from_fresh_start():
    cfg, t, bank, _ = _engine()
    eng = ConsensusEngine(cfg, t, "cpu", rollback_rule="settle")
    for _ in range(cfg.consensus.rollback_after): eng.step(bank)
    assert eng.rollbacks == 1


def test_engine_refuses_nan_and_gates():
    cfg, t, bank, eng = _engine(consensus__beta_q=1.0)
    eng.step(bank)
    before = bank.P.clone()
    G = torch.zeros_like(bank.P); G[0, 0] = float("inf")
    r = eng.step(bank, grad_q=G)
    assert r["rejected"] and eng.rejected == 1 and torch.equal(bank.P, before)
    eng.set_resource(0.99)
    assert eng.step(bank)["gate"] == "resource" and torch.equal(bank.P, before)
    eng.set_resource(0.1)
    eng.record_outcomes([0] * 50)
    stable = eng.stable
    r = eng.step(bank)
    assert r["gate"] == "effectiveness" and eng.stable is stable


def test_engine_dead_agents_frozen_and_exchanges():
    cfg, t, bank, eng = _engine()
    bank.remove_agents(torch.tensor([2, 3]))
    frozen = bank.P[[2, 3]].clone()
    for _ in range(3): eng.step(bank)
    assert torch.equal(bank.P[[2, 3]], frozen)
    nb = t.neighbors(0)
    assert eng.record_exchanges(torch.tensor([0, 0]), nb[:2], torch.tensor([0.0, 1.0])) == 0
    w = eng.weights(); row = w[int(t.indptr[0]):int(t.indptr[1])]
    assert row[0] < row[1] and abs(float(row.sum()) - 1) < 1e-5


def test_engine_adopts_in_place_edit_as_stable():
    cfg, t, bank, eng = _engine(consensus__beta_q=1.0)
    for _ in range(3): eng.step(bank)
    assert eng.stable is bank.P                     # the last converging iteration's P is kept by reference
    bank.P[0] = bank.P[1]                           # e.g. a failure-recovery path copying a state in place
    edited = bank.P.clone()
    w = eng.weights(bank.alive)
    for _ in range(cfg.consensus.rollback_after): eng.step(bank, grad_q=-2 * neighbour_pull(bank.P, t, w))
    assert eng.stable_edits == 1 and eng.rollbacks == 1 and torch.equal(bank.P, edited)
    eng.stable.add_(1.0)                            # editing the saved stable tensor itself is refused at rollback
    with pytest.raises(RuntimeError, match="stable"):
        for _ in range(2 * cfg.consensus.rollback_after): eng.step(bank, grad_q=-2 * neighbour_pull(bank.P, t, w))


# ---- the convergence statements of §3.5 that should hold (rapo_nb.convergence) ----

@settings(max_examples=40, deadline=None)
@given(kind=kinds, n=st.integers(3, 40), seed=seeds, alpha=st.floats(0.01, 1.0), uniform=st.booleans())
def test_pi_weighted_lyapunov_never_rises(kind, n, seed, alpha, uniform):
    t = make_topology(kind, n, degree=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    E = torch.ones(t.n_edges, dtype=torch.float64) if uniform else torch.rand(t.n_edges, generator=g, dtype=torch.float64) ** 3 + 0.01
    w = adaptive_weights(t, E)
    sim = simulate_consensus(t, w, torch.randn(n, 2, generator=g, dtype=torch.float64), [alpha], 40)
    V = sim["V_pi"][:, 0]
    assert (np.diff(V) <= 1e-12 * V[0]).all()


@settings(max_examples=15, deadline=None)
@given(kind=kinds, n=st.integers(3, 30), seed=seeds)
def test_limit_is_pi_weighted_mean_and_paper_step_converges(kind, n, seed):
    t = make_topology(kind, n, degree=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    w = adaptive_weights(t, torch.rand(t.n_edges, generator=g, dtype=torch.float64) + 0.1)
    L = lipschitz_estimate(t, w, iters=3000, tol=1e-9)
    dense_L = np.linalg.norm(np.eye(n) - t.to_dense(w).numpy(), 2)
    assert L <= dense_L * (1 + 1e-9) and L >= dense_L * (1 - 1e-3)
    P0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    sim = simulate_consensus(t, w, P0, [0.99 / (2 * L)], 400)
    assert sim["V_euclid"][-1, 0] < sim["V_euclid"][0, 0]
    pi = stationary_distribution(t, w)
    M = 0.5 * (torch.eye(n, dtype=torch.float64) + t.to_dense(w))
    X = torch.linalg.matrix_power(M, 4096) @ P0
    torch.testing.assert_close(X, (pi @ P0).expand(n, 2), atol=1e-6, rtol=0)


def test_paper_bound_is_conservative_against_exact_boundary():
    t = make_topology("star", 20)
    w = adaptive_weights(t, torch.ones(t.n_edges, dtype=torch.float64))
    mu = dense_spectrum(t, w)
    L = lipschitz_estimate(t, w, iters=3000, tol=1e-9)
    assert abs(mu[-1] - 2.0) < 1e-9 and 2 / mu[-1] > 4 / (2 * L)
    alphas = [0.9 * 2 / mu[-1], 1.1 * 2 / mu[-1]]
    sim = simulate_consensus(t, w, torch.randn(20, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64), alphas, 300)
    assert sim["V_euclid"][-1, 0] < 1e-6 * sim["V_euclid"][0, 0] and sim["V_euclid"][-1, 1] > sim["V_euclid"][0, 1]


def test_iterations_to_eps_helpers():
    V = np.array([1.0, 0.5, 0.2, 0.05])
    assert iterations_to_eps(V, 0.3) == 2 and iterations_to_eps(V, 0.01) == -1
    mu = np.array([0.0, 0.1, 1.0])
    assert abs(geometric_prediction(mu, 0.5, 1e-4) - np.log(1e-4) / (2 * np.log(0.95))) < 1e-9
    assert geometric_prediction(mu, 3.0, 1e-4) == np.inf


def test_csr_from_edges_dedups():
    t = csr_from_edges(np.array([0, 0, 1, 2, 2]), np.array([1, 1, 0, 2, 0]), 3)
    assert t.n_edges == 4 and t.neighbors(0).tolist() == [1, 2]


def test_tiny_pools_work():
    for n in (1, 2):
        for kind in TOPOLOGIES:
            t = make_topology(kind, n, degree=max(0, min(8, n - 1)))
            bank = StateBank.create(n, CFG, device="cpu"); eng = ConsensusEngine(CFG, t, "cpu")
            out = [eng.step(bank) for _ in range(3)]
            assert torch.isfinite(bank.P).all() and eng.rollbacks == 0
            if n == 1: assert t.n_edges == 0 and out[-1]["converged"]


def test_reuse_buffers_gives_identical_trajectory():
    cfg = load_config("quick", device="cpu", consensus__beta_q=1.0)
    t = make_topology("small_world", 50, degree=6, seed=2)
    runs = []
    for reuse in (False, True):
        bank = StateBank.create(50, cfg, device="cpu", seed=1); eng = ConsensusEngine(cfg, t, "cpu", reuse_buffers=reuse)
        traj = []
        for k in range(40):
            G = -2 * neighbour_pull(bank.P, t, eng.weights(bank.alive)) if 10 <= k < 22 else None
            out = eng.step(bank, grad_q=G); traj.append((bank.P.clone(), out["rolled_back"]))
        runs.append((traj, eng.rollbacks))
    assert runs[0][1] == runs[1][1] >= 1
    for (Pa, ra), (Pb, rb) in zip(runs[0][0], runs[1][0]):
        assert ra == rb and torch.allclose(Pa, Pb, atol=1e-6, rtol=0)


def test_engine_weights_follow_alive_edits_without_a_stale_cache():
    "The O(1) cache hit for the same unedited alive tensor must not hide in-place edits or a different tensor's values."
    t = make_topology("ring", 12, degree=4, seed=0)
    eng = ConsensusEngine(CFG, t, "cpu")
    alive = torch.ones(12, dtype=torch.bool)
    w0 = eng.weights(alive)
    assert eng.weights(alive) is w0 and eng.weights(alive.clone()) is w0     # same values: cached
    alive[3] = False                                                           # in-place edit of the same tensor
    w1 = eng.weights(alive)
    dead = (t.rows == 3) | (t.indices == 3)
    assert w1 is not w0 and bool((w1[dead] == 0).all()) and bool((w1[~dead] > 0).all())
    other = torch.ones(12, dtype=torch.bool); other[5] = False                # a different tensor, different values
    w2 = eng.weights(other)
    dead5 = (t.rows == 5) | (t.indices == 5)
    assert bool((w2[dead5] == 0).all()) and bool((w2[dead & ~dead5] > 0).all())
    assert eng.weights(torch.ones(12, dtype=torch.bool)) is not w2            # back to all alive: recomputed


@settings(max_examples=50, deadline=None)
@given(kind=kinds, n=sizes, seed=seeds, p=st.integers(1, 40), dead=st.floats(0.0, 0.5))
def test_reference_pull_is_the_edge_sum(kind, n, seed, p, dead):
    "`neighbour_pull` (W·P − r⊙P by torch's CSR product) equals Σ_j w_ij (P_j − P_i) summed edge by edge, in float64."
    t = make_topology(kind, n, degree=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    E = torch.rand(t.n_edges, generator=g) * (torch.rand(t.n_edges, generator=g) >= dead)
    w = adaptive_weights(t, E, empty="zero").double()
    P = torch.randn(n, p, generator=g, dtype=torch.float64)
    by_edge = torch.zeros_like(P).index_add_(0, t.rows, w[:, None] * (P[t.indices] - P[t.rows]))
    torch.testing.assert_close(neighbour_pull(P, t, w), by_edge, atol=1e-12, rtol=1e-12)
    assert math.isclose(consensus_residual(P, t, w), float(by_edge.norm()), rel_tol=1e-10, abs_tol=1e-12)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), seed=seeds, alpha=st.floats(0.0, 5.0), beta=st.floats(0.0, 2.0), scope=st.sampled_from(["global", "agent"]))
def test_step_result_norms(n, seed, alpha, beta, scope):
    "The norms `consensus_step` returns are those of the pull, P, the unconstrained update and the step taken."
    t = make_topology("small_world", n, degree=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    w = adaptive_weights(t, torch.rand(t.n_edges, generator=g)).double()
    P, G = torch.randn(n, 5, generator=g, dtype=torch.float64), 10 * torch.randn(n, 5, generator=g, dtype=torch.float64)
    s = consensus_step(P, t, w, alpha, grad_q=G, beta=beta, trust_region=0.1, grad_clip=5.0, trust_scope=scope)
    pull = neighbour_pull(P, t, w)
    assert math.isclose(s.residual, float(pull.norm()), rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(s.norm_P, float(P.norm()), rel_tol=1e-12)
    assert math.isclose(s.update_norm, float((alpha * pull + beta * clip_rows(G, 5.0)).norm()), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(s.change, float((s.P - P).norm()), rel_tol=1e-9, abs_tol=1e-12)
    assert s.change <= s.update_norm * (1 + 1e-12) + 1e-15


def test_engine_computes_eq4_only_through_its_kernel():
    "A kernel that perturbs the step shows in the trajectory (the engine has no second copy of eq. 4); strings are refused."
    t = make_topology("small_world", 40, degree=6, seed=0)
    calls = []
    def nudged(*args, **kw):
        calls.append(1); s = consensus_step(*args, **kw)
        return s._replace(P=s.P + 1e-3)
    runs = []
    for kernel in (consensus_step, nudged):
        bank = StateBank.create(40, CFG, device="cpu", seed=0); eng = ConsensusEngine(CFG, t, "cpu", kernel=kernel)
        for _ in range(3): eng.step(bank)
        runs.append(bank.P.clone())
    assert len(calls) == 3 and float((runs[1] - runs[0]).mean()) > 2e-3   # three nudges of 1e-3 reached bank.P
    with pytest.raises(ValueError, match="kernel"):
        ConsensusEngine(CFG, t, "cpu", kernel="numba")


def test_consensus_imports_no_kernel_machinery():
    "The paper's consensus module stands alone: no numba, no llvmlite, no fast paths."
    import rapo_nb.consensus as cs
    src = open(cs.__file__).read()
    assert "numba" not in src and "llvmlite" not in src and "fastpaths" not in src.replace("rapo_nb.fastpaths.fast_step", "")
