"""Config validation: the paper's constants, profiles, and clear errors for bad input."""
import dataclasses, json
import pytest
from hypothesis import given, strategies as st
from rapo_nb.config import load_config, validate, GROUPS, PROFILES, constants_table, get_device, seed_everything, Config


def test_paper_constants_are_defaults():
    c = load_config("full")
    assert (c.state.prompt_dim, c.state.context_dim, c.state.n_tasks, c.state.n_modalities) == (512, 768, 10, 5)
    assert c.routing.load_weights == (0.4, 0.3, 0.3) and (c.routing.c_max, c.routing.q_max, c.routing.r_max) == (10, 50, 0.8)
    assert c.synthetic.fsm_probs == (0.10, 0.20, 0.40, 0.20, 0.10)
    assert c.training.buffer_size == 10_000 and c.training.batch_size == 32 and c.training.lr == 1e-4
    assert c.evaluation.bootstrap_resamples == 10_000 and c.evaluation.n_comparisons == 4


def test_profiles_change_sizes_not_constants():
    q, f = load_config("quick"), load_config("full")
    assert q.synthetic.n_conversations < f.synthetic.n_conversations
    for key in PROFILES["quick"]:
        g, k = key.split(".")
        assert k in {x.name for x in dataclasses.fields(getattr(q, g))}
    assert q.routing == f.routing and q.consensus == f.consensus and q.state == f.state


@pytest.mark.parametrize("kw, field", [
    (dict(consensus__alpha=-0.1), "consensus.alpha"),
    (dict(routing__c_max=0), "routing.c_max"),
    (dict(routing__load_weights=(0.4, 0.4, 0.4)), "routing.load_weights"),
    (dict(synthetic__task_type_probs=(0.5, 0.5, 0.5)), "synthetic.task_type_probs"),
    (dict(state__prompt_dim=-3), "state.prompt_dim"),
    (dict(state__context_dim="768"), "state.context_dim"),
    (dict(training__lr=float("nan")), "training.lr"),
    (dict(state__fp16_capability=1), "state.fp16_capability"),
    (dict(runtime__store="postgres"), "runtime.store"),
    (dict(seed=-1), "seed"),
    (dict(nonsense=3), "nonsense"),
    (dict(state__nonsense=3), "state.nonsense"),
    (dict(simulation__reception_floor=1.5), "simulation.reception_floor"),
    (dict(simulation__skill_levels=((0.9, 0.5),) * 4), "simulation.skill_levels"),
    (dict(simulation__speed_range=(1.25, 0.8)), "simulation.speed_range"),
    (dict(workflows__failure_mix=(0.5, 0.5, 0.5)), "workflows.failure_mix"),
    (dict(workflows__failure_mix=(0.5, 0.5)), "workflows.failure_mix"),
    (dict(workflows__skill_other=(0.9, 0.5)), "workflows.skill_other"),
    (dict(synthetic__side_slack=1.5), "synthetic.side_slack"),
    (dict(evaluation__moderate_d_range=(0.8, 0.3)), "evaluation.moderate_d_range"),
    (dict(runtime__rerank_k=0), "runtime.rerank_k"),
    # issue 22: holes that were accepted
    (dict(runtime__redis_timeout_s=0), "runtime.redis_timeout_s"),
    (dict(runtime__redis_url="not a url"), "runtime.redis_url"),
    (dict(runtime__redis_url="http://127.0.0.1:6379/0"), "runtime.redis_url"),
    (dict(evaluation__n_agents=1), "evaluation.n_agents"),
    (dict(evaluation__seeds=(0, 1.5, 2)), "evaluation.seeds"),
    (dict(routellm__split_seeds=(1, 2.5)), "routellm.split_seeds"),
    (dict(synthetic__depth_range=(3, 8.5)), "synthetic.depth_range"),
    (dict(synthetic__entity_range=(5.5, 50)), "synthetic.entity_range"),
    (dict(runtime__segment_conversations=0), "runtime.segment_conversations"),
    (dict(runtime__store_retries=-1), "runtime.store_retries"),
    (dict(runtime__store_backoff_s=0), "runtime.store_backoff_s"),
])
def test_bad_values_name_the_field(kw, field):
    with pytest.raises(ValueError) as e: load_config("quick", **kw)
    assert str(e.value).startswith(field), str(e.value)


def test_bad_profile_lists_valid_ones():
    with pytest.raises(ValueError, match="quick"): load_config("medium")


@given(st.floats(min_value=0.0, max_value=10.0, allow_nan=False))
def test_alpha_in_range_accepted(a):
    assert load_config(consensus__alpha=a).consensus.alpha == a


@given(st.lists(st.floats(min_value=0, max_value=1, allow_nan=False), min_size=3, max_size=3))
def test_load_weights_must_sum_to_one(w):
    if abs(sum(w) - 1) <= 1e-6: assert load_config(routing__load_weights=tuple(w)).routing.load_weights == tuple(w)
    else:
        with pytest.raises(ValueError, match="routing.load_weights"): load_config(routing__load_weights=tuple(w))


def test_every_field_documented_with_section():
    t = constants_table()
    assert (t.section.str.len() > 0).all() and (t.description.str.len() > 0).all()
    json.dumps(load_config().to_dict())


def test_seed_and_device(monkeypatch):
    assert (seed_everything(3).random(4) == seed_everything(3).random(4)).all()
    monkeypatch.setenv("RAPO_DEVICE", "cpu"); assert get_device("auto").type == "cpu"
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"): get_device("cuda")


def test_simulated_world_is_config():
    "The simulated world's constants are fields of their own group, listed in the constants table with a section."
    c = load_config("full")
    assert "simulation" in GROUPS and c.simulation.skill_levels[0] == (0.92, 0.50, 0.50, 0.70)
    t = constants_table(c)
    sim = t[t.group == "simulation"]
    assert {"reception_floor", "skill_levels", "latency_sigma"} <= set(sim.field) and sim.section.str.startswith("ours").all()
    # a matrix round-trips through JSON (lists) back to tuples
    back = load_config("full", overrides={"simulation.skill_levels": json.loads(json.dumps(c.to_dict()["simulation"]["skill_levels"]))})
    assert back.simulation == c.simulation
    from rapo_nb.config import PAPER_TABLE3, PAPER_TABLE3_CI
    assert set(PAPER_TABLE3_CI) == set(PAPER_TABLE3) and all(lo < PAPER_TABLE3[b]["mean_diff"] < hi for b, (lo, hi) in PAPER_TABLE3_CI.items())


@pytest.mark.parametrize("kw, msg", [
    (dict(routing__load_weights=(0.5, 0.5)), "routing.load_weights: expected 3 values, got 2"),
    (dict(synthetic__task_type_probs=(0.5, 0.5)), "synthetic.task_type_probs: expected 3 values, got 2"),
    (dict(simulation__speed_range=(1.0, 2.0, 3.0)), "simulation.speed_range: expected 2 values, got 3"),
    (dict(synthetic__depth_range=(5, 3)), "synthetic.depth_range: lower bound 5 exceeds upper bound 3"),
    (dict(evaluation__moderate_d_range=(0.8, 0.3)), "evaluation.moderate_d_range: lower bound 0.8 exceeds upper bound 0.3"),
])
def test_length_and_order_come_from_field_metadata(kw, msg):
    "Length and order checks are declared on the field (cf(..., length=, ordered=True)), not inferred from its name."
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        load_config("quick", **kw)
    group, key = msg.split(":")[0].split(".")
    meta = {f.name: f.metadata for f in dataclasses.fields(getattr(load_config("quick"), group))}[key]
    assert "length" in meta or meta.get("ordered")


def test_good_redis_urls_and_integral_floats_accepted():
    for url in ("redis://127.0.0.1:6379/0", "rediss://user:pw@redis.example.org:6380/2", "unix:///tmp/redis.sock"):
        assert load_config(runtime__redis_url=url).runtime.redis_url == url
    c = load_config(evaluation__seeds=(0, 1.0, 2), synthetic__depth_range=[3.0, 8])
    assert c.evaluation.seeds == (0, 1, 2) and all(type(s) is int for s in c.evaluation.seeds)
    assert c.synthetic.depth_range == (3, 8) and all(type(s) is int for s in c.synthetic.depth_range)
