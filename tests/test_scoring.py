"""Task scoring: one scoring function with per-example correctness, Wilson intervals, and the paired comparison of two
scorings of the same examples, checked against hand-computed and published values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import make_tiny_model

from edgeforge.tasks.metrics import (
    exact_mcnemar_p,
    greedy_answers,
    paired_comparison,
    score_answer,
    score_answers,
    task_metrics,
    wilson_interval,
)


def _pairs(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


def test_wilson_interval_hand_computed():
    # 8 of 10: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10) = 0.7168, half-width 0.2265.
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    # 0 of 10: the lower end is exactly 0, the upper 1.96^2/10 / (1 + 1.96^2/10) = 0.2775.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(3, 2)


def test_exact_mcnemar_hand_computed():
    # 9 vs 2 discordant pairs: 2 * (C(11,0) + C(11,1) + C(11,2)) / 2^11 = 2 * 67 / 2048.
    assert exact_mcnemar_p(9, 2) == 134 / 2048
    assert exact_mcnemar_p(2, 9) == 134 / 2048
    # 6 vs 16: 2 * sum_{i<=6} C(22, i) / 2^22 = 2 * 110056 / 4194304.
    assert exact_mcnemar_p(6, 16) == pytest.approx(2 * 110056 / 4194304, rel=1e-12)
    assert exact_mcnemar_p(5, 5) == 1.0 and exact_mcnemar_p(0, 0) == 1.0


def test_paired_difference_matches_the_published_newcombe_interval():
    """Cavo et al. (2012) complete response before/after consolidation, [[59, 6], [16, 80]]: Fagerland, Lydersen and
    Laake's reference implementation (R package contingencytables, chapter 8 tests) gives -0.0621 (95% CI -0.1186 to
    -0.0046) for Newcombe's square-and-add interval."""
    r = paired_comparison(*_pairs(59, 6, 16, 80))
    assert r["difference"] == pytest.approx(-10 / 161)
    assert r["difference_ci95"] == pytest.approx([-0.1186, -0.0046], abs=1e-4)
    assert (r["both_correct"], r["only_a_correct"], r["only_b_correct"], r["neither_correct"]) == (59, 6, 16, 80)
    assert r["mcnemar_exact_p"] == exact_mcnemar_p(6, 16)
    assert r["accuracy_a"] == pytest.approx(65 / 161) and r["accuracy_b"] == pytest.approx(75 / 161)


def test_paired_comparison_of_equal_scorings_and_mismatched_lengths():
    a = [True, False, True, True]
    r = paired_comparison(a, a)
    assert r["difference"] == 0 and r["difference_ci95"][0] < 0 < r["difference_ci95"][1]
    assert r["mcnemar_exact_p"] == 1.0
    with pytest.raises(ValueError, match="same examples"):
        paired_comparison(a, a[:3])


def test_score_answer_rules():
    assert score_answer('{"device": "light", "on": true}', ' {"on": true,  "device": "light"}\n') == (True, True)
    assert score_answer('{"device": "light"}', '{"device": "fan"}') == (False, True)
    assert score_answer('{"device": "light"}', "sure! here") == (False, False)
    assert score_answer("Paris", "  Paris\n") == (True, False)


def test_score_answers_keeps_example_order_and_interval():
    examples = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f'{{"n": {i}}}'}]}
                for i in range(5)]
    answers = ['{"n": 0}', "no", '{"n": 2}', '{"n": 9}', '{"n":4}']
    m = score_answers(examples, answers)
    assert m["correct"] == [True, False, True, False, True]
    assert m["task_accuracy"] == pytest.approx(0.6) and m["valid_json_rate"] == pytest.approx(0.8)
    assert m["task_accuracy_ci95"] == pytest.approx(list(wilson_interval(3, 5)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("scoring") / "tiny")


def test_task_metrics_reports_per_example_correctness_of_a_real_model(tiny: Path):
    """The model's own greedy answers as references for examples 0 and 2, other answers for 1 and 3: task_metrics
    scores them in example order through the shared scoring."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    model = AutoModelForCausalLM.from_pretrained(str(tiny)).eval()
    prompts = [[{"role": "user", "content": f"turn on lamp {i}"}] for i in range(4)]
    own = greedy_answers(model, tok, [{"messages": p + [{"role": "assistant", "content": ""}]} for p in prompts])
    want = [own[0], json.dumps({"x": 1}), own[2], json.dumps({"x": 3})]
    examples = [{"messages": p + [{"role": "assistant", "content": w}]} for p, w in zip(prompts, want, strict=True)]
    m = task_metrics(model, tok, examples)
    assert m["correct"] == [True, False, True, False] and m["n_examples"] == 4
    assert m["task_accuracy_ci95"] == pytest.approx(list(wilson_interval(2, 4)))


def test_task_gate_fails_a_significant_or_large_drop_and_passes_noise():
    from edgeforge.tasks.metrics import task_gate

    source = [True] * 60 + [False] * 40
    same = task_gate(list(source), source, max_drop=0.05)
    assert same["passed"] and same["difference"] == 0 and same["reason"] == ""
    # 3 of 100 lost: within 5 points and not significant (3 discordant pairs)
    noise = task_gate([False] * 3 + source[3:], source, max_drop=0.05)
    assert noise["passed"], noise["reason"]
    # 8 lost: more than 5 points below, and significant (McNemar p = 2 / 2**8)
    big = task_gate([False] * 8 + source[8:], source, max_drop=0.05)
    assert not big["passed"] and "8.0% below" in big["reason"] and "significantly below" in big["reason"]
    # a configurable drop: 10 points allowed, the 8-point loss still fails on significance alone
    lax = task_gate([False] * 8 + source[8:], source, max_drop=0.10)
    assert not lax["passed"] and "allowed" not in lax["reason"] and "McNemar" in lax["reason"]
    # an artifact better than its source never fails
    assert task_gate([True] * 100, source, max_drop=0.0)["passed"]
