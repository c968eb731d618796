"""Profiling jobs started through the admin API (``POST /admin/models/{name}/profile``).

One background task per model in this replica; ``GET /admin/models/{name}/profile`` shows its
progress and final report. Outcomes are in the database, so a job that dies (or a replica that
restarts) resumes where it stopped when started again, from any replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gateway.config import GatewayConfig
from gateway.errors import ConflictError, GatewayError, InvalidRequestError
from gateway.secrets import scrub
from gateway.store.engine import Store
from gateway.tasks import cancel_and_wait
from profiling.runner import RunReport

logger = logging.getLogger("uniroute.profiling")


@dataclass
class Job:
    id: str
    model: str
    status: str = "running"  # running | reported | activated | not_activated | failed
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    total: int = 0
    done: int = 0
    graded: int = 0
    failed: int = 0
    cost_usd: float = 0.0
    result: dict[str, Any] | None = None
    error: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        elapsed = (self.finished_at or time.time()) - self.started_at
        return {"id": self.id, "model": self.model, "status": self.status, "started_at": self.started_at,
                "finished_at": self.finished_at, "elapsed_s": round(elapsed, 3), "total": self.total,
                "done": self.done, "graded": self.graded, "failed": self.failed, "cost_usd": round(self.cost_usd, 8),
                "result": self.result, "error": self.error}


class ProfilingJobs:
    def __init__(self, config: GatewayConfig, store: Store, forwarder: Any, key: str | None) -> None:
        self.config = config
        self.store = store
        self.forwarder = forwarder
        self.key = key
        self.jobs: dict[str, Job] = {}

    def start(self, model: str, *, grader: str | None = None, concurrency: int | None = None,
              allow_partial: bool = False, activate: bool = False, max_prompts: int | None = None,
              target_ci: float | None = None, allocation: str | None = None) -> Job:
        from profiling.profiler import DEFAULT_ALLOCATION, run_profiling
        from routing.active import ALLOCATIONS

        if self.key is None:
            raise InvalidRequestError("profiling needs the UniRoute router: set router.policy: uniroute and "
                                      "router.artifact in config.yaml", code="no_router")
        if allocation is not None and allocation not in ALLOCATIONS:
            raise InvalidRequestError(f"unknown allocation {allocation[:32]!r}; valid: {', '.join(ALLOCATIONS)}",
                                      param="allocation")
        if allocation is not None and max_prompts is None and target_ci is None:
            raise InvalidRequestError("allocation applies to sequential profiling: give max_prompts and/or target_ci "
                                      "too", param="allocation")
        running = self.jobs.get(model)
        if running is not None and running.status == "running":
            raise ConflictError(f"model {model!r} is already being profiled (job {running.id})", code="job_running")
        job = Job(id=uuid.uuid4().hex[:16], model=model)

        def on_start(total: int, done: int) -> None:
            job.total, job.done = total, done

        def progress(r: RunReport) -> None:
            job.done = r.skipped + r.graded + r.failed
            job.graded, job.failed, job.cost_usd = r.graded, r.failed, r.cost_usd

        async def run() -> None:
            try:
                res = await run_profiling(self.config, self.store, self.forwarder, model, grader=grader,
                                          concurrency=concurrency, allow_partial=allow_partial, activate=activate,
                                          progress=progress, on_start=on_start, max_prompts=max_prompts,
                                          target_ci=target_ci, allocation=allocation or DEFAULT_ALLOCATION)
                job.result = res.as_dict()
                job.status = ("activated" if res.activated else "reported" if not activate and res.psi is not None
                              else "not_activated")
            except GatewayError as exc:
                job.status, job.error = "failed", scrub(exc.message)
            except Exception as exc:
                logger.exception("profiling %s failed", model)
                job.status, job.error = "failed", scrub(f"{type(exc).__name__}: {exc}")
            finally:
                job.finished_at = time.time()

        job.task = asyncio.get_running_loop().create_task(run(), name=f"profile-{model}")
        self.jobs[model] = job
        return job

    def get(self, model: str) -> Job | None:
        return self.jobs.get(model)

    async def aclose(self) -> None:
        for job in self.jobs.values():
            if job.task is not None and not job.task.done():
                await cancel_and_wait(job.task)
