"""The impact report's bar through the gateway itself: a demo model taken out of `auto`, profiled through the admin
API against the replay upstream (report first, then activated as reported), then 1,000 `auto` requests of prompts
outside the validation set sent through the gateway; the follow-up (POST /admin/models/{name}/impact) reads the
request log and compares the share the report predicted with the share the gateway really routed to the model.

The router is the demo's (`uniroute router fit --embedder static` on the whole of mmlu_pro_27, the session's
shared artifact): its clusters were fitted on every prompt, the 1,000 requests are only new to its validation set
(benchmarks/impact_share.py and tests/test_impact_bar.py hold out prompts from the fit too). Nothing was logged
before, so the report's traffic mix is the validation prompts' own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config import parse_config
from routing.artifact import RouterArtifact
from routing.dataset import load_dataset
from tests.procs import replay_upstream

pytestmark = pytest.mark.slow  # a profiling run and 1,000 requests through the gateway: about 1.5 min

ADMIN = "sk-admin-impact-e2e"
H = {"authorization": f"Bearer {ADMIN}"}
MODEL = "DeepSeek-Coder-V2"
REQUESTS = 1000


def _wait(fn: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        out = fn()
        if out:
            return out
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _excluded(client: TestClient, prompt: str) -> set[str]:
    r = client.post("/v1/route", json={"messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200, r.text
    return {e["model"] for e in r.json()["excluded"]}


def test_the_followup_confirms_the_predicted_share_through_the_gateway(
        tmp_path: Path, shared_dataset: Path, shared_router_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIROUTE_ADMIN_KEY", ADMIN)
    ds = load_dataset(shared_dataset, with_responses=False)
    if MODEL not in ds.models:
        pytest.skip(f"$UNIROUTE_DATASET is not mmlu_pro_27 (no {MODEL})")
    art = RouterArtifact.load(shared_router_artifact)
    val = set(art.val_prompt_ids)
    rest = [i for i, pid in enumerate(ds.prompt_ids) if pid not in val]
    held = np.random.default_rng(13).choice(rest, size=REQUESTS, replace=False)
    with replay_upstream(shared_dataset) as replay:
        cfg = parse_config({
            "auth": {"mode": "open"}, "database_url": f"sqlite:///{tmp_path / 'gw.db'}",
            "router": {"policy": "uniroute", "artifact": str(shared_router_artifact), "default_lambda": 0.1},
            "replay_models": {"dataset": str(shared_dataset), "api_base": replay},
            "registry": {"poll_interval_s": 0.2}, "database": {"log_flush_interval_s": 0.1},
            "profiling": {"concurrency": 16, "impact_followup_s": 0}}, base_dir=tmp_path)
        with TestClient(create_app(cfg)) as gw:
            probe = ds.prompts[int(held[0])]
            assert gw.patch(f"/admin/models/{MODEL}", headers=H, json={"routable": False}).status_code == 200
            _wait(lambda: MODEL in _excluded(gw, probe), 10, "the registry to take the model out of auto")
            # profile it: the report only (nothing logged yet: the validation prompts' mix)
            assert gw.post(f"/admin/models/{MODEL}/profile", headers=H, json={}).status_code == 202
            job = _wait(lambda: (j := gw.get(f"/admin/models/{MODEL}/profile", headers=H).json())["status"]
                        != "running" and j, 300, "the profiling job")
            assert job["status"] == "reported", job
            report = job["result"]["impact"]
            assert report["traffic_requests"] == 0
            predicted = next(x["traffic_share"] for x in report["lambdas"] if x["label"] == "default")
            # activate it as reported, then route 1,000 new prompts through the gateway at the default λ
            assert gw.post(f"/admin/models/{MODEL}/profile", headers=H, json={"activate": True}).status_code == 202
            job = _wait(lambda: (j := gw.get(f"/admin/models/{MODEL}/profile", headers=H).json())["status"]
                        != "running" and j, 60, "the activation")
            assert job["status"] == "activated" and job["result"]["graded"] == 0, job
            _wait(lambda: MODEL not in _excluded(gw, probe), 10, "the registry to route to the model")
            t0 = time.perf_counter()
            served = 0
            for i in held:
                r = gw.post("/v1/chat/completions", json={"model": "auto", "messages": [
                    {"role": "user", "content": ds.prompts[int(i)]}]})
                assert r.status_code == 200, r.text
                served += r.headers["x-uniroute-model"] == MODEL
            took = time.perf_counter() - t0
            followup = _wait(lambda: (f := gw.post(f"/admin/models/{MODEL}/impact", headers=H).json()["followup"])
                             ["realised"]["requests"] == REQUESTS and f, 20, "the request log")
    realised = followup["realised"]["traffic_share"]
    assert realised == pytest.approx(served / REQUESTS)  # the log holds what the gateway answered
    print(f"\n{MODEL} at λ 0.1: predicted {100 * predicted:.1f}% (follow-up at the realised λ mix: "
          f"{100 * followup['predicted']['traffic_share']:.1f}%), realised {100 * realised:.1f}% of {REQUESTS} "
          f"requests ({took:.0f} s)")
    assert followup["predicted"]["traffic_share"] == pytest.approx(predicted)  # every request at the default λ
    assert realised >= 0.05, "not a real test of the bar: the model takes (almost) no traffic"
    assert abs(predicted - realised) <= 0.05
