"""End to end, real servers on loopback: onboard a new model without refitting the router.

1. ``uniroute router fit --exclude-models NEW``: the router knows every model but one;
2. ``uniroute replay`` serves all of them; ``uniroute serve`` routes ``auto`` among the others;
3. NEW is added through ``POST /admin/models`` and profiled through ``POST /admin/models/NEW/profile``
   (LiteLLM → replay upstream, graded by the multiple-choice grader);
4. its stored Ψ equals the Ψ computed offline from the dataset's recorded outcomes on the same
   validation prompts with the same estimator;
5. ``auto`` traffic on prompts where NEW is the best trade-off (argmin computed offline) reaches it.

Two variants: generated data (MiniLM embedder) and the repository's MMLU-Pro benchmark (static embedder).
Also: a model whose upstream is down is given up on after its first 20 failures, and it is not activated.

The README's onboarding commands run as written against the demo's ``config.yaml`` (the repository's
file, only its ports changed), on generated data and on the repository's benchmark; and ``uniroute profile``
against a replay that fails every call gives up with a clear report, one-line errors and no unclosed
HTTP session.
"""

from __future__ import annotations

import csv
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from gateway.store import models as catalog
from gateway.store.engine import Store
from gateway.store.profiling import outcome_rows
from routing.artifact import RouterArtifact, UniRoutePolicy
from routing.dataset import load_dataset
from routing.policy import PoolModel
from routing.profiles import load_profiles
from routing.synthetic import make_synthetic_dataset
from tests.procs import (
    ROOT,
    free_port,
    gateway_server,
    python,
    replay_server,
    replay_upstream,
    running_all,
    server_env,
)

pytestmark = pytest.mark.slow  # each test starts servers and fits or profiles: about a minute each

ADMIN = "sk-admin-onboarding-test"
VARIANT = "learnedmap"


def _fit(dataset: Path, out: Path, exclude: str, val_size: int, k: str, embedder: str | None) -> RouterArtifact:
    from gateway.cli.main import main as cli

    assert cli(["router", "fit", "--dataset", str(dataset), "--out", str(out), "--exclude-models", exclude,
                "--val-size", str(val_size), "--k", k, "--variant", VARIANT,
                *(["--embedder", embedder] if embedder else [])]) == 0
    return RouterArtifact.load(out)


def _models_csv(dataset: Path) -> dict[str, float]:
    with open(dataset / "models.csv", encoding="utf-8", newline="") as fh:
        return {row["model"]: float(row["cost"]) for row in csv.DictReader(fh)}


def _model_body(name: str, cost: float, api_base: str) -> dict[str, Any]:
    return {"name": name, "router_cost": cost, "input_cost_per_1m": cost * 0.01, "output_cost_per_1m": cost * 0.01,
            "litellm_params": {"model": f"openai/{name}", "api_base": api_base, "api_key": "replay"}}


def _wait(pred: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _onboard(tmp: Path, dataset: Path, new: str, *, val_size: int, k: str, min_per_cluster: int,
             embedder: str | None = None) -> None:
    art = _fit(dataset, tmp / "artifact", new, val_size, k, embedder)
    costs = _models_csv(dataset)
    ds = load_dataset(dataset, with_responses=False)
    replay_spec, replay = replay_server(dataset)
    cfg = {
        "server": {"host": "127.0.0.1"},
        "auth": {"mode": "open"},
        "database_url": f"sqlite:///{tmp / 'gw.db'}",
        "router": {"policy": "uniroute", "artifact": str(tmp / "artifact"), "variant": VARIANT,
                   "default_lambda": 0.0, "lambda_max": 100.0, "embed_cache_dir": str(tmp / "embcache")},
        "registry": {"poll_interval_s": 0.5},
        "profiling": {"concurrency": 16, "attempts": 2, "min_graded_per_cluster": min_per_cluster},
        "models": [_model_body(m, c, replay) for m, c in costs.items() if m != new],
    }
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = server_env(UNIROUTE_ADMIN_KEY=ADMIN)
    # the replay and the gateway start at once (their start-ups overlap)
    with running_all(replay_spec, gateway_server(cfg_path, "--port", str(port), env=env, timeout_s=120)), \
            httpx.Client(base_url=base, timeout=60, headers={"authorization": f"Bearer {ADMIN}"}) as http:
        # --- registry: unknown names, add, duplicate, callable by name before any profile
        r = http.get(f"/admin/models/{new}")
        assert r.status_code == 404 and "known:" in r.json()["error"]["message"]
        r = http.post("/admin/models", json=_model_body(new, costs[new], replay))
        assert r.status_code == 201, r.text
        assert r.json()["profile"] is None
        dup = http.post("/admin/models", json=_model_body(new, costs[new], replay))
        assert dup.status_code == 409 and "already exists" in dup.json()["error"]["message"]
        _wait(lambda: new in {m["id"] for m in http.get("/v1/models").json()["data"]}, 10, "the poller")
        named = http.post("/v1/chat/completions", json={"model": new, "messages": [
            {"role": "user", "content": art.val_prompts[0]}]})
        assert named.status_code == 200 and named.headers["x-uniroute-model"] == new

        # --- a model whose upstream is down: failures recorded and reported, never activated
        dead = _model_body(new, costs[new], f"http://127.0.0.1:{free_port()}/v1") | {"name": "dead-model"}
        assert http.post("/admin/models", json=dead).status_code == 201
        assert http.post("/admin/models/dead-model/profile", json={}).status_code == 202
        job = _wait(lambda: (j := http.get("/admin/models/dead-model/profile").json())["status"] != "running"
                    and j, 120, "the dead model's profiling job")
        assert job["status"] == "not_activated", job
        # it gives up after the first 20 failures (those in flight finish): the other prompts are never sent
        assert 20 <= job["result"]["failed"] < len(art.val_prompt_ids) and job["result"]["errors"]
        assert "first 20 answers all failed" in job["result"]["stopped"]
        assert job["result"]["short_clusters"]
        assert job["result"]["graded"] == 0 and "not activated" in job["result"]["message"]
        assert http.get("/admin/models/dead-model").json()["profile"] is None

        # --- profile NEW through LiteLLM against the replay upstream
        assert http.post("/admin/models/nope/profile", json={}).status_code == 404
        # sequential profiling through HTTP: bad values are 400s naming the field; a budget of 30 prompts is spent
        for body, said in (({"target_ci": 2}, "target_ci"), ({"max_prompts": 0}, "max_prompts"),
                           ({"allocation": "active"}, "give max_prompts and/or target_ci"),
                           ({"max_prompts": 5, "allocation": "psychic"}, "valid: uniform, active")):
            r = http.post(f"/admin/models/{new}/profile", json=body)
            assert r.status_code == 400 and said in r.json()["error"]["message"], (body, r.text)
        seq = _model_body(new, costs[new], replay) | {"name": "seq-model"}
        assert http.post("/admin/models", json=seq).status_code == 201
        r = http.post("/admin/models/seq-model/profile", json={"grader": "multiple_choice", "max_prompts": 30})
        assert r.status_code == 202, r.text
        job = _wait(lambda: (j := http.get("/admin/models/seq-model/profile").json())["status"] != "running"
                    and j, 240, "the sequential profiling job")
        assert job["result"]["sequential"]["used"] == 30 and job["result"]["sequential"]["stop"] == "max_prompts", job
        assert http.delete("/admin/models/seq-model").status_code == 200
        # first without activating: the impact report only (docs/IMPACT.md), then a second call activates
        r = http.post(f"/admin/models/{new}/profile", json={"grader": "multiple_choice"})
        assert r.status_code == 202, r.text
        job = _wait(lambda: (j := http.get(f"/admin/models/{new}/profile").json())["status"] != "running"
                    and j, 240, "the profiling job")
        assert job["status"] == "reported", job
        assert job["result"]["graded"] == len(art.val_prompt_ids) and job["result"]["failed"] == 0
        impact = job["result"]["impact"]
        assert impact["model"] == new and len(impact["psi"]) == art.k and impact["lambdas"], job
        assert http.get(f"/admin/models/{new}").json()["profile"] is None
        r = http.post(f"/admin/models/{new}/profile", json={"grader": "multiple_choice", "activate": True})
        assert r.status_code == 202, r.text
        job = _wait(lambda: (j := http.get(f"/admin/models/{new}/profile").json())["status"] != "running"
                    and j, 240, "the profiling job")
        assert job["status"] == "activated", job
        assert job["result"]["already_done"] == len(art.val_prompt_ids) and job["result"]["graded"] == 0
        stored = http.get(f"/admin/models/{new}").json()["profile"]
        assert stored is not None and stored["source"] == "validation"

        # --- Ψ equals the offline estimate from the recorded outcomes on the same prompts
        col = ds.models.index(new)
        row = {pid: i for i, pid in enumerate(ds.prompt_ids)}
        recorded = {pid: float(ds.scores[row[pid], col]) for pid in art.val_prompt_ids}
        offline = art.profile_model(new, recorded, cost=costs[new], variants=[VARIANT])[0]
        assert np.allclose(stored["psi"], offline.psi), (stored["psi"], offline.psi.tolist())
        assert np.allclose(job["result"]["psi"], offline.psi)

        # --- offline: prompts and λ where NEW is the argmin; auto traffic there reaches it
        pool = [PoolModel(name=n, cost=costs[n], psi=p.psi)
                for n, p in load_profiles(tmp / "artifact", VARIANT).items()]
        pool.append(PoolModel(name=new, cost=costs[new], psi=offline.psi))
        policy = UniRoutePolicy(art, VARIANT)
        best: tuple[int, float, list[int]] = (0, 0.0, [])
        for lam in (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0):
            hits = [i for i, e in enumerate(art.val_embeddings)
                    if policy.rank(np.asarray(e, dtype=np.float64), pool, lam).chosen.model == new]
            if len(hits) > best[0]:
                best = (len(hits), lam, hits)
        n_hits, lam, hits = best
        assert n_hits > 0, "the new model is never the best trade-off: pick another model for this test"
        time.sleep(1.5)  # the poller (0.5 s interval) has seen the activation
        sample = hits[:20]
        served, request_ids = [], []
        for i in sample:
            r = http.post("/v1/chat/completions", json={
                "model": "auto", "messages": [{"role": "user", "content": art.val_prompts[i]}],
                "uniroute": {"lambda": lam}})
            assert r.status_code == 200, r.text
            served.append(r.headers["x-uniroute-model"])
            request_ids.append(r.headers["x-uniroute-request-id"])
        reached = served.count(new)
        # the gateway embeds the prompt online (float32, batched): allow a rare near-tie to flip
        assert reached >= max(1, int(0.8 * len(sample))), (lam, served)

        # --- feedback on what NEW served, then a re-profiling pass: its Ψ moves, the drift report says where
        for rid, model in zip(request_ids, served, strict=True):
            if model == new:
                fb = http.post("/v1/feedback", json={"request_id": rid, "thumbs": "down"})
                assert fb.status_code == 201, fb.text
        assert http.post("/v1/feedback", json={"request_id": "no-such-request", "score": 1}).status_code == 404
        report = http.post("/admin/reprofile").json()
        assert report["models"][new]["status"] == "updated" and report["models"][new]["feedback"] == reached
        assert report["drift"][0]["model"] == new and report["drift"][0]["change"] > 0
        assert http.get("/admin/reprofile/last").json()["drift"] == report["drift"]
        hist = http.get(f"/admin/models/{new}").json()["profile_history"]
        mine = [(p["version"], p["source"], p["active"]) for p in hist if p["router"].endswith(VARIANT)]
        assert mine == [(1, "validation", False), (2, "feedback", True)]


def test_onboarding_on_generated_data(tmp_path: Path) -> None:
    accuracy = {
        "small-general": {"math": 0.4, "biology": 0.4, "law": 0.4, "history": 0.4},
        "math-expert": {"math": 0.95, "biology": 0.2, "law": 0.2, "history": 0.2},
        "bio-expert": {"math": 0.2, "biology": 0.95, "law": 0.3, "history": 0.3},
        "large-general": {"math": 0.85, "biology": 0.85, "law": 0.85, "history": 0.85},
        "law-expert": {"math": 0.2, "biology": 0.2, "law": 0.97, "history": 0.3},
    }
    costs = {"small-general": 1.0, "math-expert": 2.0, "bio-expert": 2.0, "large-general": 20.0, "law-expert": 2.0}
    dataset = make_synthetic_dataset(tmp_path / "dataset", n_prompts=400, accuracy=accuracy, costs=costs, seed=3)
    _onboard(tmp_path, dataset, "law-expert", val_size=120, k="4", min_per_cluster=3)


def test_onboarding_on_mmlu_pro(tmp_path: Path, shared_dataset: Path) -> None:
    # K is chosen automatically (about 40 here); a cluster with fewer validation prompts than the minimum
    # needs all of them graded
    # the static embedder, as the demo's router: embedding the ~10k prompts with MiniLM would take 10-30 min
    # on a cold cache (the generated-data variant above exercises MiniLM through the same path)
    _onboard(tmp_path, shared_dataset, "Phi-3-mini-4k-instruct", val_size=300, k="auto", min_per_cluster=3,
             embedder="static")



# ------------------------------------------------------------------ the README's onboarding example
README_MODEL = "Phi-3-mini-4k-instruct"  # the replay model the README registers as my-model
DEMO_REPLAY = "http://127.0.0.1:8100/v1"


def _readme_commands() -> list[list[str]]:
    """The first bash block of the README's "Adding a model" section, one argv per command."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Adding a model"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    commands = [shlex.split(line) for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands and all(c[0] == "uniroute" for c in commands), commands
    return commands


def _uniroute(argv: list[str], cwd: Path, env: dict[str, str], timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    return python(["-m", "gateway.cli.main", *argv], cwd=cwd, env=env, timeout=timeout_s)


def _demo_config(tmp: Path, replay: str) -> tuple[Path, int]:
    """The repository's config.yaml (the demo), in ``tmp`` (its SQLite file goes to tmp/var), on free ports."""
    port = free_port()
    text = (ROOT / "config.yaml").read_text(encoding="utf-8")
    assert DEMO_REPLAY in text and "port: 8000" in text and "health_port: 8001" in text
    (tmp / "config.yaml").write_text(text.replace(DEMO_REPLAY, replay).replace("port: 8000", f"port: {port}")
                                     .replace("health_port: 8001", f"health_port: {free_port()}"))
    (tmp / "var").mkdir(exist_ok=True)
    return tmp / "config.yaml", port


def _readme_onboarding(tmp: Path, dataset: Path, artifact: Path) -> None:
    commands = _readme_commands()
    replay_spec, replay = replay_server(dataset)
    cfg, port = _demo_config(tmp, replay)
    env = server_env(UNIROUTE_DATASET=str(dataset), UNIROUTE_ROUTER_ARTIFACT=str(artifact))
    env.pop("UNIROUTE_CONFIG", None)
    env.pop("UNIROUTE_DATABASE_URL", None)
    base = f"http://127.0.0.1:{port}"
    # the replay and the gateway start at once (their start-ups overlap)
    with running_all(replay_spec, gateway_server(cfg, env=env, timeout_s=120)), \
            httpx.Client(base_url=base, timeout=60) as http:
        outputs = []
        for argv in commands:  # from the config's folder, as the README says (./config.yaml)
            done = _uniroute([a.replace(DEMO_REPLAY, replay) for a in argv[1:]], tmp, env)
            assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-2000:])
            assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr, done.stderr[-2000:]
            outputs.append(done.stdout)
        reported = next(out for argv, out in zip(commands, outputs, strict=True) if argv[1] == "profile")
        assert "NOT activated" in reported and "impact of my-model" in reported, reported
        plotted = next(argv for argv in commands if "--impact-plot" in argv)  # relative to the config's folder
        assert (tmp / plotted[plotted.index("--impact-plot") + 1]).stat().st_size > 10_000
        profiled = next(out for argv, out in zip(commands, outputs, strict=True) if "--activate" in argv)
        assert "activated 'my-model'" in profiled and "nothing asked" in profiled, profiled
        reprofiled = next(out for argv, out in zip(commands, outputs, strict=True) if argv[1] == "reprofile")
        assert "my-model: unchanged (0 feedback)" in reprofiled, reprofiled

        # the running gateway picks it up: callable by name, with Ψ measured from the replay's answers
        _wait(lambda: "my-model" in {m["id"] for m in http.get("/v1/models").json()["data"]}, 15, "the poller")
        art = RouterArtifact.load(artifact)
        r = http.post("/v1/chat/completions", json={"model": "my-model", "messages": [
            {"role": "user", "content": art.val_prompts[0]}]})
        assert r.status_code == 200 and r.headers["x-uniroute-model"] == "my-model", r.text
    store = Store(f"sqlite:///{tmp / 'var' / 'uniroute.db'}")
    try:
        active = catalog.active_profiles(store, catalog.profile_key(art.version, "learnedmap"))
        assert active["my-model"].source == "validation"
        # the same answers as the model it aliases, the same estimator: the Ψ router fit computed for it
        assert np.allclose(active["my-model"].psi, active[README_MODEL].psi, atol=1e-6), (
            active["my-model"].psi, active[README_MODEL].psi)
        assert catalog.spec_from_row(catalog.get_model(store, "my-model")).routable
    finally:
        store.dispose()


def test_readme_onboarding_on_generated_data(tmp_path: Path) -> None:
    accuracy = {
        "small-general": {"math": 0.4, "biology": 0.4, "law": 0.4, "history": 0.4},
        "math-expert": {"math": 0.95, "biology": 0.2, "law": 0.2, "history": 0.2},
        README_MODEL: {"math": 0.5, "biology": 0.9, "law": 0.6, "history": 0.3},
        "large-general": {"math": 0.85, "biology": 0.85, "law": 0.85, "history": 0.85},
    }
    costs = {"small-general": 1.0, "math-expert": 2.0, README_MODEL: 3.8, "large-general": 20.0}
    dataset = make_synthetic_dataset(tmp_path / "dataset", n_prompts=300, accuracy=accuracy, costs=costs, seed=5)
    from gateway.cli.main import main as cli

    # fitted as the demo fits its router (`uniroute router fit --embedder static`, the README): its config.yaml
    # is written for a static embedding (max_wait_ms: 0), and a gateway on it starts without importing torch
    # (test_onboarding_on_generated_data serves a MiniLM router through the same onboarding path)
    artifact = tmp_path / "var" / "router"
    assert cli(["router", "fit", "--dataset", str(dataset), "--out", str(artifact), "--val-size", "100",
                "--k", "4", "--embedder", "static"]) == 0
    _readme_onboarding(tmp_path, dataset, artifact)


def test_readme_onboarding_on_mmlu_pro(tmp_path: Path, shared_dataset: Path, shared_router_artifact: Path) -> None:
    _readme_onboarding(tmp_path, shared_dataset, shared_router_artifact)


# ------------------------------------------------------- a model that rejects every call, from the CLI
def test_profile_cli_gives_up_on_a_model_that_rejects_every_call(tmp_path: Path) -> None:
    from gateway.cli.main import main as cli

    dataset = make_synthetic_dataset(tmp_path / "dataset", n_prompts=40, seed=1)
    n = 120
    art = RouterArtifact(embedder_id="t", k=2, centroids=np.eye(2), theta=None,
                         val_prompt_ids=[f"p{i}" for i in range(n)], val_prompts=[f"question {i}" for i in range(n)],
                         val_embeddings=np.array([[1.0, 0.0] if i % 2 else [0.0, 1.0] for i in range(n)]),
                         training_set_hash="h", variant="kmeans", val_answers=["A"] * n)
    art.save(tmp_path / "art")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "database_url": f"sqlite:///{tmp_path / 'gw.db'}",
        "router": {"policy": "uniroute", "artifact": str(tmp_path / "art"), "variant": "kmeans"},
        "profiling": {"attempts": 2, "concurrency": 8}}))
    env = server_env(UNIROUTE_CONFIG=str(cfg))
    env.pop("UNIROUTE_DATABASE_URL", None)
    with replay_upstream(dataset, "--fail", "small-general=500") as replay:
        for name, api_base, seen in (("failing", replay, "injected server error"),
                                     ("refused", f"http://127.0.0.1:{free_port()}/v1", "connection error")):
            assert cli(["models", "add", name, "--litellm-model", "openai/small-general", "--api-base", api_base,
                        "--api-key", "replay", "--router-cost", "1", "--config", str(cfg)]) == 0
            done = _uniroute(["profile", name], tmp_path, env, timeout_s=300)
            assert done.returncode == 2, (done.stdout, done.stderr[-3000:])
            assert "Traceback" not in done.stderr and "Unclosed" not in done.stderr, done.stderr[-3000:]
            assert f"'{name}' not activated: profiling gave up after the first 20 answers all failed" in done.stdout
            assert "prompts not asked" in done.stdout and "run again" in done.stdout
            assert f"most often: 502 model '{name}' failed upstream: " in done.stdout and seen in done.stdout
            store = Store(f"sqlite:///{tmp_path / 'gw.db'}")
            try:
                failed = outcome_rows(store, art.version, name)
                assert 20 <= len(failed) < n and all(o.score is None and o.error for o in failed)
                assert catalog.active_profiles(store, catalog.profile_key(art.version, "kmeans")) == {}
            finally:
                store.dispose()
    # an unset variable in the stored model: one line saying what to do, no traceback
    assert cli(["models", "update", "failing", "--api-key", "os.environ/UNIROUTE_TEST_UNSET_KEY",
                "--config", str(cfg)]) == 0
    done = _uniroute(["profile", "failing"], tmp_path, env)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: "), done.stderr
    assert "UNIROUTE_TEST_UNSET_KEY is not set" in done.stderr and "models update failing" in done.stderr
