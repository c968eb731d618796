"""Onboarding a model: ask it the router's validation prompts through LiteLLM, grade, store Ψ, activate.

Used by ``uniroute profile MODEL`` and by ``POST /admin/models/{name}/profile``:

1. The validation prompts (ids, texts, reference answers) come from the router artifact
   (``RouterArtifact.val_answers``; artifacts fitted before they were recorded can take the
   references from the dataset folder with ``--dataset``). Each prompt's cluster is the argmax
   of its membership z(x) for the configured variant.
2. :func:`profiling.runner.profile_model` sends them to the model through the gateway's
   :class:`~gateway.serving.forwarding.Forwarder` (LiteLLM), bounded concurrency, retries with
   backoff (429: at least ``Retry-After``); each outcome is stored in ``profile_outcomes`` as
   it arrives, so a second run resumes.
3. Ψ is computed with the artifact's estimator (``RouterArtifact.profile_model``, every
   variant) from the graded outcomes, and stored as a new active version in
   ``model_profiles`` (source ``validation``) — only when every cluster has at least
   ``profiling.min_graded_per_cluster`` graded answers (or all of its prompts, when it has fewer), unless ``allow_partial`` (then the
   source is ``validation-partial`` and the report says so). Activation also marks the
   model routable; every replica picks it up at its next registry poll.
4. Before that, the impact report (docs/IMPACT.md): what activating it changes. By default a run stops there
   (``activate=False``): the report and the profile it would activate are kept in ``model_impacts``
   (``reported``), and a later call with ``activate=True`` activates that profile without asking or grading
   anything again, as long as it is still current (same artifact and variant, same graded outcomes, same
   router cost); otherwise that call profiles (resuming) and activates. Every activation keeps its report
   (``activated``) for the follow-up with the realised figures (profiling/followup.py).

Sequential profiling (``uniroute profile --max-prompts N --target-ci X``, issue 15) asks the prompts in
rounds (:class:`routing.active.SequentialProfile`: one seeded order per artifact, the same for every model)
and stops when every cluster's 95 % posterior half-width is at most X or N prompts were asked; the target,
not ``min_graded_per_cluster``, then decides activation (docs/PROFILING.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.config import GatewayConfig
from gateway.errors import GatewayError, InvalidRequestError
from gateway.secrets import keep_config_params, scrub
from gateway.serving.registry import ModelEntry
from gateway.spec import ModelSpec
from gateway.store import impact as impact_sql
from gateway.store import models as catalog
from gateway.store import profiling as profiling_sql
from gateway.store.engine import Store
from profiling.graders import GRADERS, get_grader
from profiling.impact import store_impact
from profiling.runner import (
    Completer,
    Completion,
    CompletionFailed,
    Outcome,
    RetryPolicy,
    RunReport,
    ValidationPrompt,
    profile_model,
)
from routing.active import SequentialProfile, SequentialState
from routing.artifact import RouterArtifact
from routing.impact import ImpactReport

logger = logging.getLogger("uniroute.profiling")
#: how `uniroute profile --max-prompts/--target-ci` chooses its prompts (routing.active.ALLOCATIONS; issue 15:
#: docs/EVALUATION.md, "Active allocation", decides it)
DEFAULT_ALLOCATION = "uniform"


# ----------------------------------------------------------------------------- outcome store
class SqlOutcomeStore:
    """:class:`profiling.runner.OutcomeStore` on the ``profile_outcomes`` table, for one artifact version."""

    def __init__(self, store: Store, router_version: str) -> None:
        self.store = store
        self.router_version = router_version

    def completed(self, model: str, prompt_ids: Sequence[str]) -> set[str]:
        return profiling_sql.graded_prompt_ids(self.store, self.router_version, model) & set(prompt_ids)

    def record(self, outcome: Outcome) -> None:
        profiling_sql.record_outcome(self.store, self.router_version, model=outcome.model,
                                     prompt_id=outcome.prompt_id, cluster=outcome.cluster, score=outcome.score,
                                     answer=outcome.answer, cost_usd=outcome.cost_usd, error=outcome.error)

    def outcomes(self, model: str) -> list[Outcome]:
        return [Outcome(r.model_name, r.prompt_id, r.cluster, r.score, r.answer or "", r.cost_usd, r.error)
                for r in profiling_sql.outcome_rows(self.store, self.router_version, model)]

    def reset(self, model: str) -> int:
        return profiling_sql.delete_outcomes(self.store, self.router_version, model)


# -------------------------------------------------------------------------------- completer
class ForwarderCompleter:
    """:class:`profiling.runner.Completer` through the gateway's Forwarder (LiteLLM), one model per call."""

    def __init__(self, forwarder: Any, entries: Mapping[str, Any], *, max_tokens: int | None = None) -> None:
        self.forwarder = forwarder
        self.entries = dict(entries)
        self.params: dict[str, Any] = {"temperature": 0}
        if max_tokens is not None:
            self.params["max_tokens"] = max_tokens

    async def __call__(self, model: str, prompt: str) -> Completion:
        entry = self.entries[model]
        try:
            done = await self.forwarder.complete([entry], [{"role": "user", "content": prompt}], self.params)
        except GatewayError as exc:
            retry_after = None
            if exc.headers and "retry-after" in {k.lower() for k in exc.headers}:
                raw = next(v for k, v in exc.headers.items() if k.lower() == "retry-after")
                try:
                    retry_after = float(raw)
                except ValueError:
                    retry_after = None
            retryable = exc.status_code in (429, 502, 503, 504) or exc.status_code >= 500
            raise CompletionFailed(f"{exc.status_code} {scrub(exc.message)}", retryable=retryable,
                                   retry_after=retry_after) from None
        choice = done.response.choices[0]
        text = getattr(choice.message, "content", None) or ""
        return Completion(text=str(text), cost_usd=done.cost_usd)


# ------------------------------------------------------------------------------ the session
@dataclass
class ProfilingResult:
    model: str
    router_version: str
    report: RunReport
    graded_per_cluster: list[int]
    short_clusters: list[int]
    min_graded_per_cluster: int
    activated: bool = False
    partial: bool = False
    profile_versions: dict[str, int] = field(default_factory=dict)  # profile key -> version
    psi: list[float] | None = None  # for the configured variant
    message: str = ""
    impact: ImpactReport | None = None  # what activating it changes (docs/IMPACT.md), computed before activation
    impact_error: str | None = None  # why there is no impact report (e.g. no other profiled model)
    #: sequential profiling (``--max-prompts`` / ``--target-ci``): prompts used, half-widths, why it stopped
    sequential: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        r = self.report
        return {
            "model": self.model, "router_version": self.router_version, "activated": self.activated,
            "partial": self.partial, "message": self.message,
            "prompts": r.total, "graded": r.graded, "failed": r.failed, "already_done": r.skipped,
            "cost_usd": round(r.cost_usd, 8), "seconds": round(r.seconds, 3), "errors": r.errors,
            "stopped": r.stopped,
            "graded_per_cluster": self.graded_per_cluster, "short_clusters": self.short_clusters,
            "min_graded_per_cluster": self.min_graded_per_cluster, "profile_versions": self.profile_versions,
            "psi": self.psi, "impact": self.impact.as_dict() if self.impact is not None else None,
            "impact_error": self.impact_error, "sequential": self.sequential,
        }


def load_artifact(config: GatewayConfig) -> RouterArtifact:
    if config.router.policy != "uniroute" or not config.router.artifact:
        raise InvalidRequestError("profiling needs the UniRoute router: set router.policy: uniroute and "
                                  "router.artifact in config.yaml", code="no_router")
    return RouterArtifact.load(config.router.artifact)


def validation_prompts(artifact: RouterArtifact, variant: str,
                       answers: Mapping[str, str | None] | None = None) -> list[ValidationPrompt]:
    """The artifact's validation prompts with their reference answers and hard cluster."""
    refs: Sequence[str | None]
    if answers is not None:
        refs = [answers.get(pid) for pid in artifact.val_prompt_ids]
    elif artifact.val_answers is not None:
        refs = artifact.val_answers
    else:
        raise InvalidRequestError("the router artifact has no reference answers (fitted before they were "
                                  "recorded): refit it, or pass the dataset folder (--dataset)", code="no_answers")
    clusters = artifact.membership(artifact.val_embeddings, variant).argmax(axis=1)
    return [ValidationPrompt(pid, text, ref, int(c))
            for pid, text, ref, c in zip(artifact.val_prompt_ids, artifact.val_prompts, refs, clusters, strict=True)]


def dataset_answers(path: str) -> dict[str, str | None]:
    from routing.dataset import load_dataset

    ds = load_dataset(path, with_responses=False)
    return dict(zip(ds.prompt_ids, ds.answers, strict=True))


async def run_profiling(
    config: GatewayConfig,
    store: Store,
    forwarder: Any,
    model: str,
    *,
    grader: str | None = None,
    concurrency: int | None = None,
    allow_partial: bool = False,
    answers: Mapping[str, str | None] | None = None,
    artifact: RouterArtifact | None = None,
    progress: Callable[[RunReport], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    activate: bool = False,
    max_prompts: int | None = None,
    target_ci: float | None = None,
    allocation: str = DEFAULT_ALLOCATION,
) -> ProfilingResult:
    """Profile ``model`` (a registry row) and report what activating it changes; with ``activate``, activate it
    when every cluster has enough graded answers (a profile reported earlier and still current is activated as
    reported, nothing asked or graded again).

    With ``max_prompts`` or ``target_ci``, profiling is sequential (:func:`_sequential`): prompts are
    asked in rounds, chosen by ``allocation`` (routing.active.ALLOCATIONS), until every cluster's 95 %
    posterior half-width is at most ``target_ci`` or ``max_prompts`` were asked. Activation then needs
    the target met (a cluster with no prompt left counts as met), not ``min_graded_per_cluster``
    graded answers per cluster; without a target, spending ``max_prompts`` is enough."""
    pc = config.profiling
    keep_config_params(config.models)  # config.yaml's secrets, which the table holds masked
    art: RouterArtifact = artifact if artifact is not None else await asyncio.to_thread(load_artifact, config)
    variant = config.router.variant
    spec = catalog.spec_from_row(await asyncio.to_thread(catalog.get_model, store, model))  # 404: the known ones
    if activate:
        reported = await asyncio.to_thread(activate_reported, config, store, art, model, spec.router_cost)
        if reported is not None:
            return reported
    entries = {model: _entry(spec)}
    grader_name = grader or pc.grader
    if grader_name not in GRADERS:
        raise InvalidRequestError(f"unknown grader {grader_name!r}; known: {', '.join(GRADERS)}", param="grader")
    judge = None
    if grader_name == "judge":
        if not pc.judge_model:
            raise InvalidRequestError("grader 'judge' needs profiling.judge_model in config.yaml", param="grader")
        judge_spec = catalog.spec_from_row(await asyncio.to_thread(catalog.get_model, store, pc.judge_model))
        entries[judge_spec.name] = _entry(judge_spec)
    complete = ForwarderCompleter(forwarder, entries, max_tokens=pc.max_tokens)
    if grader_name == "judge":
        assert pc.judge_model is not None
        judge_name = pc.judge_model

        async def judge_call(prompt: str) -> str:
            return (await complete(judge_name, prompt)).text

        judge = judge_call
    g = get_grader(grader_name, judge=judge)
    prompts = validation_prompts(art, variant, answers)
    outcomes = SqlOutcomeStore(store, art.version)
    retry = RetryPolicy(attempts=pc.attempts)
    if max_prompts is not None or target_ci is not None:
        seq = SequentialProfile(art.membership(art.val_embeddings, variant), prior_strength=art.profile_prior(variant)[0],
                                difficulty=art.profile_prior(variant)[1], target_ci=target_ci, max_prompts=max_prompts,
                                allocation=allocation, seed=_order_seed(art.version))
        report, state = await _sequential(seq, model, prompts, outcomes, complete=complete, grader=g,
                                          concurrency=concurrency or pc.concurrency, retry=retry, progress=progress,
                                          on_start=on_start)
        return await asyncio.to_thread(_finish, config, store, art, spec.router_cost, model, prompts, outcomes, report,
                                       allow_partial, activate, (seq, state))
    if on_start is not None:
        done = await asyncio.to_thread(outcomes.completed, model, [p.prompt_id for p in prompts])
        on_start(len(prompts), len(done))
    report = await profile_model(model, prompts, complete=complete, grader=g, store=outcomes,
                                 concurrency=concurrency or pc.concurrency, retry=retry, progress=progress)
    return await asyncio.to_thread(_finish, config, store, art, spec.router_cost, model, prompts, outcomes, report,
                                   allow_partial, activate)


def _order_seed(router_version: str) -> int:
    """The seed of the sequential order: one per router artifact, the same for every model, so that models
    profiled on few prompts are profiled on the same ones (their Ψ then share the prompts' noise and compare
    better; per-model random subsets cost Area in docs/EVALUATION.md, "Active allocation")."""
    return int.from_bytes(hashlib.sha256(f"sequential:{router_version}".encode()).digest()[:8], "big")


def _seq_inputs(seq: SequentialProfile, model: str, prompts: Sequence[ValidationPrompt],
                outcomes: SqlOutcomeStore) -> tuple[set[int], list[int], list[float]]:
    """(positions asked, graded or not; graded positions; their errors) from the stored outcomes."""
    pos = {p.prompt_id: i for i, p in enumerate(prompts)}
    asked: set[int] = set()
    rows: list[int] = []
    errors: list[float] = []
    for o in outcomes.outcomes(model):
        i = pos.get(o.prompt_id)
        if i is None:
            continue
        asked.add(i)
        if o.score is not None:
            rows.append(i)
            errors.append(1.0 - float(o.score))
    return asked, rows, errors


async def _sequential(seq: SequentialProfile, model: str, prompts: Sequence[ValidationPrompt],
                      outcomes: SqlOutcomeStore, *, complete: Completer, grader: Any, concurrency: int,
                      retry: RetryPolicy, progress: Callable[[RunReport], None] | None,
                      on_start: Callable[[int, int], None] | None) -> tuple[RunReport, SequentialState]:
    """Ask rounds of prompts chosen by ``seq`` until it says stop; outcomes stored earlier count (resume)."""
    total = RunReport(model=model, total=seq.budget)
    asked, rows, errors = await asyncio.to_thread(_seq_inputs, seq, model, prompts, outcomes)
    total.skipped = len(rows)
    if on_start is not None:
        on_start(seq.budget, min(len(asked), seq.budget))
    while True:
        state = seq.state(asked, rows, errors)
        nxt = seq.next_rows(state, asked)
        if len(nxt) == 0:
            return total, state
        base = RunReport(model=model, total=total.total, skipped=total.skipped, graded=total.graded,
                         failed=total.failed, cost_usd=total.cost_usd)

        def step(r: RunReport, base: RunReport = base) -> None:
            if progress is not None:
                progress(RunReport(model=model, total=base.total, skipped=base.skipped, graded=base.graded + r.graded,
                                   failed=base.failed + r.failed, cost_usd=base.cost_usd + r.cost_usd))

        rep = await profile_model(model, [prompts[int(i)] for i in nxt], complete=complete, grader=grader,
                                  store=outcomes, concurrency=concurrency, retry=retry, progress=step)
        total.graded += rep.graded
        total.failed += rep.failed
        total.cost_usd += rep.cost_usd
        total.seconds += rep.seconds
        for msg, n in rep.errors.items():
            total.errors[msg] = total.errors.get(msg, 0) + n
        asked, rows, errors = await asyncio.to_thread(_seq_inputs, seq, model, prompts, outcomes)
        asked |= {int(i) for i in nxt}  # a prompt whose outcome was not stored is not asked again either
        if rep.stopped:
            total.stopped = rep.stopped
            return total, seq.state(asked, rows, errors)


def _entry(spec: ModelSpec) -> ModelEntry:
    """The registry entry of a stored model; an unset ``os.environ/NAME`` in its params is a 400 saying what to do."""
    try:
        return ModelEntry.from_spec(spec)
    except ValueError as exc:  # ConfigError: an unset variable, an undecryptable value, a masked placeholder
        raise InvalidRequestError(f"{exc}: set it where profiling runs, or change the model's litellm_params "
                                  f"(`uniroute models update {spec.name} ...`, PATCH /admin/models/{spec.name})",
                                  code="unset_variable") from None


def outcomes_fingerprint(art: RouterArtifact, graded: Mapping[str, float], cost: float) -> str:
    """What a profile is computed from: the artifact, the graded outcomes on its validation prompts, the router
    cost (a reported profile is current while this is unchanged)."""
    h = hashlib.sha256(f"{art.version}|{float(cost)!r}".encode())
    for pid in sorted(graded):
        h.update(f"|{pid}={graded[pid]!r}".encode())
    return h.hexdigest()


def _graded(art: RouterArtifact, outcomes: SqlOutcomeStore, model: str) -> tuple[dict[str, float], dict[str, int]]:
    valid = set(art.val_prompt_ids)
    rows = [o for o in outcomes.outcomes(model) if o.score is not None and o.prompt_id in valid]
    return {o.prompt_id: float(o.score) for o in rows if o.score is not None}, {o.prompt_id: o.cluster for o in rows}


def activate_reported(config: GatewayConfig, store: Store, art: RouterArtifact, model: str,
                      cost: float) -> ProfilingResult | None:
    """Activate the profile reported for ``model`` by an earlier run, as reported, when it is still current
    (same artifact and variant, same graded outcomes and router cost); None when there is none (the caller
    profiles again)."""
    pending = impact_sql.pending_impact(store, model)
    if pending is None or pending.artifact_version != art.version or pending.variant != config.router.variant:
        return None
    outcomes = SqlOutcomeStore(store, art.version)
    graded, clusters = _graded(art, outcomes, model)
    if outcomes_fingerprint(art, graded, cost) != pending.fingerprint:
        return None
    if not impact_sql.mark_activated(store, pending.id):
        return None  # activated or replaced meanwhile
    per_cluster = np.bincount(list(clusters.values()), minlength=art.k).astype(int)
    res = ProfilingResult(model=model, router_version=art.version,
                          report=RunReport(model=model, total=len(art.val_prompt_ids), skipped=len(graded)),
                          graded_per_cluster=per_cluster.tolist(), short_clusters=[],
                          min_graded_per_cluster=config.profiling.min_graded_per_cluster,
                          partial=pending.source == "validation-partial")
    try:
        for variant, prof in pending.profiles.items():
            key = catalog.profile_key(art.version, variant)
            res.profile_versions[key] = catalog.save_profile(store, model, key, prof["psi"], prof["counts"],
                                                             pending.source)
        catalog.set_routable(store, model, True)
    except Exception:
        impact_sql.mark_reported(store, pending.id)  # not activated after all: a later call may try again
        raise
    res.activated = True
    res.psi = [float(v) for v in pending.profiles[config.router.variant]["psi"]]
    res.impact = ImpactReport.from_dict(pending.report) if pending.report is not None else None
    res.impact_error = pending.report_error
    res.message = (f"activated {model!r} with the profile reported at {pending.created_at.isoformat()} "
                   f"(from {len(graded)} of {len(art.val_prompt_ids)} prompts; nothing asked or graded again)"
                   + (" — PARTIAL" if res.partial else ""))
    return res


def _finish(config: GatewayConfig, store: Store, art: RouterArtifact, cost: float, model: str,
            prompts: Sequence[ValidationPrompt], outcomes: SqlOutcomeStore, report: RunReport,
            allow_partial: bool, activate: bool = False,
            sequential: tuple[SequentialProfile, SequentialState] | None = None) -> ProfilingResult:
    pc = config.profiling
    valid = {p.prompt_id for p in prompts}
    graded = {o.prompt_id: float(o.score) for o in outcomes.outcomes(model) if o.score is not None
              and o.prompt_id in valid}
    cluster_of = {p.prompt_id: p.cluster for p in prompts}
    per_cluster = np.bincount([cluster_of[pid] for pid in graded], minlength=art.k).astype(int)
    available = np.bincount([p.cluster for p in prompts], minlength=art.k).astype(int)
    # a cluster with fewer validation prompts than the minimum needs all of them graded
    short = [k for k in range(art.k) if per_cluster[k] < min(pc.min_graded_per_cluster, available[k])]
    seq_info: dict[str, Any] | None = None
    if sequential is not None:  # the target, not a count per cluster, decides (run_profiling)
        seq, state = sequential
        short = [] if seq.target is None else [
            k for k in range(art.k) if state.half_widths[k] > seq.target and not state.exhausted[k]]
        seq_info = {**state.as_dict(), "target_ci": seq.target, "max_prompts": seq.budget,
                    "allocation": seq.allocation, "candidates": len(prompts)}
    res = ProfilingResult(model=model, router_version=art.version, report=report,
                          graded_per_cluster=per_cluster.tolist(), short_clusters=short,
                          min_graded_per_cluster=pc.min_graded_per_cluster, sequential=seq_info)
    if report.stopped:
        res.message = (f"{model!r} not activated: profiling {report.stopped}. Check the model's litellm_params "
                       "(model name, api_base, api_key) and its upstream, then run again (it resumes)")
        return res
    if not graded:
        res.message = f"no graded answer for {model!r}: not activated ({report.failed} failures)"
        return res
    if short and not allow_partial and sequential is not None:
        res.message = (f"not activated: the 95% half-width of clusters {short} is above the target "
                       f"{sequential[0].target} after {sequential[1].used} prompts (max half-width "
                       f"{float(np.max(sequential[1].half_widths)):.3f}); raise --max-prompts and run again (it "
                       "resumes), or pass --allow-partial")
        return res
    if short and not allow_partial:
        res.message = (f"not activated: clusters {short} have fewer than {pc.min_graded_per_cluster} graded answers "
                       f"(graded per cluster: {res.graded_per_cluster}); fix the failures and run again (it "
                       "resumes), or pass --allow-partial")
        return res
    res.partial = bool(short) or (len(graded) < len(prompts) and sequential is None)
    source = "validation-partial" if res.partial else "validation"
    reweight = sequential is not None and sequential[0].allocation == "active"
    profiles = art.profile_model(model, graded, cost=cost, reweight=reweight)
    inputs: dict[str, Any] | None = None
    for prof in profiles:
        if prof.variant == config.router.variant:
            res.psi = [float(v) for v in prof.psi]
            try:
                res.impact, inputs = store_impact(config, store, art, model, prof.psi, cost)
            except ValueError as exc:  # e.g. no other profiled model to compare with
                res.impact_error = str(exc)
    kept = {prof.variant: {"psi": [float(v) for v in prof.psi], "counts": [float(v) for v in prof.counts]}
            for prof in profiles}
    fingerprint = outcomes_fingerprint(art, {pid: graded[pid] for pid in graded}, cost)

    def keep(activated: bool) -> None:
        impact_sql.save_impact(store, model=model, artifact_version=art.version, variant=config.router.variant,
                               fingerprint=fingerprint, source=source, profiles=kept,
                               report=res.impact.as_dict() if res.impact is not None else None,
                               report_error=res.impact_error, inputs=inputs, activated=activated)

    if not activate:
        keep(False)
        res.message = (f"{model!r} profiled from {len(graded)} of {len(prompts)} prompts and NOT activated: the "
                       f"impact report shows what activating it changes; activate it as reported with "
                       f"`uniroute profile {model} --activate` or POST /admin/models/{model}/profile "
                       '{"activate": true} (nothing is asked or graded again)')
        return res
    for prof in profiles:
        key = catalog.profile_key(art.version, prof.variant)
        res.profile_versions[key] = catalog.save_profile(store, model, key, prof.psi, prof.counts, source)
    catalog.set_routable(store, model, True)
    keep(True)
    res.activated = True
    res.message = (f"activated {model!r} with a profile from {len(graded)} of {len(prompts)} prompts"
                   + (f" (sequential: stopped on {seq_info['stop']}, max 95% half-width "
                      f"{seq_info['max_half_width']:.3f})" if seq_info is not None else "")
                   + (f" — PARTIAL: clusters {short} below {pc.min_graded_per_cluster} graded answers, "
                      f"{len(prompts) - len(graded)} prompts ungraded" if res.partial else ""))
    return res
