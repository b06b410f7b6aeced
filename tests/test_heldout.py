"""Held out by content: the built-in prose shares no 64-character window with anything trained on, user data is split
by content hash (duplicates dropped, stable under reordering), and verification gets the tokens it asks for."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tiny_models import make_tiny_model

from edgeforge.data import builtin
from edgeforge.data.builtin import heldout_prose, training_prose, write_calibration_text
from edgeforge.errors import BadInputError
from edgeforge.tasks.examples import load_task_examples

#: The leak test's unit: two texts that share no window of 64 characters share no sentence.
WINDOW_CHARS = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("heldout") / "tiny")


@pytest.fixture(scope="module")
def tokenizer(tiny: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny))


def _windows(text: str) -> set[int]:
    return {hash(text[i:i + WINDOW_CHARS]) for i in range(len(text) - WINDOW_CHARS + 1)}


# ---------------------------------------------------------------- built-in prose
def test_builtin_heldout_shares_no_window_with_training_or_calibration_text(tmp_path: Path):
    from edgeforge.distill.teacher_cache import BUILTIN_PROMPTS

    calibration = write_calibration_text(tmp_path / "calibration.txt").read_text(encoding="utf-8")
    trained = _windows(training_prose()) | _windows(calibration) | _windows("\n".join(BUILTIN_PROMPTS))
    shared = _windows(heldout_prose()) & trained
    assert not shared, f"{len(shared)} 64-character windows of the held-out prose are trained on"


def test_builtin_heldout_is_long_enough_and_uncapped(tokenizer):
    text = heldout_prose()
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert n_tokens >= 4000, f"only {n_tokens} held-out tokens"
    assert len(text) > 5000 and heldout_prose(10**9) == text  # no hidden 5,000-character cap
    assert heldout_prose(300) == text[:300]


def test_builtin_split_does_not_depend_on_the_topic_order(monkeypatch: pytest.MonkeyPatch):
    import pydoc_data.topics as topics

    before = heldout_prose()
    monkeypatch.setattr(topics, "topics", dict(reversed(list(topics.topics.items()))))
    builtin.builtin_split.cache_clear()
    try:
        assert heldout_prose() == before
    finally:
        monkeypatch.undo()
        builtin.builtin_split.cache_clear()


# ---------------------------------------------------------------- user data
def _task_rows(n: int) -> list[dict]:
    return [{"prompt": f"turn on light number {i}", "completion": json.dumps({"device": "light", "id": i})}
            for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _key(example: dict) -> str:
    return json.dumps([[m["role"], " ".join(m["content"].split())] for m in example["messages"]])


def test_task_split_is_by_content_with_duplicates_dropped(tmp_path: Path):
    rows = _task_rows(60)
    # Duplicates spread over the file, the last lines included: a split by position puts copies on both sides.
    dupes = [dict(rows[i]) for i in (3, 17, 41, 58, 59)] + [{"prompt": "turn on  light number 5 ",
                                                            "completion": rows[5]["completion"]}]
    mixed = rows[:30] + dupes[:3] + rows[30:] + dupes[3:]
    train, held, source = load_task_examples(None, _write_jsonl(tmp_path / "task.jsonl", mixed))
    train_keys, held_keys = {_key(e) for e in train}, [_key(e) for e in held]
    assert held and not train_keys & set(held_keys), "a held-out example also sits in training"
    assert len(train) + len(held) == 60 and len(set(held_keys)) == len(held)
    assert "6 exact duplicates dropped" in source and f"{len(held)} of 60" in source


def test_task_split_is_stable_under_reordering(tmp_path: Path):
    rows = _task_rows(80)
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    a_train, a_held, _ = load_task_examples(None, _write_jsonl(tmp_path / "a.jsonl", rows))
    b_train, b_held, _ = load_task_examples(None, _write_jsonl(tmp_path / "b.jsonl", shuffled))
    assert a_held == b_held  # the same examples, in the same (hash) order: a prefix of them is stable too
    assert sorted(map(_key, a_train)) == sorted(map(_key, b_train))


def test_answers_to_one_prompt_stay_on_one_side():
    from edgeforge.data.text import split_by_content

    items = [("q1", "a"), ("q1", "b"), ("q2", "a"), ("q3", "c"), ("q3", "d"), ("q4", "e")]
    split = split_by_content(items, content=lambda x: f"{x[0]}|{x[1]}", group=lambda x: x[0], heldout_fraction=0.5)
    held_prompts = {q for q, _ in split.heldout}
    assert held_prompts and not held_prompts & {q for q, _ in split.train}


def test_too_few_distinct_examples_is_a_clear_error(tmp_path: Path):
    row = _task_rows(1)[0]
    with pytest.raises(BadInputError, match=r"task.jsonl: only 1 distinct item.*3 duplicate"):
        load_task_examples(None, _write_jsonl(tmp_path / "task.jsonl", [row] * 4))


def test_documents_split_by_content_and_packed_apart(tokenizer):
    from edgeforge.data.text import split_documents

    docs = [f"Document {i}: " + " ".join(f"word{i}-{j}" for j in range(30)) for i in range(40)]
    with_dupes = docs + docs[:5] + [docs[-1]]
    split = split_documents(with_dupes, tokenizer, seq_len=32)
    again = split_documents(random.Random(3).sample(with_dupes, len(with_dupes)), tokenizer, seq_len=32)
    assert split.info["duplicate_documents_dropped"] == 6
    assert split.info["heldout_documents"] + split.info["train_documents"] == 40
    assert split.heldout.equal(again.heldout)  # the same held-out sequences whatever the file's order
    held_ids = {tuple(r) for r in split.heldout.tolist()}
    assert split.train.shape[1] == 32 and not held_ids & {tuple(r) for r in split.train.tolist()}


def test_short_heldout_documents_grow_to_one_sequence(tokenizer):
    from edgeforge.data.text import split_documents

    docs = [f"note {i}" for i in range(30)]  # ~4 tokens each: 10% of them cannot fill a sequence of 32
    split = split_documents(docs, tokenizer, seq_len=32)
    assert len(split.heldout) >= 1 and "grown to" in split.info["heldout_source"]


# ---------------------------------------------------------------- verification gets what it asks for
def test_verification_refuses_more_tokens_than_the_text_has(tiny: Path, tmp_path: Path):
    from edgeforge.models.refs import ModelRef
    from edgeforge.verify.artifact import Reference, verify_artifact

    ref = Reference(ModelRef(str(tiny), tiny, "hf"))
    available = len(ref.encode(heldout_prose(), 10**9))
    with pytest.raises(BadInputError, match=rf"asks for {available + 1} tokens.*has {available}"):
        verify_artifact(tmp_path / "never-opened.gguf", ref, "Q8_0", n_tokens=available + 1)
