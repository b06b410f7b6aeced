"""The one loop every build stage goes through: find it in the cache or run it (resuming), time it, log it, record
it, absorb it. ``--dry-run`` is the same loop with nothing run: it describes each stage and absorbs only the
records that are already in the cache."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from edgeforge.build.cache import StageCache, StageDir
from edgeforge.build.stage import BuildState, Log, Stage


def describe(stage: Stage, place: StageDir) -> dict[str, Any]:
    """One ``--dry-run`` row: what the stage is and whether the build would skip, resume or run it."""
    state = "cached" if place.done else ("resume" if place.started else "run")
    return {"stage": stage.name, "key": place.key[:16], "state": state, "dir": str(place.dir), "note": stage.note}


class StageRunner:
    """Runs laid-out stages against the stage cache (or, with ``dry_run``, only describes them in ``rows``)."""

    def __init__(self, cache: StageCache, state: BuildState, log: Log, dry_run: bool = False) -> None:
        self.cache = cache
        self.state = state
        self.log = log
        self.dry_run = dry_run
        self.rows: list[dict[str, Any]] = []

    def run_all(self, stages: Iterable[Stage]) -> None:
        """Take each stage in turn; ``stages`` may be a generator that lays out the next one from the state."""
        for stage in stages:
            self.take(stage)

    def take(self, stage: Stage) -> None:
        place = self.cache.place(stage.name, stage.settings(), stage.inputs())
        if self.dry_run:
            self.rows.append(describe(stage, place))
            if place.done:
                stage.absorb(place.result(), self.state)
            else:
                self.state.pending.append(stage.name)
            return
        cached = place.done
        if cached:
            self.log(f"[{stage.name}] cached ({place.dir.name})")
            # seconds: what the stage took when it ran (the cache hit itself costs next to nothing)
            record, seconds = place.result(), place.seconds()
        else:
            record, seconds = self._run(stage, place)
        self.state.stage_rows.append({"name": stage.name, "cache_key": place.key[:16], "cached": cached,
                                      "seconds": seconds, "config": place.config})
        stage.absorb(record, self.state)

    def _run(self, stage: Stage, place: StageDir) -> tuple[dict[str, Any], float]:
        self.log(f"[{stage.name}] {'resuming' if place.started else 'running'}: {stage.note}")
        place.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        record = stage.run(place.dir, self.state)
        seconds = time.perf_counter() - t0
        place.finish(record, seconds)
        return record, seconds
