"""The routing commands of the ``uniroute`` command line (``gateway/cli/main.py`` builds the parser).

``uniroute router fit | distill | calibrate`` and ``uniroute eval``: each command reads its
arguments, calls the library (routing.artifact, routing.embedder, routing.calibration,
routing.evaluation) and prints the result. Argument errors exit with a message
(``SystemExit``); the library functions raise ordinary exceptions.

``gateway/cli/main.py`` imports this module only when a routing command runs; torch, model2vec,
scipy and matplotlib load further down, only when the command needs them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from routing.artifact import DEFAULT_VAL_SIZE, STATIC_EMBEDDER_DIR, RouterArtifact, fit_artifact, load_pool
from routing.calibration import calibrate_lambda, target_from_fraction
from routing.dataset import default_dataset_path, load_dataset
from routing.embedder import make_embedder
from routing.profiles import load_profiles, save_profiles

# --------------------------------------------------------------------------- uniroute router fit

def select_models(models: Sequence[str], include: str | None, exclude: str | None) -> list[int]:
    """Column indices of the models to fit on (``--models a,b`` / ``--exclude-models c``)."""
    names = list(models)
    chosen = names
    for opt, value in (("--models", include), ("--exclude-models", exclude)):
        if not value:
            continue
        given = [m.strip() for m in value.split(",") if m.strip()]
        unknown = [m for m in given if m not in names]
        if unknown:
            raise SystemExit(f"{opt}: unknown model(s) {', '.join(unknown)}; known: {', '.join(names)}")
        chosen = [m for m in chosen if m in given] if opt == "--models" else [m for m in chosen if m not in given]
    if not chosen:
        raise SystemExit("no model left to fit on")
    return [names.index(m) for m in chosen]


def fit_command(args: argparse.Namespace) -> int:
    """``uniroute router fit``."""
    path = args.dataset or default_dataset_path()
    if path is None:
        raise SystemExit("no dataset: pass --dataset DIR or set $UNIROUTE_DATASET")
    k: int | str = args.k
    if k != "auto":
        try:
            k = int(k)
        except ValueError:
            raise SystemExit(f"--k must be an integer or 'auto', got {args.k!r}") from None
    ds = load_dataset(path, with_responses=False)
    cols = select_models(ds.models, getattr(args, "models", None), getattr(args, "exclude_models", None))
    embedder = make_embedder(args.embedder, cache_dir=args.cache_dir, progress=True)
    embedder_path = args.embedder
    static_dir = _static_folder(embedder)
    if static_dir is not None:
        # the gateway must load exactly these vectors: copy them into the artifact folder
        dest = Path(args.out) / STATIC_EMBEDDER_DIR
        if dest.resolve() != static_dir.resolve():
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(static_dir, dest)
        embedder_path = str(dest.resolve())
    x = embedder.embed(ds.prompts)
    art, profiles = fit_artifact(x, ds.scores[:, cols], ds.model_costs[cols], [ds.models[j] for j in cols],
                                 ds.prompt_ids, ds.prompts, answers=ds.answers,
                                 embedder_id=embedder.id, training_set_hash=ds.fingerprint(), k=k,
                                 variant=args.variant,
                                 val_size=DEFAULT_VAL_SIZE if args.val_size is None else args.val_size, seed=args.seed,
                                 prior=getattr(args, "prior", None),
                                 embedder_path=embedder_path)
    out = art.save(args.out)
    save_profiles(out, profiles, artifact_version=art.version)
    print(json.dumps({"artifact": str(out), "version": art.version, "k": art.k, "variant": art.variant,
                      "profile_priors": art.profile_priors,
                      "embedder": art.embedder_id, "val_prompts": len(art.val_prompt_ids),
                      "models_profiled": len(cols)}))
    return 0


def _static_folder(embedder: Any) -> Path | None:
    """The folder of a (cached) static embedder, else None."""
    from routing.embedder import CachedEmbedder, StaticEmbedder

    inner = embedder.inner if isinstance(embedder, CachedEmbedder) else embedder
    return inner.path if isinstance(inner, StaticEmbedder) else None


# --------------------------------------------------------------------------- uniroute router distill

def distill_command(args: argparse.Namespace) -> int:
    """``uniroute router distill``: a static embedding from the local MiniLM (or --model) weights."""
    from routing.embedder import StaticEmbedder, default_static_path, distill_static

    out = Path(args.out) if args.out else default_static_path(args.cache_dir, args.pca_dims or None)
    path = distill_static(out, model_path=args.model, pca_dims=args.pca_dims or None, overwrite=args.overwrite)
    emb = StaticEmbedder(path)
    print(json.dumps({"path": str(path), "embedder": emb.id, "dim": emb.dim}))
    return 0


# --------------------------------------------------------------------------- uniroute router calibrate

def calibrate_command(args: argparse.Namespace) -> int:
    """``uniroute router calibrate``."""
    art = RouterArtifact.load(args.artifact)
    variant = args.variant or art.variant
    models = args.models.split(",") if args.models else None
    try:
        pool = load_pool(args.artifact, variant, models)
    except KeyError as exc:
        raise SystemExit(f"uniroute router calibrate: {exc.args[0]}") from None
    z = art.membership(art.val_embeddings, variant)
    if args.fraction_of_best is not None:
        profiles = load_profiles(args.artifact, variant)
        target = target_from_fraction(pool, [profiles[m.name].overall_error for m in pool], args.fraction_of_best)
    else:
        target = args.target_cost
    if not 0 < target <= 1:
        raise SystemExit(f"target mean normalised cost must be in (0, 1], got {target:g}")
    try:
        cal = calibrate_lambda(z, pool, target)
    except ValueError as exc:
        raise SystemExit(f"uniroute router calibrate: {exc}") from None
    print(json.dumps({"lambda": cal.lam, "expected_cost": cal.expected_cost,
                      "expected_error": cal.expected_error, "target_cost": cal.target_cost,
                      "variant": variant, "pool": [m.name for m in pool]}))
    return 0


# --------------------------------------------------------------------------- uniroute eval

def _val_sizes(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--val-sizes must be comma-separated positive integers, got {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--val-sizes must be comma-separated positive integers, got {value!r}")
    return sizes


def eval_command(args: argparse.Namespace) -> int:
    """``uniroute eval``: seeded trials of the paper's protocol on a routing benchmark folder."""
    from routing.evaluation import (
        DEFAULT_METHODS,
        evaluate,
        evaluate_sizes,
        markdown_table,
        plot_curves,
        plot_sizes,
        sizes_table,
    )

    path = args.dataset or default_dataset_path()
    if path is None:
        raise SystemExit("no dataset: pass --dataset DIR or set $UNIROUTE_DATASET")
    methods = args.methods.split(",") if args.methods else DEFAULT_METHODS
    sizes = _val_sizes(getattr(args, "val_sizes", None))
    t0 = time.perf_counter()
    ds = load_dataset(path, with_responses=False)
    embedder = make_embedder(args.embedder, cache_dir=args.cache_dir, progress=True,
                             max_seq_length=args.max_seq_length, quantize=getattr(args, "quantize", False))
    x = embedder.embed(ds.prompts)
    seeds = f"seeds {args.seed0}–{args.seed0 + args.trials - 1}"
    try:
        if sizes is not None and len(sizes) > 1:
            by_size, summary = evaluate_sizes(x, ds.scores, ds.model_costs, ds.models, val_sizes=sizes,
                                              trials=args.trials, seed0=args.seed0, methods=methods)
        else:
            results, summary = evaluate(x, ds.scores, ds.model_costs, ds.models, trials=args.trials,
                                        seed0=args.seed0, methods=methods, val_size=sizes[0] if sizes else None)
    except ValueError as exc:
        raise SystemExit(f"uniroute eval: {exc}") from None
    summary["dataset"] = str(path)
    summary["embedder"] = embedder.id
    summary["seconds"] = time.perf_counter() - t0
    if sizes is not None and len(sizes) > 1:
        print(sizes_table(summary))
        per_trial: Any = {str(n): _per_trial(rs) for n, rs in by_size.items()}
    else:
        print(markdown_table(summary))
        per_trial = _per_trial(results)
    print(f"\n{args.trials} trials ({seeds}) on {path} with {embedder.id}: {summary['seconds']:.1f} s")
    if args.json:
        summary["per_trial"] = per_trial
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1, default=float), encoding="utf-8")
    if args.plot:
        name = Path(path).name
        if sizes is not None and len(sizes) > 1:
            plot_sizes(summary, args.plot, f"{name}: Area against validation labels per new model, "
                                           f"{args.trials} trials ({seeds})")
        else:
            plot_curves(results, args.plot, f"{name}: mean deferral curves, {args.trials} trials ({seeds})")
        print(f"plot: {args.plot}")
    return 0


def _per_trial(results: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"seed": r.seed, "metrics": r.metrics,
             "info": {k: (list(v) if isinstance(v, tuple) else v) for k, v in r.info.items()}}
            for r in results]
