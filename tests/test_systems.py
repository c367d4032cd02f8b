"""Systems: the compared systems, the simulated world's rules, and the one list of names the other notebooks read."""
import numpy as np
import pytest
import torch
from rapo_nb.config import load_config
from rapo_nb.systems import (SYSTEMS, SYSTEM_SPECS, SYSTEM_LABELS, ERROR_TYPES, TURN_COLUMNS, CONV_COLUMNS, classify_failure,
                             drop_facts, reception_probability, check_ablation, ABLATIONS)

CFG = load_config("quick")


def test_failure_rules_order():
    assert classify_failure(True, True, True, True) == "resource"
    assert classify_failure(False, True, True, True) == "context_loss"
    assert classify_failure(False, False, True, True) == "agent_selection"
    assert classify_failure(False, False, False, True) == "topic_shift"
    assert classify_failure(False, False, False, False) == "ambiguous_query"


def test_reception_depends_on_prompt_alignment():
    P = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert reception_probability(P, 0, 1) == pytest.approx(1.0)
    assert reception_probability(P, 0, 2) == pytest.approx(reception_probability(P, 0, 3))
    assert reception_probability(P, 0, 2) < 1.0
    assert reception_probability(P, 0, 2) == pytest.approx(CFG.simulation.reception_floor)     # orthogonal prompts: the floor
    assert reception_probability(P, 0, 2, load_config("quick", simulation__reception_floor=0.2)) == pytest.approx(0.2)
    ctx, lost = drop_facts("Fact: A funds B . Fact: C hosts D .", ["A funds B", "C hosts D"], np.array([True, False]))
    assert lost == ["C hosts D"] and "A funds B" in ctx and "C hosts D" not in ctx


def test_one_source_of_names():
    import rapo_nb.evaluation as ev, rapo_nb.stats as st
    assert ev.SYSTEMS is SYSTEMS and st.SYSTEMS is SYSTEMS and ev.SYSTEM_LABELS is SYSTEM_LABELS
    assert ev.TURN_COLUMNS is TURN_COLUMNS and ev.CONV_COLUMNS is CONV_COLUMNS and ev.ERROR_TYPES is ERROR_TYPES
    assert tuple(SYSTEM_SPECS) == SYSTEMS and set(SYSTEM_LABELS) == set(SYSTEMS)


def test_every_failure_rule_is_reachable():
    got = {classify_failure(*map(bool, np.unravel_index(i, (2,) * 4))) for i in range(16)}
    assert got == set(ERROR_TYPES)


def test_ablation_switches_checked():
    assert check_ablation(None) == {k: False for k in ABLATIONS}
    with pytest.raises(ValueError, match="no_brain"): check_ablation({"no_brain": True})
