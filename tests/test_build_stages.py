"""The build's stage runner and its GGUF fallback, with no model run: a cached stage contributes exactly as a fresh
one, a stage killed half-way runs again in its own directory, --dry-run runs nothing, and a GGUF type that fails
verification falls back to the next larger one until none is left (a quality-gate error naming every type tried).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgeforge.build.builder import Builder
from edgeforge.build.cache import MARKER, StageCache
from edgeforge.build.config import validate_pipeline
from edgeforge.build.runner import StageRunner
from edgeforge.build.stage import BuildState, key_of
from edgeforge.build.stages.export import ExportStage, export_with_fallback
from edgeforge.errors import QualityGateError

TEACHER_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
                  "max_position_embeddings": 2048, "tie_word_embeddings": True}


@dataclass
class WordStage:
    """A real stage that writes one word to a file in its directory; ``runs`` counts how often it really ran."""

    word: str
    runs: list[Path] = field(default_factory=list)
    name: str = "word"

    @property
    def note(self) -> str:
        return f"writes {self.word}"

    def settings(self) -> dict[str, Any]:
        return {"word": self.word}

    def inputs(self) -> dict[str, Any]:
        return {}

    def run(self, stage_dir: Path, state: BuildState) -> dict[str, Any]:
        self.runs.append(stage_dir)
        (stage_dir / "word.txt").write_text(self.word, encoding="utf-8")
        return {"model_dir": str(stage_dir), "words": [self.word]}

    def absorb(self, record: dict[str, Any], state: BuildState) -> None:
        state.model_dir = Path(record["model_dir"])
        state.lineage_stages.extend(record["words"])


def test_a_cached_stage_contributes_exactly_as_a_fresh_one(tmp_path: Path) -> None:
    cache, logs = StageCache(tmp_path / ".stages"), []
    stage = WordStage("hello")
    fresh, cached = BuildState(), BuildState()
    StageRunner(cache, fresh, logs.append).take(stage)
    StageRunner(cache, cached, logs.append).take(stage)
    assert len(stage.runs) == 1 and stage.runs[0].name == f"word-{key_of(stage)[:16]}"
    assert (fresh.model_dir, fresh.lineage_stages) == (cached.model_dir, cached.lineage_stages)
    assert [r["cached"] for r in fresh.stage_rows + cached.stage_rows] == [False, True]
    # the cached row reports what the stage took when it ran, not the cache hit
    assert cached.stage_rows[0]["seconds"] == fresh.stage_rows[0]["seconds"]
    assert {k: v for k, v in fresh.stage_rows[0].items() if k != "cached"} == \
        {k: v for k, v in cached.stage_rows[0].items() if k != "cached"}
    assert logs[0] == "[word] running: writes hello" and logs[1].startswith("[word] cached (word-")


def test_a_stage_killed_half_way_runs_again_in_its_directory(tmp_path: Path) -> None:
    cache, logs = StageCache(tmp_path / ".stages"), []
    stage = WordStage("again")
    killed = cache.place(stage.name, stage.settings(), stage.inputs())
    killed.dir.mkdir(parents=True)  # what a SIGKILL leaves: the directory, no marker
    StageRunner(cache, BuildState(), logs.append).take(stage)
    assert stage.runs == [killed.dir] and (killed.dir / MARKER).is_file()
    assert logs == ["[word] resuming: writes again"]


def test_dry_run_describes_without_running(tmp_path: Path) -> None:
    cache = StageCache(tmp_path / ".stages")
    done, todo = WordStage("done"), WordStage("todo")
    StageRunner(cache, BuildState(), lambda _m: None).take(done)
    runner = StageRunner(cache, BuildState(), lambda _m: None, dry_run=True)
    runner.run_all([done, todo])
    assert len(done.runs) == 1 and todo.runs == []
    assert [(r["stage"], r["state"], r["key"]) for r in runner.rows] == \
        [("word", "cached", key_of(done)[:16]), ("word", "run", key_of(todo)[:16])]
    assert runner.state.lineage_stages == ["done"] and runner.state.pending == ["word"]
    assert runner.state.stage_rows == []


@pytest.fixture
def builder(tmp_path: Path) -> Builder:
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(TEACHER_CONFIG), encoding="utf-8")
    cfg = validate_pipeline({"teacher": str(teacher), "profile": "raspberry-pi-5-8gb", "task": None,
                             "export": {"formats": ["gguf"], "gguf_quant": "Q4_K_M"}}, "test")
    return Builder(cfg, tmp_path / "out")


def verdicts(builder: Builder, passing: set[str], logs: list[str]) -> BuildState:
    """Walk the GGUF exports as the runner does, each type verified as passing when it is in ``passing``."""
    builder.log = logs.append
    state = BuildState(model_dir=Path(builder.cfg.teacher or ""))
    for stage in export_with_fallback(builder, state, "gguf", "model-key"):
        assert isinstance(stage, ExportStage)
        ok = stage.quant in passing
        stage.absorb({"path": f"/kept/{stage.quant}/m.gguf", "format": "gguf", "quant": stage.quant,
                      "verify": {"passed": ok, "failures": [] if ok else [f"{stage.quant} mean KL too high"]}},
                     state)
    return state


def test_a_failed_gguf_type_falls_back_to_the_next_larger_one(builder: Builder) -> None:
    logs: list[str] = []
    state = verdicts(builder, {"Q5_K_M", "Q8_0"}, logs)
    assert [r["quant"] for r in state.exports["gguf"]] == ["Q4_K_M", "Q5_K_M"]
    assert [(a["quant"], [t["quant"] for t in a["tried"]]) for a in state.artifacts] == \
        [("Q5_K_M", ["Q4_K_M", "Q5_K_M"])]
    assert logs == ["[export-gguf] Q4_K_M failed verification (Q4_K_M mean KL too high); "
                    "trying the next larger type"]


def test_no_gguf_type_passing_is_a_quality_gate_error(builder: Builder) -> None:
    logs: list[str] = []
    with pytest.raises(QualityGateError) as e:
        verdicts(builder, set(), logs)
    # every larger preferred type that fits is tried, smallest estimate first (on this 64-wide config llama.cpp's
    # K-quants fall back to larger blocks, so Q6_K is estimated above Q8_0)
    assert "tried Q4_K_M, Q5_K_M, Q8_0, Q6_K" in str(e.value) and "Q6_K mean KL too high" in str(e.value)
    assert "artifacts kept in /kept/Q6_K" in str(e.value)
    assert logs[-1] == "[export-gguf] Q6_K failed verification (Q6_K mean KL too high)"


@pytest.mark.integration  # three real exports, each verified twice and scored through llama.cpp: about 90 s
def test_an_artifact_that_loses_task_accuracy_fails_and_the_build_falls_back(tmp_path: Path) -> None:
    """Real GGUF exports of a tiny random model, scored through llama.cpp on the fixed task set, against a source
    whose fine-tuning record says it got every example right: each type loses the task (random weights answer
    nothing correctly), so each fails the task gate, the build falls back through the larger types, and the
    quality-gate error names the task drop. KL alone would have passed Q8_0."""
    from tiny_models import make_tiny_model

    from edgeforge.build.task_set import held_out_task_examples

    model = make_tiny_model(tmp_path / "tiny")
    cfg = validate_pipeline({"teacher": str(model), "profile": "raspberry-pi-5-8gb", "task": "home-commands",
                             "export": {"formats": ["gguf"], "gguf_quant": "Q5_K_M"},
                             "verify": {"tokens": 64, "task_examples": 12}}, "test")
    logs: list[str] = []
    builder = Builder(cfg, tmp_path / "out", log=logs.append)
    n = len(held_out_task_examples(builder))
    assert n == 12
    state = BuildState(model_dir=model, source_scores={"model": "merged model", "correct": [True] * n,
                                                      "task_accuracy": 1.0})
    runner = StageRunner(builder.cache, state, logs.append)
    with pytest.raises(QualityGateError) as err:
        for stage in export_with_fallback(builder, state, "gguf", "model-key"):
            runner.take(stage)
    tried = state.exports["gguf"]
    assert [r["quant"] for r in tried][0] == "Q5_K_M" and len(tried) == 3  # fell back through the larger types
    for r in tried:
        gate = r["task"]["versus_source"]
        assert not gate["passed"] and gate["accuracy_b"] == 1.0 and gate["n_examples"] == n
        assert any("task exact match" in f for f in r["verify"]["failures"])
    assert "task exact match" in str(err.value)
    assert any("trying the next larger type" in line for line in logs)


def test_a_budget_between_two_presets_falls_back_to_a_fitted_mix(tmp_path: Path) -> None:
    """A profile whose GGUF budget holds Q5_K_M but not Q8_0 (both preferred): when every preset that fits fails,
    the last candidate is ``fit``, laid out with the profile's budget as its byte limit and that budget in its key."""
    import yaml

    from edgeforge.models.refs import arch_from_config
    from edgeforge.plan.planner import DEFAULT_CONTEXT, weights_budget_bytes
    from edgeforge.plan.profiles import resolve_profile
    from edgeforge.plan.sizing import memory_estimate

    arch = arch_from_config(TEACHER_CONFIG)
    stock = resolve_profile("raspberry-pi-5-8gb", ())
    ctx_tokens = DEFAULT_CONTEXT
    low = memory_estimate(arch, "gguf", "Q5_K_M", ctx_tokens).total_bytes
    high = memory_estimate(arch, "gguf", "Q8_0", ctx_tokens).total_bytes
    assert low < high
    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "profiles" / "raspberry-pi-5-8gb.yaml")
                          .read_text(encoding="utf-8"))
    data.update(name="tight-pi", memory_budget_bytes=(low + high) // 2)
    data["preferred_quants"]["gguf"] = ["Q8_0", "Q5_K_M", "Q4_K_M"]
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "tight-pi.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(TEACHER_CONFIG), encoding="utf-8")
    cfg = validate_pipeline({"teacher": str(teacher), "profile": "tight-pi", "task": None,
                             "export": {"formats": ["gguf"], "gguf_quant": "Q4_K_M"}}, "test")
    b = Builder(cfg, tmp_path / "out", profiles_dirs=(profiles,))
    assert b.plan.context_tokens == ctx_tokens
    assert stock.memory_budget_bytes > high  # the stock profile holds every preset: no fit there (test above)
    logs: list[str] = []
    b.log = logs.append
    state = BuildState(model_dir=teacher)
    laid_out = []
    for stage in export_with_fallback(b, state, "gguf", "model-key"):
        laid_out.append(stage)
        ok = stage.quant == "fit"
        stage.absorb({"path": f"/kept/{stage.quant}/m.gguf", "format": "gguf", "quant": stage.quant,
                      "verify": {"passed": ok, "failures": [] if ok else [f"{stage.quant} task drop"]}}, state)
    assert [s.quant for s in laid_out] == ["Q4_K_M", "Q5_K_M", "fit"]
    budget = weights_budget_bytes(arch, b.profile, b.plan.context_tokens)
    assert laid_out[-1].max_bytes == budget and laid_out[-1].settings()["max_bytes"] == budget
    assert "max_bytes" not in laid_out[0].settings()
    assert [(a["quant"], [t["quant"] for t in a["tried"]]) for a in state.artifacts] == \
        [("fit", ["Q4_K_M", "Q5_K_M", "fit"])]


def test_an_onnx_int4_that_fails_falls_back_to_int8_or_to_a_fit_between_them(tmp_path: Path) -> None:
    """ONNX fallback: a stock profile holds int8 (int4 -> int8); a profile whose budget sits between the int4 and
    int8 sizes lays out ``fit`` with that budget instead."""
    import yaml

    from edgeforge.models.refs import arch_from_config
    from edgeforge.plan.planner import DEFAULT_CONTEXT, weights_budget_bytes
    from edgeforge.plan.sizing import kv_cache_bytes, onnx_weights_bytes, runtime_overhead_bytes

    config = {**TEACHER_CONFIG, "num_hidden_layers": 4}  # int4 keeps the first and last layer at 8 bits
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(config), encoding="utf-8")
    arch = arch_from_config(config)
    assert onnx_weights_bytes(arch, "int4") < onnx_weights_bytes(arch, "int8")
    between = (onnx_weights_bytes(arch, "int4") + onnx_weights_bytes(arch, "int8")) // 2
    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "profiles" / "raspberry-pi-5-8gb.yaml")
                          .read_text(encoding="utf-8"))
    data.update(name="tight-onnx", memory_budget_bytes=between + kv_cache_bytes(arch, DEFAULT_CONTEXT)
                + runtime_overhead_bytes(arch, DEFAULT_CONTEXT))
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "tight-onnx.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")

    def laid_out(profile: str) -> list[ExportStage]:
        cfg = validate_pipeline({"teacher": str(teacher), "profile": profile, "task": None,
                                 "export": {"formats": ["onnx"], "onnx_quantize": "int4"}}, "test")
        b = Builder(cfg, tmp_path / f"out-{profile}", profiles_dirs=(profiles,), log=lambda _: None)
        state, stages = BuildState(model_dir=teacher), []
        with pytest.raises(QualityGateError):
            for stage in export_with_fallback(b, state, "onnx", "model-key"):
                stages.append(stage)
                stage.absorb({"path": f"/kept/{stage.quant}", "format": "onnx", "quant": stage.quant,
                              "verify": {"passed": False, "failures": ["task drop"]}}, state)
        assert all(s.max_bytes == (weights_budget_bytes(arch, b.profile, b.plan.context_tokens)
                                   if s.quant == "fit" else None) for s in stages)
        return stages

    assert [s.quant for s in laid_out("raspberry-pi-5-8gb")] == ["int4", "int8"]
    tight = laid_out("tight-onnx")
    assert [s.quant for s in tight] == ["int4", "fit"] and tight[-1].settings()["max_bytes"] == tight[-1].max_bytes


def test_a_fit_in_a_build_with_a_task_calibrates_on_its_training_examples_only(tmp_path: Path) -> None:
    """The calibration text of a fitted mix holds the task's training examples, never a held-out one (those are
    what the task gate scores), then the built-in prose."""
    from transformers import AutoTokenizer

    from edgeforge.build.task_set import fit_calibration_text, task_text
    from edgeforge.data.builtin import calibration_text
    from edgeforge.data.chat import conversation_text
    from edgeforge.models.gguf_hf import write_canonical_tokenizer
    from edgeforge.models.refs import resolve_model

    write_canonical_tokenizer(resolve_model(None).path, tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(TEACHER_CONFIG), encoding="utf-8")
    cfg = validate_pipeline({"teacher": str(teacher), "profile": "raspberry-pi-5-8gb", "task": "home-commands"},
                            "test")
    b = Builder(cfg, tmp_path / "out")
    text = fit_calibration_text(b, tokenizer)
    assert text.startswith(task_text(tokenizer, b.training_task()[:3])) and text.endswith(calibration_text())
    task_part = text[: len(text) - len(calibration_text())]
    held = [conversation_text(tokenizer, e["messages"]) for e in b.held_out_task()]
    assert held and not any(h in task_part for h in held)
