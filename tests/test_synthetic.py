"""Tests of the §5.1 synthetic benchmark generator (rapo_nb.synthetic)."""
import hashlib, json, os, subprocess, sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from rapo_nb.config import load_config, FSM_STATES, TASK_TYPES, SPECIALISTS
from rapo_nb import synthetic as S

ROOT = Path(__file__).resolve().parents[1]
CFG = load_config("full")


@pytest.fixture(scope="module")
def bench():
    "The paper-sized benchmark (1,000 conversations) for seed 0."
    return S.generate_conversations(1000, 0, CFG)


def test_rule_counts():
    "§5.1: 50 query, 30 response and 20 trigger production rules."
    assert S.n_productions(S.QUERY_GRAMMAR) == 50
    assert S.n_productions(S.RESPONSE_GRAMMAR) == 30
    assert S.n_productions(S.TRIGGER_GRAMMAR) == 20


@pytest.mark.parametrize("start", ["IR", "PS", "CR"])
def test_derive_exact_depth(start):
    rng = np.random.default_rng(3)
    for d in range(3, 13):
        for _ in range(5):
            toks = []
            tree = S.derive(S.QUERY_GRAMMAR, start, d, rng, tokens=toks)
            assert S.tree_depth(tree) == d
            assert " ".join(toks) == S.tree_text(tree)
    with pytest.raises(ValueError, match="depth"):
        S.derive(S.QUERY_GRAMMAR, start, 2, rng)


def test_fsm_shares_and_task_types(bench):
    "Realised FSM-state and task-type shares match §5.1 within sampling tolerance."
    turns = [t.fsm_state for c in bench for t in c.turns]
    n = len(turns)
    for st, p in zip(FSM_STATES, CFG.synthetic.fsm_probs):
        share = turns.count(st) / n
        # turns are clustered by conversation: allow 4 binomial s.e. plus 0.02 for the length correlation
        assert abs(share - p) < 4 * np.sqrt(p * (1 - p) / n) + 0.02, (st, share, p)
    types = [c.task_type for c in bench]
    for ty, p in zip(TASK_TYPES, CFG.synthetic.task_type_probs):
        assert abs(types.count(ty) / len(types) - p) < 4 * np.sqrt(p * (1 - p) / len(types)), ty


def test_fsm_shares_follow_config():
    "Changing the FSM shares in config changes the realised shares (the generator reads the config)."
    cfg = load_config("full", synthetic__fsm_probs=(0.05, 0.15, 0.60, 0.15, 0.05))
    convs = S.generate_conversations(400, 1, cfg)
    turns = [t.fsm_state for c in convs for t in c.turns]
    assert abs(turns.count("information_exchange") / len(turns) - 0.60) < 0.05
    assert abs(turns.count("greeting") / len(turns) - 0.05) < 0.01


def test_complexity_ranges(bench):
    s = CFG.synthetic
    for c in bench:
        assert s.depth_range[0] <= c.depth <= s.depth_range[1]
        assert s.entity_range[0] <= c.n_entities <= s.entity_range[1]
        assert s.relation_range[0] <= c.n_relations <= s.relation_range[1]
        assert s.inference_range[0] <= c.inference_steps <= s.inference_range[1]
        assert len(c.facts) == c.inference_steps
        assert max(c.expected["turn_depth"]) == c.depth and max(c.expected["turn_entities"]) == c.n_entities
    # the whole range is used (uniform draws over 1,000 conversations)
    assert {c.depth for c in bench} == set(range(3, 13))
    assert {c.inference_steps for c in bench} == set(range(1, 9))


def test_triggers_deterministic(bench):
    "depth > 8 → grammar, entities > 20 → knowledge, inference > 4 → reasoning, else general; per turn."
    for c in bench[:200]:
        ex = c.expected
        for t in c.turns:
            if t.fsm_state in ("greeting", "conclusion"):
                assert t.specialist == "general"; continue
            d, e, i = ex["turn_depth"][t.index], ex["turn_entities"][t.index], ex["turn_inference"][t.index]
            fired = {"grammar": d > 8, "knowledge": e > 20, "reasoning": i > 4}
            if not any(fired.values()): assert t.specialist == "general"
            else: assert fired[t.specialist], (c.id, t.index, d, e, i, t.specialist)
        assert c.handoff_turns == S.handoff_positions([t.specialist for t in c.turns])
        for h in c.handoff_turns:
            assert S.trigger_specialist(c.turns[h].text) == c.turns[h].specialist


def test_trigger_thresholds_exact():
    sp = lambda d, e, i: SPECIALISTS[int(S.required_specialist([d], [e], [i], CFG)[0])]
    assert sp(8, 20, 4) == "general"
    assert sp(9, 20, 4) == "grammar"
    assert sp(8, 21, 4) == "knowledge"
    assert sp(8, 20, 5) == "reasoning"


def test_turn_fields_in_range(bench):
    m, l = CFG.state.n_tasks, CFG.state.n_modalities
    tasks, mods = set(), set()
    for c in bench:
        for t in c.turns:
            assert t.specialist in SPECIALISTS and 0 <= t.task < m and 0 <= t.modality < l
            tasks.add(t.task); mods.add(t.modality)
            if t.fsm_state in ("query_formulation", "information_exchange"):
                assert S.TASK_TABLE[c.task_type][t.specialist] == t.task
    assert tasks == set(range(m)) and mods == set(range(l))


def test_handoff_spread(bench):
    "The spread of handoffs reaches past 10 transitions; lengths cover turns 3..>14."
    h = np.array([c.n_handoffs for c in bench]); n = np.array([c.n_turns for c in bench])
    assert h.max() > 10 and (h > 10).sum() >= 5
    assert (h == 0).any() and n.min() == 3 and n.max() > 14
    assert abs(n.mean() - 10) < 0.6  # T = 2 / (p_greeting + p_conclusion)


def test_same_seed_same_bytes_and_prefix_stable(bench):
    again = S.generate_conversations(300, 0, CFG)
    assert S.jsonl_sha256(again) == S.jsonl_sha256(bench[:300])
    assert S.jsonl_sha256(S.generate_conversations(50, 0, CFG)) == S.jsonl_sha256(bench[:50])
    assert S.jsonl_sha256(S.generate_conversations(50, 1, CFG)) != S.jsonl_sha256(bench[:50])


def test_same_seed_across_processes(tmp_path):
    "A fresh interpreter with another hash seed writes byte-identical JSONL (nothing depends on Python's salted hash)."
    code = ("import sys; from rapo_nb.config import load_config; from rapo_nb.synthetic import generate_conversations, save_jsonl;"
            "save_jsonl(generate_conversations(60, 7, load_config('full')), sys.argv[1])")
    out = tmp_path / "c.jsonl"
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert hashlib.sha256(out.read_bytes()).hexdigest() == S.jsonl_sha256(S.generate_conversations(60, 7, CFG))


def test_jsonl_round_trip(tmp_path, bench):
    p = S.save_jsonl(bench[:100], tmp_path / "b.jsonl")
    back = S.load_jsonl(p)
    assert [asdict(c) for c in back] == [asdict(c) for c in bench[:100]] and back.errors == []


def _write_with_bad_line(tmp_path, bench, bad_line, line_no=3):
    lines = [S.conversation_to_json(c) for c in bench[:5]]
    lines[line_no - 1] = bad_line
    p = tmp_path / "bad.jsonl"; p.write_text("\n".join(lines) + "\n"); return p


@pytest.mark.parametrize("mutate,field", [
    (lambda d: "{not json", "malformed JSON"),
    (lambda d: json.dumps([1, 2]), "record"),
    (lambda d: json.dumps({**d, "task_type": "poetry"}), "task_type"),
    (lambda d: json.dumps({k: v for k, v in d.items() if k != "facts"}), "facts: missing"),
    (lambda d: json.dumps({**d, "depth": "deep"}), "depth"),
    (lambda d: json.dumps({**d, "schema": "other/9"}), "schema"),
    (lambda d: json.dumps({**d, "handoff_turns": [999]}), "handoff_turns"),
    (lambda d: json.dumps({**d, "turns": d["turns"][:1] + [{**d["turns"][1], "task": 10}]}), "turns[1].task"),
    (lambda d: json.dumps({**d, "turns": [{**d["turns"][0], "fsm_state": "chitchat"}] + d["turns"][1:]}), "turns[0].fsm_state"),
])
def test_jsonl_bad_line_names_file_line_field(tmp_path, bench, mutate, field):
    d = json.loads(S.conversation_to_json(bench[2]))
    p = _write_with_bad_line(tmp_path, bench, mutate(d))
    with pytest.raises(S.JsonlError) as ei:
        S.load_jsonl(p)
    e = ei.value
    assert f"{p}:3:" in str(e) and field in str(e)
    assert e.line == 3 and e.path == p
    assert [c.id for c in e.conversations] == [c.id for c in bench[:2]]  # nothing already read is lost
    got = S.load_jsonl(p, errors="collect")
    assert [c.id for c in got] == [bench[i].id for i in (0, 1, 3, 4)] and [x.line for x in got.errors] == [3]


def test_load_jsonl_bad_mode(tmp_path):
    with pytest.raises(ValueError, match="errors"):
        S.load_jsonl(tmp_path / "x.jsonl", errors="ignore")


def test_check_expected(bench):
    for c in bench[:50]:
        ideal = [" ".join(f) + " " + " ".join(c.facts) for f in c.expected["turn_focus"]]
        assert S.check_expected(c, ideal)
        # dropping one key fact from the final answer fails
        assert not S.check_expected(c, ideal[:-1] + [" ".join(c.facts[1:])])
        # answering no turn on focus fails (every conversation has checked turns)
        bare = [""] * (len(c.turns) - 1) + [" ".join(c.facts)]
        assert not S.check_expected(c, bare)
    with pytest.raises(ValueError, match="responses"):
        S.check_expected(bench[0], [])


def test_facts_are_stated_before_conclusion(bench):
    for c in bench[:200]:
        stated = S.extract_facts(" ".join(t.text for t in c.turns[:-1]))
        assert all(f in stated for f in c.facts)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n:"): S.generate_conversations(-1, 0, CFG)
    with pytest.raises(ValueError, match="seed"): S.generate_conversations(3, -2, CFG)
    with pytest.raises(ValueError, match="synthetic.fsm_probs"):
        S.generate_conversations(3, 0, load_config("full", synthetic__fsm_probs=(0.0, 0.5, 0.5, 0.0, 0.0)))


def test_dataset_card(bench):
    card = S.dataset_card(bench[:300], CFG)
    assert {"quantity", "paper", "ours"} <= set(card.columns)
    assert card.quantity.str.contains("information_exchange").any()


def test_benchmark_runs_tiny():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_synthetic
    df = bench_synthetic.run(sizes=(20,), repeats=1)
    assert list(df["conversations"]) == [20] and (df["seconds"] > 0).all()


def test_greeting_announces_topic(bench):
    "The greeting names the seed query's focus entities (the topic agents carry through the conversation)."
    for c in bench[:100]:
        assert f"Topic: {' and '.join(c.expected['turn_focus'][1])} ." in c.turns[0].text


def test_generator_reads_its_constants_from_the_config():
    "turn_pass_fraction, length_dispersion and side_slack are config fields that reach the generator."
    base = load_config("full")
    assert S.generate_conversations(1, 0, load_config("full", synthetic__turn_pass_fraction=0.5))[0].expected["min_turn_pass"] == 0.5
    assert S.generate_conversations(1, 0, base)[0].expected["min_turn_pass"] == base.synthetic.turn_pass_fraction
    turns = lambda cfg: np.array([c.n_turns for c in S.generate_conversations(300, 0, cfg)])
    assert turns(load_config("full", synthetic__length_dispersion=1000.0)).var() < turns(base).var()
    flat = S.generate_conversations(30, 0, load_config("full", synthetic__side_slack=0))
    assert S.jsonl_sha256(flat) != S.jsonl_sha256(S.generate_conversations(30, 0, base))


def test_jsonl_invalid_utf8_names_file_and_line_in_both_modes(tmp_path, bench):
    "Issue 22: a line that is not UTF-8 is a bad line like any other (file:line), also under errors='collect'."
    lines = [S.conversation_to_json(c).encode() for c in bench[:5]]
    lines[3] = lines[3].replace(b'"facts":', b'"f\xff\xfeacts":')
    p = tmp_path / "latin.jsonl"; p.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(S.JsonlError) as ei:
        S.load_jsonl(p)
    assert ei.value.line == 4 and f"{p}:4:" in str(ei.value) and "UTF-8" in str(ei.value)
    assert [c.id for c in ei.value.conversations] == [c.id for c in bench[:3]]
    got = S.load_jsonl(p, errors="collect")
    assert [c.id for c in got] == [bench[i].id for i in (0, 1, 2, 4)] and [x.line for x in got.errors] == [4]


def test_jsonl_duplicate_conversation_id_names_the_second_line(tmp_path, bench):
    "Issue 22: two records with one id would make a run drop or double a conversation; the second is refused."
    lines = [S.conversation_to_json(c) for c in bench[:4]]
    lines.insert(3, "")                                   # a blank line still counts in the line numbers
    lines.append(lines[1])                                # line 6 repeats the id of line 2
    p = tmp_path / "dup.jsonl"; p.write_text("\n".join(lines) + "\n")
    with pytest.raises(S.JsonlError) as ei:
        S.load_jsonl(p)
    assert ei.value.line == 6 and f"{p}:6: id:" in str(ei.value) and "line 2" in str(ei.value)
    got = S.load_jsonl(p, errors="collect")
    assert [c.id for c in got] == [c.id for c in bench[:4]] and [x.line for x in got.errors] == [6]
