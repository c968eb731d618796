"""Re-profiling: every model's Ψ from its validation outcomes (the prior) plus logged feedback.

Run by ``uniroute reprofile`` and, inside ``serve``, every ``profiling.reprofile_interval_s``
seconds by the replica that holds the ``reprofile`` database lease (:mod:`gateway.store.lease`).

Per model with an active profile for the router key (artifact version + variant):

- the prior is its latest *validation* profile (source ``validation``, ``validation-partial``
  or ``import``): Ψ_k and the (soft) count n_k of validation prompts behind it;
- the evidence is every feedback row on a request that model served (the request row gives
  the cluster k = argmax z(x) the router computed, and the key that may send feedback);
- the new Ψ is :func:`profiling.reprofile.reprofile`'s Beta posterior mean (docs/PROFILING.md).

The estimate is recomputed from the prior and ALL feedback each run (idempotent). A new
profile version (source ``feedback``) is stored only when Ψ moved; the previous stays as
history. The drift report ranks the (model, cluster) pairs by |ΔΨ| and is kept in
``reprofile_runs`` (``GET /admin/reprofile/last``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import uuid
from typing import Any

import numpy as np
import sqlalchemy as sa

from gateway.config import GatewayConfig
from gateway.store import lease
from gateway.store import models as catalog
from gateway.store.engine import Store
from gateway.store.tables import Feedback, ProfileRow, ReprofileRun, RequestRow, utcnow
from gateway.tasks import cancel_and_wait
from profiling.reprofile import ClusterFeedback, drift_report, format_drift, reprofile

logger = logging.getLogger("uniroute.reprofile")
LEASE_NAME = "reprofile"
PRIOR_SOURCES = ("validation", "validation-partial", "import")


def _feedback_by_model(store: Store, k: int) -> dict[str, list[ClusterFeedback]]:
    out: dict[str, list[ClusterFeedback]] = {}
    with store.session() as s:
        q = (sa.select(RequestRow.routed_model, RequestRow.cluster, Feedback.score)
             .join(RequestRow, RequestRow.request_id == Feedback.request_id)
             .where(RequestRow.routed_model.is_not(None), RequestRow.cluster.is_not(None),
                    RequestRow.status_code == 200,
                    sa.or_(RequestRow.key_id == Feedback.key_id,
                           sa.and_(RequestRow.key_id.is_(None), Feedback.key_id.is_(None)))))
        for model, cluster, score in s.execute(q):
            if cluster is not None and 0 <= int(cluster) < k:
                out.setdefault(str(model), []).append(ClusterFeedback(int(cluster), float(score)))
    return out


def run_reprofile(store: Store, key: str, *, feedback_weight: float = 1.0, max_feedback_weight_ratio: float = 4.0,
                  holder: str = "cli", top: int = 10) -> dict[str, Any]:
    """One pass over every profiled model; returns (and stores) the report with its drift table."""
    started = utcnow()
    active = catalog.active_profiles(store, key)
    report: dict[str, Any] = {"router": key, "models": {}, "drift": []}
    if not active:
        report["message"] = f"no active profile for router {key}"
    else:
        k = len(next(iter(active.values())).psi)
        feedback = _feedback_by_model(store, k)
        changes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for name, cur in sorted(active.items()):
            with store.session() as s:
                prior = s.scalars(sa.select(ProfileRow).where(
                    ProfileRow.model_name == name, ProfileRow.router_version == key,
                    ProfileRow.source.in_(PRIOR_SOURCES)).order_by(ProfileRow.version.desc())).first()
            if prior is None:
                report["models"][name] = {"status": "skipped: no validation profile (prior)"}
                continue
            fb = feedback.get(name, [])
            new = reprofile(np.asarray(prior.features, dtype=np.float64), np.asarray(prior.counts, dtype=np.float64),
                            fb, feedback_weight=feedback_weight, max_feedback_weight_ratio=max_feedback_weight_ratio)
            changes[name] = (cur.psi, new.psi, new.feedback_counts)
            entry: dict[str, Any] = {"feedback": len(fb), "from_version": cur.version, "prior_version": prior.version}
            if np.allclose(new.psi, cur.psi, rtol=0, atol=1e-9):
                entry["status"] = "unchanged"
            else:
                entry["version"] = catalog.save_profile(store, name, key, new.psi, new.counts, "feedback")
                entry["status"] = "updated"
            report["models"][name] = entry
        report["drift"] = [{"model": d.model, "cluster": d.cluster, "before": d.before, "after": d.after,
                            "change": d.change, "feedback": d.feedback}
                           for d in drift_report(changes, top=top, min_change=1e-9)]
    with store.session() as s:
        s.add(ReprofileRun(holder=holder, router_version=key, started_at=started, finished_at=utcnow(),
                           report=report))
    return report


def last_report(store: Store) -> dict[str, Any] | None:
    with store.session() as s:
        row = s.scalars(sa.select(ReprofileRun).order_by(ReprofileRun.id.desc())).first()
        if row is None:
            return None
        return {"id": row.id, "holder": row.holder, "router": row.router_version,
                "started_at": row.started_at.isoformat(),
                "finished_at": row.finished_at.isoformat() if row.finished_at else None, **row.report}


def format_report(report: dict[str, Any]) -> str:
    from profiling.reprofile import Drift

    lines = [f"router {report['router']}: {len(report['models'])} models"]
    for name, e in report["models"].items():
        lines.append(f"  {name}: {e['status']}" + (f" ({e['feedback']} feedback)" if "feedback" in e else ""))
    rows = [Drift(d["model"], d["cluster"], d["before"], d["after"], d["feedback"]) for d in report["drift"]]
    lines += ["", "drift (largest |ΔΨ| first):", format_drift(rows)]
    return "\n".join(lines)


def router_key(config: GatewayConfig) -> str:
    from profiling.profiler import load_artifact

    return catalog.profile_key(load_artifact(config).version, config.router.variant)


class ReprofileScheduler:
    """The periodic job inside ``serve``; only the lease holder runs a pass."""

    def __init__(self, config: GatewayConfig, store: Store, key: str | None) -> None:
        self.config = config
        self.store = store
        self.key = key
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._task: asyncio.Task[None] | None = None

    def run_once(self) -> dict[str, Any] | None:
        """A pass if this replica gets the lease (blocking; call in a thread)."""
        pc = self.config.profiling
        if self.key is None:
            return None
        # the lease is kept until it expires (not released), so another replica does not repeat the pass
        if not lease.acquire(self.store, LEASE_NAME, self.holder, min(pc.lease_ttl_s, pc.reprofile_interval_s or
                                                                          pc.lease_ttl_s)):
            return None
        return run_reprofile(self.store, self.key, feedback_weight=pc.feedback_weight,
                             max_feedback_weight_ratio=pc.max_feedback_weight_ratio, holder=self.holder)

    async def _loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                report = await asyncio.to_thread(self.run_once)
                if report is not None:
                    updated = [m for m, e in report["models"].items() if e.get("status") == "updated"]
                    logger.info("re-profiling: %d models, %d updated", len(report["models"]), len(updated))
            except Exception:
                logger.exception("re-profiling pass failed")

    def start(self) -> None:
        interval = self.config.profiling.reprofile_interval_s
        if interval > 0 and self.key is not None:
            self._task = asyncio.get_running_loop().create_task(self._loop(interval), name="reprofile")

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None


def reprofile_command(args: argparse.Namespace) -> int:
    """``uniroute reprofile``: one pass now (waits for nobody: takes the lease or says who holds it)."""
    from gateway.config import load_config
    from gateway.errors import GatewayError

    config = load_config(args.config)
    store = Store(config.database_url)
    try:
        store.upgrade()
        try:
            key = router_key(config)
        except GatewayError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
        holder = f"cli:{socket.gethostname()}:{os.getpid()}"
        if not lease.acquire(store, LEASE_NAME, holder, config.profiling.lease_ttl_s):
            print(f"error: re-profiling is running on {lease.holder_of(store, LEASE_NAME)}; try again later",
                  file=sys.stderr)
            return 1
        try:
            pc = config.profiling
            report = run_reprofile(store, key, feedback_weight=pc.feedback_weight,
                                   max_feedback_weight_ratio=pc.max_feedback_weight_ratio, holder=holder, top=args.top)
        finally:
            lease.release(store, LEASE_NAME, holder)
    finally:
        store.dispose()
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0
