"""Tests of rapo_nb.state: encoder, PCA init, context module, StateBank (EMA, snapshot, membership, eq. 1, refusal)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from rapo_nb.config import load_config, SPECIALISTS
from rapo_nb.state import (HashedTextEncoder, NonFiniteUpdate, SlidingWindowContext, StateBank, cosine_rows,
                           encode_histories, importance_weights, init_prompts, role_prompt_vectors, sequential_ema,
                           sequential_ema_,
                           text_cosine)

CFG = load_config("quick", device="cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_encoder_shapes_and_norms():
    enc = HashedTextEncoder.from_config(CFG)
    E = enc.encode(["hello world", "", "x y z"])
    assert E.shape == (3, CFG.state.encoder_dim) and E.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(E, axis=1), [1.0, 0.0, 1.0], atol=1e-5)


def test_encoder_similarity_orders_related_above_unrelated():
    enc = HashedTextEncoder(512, 3)
    a = "the agent retrieves facts about the entity Alice and her employer"
    related = "facts about the entity Alice and her employer were retrieved"
    unrelated = "compose a haiku on autumn leaves"
    assert text_cosine(a, related, enc) > 0.4 > text_cosine(a, unrelated, enc)


def test_encoder_is_deterministic_and_seeded():
    t = ["deterministic across processes"]
    np.testing.assert_array_equal(HashedTextEncoder(128, 5).encode(t), HashedTextEncoder(128, 5).encode(t))
    assert not np.allclose(HashedTextEncoder(128, 5).encode(t), HashedTextEncoder(128, 6).encode(t))


def test_encoder_rejects_bad_input():
    with pytest.raises(ValueError, match="texts"): HashedTextEncoder(64).encode("single")
    with pytest.raises(ValueError, match="dim"): HashedTextEncoder(0)
    with pytest.raises(ValueError, match="texts"): HashedTextEncoder(64).encode([1, 2])


def test_cosine_rows():
    A = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]); B = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(cosine_rows(A, B), [1.0, -1.0, 0.0], atol=1e-12)


def test_role_vectors_distinct_and_padded():
    enc = HashedTextEncoder.from_config(CFG)
    R = role_prompt_vectors(CFG.state.prompt_dim, enc)
    assert R.shape == (len(SPECIALISTS), CFG.state.prompt_dim)
    n_templates = 24
    assert np.all(R[:, n_templates:] == 0)
    C = cosine_rows(np.repeat(R, len(R), 0), np.tile(R, (len(R), 1))).reshape(len(R), len(R))
    assert np.all(C[~np.eye(len(R), dtype=bool)] < 0.99)


def test_init_prompts_closest_to_own_role():
    roles = torch.arange(20) % len(SPECIALISTS)
    P = init_prompts(roles, CFG, seed=3)
    R = torch.from_numpy(role_prompt_vectors(CFG.state.prompt_dim, HashedTextEncoder.from_config(CFG)))
    sim = torch.nn.functional.normalize(P, dim=1) @ torch.nn.functional.normalize(R, dim=1).T
    assert torch.equal(sim.argmax(1), roles)


def test_context_window_ignores_old_turns():
    ctx = SlidingWindowContext(16, 24, window=3, attn_dim=8, seed=0)
    turns = torch.randn(2, 6, 16); lengths = torch.tensor([6, 2])
    with torch.no_grad():
        base = ctx(turns, lengths)
        t2 = turns.clone(); t2[0, :3] = 0.0; t2[1, 2:] = 5.0      # outside the window / beyond the valid length
        torch.testing.assert_close(ctx(t2, lengths), base)
    assert base.shape == (2, 24)
    with pytest.raises(ValueError, match="lengths"): ctx(turns, torch.tensor([7, 1]))


def test_encode_histories_prunes():
    enc = HashedTextEncoder(32, 0)
    turns, lengths = encode_histories([[f"t{i}" for i in range(30)], []], enc, 20)
    assert turns.shape == (2, 20, 32) and lengths.tolist() == [20, 0]
    np.testing.assert_allclose(turns[0, 0].numpy(), enc.encode(["t10"])[0])


@settings(max_examples=40, deadline=None)
@given(n_cells=st.integers(1, 5), updates=st.lists(st.tuples(st.integers(0, 4), st.floats(0, 1)), min_size=0, max_size=30),
       rate=st.floats(0.01, 0.99))
def test_sequential_ema_matches_loop(n_cells, updates, rate):
    vals = torch.linspace(0, 1, 5)
    keys = torch.tensor([k for k, _ in updates], dtype=torch.long); ups = torch.tensor([u for _, u in updates], dtype=torch.float32)
    ref = vals.double().clone()
    for k, u in updates: ref[k] = (1 - rate) * ref[k] + rate * u
    torch.testing.assert_close(sequential_ema(vals, keys, ups, rate).double(), ref, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(n_cells=st.integers(1, 300), n_updates=st.integers(0, 600), rate=st.floats(0.01, 0.99), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_sequential_ema_inplace_is_the_float64_loop_rounded_once(n_cells, n_updates, rate, seed, dtype):
    "The CPU kernel: every touched cell equals the one-by-one float64 loop rounded once, bit for bit; other cells and the functional form's input are untouched."
    g = torch.Generator().manual_seed(seed)
    vals = torch.rand(n_cells, generator=g, dtype=torch.float64).to(dtype)
    keys = torch.randint(0, n_cells, (n_updates,), generator=g); ups = torch.rand(n_updates, generator=g)
    ref = vals.double().clone()
    for k, u in zip(keys.tolist(), ups.tolist()): ref[k] = (1 - rate) * ref[k] + rate * u
    before = vals.clone()
    assert torch.equal(sequential_ema(vals, keys, ups, rate), ref.to(dtype)) and torch.equal(vals, before)
    buf = vals.clone(); assert sequential_ema_(buf, keys, ups, rate) is buf and torch.equal(buf, ref.to(dtype))
    untouched = torch.ones(n_cells, dtype=torch.bool); untouched[keys] = False
    assert torch.equal(buf[untouched], before[untouched])


def test_sequential_ema_inplace_refuses_bad_input():
    with pytest.raises(ValueError, match="keys"): sequential_ema_(torch.zeros(3), torch.tensor([3]), torch.tensor([1.0]), 0.1)
    with pytest.raises(ValueError, match="keys"): sequential_ema_(torch.zeros(3), torch.tensor([-1]), torch.tensor([1.0]), 0.1)
    with pytest.raises(ValueError, match="keys"): sequential_ema_(torch.zeros(3), torch.tensor([0.0]), torch.tensor([1.0]), 0.1)
    with pytest.raises(ValueError, match="values"): sequential_ema_(torch.zeros(3, 2), torch.tensor([0]), torch.tensor([1.0]), 0.1)
    with pytest.raises(ValueError, match="keys/updates"): sequential_ema_(torch.zeros(3), torch.tensor([0, 1]), torch.tensor([1.0]), 0.1)


def test_update_capability_in_place_leaves_snapshots_alone():
    bank = StateBank.create(6, CFG, device="cpu")
    M, snap = bank.M, bank.snapshot()
    bank.update_capability(torch.tensor([2, 2]), torch.tensor([1, 1]), torch.tensor([0, 0]), torch.tensor([1.0, 0.0]))
    assert bank.M is M                                                   # written in place, not replaced
    assert torch.equal(snap["M"], torch.full_like(snap["M"], 0.5))      # the snapshot kept the old values
    want = 0.9 * (0.9 * 0.5 + 0.1 * 1.0) + 0.1 * 0.0
    assert float(bank.M[2, 1, 0]) == pytest.approx(want) and int((bank.M != snap["M"]).sum()) == 1


def test_bank_create_and_nbytes():
    bank = StateBank.create(10, CFG, device="cpu")
    s = CFG.state
    assert bank.P.shape == (10, s.prompt_dim) and bank.C.shape == (10, s.context_dim) and bank.M.shape == (10, s.n_tasks, s.n_modalities)
    assert bank.nbytes() == 10 * (4 * (s.prompt_dim + s.context_dim + s.n_tasks * s.n_modalities) + 3 * 4 + 1 + 8)
    half = StateBank.create(10, load_config("quick", device="cpu", state__fp16_capability=True), device="cpu")
    assert half.M.dtype == torch.float16 and half.nbytes() < bank.nbytes()


def test_update_capability_matches_loop_fp16():
    cfg = load_config("quick", device="cpu", state__fp16_capability=True)
    bank = StateBank.create(5, cfg, device="cpu")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (50,), generator=g); t = torch.randint(0, 10, (50,), generator=g)
    m = torch.randint(0, 5, (50,), generator=g); o = (torch.rand(50, generator=g) > 0.5).float()
    M = bank.M.double().clone()
    for ai, ti, mi, oi in zip(a.tolist(), t.tolist(), m.tolist(), o.tolist()): M[ai, ti, mi] = 0.9 * M[ai, ti, mi] + 0.1 * oi
    bank.update_capability(a, t, m, o)
    torch.testing.assert_close(bank.M.double(), M, atol=2e-3, rtol=0)


def test_nan_refused_and_bank_unchanged():
    bank = StateBank.create(4, CFG, device="cpu")
    snap = bank.snapshot()
    with pytest.raises(NonFiniteUpdate, match="outcome"):
        bank.update_capability(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([float("nan")]))
    with pytest.raises(NonFiniteUpdate, match="C"):
        bank.set_rows("C", torch.tensor([1]), torch.full((1, CFG.state.context_dim), float("inf")))
    assert bank.rejected_updates == 2
    for k in ("P", "C", "M", "capability_score"): assert torch.equal(getattr(bank, k), snap[k])


def test_snapshot_restore_and_membership():
    bank = StateBank.create(6, CFG, device="cpu")
    snap = bank.snapshot()
    bank.update_capability(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]))
    ids = bank.add_agents(2)
    assert ids.tolist() == [6, 7] and bank.n == 8
    bank.remove_agents(torch.tensor([1]))
    assert bank.n_alive == 7 and float(bank.omega[1]) == 0.0
    bank.validate()
    bank.restore(snap)
    assert bank.n == 6 and torch.equal(bank.M, snap["M"]) and bank.n_alive == 6
    with pytest.raises(ValueError, match="P"):
        bank.restore({**snap, "P": torch.zeros(6, 3)})


def test_global_state_is_weighted_sum():
    bank = StateBank.create(8, CFG, device="cpu")
    u = torch.tensor([0.0, 0.2, 0.4, 0.0, 0.1, 0.1, 0.1, 0.1])
    bank.set_utilisation(u)
    w = u / u.sum()
    phi = bank.global_state()
    torch.testing.assert_close(phi["P"], (w[:, None] * bank.P).sum(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(phi["M"], (w[:, None, None] * bank.M).sum(0), atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(u=st.lists(st.floats(0, 1), min_size=1, max_size=20), seed=st.integers(0, 1000))
def test_importance_weights_sum_to_one(u, seed):
    u = torch.tensor(u)
    alive = torch.rand(len(u), generator=torch.Generator().manual_seed(seed)) > 0.3
    w = importance_weights(u, alive)
    assert (w >= 0).all() and (w[~alive] == 0).all()
    if alive.any(): assert abs(float(w.sum()) - 1) < 1e-5
    else: assert float(w.sum()) == 0.0


def test_bad_input_names_field():
    bank = StateBank.create(3, CFG, device="cpu")
    with pytest.raises(ValueError, match="modality"):
        bank.update_capability(torch.tensor([0]), torch.tensor([0]), torch.tensor([9]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="task"):
        bank.update_capability(torch.tensor([0]), torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="P"):
        bank.set_prompts(torch.zeros(3, 5))
    bank.M = bank.M.clone(); bank.M[0, 0, 0] = 2.0
    with pytest.raises(ValueError, match="M"): bank.validate()


# ---------------------------------------------------------------- lazy agents (§4.5)
_ops = st.lists(st.tuples(st.sampled_from(["set", "release", "add", "remove", "snapshot_restore"]),
                          st.lists(st.integers(0, 10_000), min_size=1, max_size=6)), max_size=12)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 30), ops=_ops, seed=st.integers(0, 1000))
def test_lazy_bank_behaves_like_the_dense_bank(n, ops, seed):
    cfg = load_config("quick", device="cpu")
    lazy_cfg = load_config("quick", device="cpu", state__lazy_agents=True)
    dense, lazy = StateBank.create(n, cfg, seed=seed), StateBank.create(n, lazy_cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for op, raw in ops:
        ids = torch.tensor([r % dense.n for r in raw])
        if op == "set":
            vals = torch.randn(ids.numel(), cfg.state.context_dim, generator=g)
            uniq = torch.unique(ids); vals = vals[:uniq.numel()]   # distinct ids: the row written is well defined
            for b in (dense, lazy): b.set_rows("C", uniq, vals)
        elif op == "release":
            for b in (dense, lazy): b.release_context(ids)
        elif op == "add":
            for b in (dense, lazy): b.add_agents(len(raw))
        elif op == "remove":
            for b in (dense, lazy): b.remove_agents(ids)
        else:
            snaps = [b.snapshot() for b in (dense, lazy)]
            for b in (dense, lazy): b.release_context(torch.arange(b.n))
            for b, s in zip((dense, lazy), snaps): b.restore(s)
        lazy.validate(); dense.validate()
        torch.testing.assert_close(lazy.context(), dense.context())
    torch.testing.assert_close(lazy.global_state()["C"], dense.global_state()["C"])
    nonzero_rows = int((dense.context().abs().sum(1) > 0).sum())
    assert lazy.n_materialised >= nonzero_rows and lazy.C.shape[0] == lazy.n_materialised


def test_lazy_bank_saves_memory_and_rejects_bad_slots():
    cfg = load_config("quick", device="cpu", state__lazy_agents=True)
    bank = StateBank.create(100, cfg)
    dense = StateBank.create(100, load_config("quick", device="cpu"))
    bank.set_rows("C", torch.arange(10), torch.ones(10, cfg.state.context_dim))
    saved = dense.nbytes() - bank.nbytes()
    assert saved == 90 * cfg.state.context_dim * 4 - 100 * 8          # 90 rows of C not held, 8 bytes of c_slot per agent
    bank.c_slot = bank.c_slot.clone(); bank.c_slot[9] = 3                # agents 3 and 9 on one row, row 9 orphaned
    with pytest.raises(ValueError, match="c_slot"):
        bank.validate()
    bank.c_slot = bank.c_slot.int()
    with pytest.raises(ValueError, match="c_slot"):
        bank.validate()
    with pytest.raises(ValueError, match="ids"):
        StateBank.create(5, cfg).release_context(torch.tensor([7]))


@settings(max_examples=60, deadline=None, database=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 9), st.sampled_from(["binary", "float", "mixed"]),
       st.booleans())
def test_update_one_is_bit_equal_to_a_batch_of_one(seed, n, kind, fp16):
    "StateBank.update_one (numpy scalars) == update_capability with a batch of one, outcome after outcome, M and the score."
    cfg = load_config("quick", device="cpu", state__fp16_capability=fp16)
    a_bank = StateBank.create(n, cfg, device="cpu")
    rng = np.random.default_rng(seed)
    if not fp16:
        a_bank.M = torch.as_tensor(rng.random(a_bank.M.shape), dtype=torch.float32)
        a_bank.capability_score = torch.as_tensor(rng.random(n), dtype=torch.float32)
    b_bank = StateBank.create(n, cfg, device="cpu")
    b_bank.M, b_bank.capability_score = a_bank.M.clone(), a_bank.capability_score.clone()
    m, l = a_bank.M.shape[1:]
    for i in range(60):
        a, t, u = int(rng.integers(n)), int(rng.integers(m)), int(rng.integers(l))
        o = float(rng.integers(2)) if kind == "binary" or (kind == "mixed" and i % 2) else float(rng.random())
        a_bank.update_one(a, t, u, o)
        b_bank.update_capability(torch.tensor([a]), torch.tensor([t]), torch.tensor([u]), torch.tensor([o]))
    assert torch.equal(a_bank.M, b_bank.M) and torch.equal(a_bank.capability_score, b_bank.capability_score)


def test_update_one_errors_name_the_field_and_refuse_nan():
    bank = StateBank.create(4, CFG, device="cpu")
    snap = bank.snapshot()
    with pytest.raises(ValueError, match="agent"):
        bank.update_one(4, 0, 0, 1.0)
    with pytest.raises(ValueError, match="task"):
        bank.update_one(0, CFG.state.n_tasks, 0, 1.0)
    with pytest.raises(ValueError, match="outcome"):
        bank.update_one(0, 0, 0, 1.5)
    with pytest.raises(NonFiniteUpdate, match="outcome"):
        bank.update_one(0, 0, 0, float("nan"))
    assert bank.rejected_updates == 1
    for k in ("M", "capability_score"): assert torch.equal(getattr(bank, k), snap[k])


def test_update_one_views_follow_replaced_copied_and_pickled_banks():
    "The cached numpy views never write into a stale array: a replaced M, a deep copy and a pickled bank each get their own."
    import copy, pickle
    bank = StateBank.create(3, CFG, device="cpu")
    bank.update_one(0, 0, 0, 1.0)
    twin = copy.deepcopy(bank)
    twin.update_one(1, 0, 0, 1.0)
    assert float(twin.M[1, 0, 0]) == np.float32(0.55) and float(bank.M[1, 0, 0]) == 0.5   # the copy writes its own M
    bank.M = bank.M.clone()                                                           # replaced: views rebuilt
    bank.update_one(2, 0, 0, 0.0)
    assert float(bank.M[2, 0, 0]) == np.float32(0.45)
    back = pickle.loads(pickle.dumps(bank))
    back.update_one(2, 1, 0, 1.0)
    assert float(back.M[2, 1, 0]) == np.float32(0.55) and float(bank.M[2, 1, 0]) == 0.5
