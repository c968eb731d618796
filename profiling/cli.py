"""``uniroute profile MODEL``, ``uniroute impact MODEL`` and ``uniroute reprofile``.

Errors are not caught here: :func:`gateway.cli.main.main` prints every one of them as one
``error: ...`` line (exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from typing import Any

from gateway.config import GatewayConfig, load_config
from gateway.store.engine import Store
from profiling.profiler import (
    DEFAULT_ALLOCATION,
    ProfilingResult,
    SqlOutcomeStore,
    dataset_answers,
    load_artifact,
    run_profiling,
)
from profiling.runner import RunReport
from profiling.schedule import Reprofiler, format_report, router_key


def profile_command(args: argparse.Namespace) -> int:
    """``uniroute profile MODEL [--activate]``: exit 0 when profiled and reported (and, with ``--activate``,
    activated), 2 when not (the report says why)."""
    if args.max_prompts is not None and args.max_prompts < 1:
        raise ValueError(f"--max-prompts must be a positive integer, got {args.max_prompts}")
    if args.target_ci is not None and not 0 < args.target_ci < 1:
        raise ValueError(f"--target-ci must be a half-width in (0, 1) error units (e.g. 0.1), got {args.target_ci}")
    if args.allocation is not None and args.max_prompts is None and args.target_ci is None:
        raise ValueError("--allocation applies to sequential profiling: give --max-prompts and/or --target-ci too")
    config = load_config(args.config)
    store = Store(config.database_url)
    t0 = time.perf_counter()
    try:
        store.upgrade()
        if args.restart:
            art = load_artifact(config)
            n = SqlOutcomeStore(store, art.version).reset(args.model)
            print(f"deleted {n} stored outcomes of {args.model}", file=sys.stderr)
        answers = dataset_answers(args.dataset) if args.dataset else None
        result = asyncio.run(_profile(config, store, args, answers))
    finally:
        store.dispose()
    wall = time.perf_counter() - t0
    out = result.as_dict()
    out["wall_seconds"] = round(wall, 3)
    print(json.dumps(out, indent=1) if args.json else _format(result, wall))
    if args.impact_plot and result.impact is not None:
        from routing.impact import plot_report

        print(f"impact plot: {plot_report(result.impact, args.impact_plot)}", file=sys.stderr)
    if result.partial:
        done = "activated" if result.activated else "profiled"
        print(f"WARNING: {args.model} was {done} on PARTIAL data ({result.message})", file=sys.stderr)
    return 0 if result.activated or (not args.activate and result.psi is not None) else 2


async def _profile(config: GatewayConfig, store: Store, args: argparse.Namespace,
                   answers: dict[str, str | None] | None) -> ProfilingResult:
    """One profiling run with a progress bar; the forwarder's HTTP clients are closed before the loop ends."""
    from tqdm import tqdm

    from gateway.serving.forwarding import Forwarder

    bar: Any = None

    def on_start(total: int, done: int) -> None:
        nonlocal bar
        bar = tqdm(total=total, initial=done, desc=f"profiling {args.model}", unit="prompt", file=sys.stderr,
                   dynamic_ncols=True)

    def progress(r: RunReport) -> None:
        if bar is not None:
            bar.update(r.skipped + r.graded + r.failed - bar.n)
            bar.set_postfix(cost=f"${r.cost_usd:.4f}", failed=r.failed, refresh=False)

    forwarder = Forwarder(max_attempts=1)
    try:
        return await run_profiling(config, store, forwarder, args.model, grader=args.grader,
                                   concurrency=args.concurrency, allow_partial=args.allow_partial, answers=answers,
                                   progress=progress, on_start=on_start, activate=args.activate,
                                   max_prompts=args.max_prompts, target_ci=args.target_ci,
                                   allocation=args.allocation or DEFAULT_ALLOCATION)
    finally:
        if bar is not None:
            bar.close()
        await forwarder.aclose()


def _format(r: ProfilingResult, wall: float) -> str:
    lines = [r.report.summary(), f"wall time {wall:.2f}s", f"graded per cluster: {r.graded_per_cluster}"]
    if r.sequential is not None:
        s = r.sequential
        lines.append(f"sequential ({s['allocation']}): used {s['used']} of {s['candidates']} prompts "
                     f"({s['graded']} graded), stopped on {s['stop']}; max 95% half-width {s['max_half_width']:.3f}"
                     + (f" (target {s['target_ci']})" if s["target_ci"] is not None else ""))
    lines.append(r.message)
    if r.psi is not None:
        lines.append("Ψ: [" + ", ".join(f"{v:.3f}" for v in r.psi) + "]")
    if r.impact is not None:
        when = "as reported before activation" if r.activated else "before activation"
        lines += ["", f"impact of {r.model} on routing ({when}; docs/IMPACT.md):", r.impact.table()]
    elif r.impact_error:
        lines.append(f"no impact report: {r.impact_error}")
    return "\n".join(lines)


def impact_command(args: argparse.Namespace) -> int:
    """``uniroute impact MODEL [--now] [--plot PNG]``: the stored report and its follow-up; ``--now`` computes the
    follow-up; ``--plot`` draws the stored report."""
    from profiling.followup import ImpactFollowups, format_impact

    config = load_config(args.config)
    store = Store(config.database_url)
    try:
        store.upgrade()
        followups = ImpactFollowups(config, store)
        out = followups.run_now(args.model) if args.now else followups.show(args.model)
    finally:
        store.dispose()
    print(json.dumps(out, indent=1) if args.json else format_impact(out))
    if args.plot:
        from routing.impact import ImpactReport, plot_report

        if out.get("report") is None:
            raise ValueError(f"--plot: the stored run of {args.model} has no impact report to draw "
                             f"({out.get('report_error') or 'none was computed'})")
        print(f"impact plot: {plot_report(ImpactReport.from_dict(out['report']), args.plot)}", file=sys.stderr)
    return 0


def reprofile_command(args: argparse.Namespace) -> int:
    """``uniroute reprofile``: one pass now; waits for nobody (a pass running elsewhere: exit 1, naming it)."""
    config = load_config(args.config)
    store = Store(config.database_url)
    try:
        store.upgrade()
        reprofiler = Reprofiler(config, store, router_key(config), holder=f"cli:{socket.gethostname()}:{os.getpid()}")
        report = reprofiler.run_once(top=args.top)
        if report is None:
            raise reprofiler.busy_error()
    finally:
        store.dispose()
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0
