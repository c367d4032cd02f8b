"""Tests of rapo_nb.fastpaths: the numba kernels equal the plain-torch reference of rapo_nb.consensus within
`rounding_bound` ((deg_i + 4) ulps of each entry's scale: two correct evaluations of a sum of deg_i + 1 products in
different orders; see the fast paths notebook), and kernel variants doing the same arithmetic in the same order
(register blocks vs the plain loop, streaming vs ordinary stores, one thread vs several) are equal bit for bit.
Property tests (hypothesis) run over random graphs, sizes, widths, dtypes, step sizes and seeds."""
import math
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from rapo_nb.config import load_config
from rapo_nb.consensus import TOPOLOGIES, ConsensusEngine, adaptive_weights, consensus_step, make_topology, neighbour_pull
from rapo_nb.state import StateBank
import rapo_nb.fastpaths as fp
from rapo_nb.fastpaths import (STEP_KERNELS, engine_step_us, fast_step, fused_pull, fused_step, rounding_bound,
                               tick_benchmark)

CFG = load_config("quick", device="cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
kinds = st.sampled_from(TOPOLOGIES)
sizes = st.integers(2, 60)
seeds = st.integers(0, 10_000)


def _weighted_case(kind, n, seed, p, double, dead=0.0):
    "A seeded topology with random eq. 5 weights (a share `dead` of edges at 0) and a random P [n, p]."
    t = make_topology(kind, n, degree=4, seed=seed)
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    E = torch.rand(t.n_edges, generator=g) * (torch.rand(t.n_edges, generator=g) >= dead)
    w = adaptive_weights(t, E, empty="zero").to(dtype)
    return t, w, torch.randn(n, p, generator=g, dtype=dtype), dtype


def _within(a, b, bound) -> bool:
    return bool(((a.double() - b.double()).abs() <= bound).all())


@settings(max_examples=60, deadline=None)
@given(kind=kinds, n=sizes, seed=seeds, p=st.integers(1, 300), double=st.booleans(), dead=st.floats(0.0, 0.5))
def test_numba_pull_equals_torch_reference(kind, n, seed, p, double, dead):
    "Widths up to 300 cross the kernel's register blocks (128 float32 / 64 float64 on AVX-512) and their tails."
    t, w, P, dtype = _weighted_case(kind, n, seed, p, double, dead)
    a, na, pa = fused_pull(P, t, w, kernel="numba")
    ref = neighbour_pull(P, t, w)
    assert _within(a, ref, rounding_bound(P, t, w))
    rel = 1e-12 if double else 1e-5      # norms: summed in float64 by the kernel, in P's dtype by torch
    assert math.isclose(na, float(ref.double().norm()), rel_tol=rel, abs_tol=1e-6)
    assert math.isclose(pa, float(P.double().norm()), rel_tol=rel, abs_tol=1e-6)


@settings(max_examples=60, deadline=None)
@given(kind=kinds, n=sizes, seed=seeds, p=st.integers(1, 300), double=st.booleans(), alpha=st.floats(0.0, 2.0),
       dead=st.floats(0.0, 0.5))
def test_fast_step_equals_consensus_step_without_trust_region(kind, n, seed, p, double, alpha, dead):
    "The one-pass step (finished in registers, in P's dtype) is the reference step to rounding, norms included."
    t, w, P, dtype = _weighted_case(kind, n, seed, p, double, dead)
    a, b = fast_step(P, t, w, alpha, trust_region=None), consensus_step(P, t, w, alpha, trust_region=None)
    assert _within(a.P, b.P, rounding_bound(P, t, w, alpha))
    rel = 1e-12 if double else 1e-5
    for x, y in zip(a[1:], b[1:]):
        assert math.isclose(x, y, rel_tol=rel, abs_tol=1e-6)


@settings(max_examples=40, deadline=None)
@given(kind=kinds, n=sizes, seed=seeds, p=st.integers(1, 200), double=st.booleans(), alpha=st.floats(0.5, 20.0))
def test_fast_step_holds_the_trust_region_like_the_reference(kind, n, seed, p, double, alpha):
    "Where the region binds, α is rescaled by a ratio of norms: the bound gains (n·p + 2) ulps of the step's length."
    t, w, P, dtype = _weighted_case(kind, n, seed, p, double)
    a, b = fast_step(P, t, w, alpha, trust_region=0.1), consensus_step(P, t, w, alpha, trust_region=0.1)
    step = (b.P - P).double().abs()
    bound = rounding_bound(P, t, w, alpha) + (n * p + 2) * torch.finfo(dtype).eps * step
    assert _within(a.P, b.P, bound)
    assert a.change <= 0.1 * a.norm_P * (1 + 1e-6) + 1e-12 and b.change <= 0.1 * b.norm_P * (1 + 1e-5) + 1e-12


def test_fast_step_hands_uncovered_cases_to_the_reference():
    t, w, P, _ = _weighted_case("small_world", 50, 1, 16, False)
    G = torch.randn(50, 16)
    for kw in (dict(grad_q=G, beta=0.5), dict(trust_scope="agent")):
        assert torch.equal(fast_step(P, t, w, 0.3, **kw).P, consensus_step(P, t, w, 0.3, **kw).P)
    Pg = P.clone().requires_grad_()
    assert torch.equal(fast_step(Pg, t, w, 0.3).P, consensus_step(Pg, t, w, 0.3).P)
    assert torch.equal(fast_step(P.double(), t, w.double(), 0.3, trust_scope="agent").P,
                       consensus_step(P.double(), t, w.double(), 0.3, trust_scope="agent").P)
    with pytest.raises(ValueError, match="alpha"):
        fast_step(P, t, w, -1.0)
    with pytest.raises(ValueError, match="P"):
        fast_step(P[:3], t, w, 0.1)


@settings(max_examples=40, deadline=None)
@given(kind=kinds, n=sizes, seed=seeds, p=st.integers(1, 300), double=st.booleans())
def test_register_block_kernel_is_bitwise_the_plain_kernel(kind, n, seed, p, double):
    "The register-blocked, prefetching `_pull_rows` does the plain kernel's arithmetic in the same order: equal bit for bit."
    t, w, P, dtype = _weighted_case(kind, n, seed, p, double)
    results = []
    for kern in (fp._pull_rows, fp._pull_rows_plain):
        out, a, b = torch.empty_like(P), np.empty(n), np.empty(n)
        kern(t.indptr.numpy(), t.indices.numpy(), w.numpy(), P.numpy(), out.numpy(), a, b, 0, n)
        results.append((out, a, b))
    assert torch.equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1]) and np.array_equal(results[0][2], results[1][2])


@settings(max_examples=30, deadline=None)
@given(kind=kinds, n=sizes, seed=seeds, p=st.sampled_from([16, 32, 128, 256, 272, 512]), double=st.booleans(),
       alpha=st.floats(-2.0, 2.0))
def test_streaming_stores_change_no_bit(kind, n, seed, p, double, alpha):
    "`_step_rows` with streaming (non-temporal) stores writes the same bits and norms as with ordinary stores (rows 64-byte aligned)."
    t, w, P, dtype = _weighted_case(kind, n, seed, p, double)
    results = []
    for stream in (False, True):
        out = torch.empty_like(P); sums = [np.empty(n) for _ in range(3)]
        assert out.data_ptr() % 64 == 0 and (p * out.element_size()) % 64 == 0
        fp._step_rows(t.indptr.numpy(), t.indices.numpy(), w.numpy(), P.numpy(), float(alpha), out.numpy(), *sums, stream, 0, n)
        results.append((out, sums))
    assert torch.equal(results[0][0], results[1][0])
    assert all(np.array_equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    flat = np.empty(P.numel() + 1, dtype=P.numpy().dtype); out = flat[1:].reshape(P.shape)   # rows off the 64-byte grid:
    sums = [np.empty(n) for _ in range(3)]                                                       # the kernel must not stream
    fp._step_rows(t.indptr.numpy(), t.indices.numpy(), w.numpy(), P.numpy(), float(alpha), out, *sums, True, 0, n)
    assert out.ctypes.data % 64 != 0 and np.array_equal(out, results[0][0].numpy())


def test_fused_step_streams_large_outputs_and_falls_back_safely(monkeypatch):
    "With the streaming threshold at 0, fused_step asks to stream into any buffer; into a misaligned one the kernel falls back: same result, no fault."
    t, w, P, dtype = _weighted_case("small_world", 50, 3, 64, False)
    ref = fp.fused_step(P, t, w, 0.4)
    calls = []
    real = fp._run_rows
    monkeypatch.setattr(fp, "_run_rows", lambda kernel, n, size, *args: (calls.append(args[-1]), real(kernel, n, size, *args)))
    fp.fused_step(P, t, w, 0.4)
    monkeypatch.setattr(fp, "PULL_STREAM_MIN", 0)
    aligned = fp.fused_step(P, t, w, 0.4, out=torch.empty_like(P))
    flat = torch.empty(P.numel() + 1); misaligned = flat[1:].view(P.shape)   # contiguous, but 4 bytes off a 64-byte line
    assert misaligned.is_contiguous() and misaligned.data_ptr() % 64 != 0
    shifted = fp.fused_step(P, t, w, 0.4, out=misaligned)
    assert calls == [False, True, True]            # small output: no streaming; threshold 0: asked for both buffers
    for got in (aligned, shifted):
        assert torch.equal(got[0], ref[0]) and got[1:] == ref[1:]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_row_kernels_split_over_threads_give_the_same_bits(monkeypatch, threads):
    monkeypatch.setattr(fp, "PULL_PARALLEL_MIN", 0)          # split even a small bank
    old = torch.get_num_threads(); torch.set_num_threads(threads)
    try:
        t = make_topology("small_world", 101, degree=6, seed=1)
        g = torch.Generator().manual_seed(1)
        w = adaptive_weights(t, torch.rand(t.n_edges, generator=g))
        P = torch.randn(101, 300, generator=g)                 # two full register blocks and a tail
        new, res, normP, norm_new = fp.fused_step(P, t, w, 0.3, kernel="numba")
        pull = fp.fused_pull(P, t, w, kernel="numba")[0]
        single = torch.get_num_threads(); torch.set_num_threads(1)
        try:
            new1, res1, normP1, norm_new1 = fp.fused_step(P, t, w, 0.3, kernel="numba")
            pull1 = fp.fused_pull(P, t, w, kernel="numba")[0]
        finally: torch.set_num_threads(single)
        assert torch.equal(new, new1) and torch.equal(pull, pull1)
        assert math.isclose(res, res1, rel_tol=1e-12) and math.isclose(norm_new, norm_new1, rel_tol=1e-12)
        assert _within(new, consensus_step(P, t, w, 0.3, trust_region=None).P, rounding_bound(P, t, w, 0.3))
        out = torch.empty_like(P); assert fp.fused_step(P, t, w, 0.3, out=out)[0] is out
        with pytest.raises(ValueError, match="alpha"):
            fp.fused_step(P, t, w, float("nan"))
        with pytest.raises(ValueError, match="kernel"):
            fp.fused_step(P, t, w, 0.1, kernel="fast")
        with pytest.raises(ValueError, match="out"):
            fp.fused_step(P, t, w, 0.1, out=P)
    finally:
        torch.set_num_threads(old)


def test_rounding_bound_is_not_vacuous():
    "The tolerance is tight enough to catch a one-ulp-per-entry-scale error in the neighbour weights' use."
    t, w, P, dtype = _weighted_case("small_world", 60, 5, 64, False)
    b = rounding_bound(P, t, w, 0.3)
    assert float(b.max()) < 1e-4 * float(P.abs().max())                       # tens of ulps, not a loose atol
    wrong = consensus_step(P, t, w * (1 + 1e-3), 0.3, trust_region=None).P     # weights off by 0.1 %
    assert not _within(wrong, consensus_step(P, t, w, 0.3, trust_region=None).P, b)


def test_engine_trajectories_agree_across_kernels():
    topo = make_topology("small_world", 300, degree=8, seed=3)
    runs = {}
    for name, kernel in STEP_KERNELS.items():
        bank = StateBank.create(300, CFG, seed=3)
        eng = ConsensusEngine(CFG, topo, "cpu", kernel=kernel, reuse_buffers=True)
        infos = [eng.step(bank) for _ in range(25)]
        runs[name] = (bank.P.clone(), [i["converged"] for i in infos], eng.rollbacks)
    torch.testing.assert_close(runs["numba"][0], runs["torch"][0], atol=1e-5, rtol=1e-4)
    assert runs["numba"][1:] == runs["torch"][1:]


def test_engine_refuses_nan_with_the_fast_kernel():
    topo = make_topology("ring", 50, degree=4, seed=0)
    bank = StateBank.create(50, CFG, seed=0)
    eng = ConsensusEngine(CFG, topo, "cpu", kernel=fast_step)
    eng.step(bank); good = bank.P.clone()
    bad = bank.P.clone(); bad[7, 3] = float("nan"); bank.P = bad
    info = eng.step(bank)
    assert info["rejected"] and eng.rejected == 1 and bank.P is bad


def test_tick_benchmark_runs_tiny():
    df = tick_benchmark((50,), degree=4, repeats=2, device="cpu", profile="quick", threads=1, kernels=("numba", "torch"))
    assert list(df.n_agents) == [50, 50] and list(df.kernel) == ["numba", "torch"] and (df.tick_ms > 0).all()
    assert (df.bytes_per_agent_total > df.bytes_per_agent_state).all() and (df.copy_P_ms > 0).all() and (df.clone_P_ms > 0).all()
    assert np.allclose(df.ratio_to_copy, df.tick_ms / df.copy_P_ms)
    with pytest.raises(ValueError, match="kernels"):
        tick_benchmark((50,), kernels=("fast",))


def test_engine_step_us_table():
    df = engine_step_us((16, 50), repeats=3)
    assert list(df.n_agents) == [16, 50] and (df[["torch_us", "numba_us"]] > 0).all(axis=None)
    assert np.allclose(df.numba_over_torch, df.numba_us / df.torch_us)


def test_bench_tick_script_prints_targets_and_verdicts():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tick.py"
    spec = importlib.util.spec_from_file_location("bench_tick", path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    df = mod.bench_tick(sizes=(40, 1000), degree=4, repeats=1, threads=1)
    assert sorted(set(df.kernel)) == ["numba", "torch"] and len(df) == 4
    small, big = df[df.n_agents == 40], df[df.n_agents == 1000]
    assert small.meets_target.isna().all() and small.target_ms.isna().all()
    assert (big.target_ms == 2.0).all() and list(big.meets_target) == list(big.tick_ms <= 2.0)
    assert df.meets_copy_target.isna().all() and df.huge_pages.str.contains('torch THP alloc').all()   # the ratio target is for 100,000 agents
