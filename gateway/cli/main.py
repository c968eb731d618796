"""The ``uniroute`` command line.

Each sub-command's handler is imported lazily, so ``uniroute --help`` stays fast and
heavy dependencies (torch, litellm) load only for the commands that need them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

import gateway  # noqa: F401  (sets the offline environment before anything imports litellm)
from gateway.cli import models as models_cli  # the `models add/update` flags come from the model spec
from gateway.cli import profiles as profiles_cli
from gateway.cli import route as route_cli


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """Return a handler that imports ``module:function`` on first call."""

    def run(args: argparse.Namespace) -> int:
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(args)
        return int(result or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniroute", description="UniRoute Gateway command line.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # --- gateway server ------------------------------------------------------------------
    p = sub.add_parser("serve", help="run the gateway (uvicorn)")
    p.add_argument("--config", default=None, help="path to config.yaml (default: $UNIROUTE_CONFIG or ./config.yaml)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(handler=_lazy("gateway.cli.serve:serve_command"))

    # --- replay upstream -----------------------------------------------------------------
    p = sub.add_parser("replay", help="serve a routing benchmark folder as an OpenAI-compatible upstream")
    p.add_argument("--dataset", default=None, help="routing benchmark folder (default: $UNIROUTE_DATASET)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--latency-ms", action="append", default=[], metavar="MODEL=MS",
                   help="add latency per model (repeatable; MODEL may be '*')")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between streamed chunks")
    p.add_argument("--stream-chunks", type=int, default=None, metavar="N",
                   help="split each streamed answer into N pieces (default: one per word)")
    p.add_argument("--fail", action="append", default=[], metavar="MODEL=500|429|timeout",
                   help="inject a fault per model (repeatable; MODEL may be '*')")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    p.set_defaults(handler=_lazy("replay.cli:replay_command"))

    # --- budget pacing simulation --------------------------------------------------------
    p = sub.add_parser("simulate", help="replay a budget period of traffic through the chat service with a "
                       "budget-paced key; print and plot spend, λ and quality (docs/PACING.md)")
    p.add_argument("--dataset", default=None, help="routing benchmark folder (default: $UNIROUTE_DATASET)")
    p.add_argument("--artifact", default=None,
                   help="router artifact (default: $UNIROUTE_ROUTER_ARTIFACT, else var/router-static)")
    p.add_argument("--budget", type=float, required=True, help="the paced key's budget for the period, USD")
    p.add_argument("--period", choices=["day", "month"], default="day", help="the budget period simulated")
    p.add_argument("--rate", type=float, required=True, help="mean requests per simulated hour")
    p.add_argument("--burst", action="append", default=[], metavar="START:LENGTH:FACTOR",
                   help="traffic x FACTOR from START for LENGTH (shares of the period), e.g. 0.3:0.1:4 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-lambda", type=float, default=0.1, help="the key's λ, where the pace starts")
    p.add_argument("--database-url", default=None, help="database for the run (default: a temporary SQLite file)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write spend, λ and quality over the period here")
    p.add_argument("--json", default=None, metavar="FILE", help="write the summary as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(handler=_lazy("simulation.cli:simulate_command"))

    # --- configuration -------------------------------------------------------------------
    p = sub.add_parser("config", help="the config.yaml reference")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    q = csub.add_parser("reference", help="print every config key with its type, default and meaning (Markdown; "
                        "docs/CONFIG.md is this output)")
    q.set_defaults(handler=_lazy("gateway.configdoc:reference_command"))

    # --- database ------------------------------------------------------------------------
    p = sub.add_parser("db", help="database migrations (Alembic)")
    dbsub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    q = dbsub.add_parser("upgrade", help="apply migrations (default: to the latest)")
    q.add_argument("revision", nargs="?", default="head")
    q.set_defaults(handler=_lazy("gateway.cli.db:db_upgrade_command"))
    q = dbsub.add_parser("downgrade", help="revert migrations down to REV ('base' empties the database)")
    q.add_argument("revision", metavar="REV")
    q.set_defaults(handler=_lazy("gateway.cli.db:db_downgrade_command"))
    q = dbsub.add_parser("current", help="show the database's revision")
    q.set_defaults(handler=_lazy("gateway.cli.db:db_current_command"))
    for q in (*dbsub.choices.values(),):
        q.add_argument("--config", default=None,
                       help="config.yaml whose database_url to use ($UNIROUTE_DATABASE_URL wins)")

    # --- API keys ------------------------------------------------------------------------
    p = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    q = ksub.add_parser("create", help="create a key and print it (once)")
    q.add_argument("--name", required=True)
    q.add_argument("--lambda", dest="lam", type=float, required=True,
                   help="the key's default cost/quality trade-off λ, within router.lambda_min..lambda_max")
    q.add_argument("--budget", type=float, default=None, help="USD per period (omit for no cap)")
    q.add_argument("--period", choices=["day", "month"], default="month")
    q.add_argument("--lambda-min", type=float, default=None,
                   help="lowest λ a request may ask for (default: router.lambda_min)")
    q.add_argument("--lambda-max", type=float, default=None,
                   help="highest λ a request may ask for (default: router.lambda_max)")
    q.add_argument("--rpm", type=int, default=None, help="requests per minute (omit for no limit)")
    q.add_argument("--models", default=None, help="comma-separated models the key may use (default: all)")
    q.add_argument("--trusted", action="store_true",
                   help="its feedback counts when profiling.feedback_from is 'trusted' (default: not trusted)")
    q.add_argument("--budget-policy", choices=["block", "pace"], default="block",
                   help="block: refuse what does not fit the budget (429); pace: also adjust the key's λ so its "
                        "spend tracks budget × elapsed share of the period (needs --budget; docs/PACING.md)")
    q.set_defaults(handler=_lazy("gateway.cli.keys:keys_create_command"))
    q = ksub.add_parser("list", help="list keys (never shows the keys themselves)")
    q.add_argument("--all", action="store_true", help="include revoked keys")
    q.add_argument("--json", action="store_true")
    q.set_defaults(handler=_lazy("gateway.cli.keys:keys_list_command"))
    q = ksub.add_parser("revoke", help="revoke a key (refused by every replica from the next request)")
    q.add_argument("name")
    q.set_defaults(handler=_lazy("gateway.cli.keys:keys_revoke_command"))
    q = ksub.add_parser("trust", help="mark a key trusted (or --off: not trusted) for profiling.feedback_from: trusted")
    q.add_argument("name")
    q.add_argument("--off", action="store_true", help="take the mark away")
    q.set_defaults(handler=_lazy("gateway.cli.keys:keys_trust_command"))
    q = ksub.add_parser("policy", help="set a key's budget policy: block (hard cap) or pace (λ paced to the budget)")
    q.add_argument("name")
    q.add_argument("policy", choices=["block", "pace"])
    q.set_defaults(handler=_lazy("gateway.cli.keys:keys_policy_command"))
    for q in (*ksub.choices.values(),):
        q.add_argument("--config", default=None,
                       help="config.yaml whose database_url to use ($UNIROUTE_DATABASE_URL wins)")

    # --- model registry ------------------------------------------------------------------
    p = sub.add_parser("models", help="list, add, update, disable and remove models (live on every replica)")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    q = msub.add_parser("list", help="list the registry")
    q.add_argument("--json", action="store_true")
    q.set_defaults(handler=_lazy("gateway.cli.models:models_list_command"))
    q = msub.add_parser("add", help="add a model (not chosen by `auto` until profiled)")
    models_cli.add_spec_arguments(q, update=False)  # one flag per field of gateway.spec.ModelSpec
    q.set_defaults(handler=_lazy("gateway.cli.models:models_add_command"))
    q = msub.add_parser("update", help="change a model's params, prices, router cost, timeouts or routability")
    models_cli.add_spec_arguments(q, update=True)
    q.set_defaults(handler=_lazy("gateway.cli.models:models_update_command"))
    q = msub.add_parser("disable", help="stop serving a model (kept in the table)")
    q.add_argument("name")
    q.set_defaults(handler=_lazy("gateway.cli.models:models_disable_command"))
    q = msub.add_parser("remove", help="delete a model from the registry")
    q.add_argument("name")
    q.set_defaults(handler=_lazy("gateway.cli.models:models_remove_command"))
    for q in (*msub.choices.values(),):
        q.add_argument("--config", default=None,
                       help="config.yaml whose database_url to use ($UNIROUTE_DATABASE_URL wins)")

    # --- routing dry-run -----------------------------------------------------------------
    p = sub.add_parser("route", help="routing dry-run against a running gateway: the ranking, cluster and "
                       "excluded models for a prompt (no model called, nothing charged)")
    route_cli.add_arguments(p)
    p.set_defaults(handler=_lazy("gateway.cli.route:route_command"))

    p = sub.add_parser("profiles", help="a key's tenant-private profile: upload its labelled set, show, delete "
                       "(through a running gateway)")
    profiles_cli.add_arguments(p)
    p.set_defaults(handler=_lazy("gateway.cli.profiles:profiles_command"))

    # --- profiling and re-profiling ----------------------------------------------------------
    p = sub.add_parser("profile", help="profile a registered model on the router's validation prompts and print its "
                       "impact report; --activate activates it")
    p.add_argument("model")
    p.add_argument("--config", default=None, help="path to config.yaml (default: $UNIROUTE_CONFIG or ./config.yaml)")
    p.add_argument("--concurrency", type=int, default=None, help="parallel requests (default: profiling.concurrency)")
    p.add_argument("--grader", default=None, choices=["multiple_choice", "exact", "numeric", "judge"],
                   help="default: profiling.grader")
    p.add_argument("--allow-partial", action="store_true",
                   help="activate even when a cluster has fewer graded answers than profiling.min_graded_per_cluster")
    p.add_argument("--dataset", default=None,
                   help="take reference answers from this dataset (for artifacts fitted without them)")
    p.add_argument("--restart", action="store_true", help="forget stored outcomes and ask every prompt again")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--activate", action="store_true",
                   help="activate it too: a profile reported by an earlier run (and still current) is activated as "
                        "reported, nothing asked or graded again; otherwise it is profiled and activated in this run "
                        "(docs/IMPACT.md)")
    g.add_argument("--no-activate", action="store_true",
                   help="the default: profile and print the impact report only (kept for scripts)")
    p.add_argument("--impact-plot", default=None, metavar="PNG", help="also draw the impact report here")
    p.add_argument("--max-prompts", type=int, default=None, metavar="N",
                   help="sequential profiling: ask at most N validation prompts, in rounds (docs/PROFILING.md)")
    p.add_argument("--target-ci", type=float, default=None, metavar="X",
                   help="sequential profiling: stop once every cluster's 95%% posterior half-width of Ψ is at most X "
                        "(e.g. 0.1); activation then needs the target met, not profiling.min_graded_per_cluster")
    p.add_argument("--allocation", default=None, choices=["uniform", "active"],
                   help="sequential profiling: how the next prompts are chosen (default: "
                        "profiling.profiler.DEFAULT_ALLOCATION, uniform)")
    p.set_defaults(handler=_lazy("profiling.cli:profile_command"))

    p = sub.add_parser("impact", help="a model's stored impact report and its follow-up: predicted against realised "
                       "traffic share, cost and error since its activation (docs/IMPACT.md)")
    p.add_argument("model")
    p.add_argument("--config", default=None, help="path to config.yaml (default: $UNIROUTE_CONFIG or ./config.yaml)")
    p.add_argument("--now", action="store_true",
                   help="compute the follow-up now from the request log (else: as stored; the scheduler inside "
                        "serve computes it profiling.impact_followup_s after the activation)")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the stored report here (as --impact-plot "
                   "of uniroute profile draws it; e.g. for a report made through the admin API)")
    p.set_defaults(handler=_lazy("profiling.cli:impact_command"))

    p = sub.add_parser("reprofile", help="recompute every model's Ψ from validation outcomes plus feedback")
    p.add_argument("--config", default=None, help="path to config.yaml (default: $UNIROUTE_CONFIG or ./config.yaml)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--top", type=int, default=10, help="rows of the drift report")
    p.set_defaults(handler=_lazy("profiling.cli:reprofile_command"))

    # --- routing: router artifact and evaluation -------------------------------------------
    p = sub.add_parser("router", help="fit and calibrate the UniRoute router artifact")
    rsub = p.add_subparsers(dest="router_command", required=True, metavar="ACTION")
    q = rsub.add_parser("fit", help="fit clusters/θ on a routing benchmark and profile its models")
    q.add_argument("--dataset", default=None, help="routing benchmark folder (default: $UNIROUTE_DATASET)")
    q.add_argument("--out", required=True, help="artifact folder to write")
    q.add_argument("--k", default="auto", help="number of clusters K, or 'auto' (default)")
    q.add_argument("--variant", default="learnedmap", choices=["kmeans", "learnedmap"],
                   help="default variant recorded in the artifact")
    q.add_argument("--val-size", type=int, default=None,
                   help="validation prompts used for profiles (default: routing.artifact.DEFAULT_VAL_SIZE, 1000, "
                        "what the label-efficiency curve supports; docs/EVALUATION.md)")
    q.add_argument("--prior", default=None, choices=["flat", "difficulty"],
                   help="profile prior of Ψ (default: routing.estimators.DEFAULT_PRIOR; docs/EVALUATION.md)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--embedder", default=None,
                   help="'static' (MiniLM distilled to a static embedding, copied into the artifact), a "
                        "static-embedding folder, or a sentence-transformers model path (default: MiniLM)")
    q.add_argument("--cache-dir", default=None, help="embedding cache (default: $UNIROUTE_CACHE_DIR)")
    q.add_argument("--models", default=None, help="comma-separated models to fit and profile (default: all)")
    q.add_argument("--exclude-models", default=None, help="comma-separated models to leave out (e.g. to onboard "
                   "one later with `uniroute profile`)")
    q.set_defaults(handler=_lazy("routing.cli:fit_command"))
    q = rsub.add_parser("distill", help="distil a static embedding from the local MiniLM weights (offline)")
    q.add_argument("--out", default=None,
                   help="folder to write (default: <cache dir>/static/all-MiniLM-L6-v2-m2v<dims>)")
    q.add_argument("--model", default=None, help="local sentence-transformers model folder (default: MiniLM)")
    q.add_argument("--pca-dims", type=int, default=256, help="PCA dimensions (0: keep the model's)")
    q.add_argument("--cache-dir", default=None, help="embedding cache (default: $UNIROUTE_CACHE_DIR)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    q.set_defaults(handler=_lazy("routing.cli:distill_command"))
    q = rsub.add_parser("calibrate", help="find the λ meeting a cost target on the validation prompts")
    q.add_argument("--artifact", required=True, help="artifact folder")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-cost", type=float, help="target mean normalised cost in (0, 1]")
    g.add_argument("--fraction-of-best", type=float,
                   help="target as a fraction of the most accurate model's normalised cost")
    q.add_argument("--variant", default=None, choices=["kmeans", "learnedmap"])
    q.add_argument("--models", default=None, help="comma-separated pool (default: every profiled model)")
    q.set_defaults(handler=_lazy("routing.cli:calibrate_command"))

    p = sub.add_parser("eval", help="the paper's evaluation (seeded trials) on a routing benchmark folder")
    p.add_argument("--dataset", default=None, help="routing benchmark folder (default: $UNIROUTE_DATASET)")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed0", type=int, default=100,
                   help="first seed (default 100: the reporting seeds; 0-19 and 200-219 were used for tuning)")
    p.add_argument("--val-sizes", default=None,
                   help="comma-separated validation labels per new model (e.g. 100,250,500,1000): the "
                        "label-efficiency table and plot (default: the whole validation split)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    p.add_argument("--json", default=None, help="write the summary JSON here")
    p.add_argument("--plot", default=None, help="write the mean deferral curves PNG here")
    p.add_argument("--embedder", default=None,
                   help="'static' (MiniLM distilled to a static embedding), a static-embedding folder, "
                        "or a sentence-transformers model path (default: MiniLM)")
    p.add_argument("--max-seq-length", type=int, default=None, help="truncate prompts (tokens)")
    p.add_argument("--quantize", action="store_true", help="dynamic int8 quantisation of the embedder")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: $UNIROUTE_CACHE_DIR)")
    p.set_defaults(handler=_lazy("routing.cli:eval_command"))

    return parser


def error_line(exc: Exception) -> str:
    """What a command that raised ``exc`` prints after ``error: `` (one line): the message of an expected
    failure — a refused request (any GatewayError), a bad or missing config or an unset variable (ConfigError
    and other ValueErrors), the database, a migration revision, a file — else the exception's type and first line.
    """
    from gateway.errors import GatewayError

    if isinstance(exc, GatewayError):
        return exc.message
    sa_exc = sys.modules.get("sqlalchemy.exc")  # only loaded modules can have raised: nothing is imported here
    if sa_exc is not None and isinstance(exc, sa_exc.SQLAlchemyError):
        from gateway.store.engine import DATABASE_URL_ENV

        if isinstance(exc, sa_exc.ArgumentError):
            return f"database_url: {exc}"
        if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
            return (f"cannot use the database ({_first_line(exc.orig)}): check database_url in the config (or "
                    f"${DATABASE_URL_ENV}) and that the database is running")
        if isinstance(exc, sa_exc.DBAPIError):
            return f"database error ({_first_line(exc.orig)}); `uniroute db upgrade` brings the schema up to date"
        return f"database: {type(exc).__name__}: {_first_line(exc)}"
    expected: tuple[type[BaseException], ...] = (ValueError, OSError)  # ConfigError is a ValueError
    for module, name in (("alembic.util", "CommandError"), ("yaml", "YAMLError")):
        if (cls := getattr(sys.modules.get(module), name, None)) is not None:
            expected += (cls,)
    if isinstance(exc, expected):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {_first_line(exc)} (unexpected: UNIROUTE_DEBUG=1 shows the traceback)"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Whatever it raises is printed as one ``error: ...`` line on stderr (exit status 1),
    never as a traceback (``UNIROUTE_DEBUG=1`` re-raises it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("UNIROUTE_DEBUG"):
            raise
        print("error: " + " ".join(error_line(exc).split()), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
