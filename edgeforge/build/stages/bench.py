"""The bench stage: every verified artifact measured on this machine and on the build's target, if any."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeforge.build.stage import BuildContext, BuildState
from edgeforge.fileio import content_identity


@dataclass
class BenchStage:
    """``artifact_ids``: the content identity of each artifact measured (its export sha256, else its files')."""

    ctx: BuildContext
    targets: list[Any]  # edgeforge.bench.targets.Target
    artifact_paths: list[str]
    artifact_ids: list[Any]

    name = "bench"

    @property
    def note(self) -> str:
        return ", ".join(t.name for t in self.targets)

    def settings(self) -> dict[str, Any]:
        return {"bench": self.ctx.cfg.bench.model_dump(), "targets": [t.model_dump() for t in self.targets]}

    def inputs(self) -> dict[str, Any]:
        return {"artifacts": self.artifact_ids}

    def run(self, stage_dir: Path, state: BuildState) -> dict[str, Any]:
        from edgeforge.bench.run import BenchOptions, TargetJob, run_benchmarks, target_profile

        ctx = self.ctx
        b = ctx.cfg.bench
        options = BenchOptions(threads=b.threads, prompt_tokens=b.prompt_tokens, gen_tokens=b.gen_tokens,
                               repeats=b.repeats, sustained_s=b.sustained_s)
        jobs = [TargetJob(t, target_profile(t, ctx.profiles_dirs)) for t in self.targets]
        return {"results": run_benchmarks(self.artifact_paths, jobs, options, log=ctx.log, save=False)}

    def absorb(self, record: dict[str, Any], state: BuildState) -> None:
        state.bench = record["results"]


def bench_stage(ctx: BuildContext, state: BuildState) -> BenchStage | None:
    """The bench stage over the verified artifacts, or None when benchmarking is off or has nowhere to run."""
    if not ctx.cfg.bench.enabled or not state.artifacts:
        return None
    from edgeforge.bench.targets import DEFAULT_LOCAL

    targets = ([DEFAULT_LOCAL] if ctx.cfg.bench.local else []) + ([ctx.target] if ctx.target is not None else [])
    if not targets:
        return None
    return BenchStage(ctx, targets, [a["path"] for a in state.artifacts],
                      [a["export"].get("sha256") or content_identity(Path(a["path"])) for a in state.artifacts])
