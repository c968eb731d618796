"""Re-profiling: every model's Ψ from its validation outcomes (the prior) plus logged feedback.

Run by ``uniroute reprofile``, ``POST /admin/reprofile`` and, inside ``serve``, every
``profiling.reprofile_interval_s`` seconds, all through :meth:`Reprofiler.run_once`: one pass at a
time across replicas, under the ``reprofile`` database lease (:mod:`gateway.store.lease`).

Per model with an active profile for the router key (artifact version + variant):

- the prior is its latest *validation* profile (source ``validation``, ``validation-partial``
  or ``import``): Ψ_k and the (soft) count n_k of validation prompts behind it;
- the evidence is every feedback row on a request that model served (the request row gives
  the cluster k = argmax z(x) the router computed, and the key that may send feedback); with
  ``profiling.feedback_from: trusted`` only the feedback of keys marked trusted;
- the new Ψ is :func:`profiling.reprofile.reprofile`'s Beta posterior mean (docs/PROFILING.md), in
  which no one key weighs more than ``profiling.max_key_share`` of a cluster (docs/security/tenants.md).

The estimate is recomputed from the prior and ALL feedback each run (idempotent). A new
profile version (source ``feedback``) is stored only when Ψ moved; the previous stays as
history. The drift report ranks the (model, cluster) pairs by |ΔΨ| and is kept in
``reprofile_runs`` (``GET /admin/reprofile/last``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np

from gateway.config import GatewayConfig
from gateway.errors import ConflictError, InvalidRequestError
from gateway.store import lease
from gateway.store import models as catalog
from gateway.store import profiling as profiling_sql
from gateway.store import tenants as tenant_sql
from gateway.store.engine import Store
from gateway.store.tenants import LabelStats
from gateway.tasks import cancel_and_wait
from profiling.followup import ImpactFollowups
from profiling.reprofile import ClusterFeedback, cluster_drift, drift_report, format_drift, reprofile

logger = logging.getLogger("uniroute.reprofile")
LEASE_NAME = "reprofile"


def run_reprofile(store: Store, key: str, *, feedback_weight: float = 1.0, max_feedback_weight_ratio: float = 4.0,
                  max_key_share: float = 1.0, trusted_only: bool = False, holder: str = "cli",
                  top: int = 10, drift_min_feedback: int = 20, drift_confidence: float = 0.95,
                  drift_demote: bool = False, tenant_feedback: bool = False) -> dict[str, Any]:
    """One pass over every profiled model; returns (and stores) the report with its drift table.

    ``report["cluster_drift"]`` holds every (model, cluster) with at least ``drift_min_feedback`` feedback rows:
    its realised error against the Ψ the pass leaves active, with a Hoeffding bound at ``drift_confidence``
    (:func:`profiling.reprofile.cluster_drift`); with ``drift_demote`` a cluster in alert is demoted.
    With ``tenant_feedback`` each key's own feedback (every key's, whatever ``trusted_only`` says: it only
    ever changes that key's routing) is stored as its tenant-private profile's ``feedback`` rows.

    Takes no lease: call it through :meth:`Reprofiler.run_once` (which passes the config's
    ``profiling.max_key_share`` and ``feedback_from``; the defaults here are the estimator's own: no
    per-key cap, every key's feedback).
    """
    started = datetime.now(UTC)
    active = catalog.active_profiles(store, key)
    report: dict[str, Any] = {"router": key, "models": {}, "drift": [], "cluster_drift": []}
    if not active:
        report["message"] = f"no active profile for router {key}"
    else:
        k = len(next(iter(active.values())).psi)
        feedback = {name: [ClusterFeedback(c, score, key_id) for c, score, key_id in rows]
                    for name, rows in profiling_sql.feedback_by_model(store, k, trusted_only=trusted_only).items()}
        changes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for name, cur in sorted(active.items()):
            prior = profiling_sql.latest_prior(store, name, key)
            if prior is None:
                report["models"][name] = {"status": "skipped: no validation profile (prior)"}
                continue
            fb = feedback.get(name, [])
            new = reprofile(np.asarray(prior.features, dtype=np.float64), np.asarray(prior.counts, dtype=np.float64),
                            fb, feedback_weight=feedback_weight, max_feedback_weight_ratio=max_feedback_weight_ratio,
                            max_key_share=max_key_share)
            rows, psi = cluster_drift(name, new.psi, fb, min_feedback=drift_min_feedback,
                                      confidence=drift_confidence, demote=drift_demote)
            report["cluster_drift"] += [r.as_dict() for r in rows]
            changes[name] = (cur.psi, psi, new.feedback_counts)
            entry: dict[str, Any] = {"feedback": len(fb), "from_version": cur.version, "prior_version": prior.version,
                                     "feedback_keys": len({f.key for f in fb})}
            capped = int(new.capped_keys.sum()) if new.capped_keys is not None else 0
            if capped:
                entry["capped_keys"] = capped  # (cluster, key) pairs whose weight max_key_share cut
            demoted = [r.cluster for r in rows if r.demoted_to is not None]
            if demoted:
                entry["demoted_clusters"] = demoted  # drift beyond the bound: Ψ_k set to its realised error's lower bound
            if np.allclose(psi, cur.psi, rtol=0, atol=1e-9):
                entry["status"] = "unchanged"
            else:
                entry["version"] = catalog.save_profile(store, name, key, psi, new.counts, "feedback")
                entry["status"] = "updated"
            report["models"][name] = entry
        if tenant_feedback:
            own = feedback if not trusted_only else {
                name: [ClusterFeedback(c, score, key_id) for c, score, key_id in rows]
                for name, rows in profiling_sql.feedback_by_model(store, k).items()}
            stats = tenant_feedback_stats(own, k)
            written = tenant_sql.replace_feedback(store, key, stats)
            report["tenant_feedback"] = {"keys": len(stats), "rows": written}
        report["cluster_drift"].sort(key=lambda r: (-r["drift"], r["model"], r["cluster"]))
        report["drift"] = [{"model": d.model, "cluster": d.cluster, "before": d.before, "after": d.after,
                            "change": d.change, "feedback": d.feedback}
                           for d in drift_report(changes, top=top, min_change=1e-9)]
    profiling_sql.save_reprofile_run(store, holder=holder, key=key, started_at=started, report=report)
    return report


def tenant_feedback_stats(feedback: dict[str, list[ClusterFeedback]], k: int) -> dict[int, dict[str, LabelStats]]:
    """Per key (anonymous feedback left out) and model: the sums of its own feedback, one-hot on the request's
    cluster, as a tenant-private profile's label statistics."""
    sums: dict[int, dict[str, tuple[np.ndarray, np.ndarray, int]]] = {}
    for model, rows in feedback.items():
        for fb in rows:
            if fb.key is None:
                continue
            errors, counts, n = sums.setdefault(fb.key, {}).get(model, (np.zeros(k), np.zeros(k), 0))
            errors, counts = errors.copy(), counts.copy()
            errors[fb.cluster] += 1.0 - fb.score
            counts[fb.cluster] += 1.0
            sums[fb.key][model] = (errors, counts, n + 1)
    return {key: {m: LabelStats(tuple(e.tolist()), tuple(c.tolist()), n) for m, (e, c, n) in by_model.items()}
            for key, by_model in sums.items()}


def format_report(report: dict[str, Any], top: int = 10) -> str:
    from profiling.reprofile import Drift

    lines = [f"router {report['router']}: {len(report['models'])} models"]
    for name, e in report["models"].items():
        capped = f", {e['capped_keys']} key(s) capped by max_key_share" if e.get("capped_keys") else ""
        lines.append(f"  {name}: {e['status']}" + (f" ({e['feedback']} feedback{capped})" if "feedback" in e else ""))
    rows = [Drift(d["model"], d["cluster"], d["before"], d["after"], d["feedback"]) for d in report["drift"]]
    lines += ["", "drift (largest |ΔΨ| first):", format_drift(rows)]
    cd = report.get("cluster_drift") or []
    if cd:
        lines += ["", "realised error against Ψ (clusters with enough feedback, largest drift first):",
                  "| model | cluster | feedback | realised | Ψ | drift | bound | alert |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {d['model']} | {d['cluster']} | {d['feedback']} | {d['realised_error']:.3f} | {d['psi']:.3f} | "
                  f"{d['drift']:+.3f} | {d['bound']:.3f} | "
                  + ("demoted to " + f"{d['demoted_to']:.3f}" if d.get("demoted_to") is not None
                     else "yes" if d["alert"] else "") + " |" for d in cd[:top]]
    return "\n".join(lines)


def router_key(config: GatewayConfig) -> str:
    from profiling.profiler import load_artifact

    return catalog.profile_key(load_artifact(config).version, config.router.variant)


class Reprofiler:
    """The one way to run a re-profiling pass: the admin endpoint, the scheduled job and the CLI call
    :meth:`run_once`.

    The ``reprofile`` lease means "a pass is running": it is taken for the pass (``lease_ttl_s``,
    which only matters when the holder dies mid-pass) and released as soon as the pass ends. What
    keeps replicas from repeating each other's scheduled passes is ``min_interval_s``: the last pass
    for the router key (by any holder) is read under the lease.
    """

    def __init__(self, config: GatewayConfig, store: Store, key: str | None, *, holder: str | None = None) -> None:
        self.config = config
        self.store = store
        self.key = key
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._running = threading.Lock()  # the lease admits its holder again: one pass per Reprofiler too

    def run_once(self, *, min_interval_s: float = 0.0, top: int = 10) -> dict[str, Any] | None:
        """Take the lease, run a pass, release the lease; return the pass's report (blocking: call it in a thread).

        None when no pass ran: another holder has the lease, or a pass for this router key finished
        less than ``min_interval_s`` seconds ago.
        """
        if self.key is None:
            raise InvalidRequestError("re-profiling needs the UniRoute router (router.policy: uniroute)",
                                      code="no_router")
        pc = self.config.profiling
        if not self._running.acquire(blocking=False):
            return None
        try:
            if not lease.acquire(self.store, LEASE_NAME, self.holder, pc.lease_ttl_s):
                return None
            try:
                if min_interval_s > 0:
                    age = profiling_sql.seconds_since_last_reprofile(self.store, self.key)
                    if age is not None and age < min_interval_s:
                        return None
                return run_reprofile(self.store, self.key, feedback_weight=pc.feedback_weight,
                                     max_feedback_weight_ratio=pc.max_feedback_weight_ratio,
                                     max_key_share=pc.max_key_share, trusted_only=pc.feedback_from == "trusted",
                                     holder=self.holder, top=top, drift_min_feedback=pc.drift_min_feedback,
                                     drift_confidence=pc.drift_confidence, drift_demote=pc.drift_demote,
                                     tenant_feedback=pc.tenant_feedback)
            finally:
                lease.release(self.store, LEASE_NAME, self.holder)
        finally:
            self._running.release()

    def busy_error(self) -> ConflictError:
        """The error for a pass refused because another holder has the lease (409; the CLI exits 1)."""
        holder = lease.holder_of(self.store, LEASE_NAME) or "another replica"
        return ConflictError(f"re-profiling is running on {holder}; try again later", code="lease_held")


class ReprofileScheduler:
    """The periodic jobs inside ``serve``: every ``profiling.reprofile_interval_s`` seconds a pass through
    :meth:`Reprofiler.run_once`, skipped when any replica ran one less than an interval ago; and, with
    ``followups``, the impact reports' follow-ups that are due (:meth:`profiling.followup.ImpactFollowups.run_due`,
    under their own lease), looked for every :meth:`followup_check_s` seconds."""

    def __init__(self, reprofiler: Reprofiler, followups: ImpactFollowups | None = None) -> None:
        self.reprofiler = reprofiler
        self.interval_s = reprofiler.config.profiling.reprofile_interval_s
        self.followups = followups
        self._task: asyncio.Task[None] | None = None
        self._followup_task: asyncio.Task[None] | None = None

    @staticmethod
    def followup_check_s(delay_s: float) -> float:
        """How often due follow-ups are looked for: a tenth of ``profiling.impact_followup_s``, 0.5 s to 5 min."""
        return min(300.0, max(0.5, delay_s / 10.0))

    async def _followup_loop(self, followups: ImpactFollowups) -> None:
        every = self.followup_check_s(followups.delay_s)
        while True:
            await asyncio.sleep(every)
            try:
                done = await asyncio.to_thread(followups.run_due)
                for d in done or []:
                    logger.info("impact follow-up of %s: realised share %s over %d requests", d["model"],
                                d["followup"]["realised"]["traffic_share"], d["followup"]["realised"]["requests"])
            except Exception:
                logger.exception("impact follow-ups failed")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                report = await asyncio.to_thread(self.reprofiler.run_once, min_interval_s=self.interval_s)
                if report is not None:
                    updated = [m for m, e in report["models"].items() if e.get("status") == "updated"]
                    logger.info("re-profiling: %d models, %d updated", len(report["models"]), len(updated))
            except Exception:
                logger.exception("re-profiling pass failed")

    def start(self) -> None:
        if self.interval_s > 0 and self.reprofiler.key is not None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="reprofile")
        if self.followups is not None and self.followups.delay_s > 0:
            self._followup_task = asyncio.get_running_loop().create_task(self._followup_loop(self.followups),
                                                                         name="impact-followup")

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        await cancel_and_wait(self._followup_task)
        self._task = self._followup_task = None


class DriftExporter:
    """Keeps the ``uniroute_profile_drift*`` gauges of this replica equal to the last re-profiling pass's drift
    rows for the router key: every ``interval_s`` it reads them from the store (``reprofile_runs``), so every
    replica exports what the one that ran the pass measured. Nothing is computed per request."""

    def __init__(self, store: Store, key: str | None, on_rows: Callable[[list[dict[str, Any]]], None], *,
                 interval_s: float = 10.0) -> None:
        self.store, self.key, self.on_rows, self.interval_s = store, key, on_rows, interval_s
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """Read the rows in a worker thread, set the gauges on the loop (a scrape never sees half of them)."""
        if self.key is not None:
            self.on_rows(await asyncio.to_thread(profiling_sql.last_cluster_drift, self.store, self.key))

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # the store is down: keep the last values, try again
                logger.warning("drift gauges: could not read the last re-profiling pass (%s: %s)",
                               type(exc).__name__, exc)
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self.key is not None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="drift-gauges")

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
