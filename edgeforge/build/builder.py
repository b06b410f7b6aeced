"""``edgeforge build``: plan -> (distill) -> fine-tune -> merge -> export -> verify -> bench -> ship.

The plan decides which stages run: fine-tune when the teacher fits and is fast enough on the device, distill (then
fine-tune the student) when it is not; a pipeline file may choose fine-tune-then-distill instead. Every stage is
cached by a key over its settings and inputs (``edgeforge.build.cache``) under ``OUT/.stages``, so a rerun skips
finished stages and a killed run resumes from the stage's own checkpoint. The ship folder ``OUT/ship`` is assembled
in ``OUT/ship.partial`` and renamed into place when complete.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeforge.errors import BadInputError, QualityGateError
from edgeforge.build.config import PipelineConfig
from edgeforge.build.cache import Stage, StageCache, path_identity, write_json_atomic

Log = Callable[[str], None]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "generation_config.json", "config.json")


@dataclass
class StagePlan:
    """What a build will do, before it does it (``--dry-run`` prints this)."""

    name: str
    stage: Stage
    run: Callable[[Stage], dict[str, Any]] | None = None
    note: str = ""

    def describe(self) -> dict[str, Any]:
        state = "cached" if self.stage.done else ("resume" if self.stage.started else "run")
        return {"stage": self.name, "key": self.stage.key[:16], "state": state, "dir": str(self.stage.dir),
                "note": self.note}


@dataclass
class BuildState:
    """What the stages have produced so far."""

    model_dir: Path | None = None  # the HF model the exports come from
    model_key: str = ""  # its stage key (or the teacher's identity hash)
    lineage_stages: list[str] = field(default_factory=list)
    distill: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    stage_rows: list[dict[str, Any]] = field(default_factory=list)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("edgeforge", "torch", "transformers", "peft", "optimum-onnx", "onnxruntime", "llama-cpp-python",
                 "gguf"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


class Builder:
    """One build: resolves the inputs, lays out the stages, runs them, ships."""

    def __init__(self, cfg: PipelineConfig, out: Path, profiles_dirs: tuple[Path, ...] = (),
                 log: Log = lambda _m: None) -> None:
        from edgeforge.models.refs import read_arch, resolve_model
        from edgeforge.plan.planner import plan
        from edgeforge.plan.profiles import resolve_profile

        if cfg.profile is None:
            raise BadInputError("no device profile: pass --profile NAME (see `edgeforge profiles list`) or set "
                                "`profile:` in the pipeline file")
        self.cfg = cfg
        self.out = Path(out)
        self.log = log
        self.profiles_dirs = profiles_dirs
        self.profile = resolve_profile(cfg.profile, profiles_dirs)
        self.teacher_ref = resolve_model(cfg.teacher)
        self.data_files = [Path(p) for p in cfg.data]
        for p in self.data_files:
            if not p.is_file():
                raise BadInputError(f"--data {p}: expected a text or JSONL file, found nothing there")
        self.task_path: Path | None = None
        if cfg.task is not None:
            from edgeforge.tasks import task_names

            if cfg.task not in task_names():
                self.task_path = Path(cfg.task)
                if not self.task_path.is_file():
                    raise BadInputError(f"--task {cfg.task}: expected a built-in task ({', '.join(task_names())}) "
                                        "or a task JSONL file, found neither")
        self.target = None
        if cfg.target is not None:
            from edgeforge.bench.targets import resolve_target

            self.target = resolve_target(cfg.target)
        arch = read_arch(self.teacher_ref)
        kwargs: dict[str, Any] = {"has_task": cfg.task is not None}
        if cfg.context_tokens:
            kwargs["context"] = cfg.context_tokens
        self.plan = plan(arch, self.profile, self.teacher_ref.name, **kwargs)
        self.cache = StageCache(self.out / ".stages")
        self.state = BuildState()
        self.teacher_identity = path_identity(self.teacher_ref.path)
        self.data_identity = [path_identity(p) for p in self.data_files]
        self.task_identity = path_identity(self.task_path) if self.task_path else cfg.task

    # ------------------------------------------------------------------ decisions
    def decide(self) -> tuple[bool, bool, str]:
        """(distill?, fine-tune?, order) from the plan and the pipeline settings."""
        cfg = self.cfg
        distill = cfg.distill.enabled if cfg.distill.enabled is not None else self.plan.decision.startswith("distill")
        finetune = cfg.finetune.enabled if cfg.finetune.enabled is not None else cfg.task is not None
        if finetune and cfg.task is None:
            raise BadInputError("finetune.enabled is true but no task is given: pass --task NAME|PATH")
        if distill and self.plan.student is None and cfg.distill.student_layers is None:
            raise BadInputError(f"the plan found no student for {self.profile.name}: {self.plan.reason}")
        order = cfg.order
        if order == "auto":
            order = "distill-then-finetune"
        if order == "finetune-then-distill" and not (distill and finetune):
            raise BadInputError("order: finetune-then-distill needs both stages; this build runs "
                                f"{'distillation' if distill else 'no distillation'} and "
                                f"{'fine-tuning' if finetune else 'no fine-tuning'}")
        return distill, finetune, order

    def student_shape(self) -> dict[str, Any]:
        s = self.plan.student or {}
        layers = self.cfg.distill.student_layers or s.get("layers")
        hidden = self.cfg.distill.student_hidden or s.get("hidden_size")
        if hidden == self.plan.teacher_arch.get("hidden_size"):
            hidden = None
        return {"layers": layers, "hidden": hidden}

    # ------------------------------------------------------------------ stages
    def stages(self) -> list[StagePlan]:
        """The model stages in order (the export/bench stages depend on their results and are laid out later)."""
        distill, finetune, order = self.decide()
        plans: list[StagePlan] = []
        upstream: dict[str, Any] = {"teacher": self.teacher_identity}
        if order == "finetune-then-distill":
            ft = self._finetune_stage(upstream, base="teacher")
            plans.append(ft)
            ds = self._distill_stage({"teacher": ft.stage.key}, teacher_from="finetune-teacher")
            plans.append(ds)
            return plans
        if distill:
            ds = self._distill_stage(upstream, teacher_from=None)
            plans.append(ds)
            upstream = {"model": ds.stage.key}
        if finetune:
            plans.append(self._finetune_stage(upstream, base="student" if distill else "teacher"))
        return plans

    def _distill_stage(self, inputs: dict[str, Any], teacher_from: str | None) -> StagePlan:
        d = self.cfg.distill
        shape = self.student_shape()
        config = {**d.model_dump(exclude={"enabled"}), "student": shape, "seed": self.cfg.seed,
                  "data": self.data_identity, "task_data": self.task_identity if teacher_from else None}
        stage = self.cache.stage("distill", config, inputs)
        return StagePlan("distill", stage, lambda st: self._run_distill(st, teacher_from),
                         note=f"{shape['layers']}-layer student, {d.steps} steps, {d.loss}"
                              + (", teacher = the fine-tuned teacher, task data" if teacher_from else ""))

    def _finetune_stage(self, inputs: dict[str, Any], base: str) -> StagePlan:
        f = self.cfg.finetune
        config = {**f.model_dump(exclude={"enabled"}), "task": self.task_identity, "seed": self.cfg.seed,
                  "base": base}
        name = "finetune-teacher" if base == "teacher" and self.cfg.order == "finetune-then-distill" else "finetune"
        stage = self.cache.stage(name, config, inputs)
        return StagePlan(name, stage, lambda st: self._run_finetune(st, base),
                         note=f"{f.method} rank {f.rank} on {self.cfg.task}, {f.steps} steps, merged")

    def _teacher_hf_dir(self) -> Path:
        from edgeforge.finetune.adapter import base_model_dir

        return base_model_dir(str(self.teacher_ref.path))[0]

    def _run_distill(self, st: Stage, teacher_from: str | None) -> dict[str, Any]:
        from edgeforge.distill.record import record_summary
        from edgeforge.distill.run import run_distill
        from edgeforge.distill.config import DistillConfig

        d = self.cfg.distill
        shape = self.student_shape()
        out = st.dir / "student"
        teacher = str(self.teacher_ref.path)
        data = tuple(self.data_files)
        if teacher_from is not None:
            teacher = str(self.state.model_dir)
            data = (*data, self._task_chat_jsonl(st.dir / "task-train.jsonl"))
        resume = (out / ".checkpoint").is_dir()
        if resume:
            self.log("distill: resuming the interrupted run from its last checkpoint")
        cfg = DistillConfig(out=out, teacher=teacher, student_layers=shape["layers"], student_hidden=shape["hidden"],
                            init=d.init, data=data, generate_answers=d.generate_answers, loss=d.loss,
                            temperature=d.temperature, alpha=d.alpha, top_k=d.top_k,
                            offline_teacher=d.offline_teacher, steps=d.steps, lr=d.lr, batch_size=d.batch_size,
                            seq_len=d.seq_len, seed=self.cfg.seed, checkpoint_every=d.checkpoint_every,
                            resume=resume, profiles_dirs=self.profiles_dirs,
                            **self._distill_techniques())
        record = run_distill(cfg, log=self.log)
        return {"model_dir": str(out), "record": record_summary(record),
                "loss_curve": record.get("loss_curve", []), "record_file": str(out / "distill.json")}

    def _distill_techniques(self) -> dict[str, Any]:
        """The pipeline's technique settings as DistillConfig fields (docs/techniques.md)."""
        d = self.cfg.distill
        out: dict[str, Any] = {k: getattr(d, k) for k in (
            "progressive_from", "curriculum", "curriculum_pacing", "curriculum_start", "self_distill", "task_loss",
            "rationale_weight", "task_examples", "task_eval_examples", "rationale_tokens", "teacher_routing",
            "on_policy_ratio", "on_policy_tokens")}
        out.update(progressive=tuple(d.progressive), extra_teachers=tuple(d.extra_teachers),
                   teacher_weights=tuple(d.teacher_weights))
        if d.task_loss != "none":
            out["task"] = str(self.task_path) if self.task_path else self.cfg.task
        return out

    def _task_chat_jsonl(self, path: Path) -> Path:
        """The task's training examples as chat JSONL: distillation data for fine-tune-then-distill."""
        from edgeforge.tasks.examples import load_task_examples

        train, _, _ = load_task_examples(None if self.task_path else self.cfg.task, self.task_path, self.cfg.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"messages": ex["messages"]}) + "\n" for ex in train), encoding="utf-8")
        return path

    def _run_finetune(self, st: Stage, base: str) -> dict[str, Any]:
        from edgeforge.finetune.run import run_finetune
        from edgeforge.finetune.config import FinetuneConfig

        f = self.cfg.finetune
        out = st.dir / "model"
        model = str(self._teacher_hf_dir() if base == "teacher" else self.state.model_dir)
        resume = (out / "checkpoint").is_dir()
        if resume:
            self.log("finetune: resuming the interrupted run from its last checkpoint")
        cfg = FinetuneConfig(method=f.method, rank=f.rank, alpha=f.alpha, steps=f.steps, lr=f.lr,
                             batch_size=f.batch_size, seed=self.cfg.seed, eval_examples=f.eval_examples,
                             checkpoint_every=f.checkpoint_every, rank_sweep=tuple(f.rank_sweep),
                             rank_sweep_steps=f.rank_sweep_steps, layerwise_lr_decay=f.layerwise_lr_decay,
                             ewc=f.ewc, ewc_batches=f.ewc_batches)
        task = None if self.task_path else self.cfg.task
        record = run_finetune(model, out, cfg, task=task, data=self.task_path, merge=True, resume=resume,
                              log=self.log)
        keep = {k: record.get(k) for k in ("before", "after", "forgetting", "accuracy_by_step", "loss_curve",
                                           "train_tokens", "train_seconds", "merge", "config", "data")}
        return {"model_dir": str(out), "record": keep, "record_file": str(out / "finetune.json")}

    # ------------------------------------------------------------------ running
    def run_stage(self, sp: StagePlan) -> dict[str, Any]:
        st = sp.stage
        if st.done:
            self.log(f"[{sp.name}] cached ({st.dir.name})")
            result = st.result()
            # seconds: what the stage took when it ran (the cache hit itself costs next to nothing)
            self.state.stage_rows.append({"name": sp.name, "cache_key": st.key[:16], "cached": True,
                                          "seconds": st.seconds(), "config": st.config})
            return result
        self.log(f"[{sp.name}] {'resuming' if st.started else 'running'}: {sp.note}")
        st.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        assert sp.run is not None
        result = sp.run(st)
        seconds = time.perf_counter() - t0
        st.finish(result, seconds)
        self.state.stage_rows.append({"name": sp.name, "cache_key": st.key[:16], "cached": False,
                                      "seconds": seconds, "config": st.config})
        return result

    def run_model_stages(self) -> None:
        self.state.model_dir = self._teacher_hf_dir()
        self.state.model_key = str(self.teacher_identity)
        for sp in self.stages():
            result = self.run_stage(sp)
            self.state.model_dir = Path(result["model_dir"])
            self.state.model_key = sp.stage.key
            self.state.lineage_stages.append(sp.name)
            if sp.name == "distill":
                self.state.distill = {**result["record"], "loss_curve": result["loss_curve"]}
            else:
                self.state.finetune = result["record"]

    # ------------------------------------------------------------------ export + verify
    def formats(self) -> list[str]:
        if self.cfg.export.formats is not None:
            fmts = list(dict.fromkeys(self.cfg.export.formats))
        else:
            fmts = list(dict.fromkeys(r.format for r in self.profile.runtimes))
        runs = {r.format for r in self.profile.runtimes}
        bad = [f for f in fmts if f not in runs]
        if bad:
            raise BadInputError(f"export.formats: {self.profile.name} runs {', '.join(sorted(runs))}, not "
                                f"{', '.join(bad)}")
        return fmts

    def gguf_candidates(self) -> list[str]:
        """The chosen GGUF type, then (with fallback) the profile's larger preferred types that still fit."""
        from edgeforge.models.refs import arch_from_config
        from edgeforge.plan.sizing import GGUF_QUANT_TYPES, memory_estimate

        first = self.cfg.export.gguf_quant
        if first is None:
            first = (self.plan.student or {}).get("quant") if self.state.distill is not None else None
            first = first or self.plan.quant
        if first not in GGUF_QUANT_TYPES:
            raise BadInputError(f"export.gguf_quant: expected one of {', '.join(GGUF_QUANT_TYPES)}, found {first}")
        if not self.cfg.export.fallback:
            return [first]
        arch = arch_from_config(json.loads((self.state.model_dir / "config.json").read_text(encoding="utf-8")))
        ctx = self.plan.context_tokens

        def size(q: str) -> int:
            return memory_estimate(arch, "gguf", q, ctx).weights_bytes

        larger = sorted((q for q in self.profile.preferred_quants.gguf
                         if q in GGUF_QUANT_TYPES and q != first and size(q) > size(first)
                         and memory_estimate(arch, "gguf", q, ctx).total_bytes <= self.profile.memory_budget_bytes),
                        key=size)
        return [first, *larger[:2]]

    def _task_examples(self) -> tuple[Any, list[dict]]:
        if self.cfg.task is None:
            return None, []
        from edgeforge.tasks.examples import load_task_examples

        _, held, _ = load_task_examples(None if self.task_path else self.cfg.task, self.task_path, self.cfg.seed)
        return held, held[: self.cfg.verify.task_examples]

    def export_stage(self, fmt: str, quant: str) -> StagePlan:
        config = {"format": fmt, "quant": quant, "verify": self.cfg.verify.model_dump(),
                  "task": self.task_identity}
        st = self.cache.stage(f"export-{fmt}", config, {"model": self.state.model_key})
        return StagePlan(f"export-{fmt}", st, lambda s: self._run_export(s, fmt, quant), note=f"{fmt} {quant}")

    def _run_export(self, st: Stage, fmt: str, quant: str) -> dict[str, Any]:
        from transformers import AutoTokenizer

        from edgeforge.tasks.metrics import artifact_task_metrics
        from edgeforge.models.refs import ModelRef
        from edgeforge.verify.artifact import Reference, verify_artifact

        assert self.state.model_dir is not None
        ref = ModelRef(name=self._model_name(), path=self.state.model_dir, format="hf")
        stages = [*self.state.lineage_stages]
        if fmt == "gguf":
            from edgeforge.export.gguf import NEEDS_IMATRIX, export_gguf

            imatrix_data = None
            if quant in NEEDS_IMATRIX:
                from edgeforge.data.builtin import write_calibration_text

                imatrix_data = write_calibration_text(st.dir / "calibration.txt")
            path = st.dir / f"{self._slug()}-{quant}.gguf"
            record = export_gguf(ref, quant, path, imatrix_data, self.profile.name, stages)
        else:
            from edgeforge.export.onnx.export import export_onnx

            path = st.dir / "onnx"
            record = export_onnx(self.state.model_dir, path, quantize=quant)  # type: ignore[arg-type]
        self.log(f"[export-{fmt}] verifying {path.name} against {self.state.model_dir.name} "
                 f"({self.cfg.verify.tokens} tokens)")
        verify = verify_artifact(path, Reference(ref), quant, n_tokens=self.cfg.verify.tokens, enforce=False)
        task = None
        _, examples = self._task_examples()
        if examples:
            tok = AutoTokenizer.from_pretrained(str(self.state.model_dir))
            self.log(f"[export-{fmt}] task accuracy of {path.name} on {len(examples)} held-out examples")
            task = artifact_task_metrics(path, tok, examples)
        return {"path": str(path), "format": fmt, "quant": quant, "verify": verify, "task": task,
                "size_bytes": _size(path), "export": {k: record.get(k) for k in ("seconds", "sha256", "lineage")}}

    def run_exports(self) -> None:
        for fmt in self.formats():
            if fmt == "gguf":
                quants = self.gguf_candidates()
            else:
                quants = [self.cfg.export.onnx_quantize or (self.profile.preferred_quants.onnx or ["int8"])[0]]
            tried = []
            for q in quants:
                res = self.run_stage(self.export_stage(fmt, q))
                tried.append({"quant": q, "passed": res["verify"]["passed"],
                              "mean_kl": res["verify"].get("mean_kl"), "top1": res["verify"].get("top1_agreement")})
                if res["verify"]["passed"]:
                    self.state.artifacts.append({**res, "tried": tried})
                    break
                self.log(f"[export-{fmt}] {q} failed verification ({_why(res['verify'])})"
                         + ("; trying the next larger type" if q != quants[-1] else ""))
            else:
                dirs = ", ".join(str(Path(r).parent) for r in [res["path"]])
                raise QualityGateError(f"{fmt}: no type passed verification (tried "
                                       f"{', '.join(t['quant'] for t in tried)}; last: {_why(res['verify'])}); "
                                       f"artifacts kept in {dirs}")

    # ------------------------------------------------------------------ bench
    def run_bench(self) -> list[dict[str, Any]]:
        if not self.cfg.bench.enabled or not self.state.artifacts:
            return []
        from edgeforge.bench.run import BenchOptions, TargetJob, run_benchmarks, target_profile
        from edgeforge.bench.targets import DEFAULT_LOCAL

        b = self.cfg.bench
        targets = ([DEFAULT_LOCAL] if b.local else []) + ([self.target] if self.target is not None else [])
        if not targets:
            return []
        options = BenchOptions(threads=b.threads, prompt_tokens=b.prompt_tokens, gen_tokens=b.gen_tokens,
                               repeats=b.repeats)
        config = {"bench": b.model_dump(), "targets": [t.model_dump() for t in targets]}
        inputs = {"artifacts": [a["export"].get("sha256") or path_identity(Path(a["path"]))
                                for a in self.state.artifacts]}
        st = self.cache.stage("bench", config, inputs)

        def run(_st: Stage) -> dict[str, Any]:
            jobs = [TargetJob(t, target_profile(t, self.profiles_dirs)) for t in targets]
            results = run_benchmarks([a["path"] for a in self.state.artifacts], jobs, options, log=self.log,
                                     save=False)
            return {"results": results}

        result = self.run_stage(StagePlan("bench", st, run, note=", ".join(t.name for t in targets)))
        return result["results"]

    # ------------------------------------------------------------------ ship
    def _model_name(self) -> str:
        return f"{self.teacher_ref.name}-{self.profile.name}"

    def _slug(self) -> str:
        base = Path(str(self.teacher_ref.name)).name.replace(".gguf", "")
        return f"{base}-{self.profile.name}"

    def ship(self, bench: list[dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
        from edgeforge.export.gguf import record_path
        from edgeforge.ship.folder import write_ship

        ship = self.out / "ship"
        partial = self.out / "ship.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        assert self.state.model_dir is not None
        rows = []
        for a in self.state.artifacts:
            src = Path(a["path"])
            name = src.name if a["format"] == "gguf" else f"onnx-{a['quant']}"
            dst = partial / name
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
                rec = record_path(src)
                if rec.is_file():
                    shutil.copy2(rec, partial / rec.name)
            measured = [r for r in bench if Path(str(r.get("artifact", ""))).name == src.name]
            rows.append({"path": name, "format": a["format"], "quant": a["quant"], "size_bytes": a["size_bytes"],
                         "verify": a["verify"], "task_accuracy": (a.get("task") or {}).get("task_accuracy"),
                         "task": a.get("task"), "tried": a.get("tried"),
                         "bench": [_bench_row(r) for r in measured]})
        tok_dir = partial / "tokenizer"
        tok_dir.mkdir()
        for f in TOKENIZER_FILES:
            if (self.state.model_dir / f).is_file():
                shutil.copy2(self.state.model_dir / f, tok_dir / f)
        records = partial / "records"
        records.mkdir()
        if self.state.distill is not None:
            write_json_atomic(records / "distill.json", self.state.distill)
        if self.state.finetune is not None:
            write_json_atomic(records / "finetune.json", self.state.finetune)
        write_json_atomic(records / "plan.json", self.plan.to_dict())
        if bench:
            write_json_atomic(records / "bench.json", bench)
        summary = self.summary(rows, bench)
        write_ship(partial, summary)
        shutil.rmtree(ship, ignore_errors=True)
        partial.rename(ship)
        return ship, summary

    def speed_rows(self, bench: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from edgeforge.bench.artifact import local_artifact
        from edgeforge.bench.results import estimate_for

        rows = []
        for a in self.state.artifacts:
            est = estimate_for(self.profile, local_artifact(a["path"]), self.cfg.bench.prompt_tokens)
            measured = None
            for r in bench:
                if r.get("profile") == self.profile.name and Path(str(r.get("artifact", ""))).name \
                        == Path(a["path"]).name:
                    measured = _bench_row(r).get("decode_tokens_per_s")
            rows.append({"profile": self.profile.name, "artifact": Path(a["path"]).name,
                         "estimated_decode_tokens_per_s": est.get("estimated_decode_tokens_per_s"),
                         "measured_decode_tokens_per_s": measured})
        for r in bench:
            row = _bench_row(r)
            if r.get("profile") == self.profile.name:
                continue
            rows.append({"profile": f"{r.get('target', '?')} ({r.get('profile', '?')})",
                         "artifact": Path(str(r.get("artifact", "?"))).name,
                         "estimated_decode_tokens_per_s": row.get("estimated_decode_tokens_per_s"),
                         "measured_decode_tokens_per_s": row.get("decode_tokens_per_s")})
        return rows

    def summary(self, rows: list[dict[str, Any]], bench: list[dict[str, Any]]) -> dict[str, Any]:
        teacher_license = read_gguf_license(self.teacher_ref.path) if self.teacher_ref.format == "gguf" else \
            _hf_license(self.teacher_ref.path)
        tokenizer_cfg = self.state.model_dir / "tokenizer_config.json" if self.state.model_dir else None
        chat_template = None
        if tokenizer_cfg is not None and tokenizer_cfg.is_file():
            chat_template = json.loads(tokenizer_cfg.read_text(encoding="utf-8")).get("chat_template")
        if chat_template is None and self.state.model_dir and (self.state.model_dir / "chat_template.jinja").is_file():
            chat_template = (self.state.model_dir / "chat_template.jinja").read_text(encoding="utf-8")
        distill = self.state.distill
        return {
            "name": self._slug(),
            "profile": {"name": self.profile.name, "backend": self.profile.primary_runtime.backend,
                        "memory_budget_bytes": self.profile.memory_budget_bytes,
                        "latency_goals": self.profile.latency_goals.model_dump()},
            "teacher": {"name": self.teacher_ref.name, "params": self.plan.teacher_arch.get("n_params"),
                        "license": teacher_license, "base_model": _base_model_id(self.teacher_ref),
                        "perplexity": (distill or {}).get("teacher", {}).get("perplexity"),
                        "size_bytes": _size(self.teacher_ref.path)},
            "plan": {k: v for k, v in self.plan.to_dict().items() if k != "candidates"},
            "stages": [{k: v for k, v in r.items() if k != "config"} for r in self.state.stage_rows],
            "distill": distill,
            "finetune": self.state.finetune,
            "artifacts": rows,
            "speed": self.speed_rows(bench),
            "lineage": {"teacher": {"name": self.teacher_ref.name, **self.teacher_identity},
                        "data": self.data_identity or "built-in (pydoc_data prose + teacher answers)",
                        "task": self.task_identity,
                        "stage_configs": {r["name"]: {"cache_key": r["cache_key"], "config": r["config"]}
                                          for r in self.state.stage_rows},
                        "config": self.cfg.model_dump(), "library_versions": _versions(), "seed": self.cfg.seed},
            "quality": {"retention": (distill or {}).get("retention"),
                        "task_accuracy": ((self.state.finetune or {}).get("after") or {}).get("task_accuracy")},
            "chat_template": chat_template,
            "stop_tokens": ["<|im_end|>"] if chat_template and "<|im_start|>" in chat_template else [],
        }


def _bench_row(r: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one device_bench result (bench.make_result) that the ship folder shows."""
    return {k: r.get(k) for k in ("target", "profile", "prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms",
                                  "peak_rss_bytes", "threads", "estimated_decode_tokens_per_s",
                                  "decode_ratio_measured_to_estimated")}


def _why(verify: dict[str, Any]) -> str:
    return "; ".join(verify.get("failures") or []) or "passed"


def read_gguf_license(path: Path) -> str | None:
    """``general.license`` of a GGUF file (what the model card's front matter takes), or None."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.license")
    if field is None:
        return None
    return str(field.contents())


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _hf_license(path: Path) -> str | None:
    readme = Path(path) / "README.md"
    if readme.is_file():
        import yaml

        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text.split("---", 2)[1]) or {}
                return meta.get("license")
            except yaml.YAMLError:
                return None
    return None


def _base_model_id(ref: Any) -> str:
    if ref.name == "smollm2-135m-instruct":
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    return str(ref.name)


def dry_run(builder: Builder) -> list[dict[str, Any]]:
    """The stages the build would run, their cache keys and whether each would be skipped (model stages exactly;
    export/bench keys depend on the models and are listed once those are cached)."""
    rows = [sp.describe() for sp in builder.stages()]
    if all(r["state"] == "cached" for r in rows):
        for sp in builder.stages():
            builder.state.model_dir = Path(sp.stage.result()["model_dir"])
            builder.state.model_key = sp.stage.key
            if sp.name == "distill":
                builder.state.distill = sp.stage.result()["record"]
        if not rows:
            builder.state.model_dir = builder._teacher_hf_dir()
            builder.state.model_key = str(builder.teacher_identity)
        for fmt in builder.formats():
            quant = (builder.gguf_candidates()[0] if fmt == "gguf" else
                     builder.cfg.export.onnx_quantize or (builder.profile.preferred_quants.onnx or ["int8"])[0])
            rows.append(builder.export_stage(fmt, quant).describe())
    else:
        rows += [{"stage": f"export-{f}", "key": "(after the model stages)", "state": "run", "dir": "",
                  "note": ""} for f in builder.formats()]
    rows.append({"stage": "bench", "key": "(after export)", "state": "run" if builder.cfg.bench.enabled else "skip",
                 "dir": "", "note": "local" + (f" + {builder.target.name}" if builder.target else "")})
    rows.append({"stage": "ship", "key": "-", "state": "run", "dir": str(builder.out / "ship"), "note": ""})
    return rows


def run_build(builder: Builder) -> dict[str, Any]:
    """Run every stage and ship; returns the build summary (also ``OUT/build.json``)."""
    t0 = time.perf_counter()
    log = builder.log
    p = builder.plan
    log(f"plan: {p.decision} for {builder.profile.name}: {p.reason}")
    builder.run_model_stages()
    builder.run_exports()
    bench = builder.run_bench()
    ship, summary = builder.ship(bench)
    result = headline(builder, ship, summary, time.perf_counter() - t0)
    write_json_atomic(builder.out / "build.json", result)
    return result


def headline(builder: Builder, ship: Path, summary: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The few numbers a user wants at the end: retention, task accuracy, size, measured speed, where."""
    arts = []
    for a in summary["artifacts"]:
        local = next((b for b in a["bench"] if b.get("target") == "local"), None) or (a["bench"] or [None])[0]
        arts.append({"file": str(ship / a["path"]), "format": a["format"], "quant": a["quant"],
                     "size_bytes": a["size_bytes"], "mean_kl": a["verify"].get("mean_kl"),
                     "top1_agreement": a["verify"].get("top1_agreement"), "task_accuracy": a.get("task_accuracy"),
                     "measured_decode_tokens_per_s": (local or {}).get("decode_tokens_per_s"),
                     "measured_prefill_tokens_per_s": (local or {}).get("prefill_tokens_per_s"),
                     "measured_on": (local or {}).get("target")})
    return {"ship_dir": str(ship), "profile": builder.profile.name, "decision": builder.plan.decision,
            "stages": summary["stages"], "retention": (summary["quality"] or {}).get("retention"),
            "task_accuracy": summary["quality"].get("task_accuracy"), "artifacts": arts, "seconds": seconds,
            "manifest": str(ship / "manifest.json")}
