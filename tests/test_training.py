"""Tests of rapo_nb.training: replay buffer, training step, CPU determinism, checkpoints (round trip, wrong config, corrupt file), the context module's InfoNCE training and its loader."""
import copy

import numpy as np
import pytest
import torch

from rapo_nb.config import load_config
from rapo_nb.state import StateBank
from rapo_nb.state import HashedTextEncoder, SlidingWindowContext
from rapo_nb.synthetic import generate_conversations
from rapo_nb.checkpoints import read_checkpoint
from rapo_nb.training import (CheckpointError, torch_threads, PHASES, ReplayBuffer, TransitionModel, baseline_errors,
                              collect_transitions, feature_layout, heldout_mask, load_checkpoint, model_from_config,
                              save_checkpoint, train_phases, train_step, train_transition_model, transition_errors,
                              transition_features, encode_conversations, sample_pairs, pair_embeddings, info_nce, retrieval_ranks,
                              retrieval_queries, retrieval_metrics, train_context_module, save_context_module, load_context_module)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    "Tiny tensors: one torch thread (two threads contend badly on a shared 2-core machine)."
    with torch_threads(1): yield


def tiny_cfg(**kw):
    "Quick profile shrunk to a few conversations and steps, on CPU."
    base = dict(synthetic__n_conversations=10, training__steps_per_phase=(6, 4, 6), device="cpu")
    return load_config("quick", **{**base, **kw})


@pytest.fixture(scope="module")
def tiny_data():
    return collect_transitions(tiny_cfg(), seed=0, device="cpu")


@pytest.fixture(scope="module")
def trained(tiny_data):
    return train_transition_model(tiny_cfg(), 0, "cpu", data=tiny_data)


# --- replay buffer -----------------------------------------------------------------------------------

def test_buffer_ring_keeps_most_recent_in_order():
    buf = ReplayBuffer(4, 2, 1)
    ptr = buf.x.data_ptr()
    for start in range(0, 10, 3):
        v = torch.arange(start, min(start + 3, 10)).float()
        buf.add(torch.stack([v, v], 1), v[:, None])
    assert len(buf) == 4 and buf.n_added == 10
    assert buf.contents()[1][:, 0].tolist() == [6.0, 7.0, 8.0, 9.0]
    assert buf.x.data_ptr() == ptr, "the buffer must be preallocated and written in place"


def test_buffer_batch_larger_than_capacity_and_partial_fill():
    buf = ReplayBuffer(5, 1, 1)
    buf.add(torch.zeros(2, 1), torch.zeros(2, 1))
    assert len(buf) == 2 and buf.contents()[0].shape == (2, 1)
    buf.add(torch.arange(12.)[:, None], torch.arange(12.)[:, None])
    assert buf.contents()[1][:, 0].tolist() == [7.0, 8.0, 9.0, 10.0, 11.0]
    buf.add(torch.tensor([[12.]]), torch.tensor([[12.]]))
    assert buf.contents()[1][:, 0].tolist() == [8.0, 9.0, 10.0, 11.0, 12.0]


def test_buffer_sampling_seeded_and_in_range():
    buf = ReplayBuffer(100, 3, 2)
    buf.add(torch.rand(30, 3), torch.arange(60.).reshape(30, 2))
    a = buf.sample(32, torch.Generator().manual_seed(5)); b = buf.sample(32, torch.Generator().manual_seed(5))
    c = buf.sample(32, torch.Generator().manual_seed(6))
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    assert a[0].shape == (32, 3) and a[1].shape == (32, 2)
    assert (a[1][:, 0] < 60).all() and set((a[1][:, 0] / 2).long().tolist()) <= set(range(30))


def test_buffer_bad_input_names_field():
    buf = ReplayBuffer(10, 3, 2)
    with pytest.raises(ValueError, match="empty"): buf.sample(4, torch.Generator())
    with pytest.raises(ValueError, match="x:"): buf.add(torch.zeros(2, 4), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="y:"): buf.add(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="finite"): buf.add(torch.full((1, 3), float("nan")), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="capacity"): ReplayBuffer(0, 3, 2)
    buf.add(torch.zeros(1, 3), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="batch_size"): buf.sample(0, torch.Generator())


# --- model and features ------------------------------------------------------------------------------

def test_model_architecture_follows_config():
    cfg = tiny_cfg()
    m = model_from_config(cfg, 0, "cpu")
    lin = [mod for mod in m.mlp if isinstance(mod, torch.nn.Linear)]
    assert [l.in_features for l in lin] + [lin[-1].out_features] == [m.input_dim, 256, 128, cfg.state.n_tasks * cfg.state.n_modalities + 2]
    assert sum(isinstance(mod, torch.nn.ReLU) for mod in m.mlp) == 2
    small = model_from_config(tiny_cfg(training__hidden=(32, 16)), 0, "cpu")
    assert [l.out_features for l in small.mlp if isinstance(l, torch.nn.Linear)][:2] == [32, 16]
    with pytest.raises(ValueError, match="n_tasks"): TransitionModel(0, 5, 8)


def test_features_and_predict_reward_shapes_and_errors():
    cfg = tiny_cfg()
    bank = StateBank.create(5, cfg, device="cpu", seed=0)
    bank.update_capability(torch.tensor([3]), torch.tensor([4]), torch.tensor([2]), torch.tensor([1.0]))
    ids = torch.tensor([[0, 3], [3, 1], [4, 4]]); task = torch.tensor([4, 0, 9]); mod = torch.tensor([2, 1, 0])
    x = transition_features(bank, ids, task, mod)
    lay = feature_layout(cfg.state.n_tasks, cfg.state.n_modalities, cfg.state.prompt_dim)
    assert x.shape == (3, 2, lay["total"].stop)
    assert torch.equal(x[1, 0, lay["M_agent"]], bank.M[3].reshape(-1).float())
    assert torch.equal(x[2, 1, lay["prompt"]], bank.P[4].float())
    m = model_from_config(cfg, 0, "cpu")
    r = m.predict_reward(bank, ids, task, mod)
    assert r.shape == (3, 2) and torch.isfinite(r).all()
    # same (agent, request) gives the same prediction wherever it sits in the batch
    assert torch.allclose(r[2, 0], r[2, 1])
    with pytest.raises(ValueError, match="task"): m.predict_reward(bank, ids, torch.tensor([4, 0, 10]), mod)
    with pytest.raises(ValueError, match="modality"): m.predict_reward(bank, ids, task, mod[:2])
    with pytest.raises(ValueError, match="agent_ids"): m.predict_reward(bank, ids + 5, task, mod)
    with pytest.raises(ValueError, match="agent_ids"): m.predict_reward(bank, ids[:, 0], task, mod)


# --- a training step ----------------------------------------------------------------------------------

def test_train_step_lowers_loss_touches_only_its_params_and_clips():
    cfg = tiny_cfg()
    m = model_from_config(cfg, 0, "cpu")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, m.feature_dim, generator=g), torch.randn(32, m.output_dim, generator=g)
    params = m.groups()["mlp"]
    frozen = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("mlp.")}
    opt = torch.optim.Adam(params, lr=1e-3)
    first = train_step(m, opt, x, y, params, cfg.training.grad_clip)
    for _ in range(15): last = train_step(m, opt, x, y, params, cfg.training.grad_clip)
    assert last["loss"] < first["loss"]
    for k, v in frozen.items(): assert torch.equal(m.state_dict()[k], v), k
    sgd = torch.optim.SGD(params, lr=1.0)
    big = train_step(m, sgd, x, y * 1e4, params, cfg.training.grad_clip)
    assert big["grad_norm"] > cfg.training.grad_clip
    after = torch.cat([p.grad.reshape(-1) for p in params]).norm()
    assert abs(float(after) - cfg.training.grad_clip) < 1e-3


def test_phases_train_their_groups_and_budget_stops():
    cfg = tiny_cfg()
    m = model_from_config(cfg, 0, "cpu")
    g = torch.Generator().manual_seed(1)
    buf = ReplayBuffer(cfg.training.buffer_size, m.feature_dim, m.output_dim)
    buf.add(torch.rand(200, m.feature_dim, generator=g), torch.rand(200, m.output_dim, generator=g))
    start = {k: v.clone() for k, v in m.state_dict().items()}
    hist = train_phases(m, buf, cfg, 0)
    assert list(hist.phase.unique()) == ["start", *PHASES]
    assert int(hist.step.max()) == sum(cfg.training.steps_per_phase)
    alpha = hist.set_index("step").consensus_alpha
    p1_end = cfg.training.steps_per_phase[0]
    assert alpha.loc[1] == alpha.loc[p1_end], "phase 1 must not move the consensus weights"
    assert alpha.loc[p1_end + cfg.training.steps_per_phase[1]] != alpha.loc[p1_end], "phase 2 must move them"
    assert not torch.equal(start["mlp.0.weight"], m.state_dict()["mlp.0.weight"])
    stop = train_phases(model_from_config(cfg, 0, "cpu"), buf, tiny_cfg(training__time_budget_s=0.0), 0)
    assert stop.attrs["stopped_by_budget"] and int(stop.step.max()) == 0
    with pytest.raises(ValueError, match="empty"): train_phases(m, ReplayBuffer(4, m.feature_dim, m.output_dim), cfg, 0)


# --- data ---------------------------------------------------------------------------------------------

def test_transitions_targets_are_consistent(tiny_data):
    cfg = tiny_cfg()
    d = tiny_data
    m, l = cfg.state.n_tasks, cfg.state.n_modalities
    lay = feature_layout(m, l, cfg.state.prompt_dim)
    assert d.x.shape[0] == d.y.shape[0] > 0 and d.y.shape[1] == m * l + 2
    task = d.x[:, lay["task"]].argmax(1); mod = d.x[:, lay["modality"]].argmax(1)
    dM = d.y[:, : m * l]
    cell = task * l + mod
    others = dM.clone(); others[torch.arange(len(cell)), cell] = 0
    assert others.abs().max() == 0, "only the requested capability cell may change"
    # the MC mean next state is an EMA step toward the mean outcome in [0, 1]: ΔM ∈ [−η·M, η·(1 − M)]
    M_cell = d.x[:, lay["M_agent"]][torch.arange(len(cell)), cell]
    eta = cfg.state.capability_eta
    assert (dM[torch.arange(len(cell)), cell] >= -eta * M_cell - 1e-6).all() and (dM[torch.arange(len(cell)), cell] <= eta * (1 - M_cell) + 1e-6).all()
    R = d.y[:, -1]
    assert (R >= -cfg.training.coherence_lambda - 1e-6).all() and (R <= 1 + 1e-6).all()
    assert d.reward_std.max() > 0, "10 Monte Carlo trajectories should not all agree"
    # held-out split is by conversation
    ho_convs, tr_convs = set(d.conversation[d.heldout].tolist()), set(d.conversation[~d.heldout].tolist())
    assert ho_convs and tr_convs and not (ho_convs & tr_convs)


def _evaluation_cosine(responses, contexts, cfg):
    "The cosine 13_evaluation measures (handoff_metrics' `cosine`, reference = previous response) for each (context, response) pair."
    import pandas as pd
    from rapo_nb.evaluation import TURN_COLUMNS, handoff_metrics
    n = len(responses)
    turns = pd.DataFrame({c: [None] * n for c in TURN_COLUMNS})
    turns = turns.assign(system="rapo", seed=0, conv_id=range(n), turn=1, agent=1, prev_agent=0, handoff=True, clarification=False,
                         prev_response=list(contexts), response=list(responses))
    return handoff_metrics(turns, cfg).sort_values("conv_id").cosine.to_numpy()


def test_reward_coherence_is_the_evaluation_cosine(monkeypatch):
    "r_coherence + 1 is the cosine the evaluation judges context with (not a word-count proxy), on the whole reward path."
    import rapo_nb.training as tr
    cfg = tiny_cfg(synthetic__n_conversations=4)
    enc = HashedTextEncoder.from_config(cfg)
    resp = ["alphabet soup", "the report of Tukatis", "zebra quantum violin"]
    ctx = ["alpha bet soups", "the report of Tukatis near Nizevek", "the report of Tukatis near Nizevek"]
    want = _evaluation_cosine(resp, ctx, cfg)
    assert want[0] > 0.1   # no shared word: a word-count cosine would say 0
    np.testing.assert_allclose(tr.coherence_penalty(resp, ctx, enc) + 1.0, want, atol=1e-6)
    seen, penalty = [], tr.coherence_penalty
    def recording(responses, contexts, *a, **k):
        out = penalty(responses, contexts, *a, **k); seen.append((list(responses), list(contexts), out)); return out
    monkeypatch.setattr(tr, "coherence_penalty", recording)
    tr.collect_transitions(cfg, seed=0, device="cpu")
    r_all = [r for s in seen for r in s[0]]; c_all = [c for s in seen for c in s[1]]; got = np.concatenate([s[2] for s in seen])
    keep = np.array([bool(c.strip()) for c in c_all])
    assert keep.sum() > 50 and (got[~keep] == 0).all()
    np.testing.assert_allclose(got[keep] + 1.0, _evaluation_cosine([r for r, k in zip(r_all, keep) if k], [c for c, k in zip(c_all, keep) if k], cfg), atol=1e-5)
    with pytest.raises(ValueError, match="encoder"): penalty(["a"], ["b"], None)


def test_oracle_line_fit_is_float64_and_deterministic():
    from rapo_nb.training import least_squares_line
    rng = np.random.default_rng(0)
    x, y = rng.random(2000).astype(np.float32), rng.random(2000).astype(np.float32)
    a = least_squares_line(x, y)
    assert a == least_squares_line(x, y) and all(isinstance(v, float) for v in a)
    np.testing.assert_allclose(a, np.polyfit(x.astype(np.float64), y.astype(np.float64), 1), rtol=0, atol=1e-12)


def test_heldout_mask():
    mask = heldout_mask(10, 0)
    assert mask.sum() == 2 and np.array_equal(mask, heldout_mask(10, 0))
    assert heldout_mask(2, 0).sum() == 1
    with pytest.raises(ValueError, match="fraction"): heldout_mask(10, 0, 1.0)


# --- determinism ----------------------------------------------------------------------------------------

def test_cpu_determinism_two_short_trainings(tiny_data, trained):
    cfg = tiny_cfg()
    again = collect_transitions(cfg, seed=0, device="cpu")
    assert torch.equal(again.x, tiny_data.x) and torch.equal(again.y, tiny_data.y)
    m1, h1 = trained
    m2, h2 = train_transition_model(cfg, 0, "cpu", data=again)
    for k, v in m1.state_dict().items(): assert torch.equal(m2.state_dict()[k], v), k
    assert h1.loss.dropna().tolist() == h2.loss.dropna().tolist()
    other = collect_transitions(cfg, seed=1, device="cpu")
    assert other.x.shape != tiny_data.x.shape or not torch.equal(other.y, tiny_data.y)
    m3, _ = train_transition_model(cfg, 1, "cpu", data=other)
    assert not torch.equal(m3.state_dict()["mlp.0.weight"], m1.state_dict()["mlp.0.weight"])


def test_trained_model_beats_untrained_on_heldout(tiny_data, trained):
    (_, _), (xh, yh) = tiny_data.split()
    m, hist = trained
    assert hist.attrs["n_heldout"] == len(yh) > 0
    e_trained = transition_errors(m, xh, yh); e_untrained = transition_errors(model_from_config(tiny_cfg(), 0, "cpu"), xh, yh)
    assert e_trained["reward_mse"] < e_untrained["reward_mse"]


# --- checkpoints ------------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path, tiny_data, trained):
    cfg = tiny_cfg()
    m, _ = trained
    p = save_checkpoint(m, tmp_path / "ck" / "tm.pt", cfg, seed=0, extra=dict(note="x"))
    back = load_checkpoint(p, cfg, device="cpu")
    for k, v in m.state_dict().items(): assert torch.equal(back.state_dict()[k], v), k
    assert torch.equal(back.predict(tiny_data.x[:20])["reward"], m.predict(tiny_data.x[:20])["reward"])
    meta = back.checkpoint_meta
    assert meta["seed"] == 0 and meta["extra"] == {"note": "x"}
    assert meta["config"]["synthetic"]["n_conversations"] == 10 and meta["config"]["training"]["lr"] == cfg.training.lr
    assert len(meta["sha256"]) == 64
    assert not list((tmp_path / "ck").glob(".*.tmp")), "atomic write leaves no temporary file"
    # an untrained model round-trips too (the evaluation's ablation)
    u = model_from_config(cfg, 3, "cpu"); q = save_checkpoint(u, tmp_path / "u.pt", cfg, seed=3)
    assert load_checkpoint(q, cfg).checkpoint_meta["seed"] == 3


@pytest.mark.parametrize("override, field", [(dict(state__n_tasks=7), "state.n_tasks"), (dict(state__n_modalities=4), "state.n_modalities"),
                                             (dict(state__prompt_dim=64), "state.prompt_dim"), (dict(training__hidden=(64, 32)), "training.hidden")])
def test_checkpoint_from_other_config_refused_naming_field(tmp_path, override, field):
    cfg = tiny_cfg()
    p = save_checkpoint(model_from_config(cfg, 0, "cpu"), tmp_path / "tm.pt", cfg, seed=0)
    with pytest.raises(CheckpointError, match=field.replace(".", r"\.")): load_checkpoint(p, tiny_cfg(**override))


def test_checkpoint_with_wrong_tensor_shape_refused(tmp_path):
    cfg = tiny_cfg()
    m = model_from_config(cfg, 0, "cpu")
    p = save_checkpoint(m, tmp_path / "tm.pt", cfg, seed=0)
    # a checkpoint claiming the config's shape but holding a model of another shape
    other = model_from_config(tiny_cfg(training__hidden=(64, 128)), 0, "cpu")
    q = save_checkpoint(other, tmp_path / "liar.pt", cfg, seed=0)
    with pytest.raises(CheckpointError, match=r"mlp\.0\.weight"): load_checkpoint(q, cfg)
    assert load_checkpoint(p, cfg) is not None


def test_corrupt_checkpoint_refused(tmp_path):
    cfg = tiny_cfg()
    p = save_checkpoint(model_from_config(cfg, 0, "cpu"), tmp_path / "tm.pt", cfg, seed=0)
    raw = bytearray(p.read_bytes())
    flipped = bytearray(raw); flipped[len(raw) // 2] ^= 0x01
    (tmp_path / "flip.pt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"): load_checkpoint(tmp_path / "flip.pt", cfg)
    (tmp_path / "trunc.pt").write_bytes(bytes(raw[: len(raw) - 50]))
    with pytest.raises(CheckpointError, match="checksum"): load_checkpoint(tmp_path / "trunc.pt", cfg)
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="header"): read_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError): load_checkpoint(tmp_path / "missing.pt", cfg)


def test_transitions_identical_in_a_fresh_process_with_other_hash_seed(tiny_data):
    "Cross-process determinism: Python's string-hash randomisation must not leak into the data."
    import hashlib, os, subprocess, sys
    code = ("import hashlib, torch; from rapo_nb.config import load_config; from rapo_nb.training import collect_transitions; "
            "d = collect_transitions(load_config('quick', synthetic__n_conversations=10, training__steps_per_phase=(6, 4, 6), device='cpu'), 0, 'cpu'); "
            "print(hashlib.sha256(d.x.numpy().tobytes() + d.y.numpy().tobytes()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    here = hashlib.sha256(tiny_data.x.numpy().tobytes() + tiny_data.y.numpy().tobytes()).hexdigest()
    assert out.stdout.strip().splitlines()[-1] == here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: the GPU path of training is not exercised")
def test_same_code_on_gpu(tmp_path):
    cfg = tiny_cfg(device="cuda")
    model, hist = train_transition_model(cfg, 0)
    assert next(model.parameters()).device.type == "cuda" and hist.attrs["device"].startswith("cuda")
    p = save_checkpoint(model, tmp_path / "gpu.pt", cfg, seed=0)
    assert next(load_checkpoint(p, tiny_cfg()).parameters()).device.type == "cpu"


# --- our knobs are config fields ----------------------------------------------------------------------------

def test_training_knobs_come_from_the_config():
    full = load_config("full").training
    assert (full.prompt_embed_dim, full.heldout_fraction, full.eval_every, full.train_threads) == (16, 0.2, 20, 1)
    assert model_from_config(tiny_cfg(training__prompt_embed_dim=8), 0, "cpu").prompt_embedding.out_features == 8
    assert heldout_mask(10, 0, tiny_cfg(training__heldout_fraction=0.5).training.heldout_fraction).sum() == 5
    d = collect_transitions(tiny_cfg(training__heldout_fraction=0.5), seed=0, device="cpu")
    assert len(set(d.conversation[d.heldout].tolist())) == 5
    cfg = tiny_cfg(training__eval_every=5)
    m = model_from_config(cfg, 0, "cpu")
    buf = ReplayBuffer(100, m.feature_dim, m.output_dim); buf.add(torch.rand(50, m.feature_dim), torch.rand(50, m.output_dim))
    hist = train_phases(m, buf, cfg, 0, heldout=(torch.rand(10, m.feature_dim), torch.rand(10, m.output_dim)))
    ends = set(np.cumsum(cfg.training.steps_per_phase).tolist())
    assert set(hist.dropna(subset=["heldout_loss"]).step.tolist()) == {0} | {s for s in range(1, 17) if s % 5 == 0} | ends
    before = torch.get_num_threads()
    train_phases(m, buf, tiny_cfg(training__train_threads=2), 0)
    assert torch.get_num_threads() == before, "the thread count is restored"
    with pytest.raises(ValueError, match="training.eval_every"): tiny_cfg(training__eval_every=0)


def test_checkpoint_with_other_prompt_embed_dim_refused(tmp_path):
    cfg = tiny_cfg()
    p = save_checkpoint(model_from_config(cfg, 0, "cpu"), tmp_path / "tm.pt", cfg, seed=0)
    with pytest.raises(CheckpointError, match=r"training\.prompt_embed_dim"): load_checkpoint(p, tiny_cfg(training__prompt_embed_dim=8))


def test_quick_profile_transition_model_learns_beyond_trivial():
    "The quick profile's step count (raised for this) must take the model below the trivial predictor on held-out data."
    cfg = load_config("quick", device="cpu", synthetic__n_conversations=60)
    data = collect_transitions(cfg, seed=0, device="cpu")
    (xt, yt), (xh, yh) = data.split()
    m, _ = train_transition_model(cfg, 0, "cpu", data=data)
    assert transition_errors(m, xh, yh)["reward_mse"] < baseline_errors(yt, yh)["reward_mse"]


# --- the context module C_i (§3.2) ------------------------------------------------------------------------

def ctx_cfg(**kw):
    base = dict(synthetic__n_conversations=40, training__context_steps=40, training__context_batch_size=8, training__eval_every=20, device="cpu")
    return load_config("quick", **{**base, **kw})


@pytest.fixture(scope="module")
def ctx_data():
    return encode_conversations(ctx_cfg(), 0)


@pytest.fixture(scope="module")
def ctx_trained(ctx_data):
    return train_context_module(ctx_cfg(), 0, ctx_data, "cpu")


def test_context_data_and_pairs(ctx_data):
    cfg = ctx_cfg()
    convs = generate_conversations(40, 0, cfg)
    assert ctx_data.lengths.tolist() == [len(c.turns) for c in convs]
    enc = HashedTextEncoder.from_config(cfg)
    assert torch.allclose(ctx_data.turns[7, 1], torch.from_numpy(enc.encode([convs[7].turns[1].text])[0]))
    assert np.array_equal(ctx_data.heldout.numpy(), heldout_mask(40, 0, cfg.training.heldout_fraction))
    conv, t = sample_pairs(ctx_data, ctx_data.usable(False, 2), 12, 2, np.random.default_rng(0))
    assert len(set(conv.tolist())) == 12 and not ctx_data.heldout[conv].any()
    assert ((t >= 1) & (t + 2 <= ctx_data.lengths[conv])).all()
    c, z = pair_embeddings(ctx_data, conv, t, 2, window=3)
    i = 0; lo = max(0, int(t[i]) - 3)
    assert torch.allclose(c[i], ctx_data.turns[conv[i], lo:int(t[i])].mean(0)) and torch.equal(z[i], ctx_data.turns[conv[i], t[i] + 1])
    with pytest.raises(ValueError, match="t:"): pair_embeddings(ctx_data, conv[:1], ctx_data.lengths[conv[:1]], 1, window=3)
    with pytest.raises(ValueError, match="conversations"): encode_conversations(cfg, 0, conversations=[])


def test_pair_embeddings_window_gather_equals_whole_conversation(ctx_data):
    "pair_embeddings gathers only the module's k-turn window; the context equals the module applied to the whole conversation."
    module = SlidingWindowContext.from_config(ctx_cfg(), seed=3)
    conv = torch.arange(len(ctx_data.lengths))
    t = torch.minimum(torch.arange(len(conv)) % 7 + 1, ctx_data.lengths - 1).clamp(min=1)   # windows shorter than, equal to and longer than k
    with torch.no_grad():
        c, z = pair_embeddings(ctx_data, conv, t, 1, model=module)
        torch.testing.assert_close(c, module(ctx_data.turns[conv], t))
        torch.testing.assert_close(z, module(ctx_data.turns[conv, t][:, None], torch.ones_like(t)))

def test_info_nce_and_ranks():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, generator=g)
    assert torch.equal(retrieval_ranks(z, z), torch.ones(6))
    assert (retrieval_ranks(z, -z) > 1).all()
    assert info_nce(z, z, 0.1) < info_nce(z, z.roll(1, 0), 0.1)
    assert torch.equal(retrieval_ranks(torch.ones(4, 2), torch.ones(4, 2)), torch.full((4,), 2.5))
    with pytest.raises(ValueError, match="temperature"): info_nce(z, z, 0.0)


def test_context_training_lowers_the_loss_and_fits_its_data(ctx_data, ctx_trained):
    cfg = ctx_cfg()
    model, hist = ctx_trained
    init = SlidingWindowContext.from_config(cfg, seed=0)
    pairs = sample_pairs(ctx_data, ctx_data.usable(False, 1), 32, 1, np.random.default_rng(9))
    with torch.no_grad():
        l0 = float(info_nce(*pair_embeddings(ctx_data, *pairs, 1, init), cfg.training.context_temperature))
        l1 = float(info_nce(*pair_embeddings(ctx_data, *pairs, 1, model.eval()), cfg.training.context_temperature))
    assert l1 < l0, (l0, l1)
    train_groups = [pairs]
    assert retrieval_metrics(ctx_data, train_groups, 1, model)["mrr"] > retrieval_metrics(ctx_data, train_groups, 1, init)["mrr"]
    assert int(hist.step.max()) == cfg.training.context_steps and hist.dropna(subset=["heldout_mrr"]).step.tolist() == [0, 20, 40]
    again, h2 = train_context_module(cfg, 0, ctx_data, "cpu")
    for k, v in model.state_dict().items(): assert torch.equal(again.state_dict()[k], v), k
    assert h2.loss.dropna().tolist() == hist.loss.dropna().tolist()
    other, _ = train_context_module(cfg, 1, ctx_data, "cpu")
    assert not torch.equal(other.state_dict()["proj.weight"], model.state_dict()["proj.weight"])
    stop = train_context_module(ctx_cfg(training__time_budget_s=0.0), 0, ctx_data, "cpu")[1]
    assert stop.attrs["stopped_by_budget"] and int(stop.step.max()) == 0


def test_retrieval_queries_use_only_heldout_full_groups(ctx_data):
    cfg = ctx_cfg(training__context_eval_candidates=4, training__context_eval_rounds=3)
    groups = retrieval_queries(ctx_data, cfg, 0)
    held = set(np.flatnonzero(ctx_data.heldout.numpy()).tolist())
    assert len(groups) == 3 * (len(ctx_data.usable(True, 1)) // 4)
    assert all(len(c) == 4 and set(c.tolist()) <= held for c, _ in groups)
    res = retrieval_metrics(ctx_data, groups, 1, window=cfg.state.context_window)
    assert res["n_queries"] == 4 * len(groups) and 0 < res["mrr"] <= 1 and res["top1"] <= res["mrr"]


def test_context_module_round_trip(tmp_path, ctx_data, ctx_trained):
    cfg = ctx_cfg()
    model, _ = ctx_trained
    p = save_context_module(model, tmp_path / "c" / "ctx.pt", cfg, seed=0, extra=dict(note="x"))
    back = load_context_module(p, cfg, device="cpu")
    for k, v in model.state_dict().items(): assert torch.equal(back.state_dict()[k], v), k
    meta = back.checkpoint_meta
    assert meta["seed"] == 0 and meta["extra"] == {"note": "x"} and meta["rapo_nb_version"] and meta["torch_version"]
    assert not list((tmp_path / "c").glob(".*.tmp"))
    pairs = sample_pairs(ctx_data, ctx_data.usable(True, 1), 4, 1, np.random.default_rng(0))
    with torch.no_grad():
        assert torch.equal(pair_embeddings(ctx_data, *pairs, 1, back)[0], pair_embeddings(ctx_data, *pairs, 1, model.eval())[0])


@pytest.mark.parametrize("override, field", [(dict(state__encoder_dim=512), "state.encoder_dim"), (dict(state__encoder_seed=7), "state.encoder_seed"),
                                             (dict(state__context_dim=256), "state.context_dim"), (dict(state__context_window=4), "state.context_window")])
def test_context_module_from_other_config_refused_naming_field(tmp_path, ctx_trained, override, field):
    p = save_context_module(ctx_trained[0], tmp_path / "ctx.pt", ctx_cfg(), seed=0)
    with pytest.raises(CheckpointError, match=field.replace(".", r"\.")): load_context_module(p, ctx_cfg(**override))


def test_corrupt_or_wrong_context_file_refused(tmp_path, ctx_trained):
    cfg = ctx_cfg()
    model = ctx_trained[0]
    p = save_context_module(model, tmp_path / "ctx.pt", cfg, seed=0)
    raw = p.read_bytes()
    flipped = bytearray(raw); flipped[len(raw) // 2] ^= 0x01
    (tmp_path / "flip.pt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"): load_context_module(tmp_path / "flip.pt", cfg)
    (tmp_path / "trunc.pt").write_bytes(raw[:-50])
    with pytest.raises(CheckpointError, match="checksum"): load_context_module(tmp_path / "trunc.pt", cfg)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="header"): load_context_module(tmp_path / "junk.pt", cfg)
    with pytest.raises(FileNotFoundError): load_context_module(tmp_path / "missing.pt", cfg)
    tm = save_checkpoint(model_from_config(cfg, 0, "cpu"), tmp_path / "tm.pt", cfg, seed=0)
    with pytest.raises(CheckpointError, match="transition-model checkpoint, not a context-module"): load_context_module(tm, cfg)
    with pytest.raises(CheckpointError, match="context-module checkpoint, not a transition-model"): load_checkpoint(p, cfg)
    # a module of another shape saved under this config's name is refused with the tensor named
    other = SlidingWindowContext(cfg.state.encoder_dim, cfg.state.context_dim, cfg.state.context_window, attn_dim=64)
    q = save_context_module(other, tmp_path / "liar.pt", cfg, seed=0)
    with pytest.raises(CheckpointError, match=r"(query|key\.weight): the checkpoint liar\.pt has shape"): load_context_module(q, cfg)
