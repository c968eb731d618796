"""Bounded work before authentication, against a real `uniroute serve` (uvicorn + httptools on loopback, and
uvicorn's h11 protocol) in front of tests/fake_upstream.py (issue 10, rows 2, 10 and 12's slow connections).

Tried the way a hostile or careless client would: raw sockets that send headers and never the body,
trickle headers or bodies byte by byte, send 9 MB of 300k tiny messages in a loop (with no key, and with a
valid one) while /health/liveliness is probed, and an upstream that answers 300 MB.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import yaml

from gateway.access.auth import create_key
from gateway.store.engine import Store
from tests.procs import free_port, running, server_env

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0
#: the adversarial body of issue 10 row 2: 9 MB, 300k tiny messages
ADVERSARIAL = orjson.dumps({"model": "echo", "messages": [{"role": "user", "content": "a"}] * 300_000})

ADMIN_KEY = "sk-admin-bounded-test"


@dataclass
class Gateway:
    port: int
    key: str
    pid: int
    impl: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _config(root: Path, upstream: str, port: int) -> Path:
    def model(name: str, **kw: Any) -> dict[str, Any]:
        return {"name": name, "router_cost": 1.0, "input_cost_per_1m": 1.0, "output_cost_per_1m": 1.0, **kw,
                "litellm_params": {"model": f"openai/{name}", "api_base": upstream, "api_key": "t"}}

    db = root / "gw.db"
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning",
                   "header_timeout_s": HEADER_TIMEOUT_S, "body_timeout_s": BODY_TIMEOUT_S},
        "auth": {"mode": "keys"},
        "database_url": f"sqlite:///{db}",
        "database": {"spill_dir": str(root / "spill")},
        "router": {"policy": "cheapest"},
        "fallback": {"max_attempts": 1, "cooldown_failures": 0},
        "models": [model("echo"), model("big-huge", routable=False)],
    }))
    store = Store(f"sqlite:///{db}")
    store.upgrade()
    raw, _ = create_key(store, "tester", default_lambda=0.1)
    store.dispose()
    (root / "key").write_text(raw)
    return cfg


@pytest.fixture(scope="module", params=["httptools", "h11"])
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            fake_upstream_url: str) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp(f"bounded-{request.param}")
    port = free_port()
    cfg = _config(root, fake_upstream_url, port)
    if request.param == "httptools":  # what `uniroute serve` runs
        args = ["-m", "gateway.cli.main", "serve", "--config", str(cfg)]
        env = server_env(UNIROUTE_ADMIN_KEY=ADMIN_KEY)  # enabled: a missing or wrong key is a 401
    else:  # the same app on uvicorn's h11 protocol (what `uniroute serve` picks without httptools)
        args = ["-m", "uvicorn", "gateway.app:app_from_env", "--factory", "--host", "127.0.0.1", "--port", str(port),
                "--http", "gateway.http.server:BoundedH11Protocol", "--h11-max-incomplete-event-size", "65536",
                "--log-level", "warning"]
        env = server_env(UNIROUTE_CONFIG=str(cfg), UNIROUTE_ADMIN_KEY=ADMIN_KEY)
    with running(args, f"http://127.0.0.1:{port}/health/readiness", env=env, timeout_s=120) as proc:
        yield Gateway(port, (root / "key").read_text(), proc.pid, request.param)


# ------------------------------------------------------------------------------------------- raw HTTP
def _connect(gw: Gateway, timeout: float = 15.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (content-length or chunked); raises ConnectionError if the server closed first."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = s.recv(65536)
        if not got:
            raise ConnectionError(f"closed before a response (got {buf[:200]!r})")
        buf += got
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            got = s.recv(65536)
            if not got:
                raise ConnectionError("closed mid-body")
            rest += got
        return status, headers, rest[:n]
    body = b""
    while True:  # chunked
        while b"\r\n" not in rest:
            rest += s.recv(65536)
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        while len(rest) < size + 2:
            rest += s.recv(65536)
        body, rest = body + rest[:size], rest[size + 2:]
        if size == 0:
            return status, headers, body


def _closed_within(s: socket.socket, seconds: float) -> float:
    """Seconds until the server closed the connection (reading and discarding what it sends); fails after."""
    t0 = time.monotonic()
    s.settimeout(seconds)
    try:
        while s.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for more than {seconds} s")
    return time.monotonic() - t0


# --------------------------------------------------------------------------------- 1. key before body
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/feedback", "/admin/keys", "/admin/models"])
def test_a_missing_or_unknown_key_is_refused_before_the_body_is_read(gateway: Gateway, path: str) -> None:
    """The request promises 9 MB and sends none of it: the 401 must come from the headers alone."""
    for auth in ({}, {"authorization": "Bearer sk-ur-not-a-key"}):
        with _connect(gateway, timeout=5.0) as s:
            s.sendall(_head("POST", path, {"content-type": "application/json", "content-length": str(len(ADVERSARIAL)),
                                           **auth}))
            status, _, body = _read_response(s)
        assert status == 401, body
        assert orjson.loads(body)["error"]["type"] == "authentication_error"


# ------------------------------------------------------------------ 2. liveliness with 9 MB bodies in flight
def _probe(gw: Gateway, n: int, stop: threading.Event | None = None) -> list[float]:
    """Latencies (s) of ``n`` GET /health/liveliness on one keep-alive connection, ~10 ms apart."""
    out: list[float] = []
    with _connect(gw) as s:
        req = _head("GET", "/health/liveliness", {})
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(req)
            status, _, _ = _read_response(s)
            out.append(time.perf_counter() - t0)
            assert status == 200
            time.sleep(0.01)
    return out


def _adversary(gw: Gateway, headers: dict[str, str], stop: threading.Event, seen: Counter[Any]) -> None:
    request = _head("POST", "/v1/chat/completions", {"content-type": "application/json",
                                                      "content-length": str(len(ADVERSARIAL)), **headers}) + ADVERSARIAL
    while not stop.is_set():
        try:
            with _connect(gw, timeout=30.0) as s:
                with contextlib.suppress(OSError):  # answered and closed before the whole body was sent:
                    s.sendall(request)  # read the answer anyway
                status, _, body = _read_response(s)
                seen[status] += 1
                if status == 400:
                    seen[orjson.loads(body)["error"]["message"]] += 1
        except OSError as exc:
            seen[type(exc).__name__] += 1


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _p99(lat: list[float]) -> float:
    return statistics.quantiles(lat, n=100, method="inclusive")[98]


@pytest.mark.alone  # a latency bound: make test runs it after the parallel run (it failed beside it)
@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "valid-key"])
def test_liveliness_stays_fast_with_9mb_adversarial_bodies_in_flight(gateway: Gateway, keyed: bool) -> None:
    if gateway.impl != "httptools":
        pytest.skip("the bar is measured on what `uniroute serve` runs")
    baseline = _probe(gateway, 100)
    stop, seen = threading.Event(), Counter[Any]()
    headers = {"authorization": f"Bearer {gateway.key}"} if keyed else {}
    threads = [threading.Thread(target=_adversary, args=(gateway, headers, stop, seen), daemon=True) for _ in range(3)]
    cpu0 = _cpu_s(gateway.pid)
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)  # bodies in flight
        lat = _probe(gateway, 200)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    cpu = _cpu_s(gateway.pid) - cpu0
    p50, p99, worst = statistics.median(lat), _p99(lat), max(lat)
    base99 = _p99(baseline)
    print(f"\n[{'key' if keyed else 'no key'}] liveliness with 3 adversaries: p50 {p50 * 1e3:.1f} ms, p99 "
          f"{p99 * 1e3:.1f} ms, max {worst * 1e3:.1f} ms (alone: p99 {base99 * 1e3:.1f} ms); adversary answers: "
          f"{dict(seen)}; gateway CPU {cpu:.2f} s; load average {os.getloadavg()[0]:.1f}")
    expected = 400 if keyed else 401
    assert seen[expected] >= 3, seen  # the bodies were really sent, and answered
    if keyed:
        assert any("limits.max_messages" in str(k) for k in seen), seen
    # The bar: p99 < 100 ms. On the shared 2-core test machine the probes' own scheduling noise is part of
    # any figure, so the bound allows what the same probes saw with nothing in flight; the old code froze
    # the loop for seconds per body (p99 and max in the seconds).
    assert p99 < max(0.100, base99 + 0.050), (p99, base99)
    assert worst < 1.0


# --------------------------------------------------------------------------------- 3. slow clients
def test_an_idle_connection_is_closed_after_the_header_timeout(gateway: Gateway) -> None:
    with _connect(gateway) as s:
        took = _closed_within(s, HEADER_TIMEOUT_S + 5)
    assert HEADER_TIMEOUT_S - 0.5 <= took <= HEADER_TIMEOUT_S + 3


def test_trickled_headers_get_408_and_the_connection_closed(gateway: Gateway) -> None:
    with _connect(gateway) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n")
        t0 = time.monotonic()
        got = b""
        s.settimeout(0.3)
        while time.monotonic() - t0 < HEADER_TIMEOUT_S + 5:
            try:
                s.sendall(b"x-a: b\r\n")  # one header line every 0.3 s: bytes keep coming, the headers never end
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            got += chunk
        took = time.monotonic() - t0
    assert took <= HEADER_TIMEOUT_S + 3, took
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert b"server.header_timeout_s" in got


def test_a_trickled_body_gets_408_naming_the_setting(gateway: Gateway) -> None:
    """Authenticated, so the handler reads the body: the middleware's deadline answers 408."""
    with _connect(gateway) as s:
        s.sendall(_head("POST", "/v1/chat/completions", {"authorization": f"Bearer {gateway.key}",
                                                         "content-type": "application/json", "content-length": "1000"}))
        t0 = time.monotonic()
        s.settimeout(0.3)
        response = b""
        while time.monotonic() - t0 < BODY_TIMEOUT_S + 5 and b"\r\n\r\n" not in response:
            try:
                s.sendall(b" ")
                response += s.recv(65536)
            except TimeoutError:
                continue
        took = time.monotonic() - t0
        s.settimeout(5)
        status, headers, body = _read_response_from(response, s)
        assert status == 408, body
        assert "server.body_timeout_s" in orjson.loads(body)["error"]["message"]
        assert headers.get("connection") == "close"
        _closed_within(s, 5)
    assert BODY_TIMEOUT_S - 0.5 <= took <= BODY_TIMEOUT_S + 3


def _read_response_from(prefix: bytes, s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    class _Pre:
        def __init__(self) -> None:
            self.data = prefix

        def recv(self, n: int) -> bytes:
            if self.data:
                out, self.data = self.data, b""
                return out
            return s.recv(n)

    return _read_response(_Pre())  # type: ignore[arg-type]


def test_a_trickled_body_after_an_early_401_is_cut_too(gateway: Gateway) -> None:
    """No key: 401 at once, then uvicorn reads the body only to discard it; trickled, that ends too."""
    with _connect(gateway) as s:
        s.sendall(_head("POST", "/v1/chat/completions", {"content-type": "application/json", "content-length": "100000"}))
        s.settimeout(5)
        status, _, _ = _read_response(s)
        assert status == 401
        t0 = time.monotonic()
        s.settimeout(0.3)
        closed = False
        while time.monotonic() - t0 < BODY_TIMEOUT_S + 6:
            try:
                s.sendall(b" ")
                if s.recv(65536) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed and time.monotonic() - t0 <= BODY_TIMEOUT_S + 4


def test_oversized_headers_are_refused(gateway: Gateway) -> None:
    with _connect(gateway) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"GET /health/liveliness HTTP/1.1\r\nhost: x\r\n" + b"x-big: " + b"a" * 200_000 + b"\r\n\r\n")
        s.settimeout(5)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    expected = b"HTTP/1.1 431" if gateway.impl == "httptools" else b"HTTP/1.1 400"  # h11 bounds it itself
    assert got.startswith(expected), got[:200]


# ------------------------------------------------------------------------------ 4. the cheap limits, on the wire
def test_each_structural_limit_answers_400_naming_it(gateway: Gateway) -> None:
    auth = {"authorization": f"Bearer {gateway.key}"}
    cases = {
        "limits.max_messages": {"model": "echo", "messages": [{"role": "user", "content": "a"}] * 2049},
        "limits.max_content_parts": {"model": "echo", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}] * 513}]},
        "limits.max_tools": {"model": "echo", "messages": [{"role": "user", "content": "a"}],
                             "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]},
        "limits.max_json_depth": {"model": "echo", "messages": [{"role": "user", "content": "a"}],
                                  "metadata": _nested(100)},
        "limits.max_json_items": {"model": "echo", "messages": [{"role": "user", "content": "a"}],
                                  "logit_bias": {str(i): 1 for i in range(100_001)}},
    }
    with httpx.Client(base_url=gateway.base, timeout=30) as client:
        for key, body in cases.items():
            r = client.post("/v1/chat/completions", json=body, headers=auth)
            assert r.status_code == 400, (key, r.text)
            err = r.json()["error"]
            assert key in err["message"] and err["code"] == "limit_exceeded", (key, err)
        r = client.post("/v1/embeddings", json={"model": "echo", "input": ["a"] * 2049}, headers=auth)
        assert r.status_code == 400 and "limits.max_embedding_inputs" in r.json()["error"]["message"], r.text
        # under the limits, the same shapes are served
        ok = {"model": "echo", "messages": [{"role": "user", "content": "a"}] * 2048}
        assert client.post("/v1/chat/completions", json=ok, headers=auth).status_code == 200


def _nested(depth: int) -> Any:
    out: Any = "x"
    for _ in range(depth):
        out = {"a": out}
    return out


# ---------------------------------------------------------------------------- 5. a 300 MB upstream answer
def _rss(pid: int, field: str = "VmRSS") -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert m is not None
    return int(m.group(1)) * 1024


@pytest.mark.alone  # a latency bound (the probes during the answer): it failed beside the parallel run (1.8 s, CI)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_300mb_upstream_answer_is_a_502_without_the_memory(gateway: Gateway, stream: bool) -> None:
    if gateway.impl != "httptools":
        pytest.skip("upstream reading does not depend on the server protocol")
    client = openai.OpenAI(base_url=f"{gateway.base}/v1", api_key=gateway.key, max_retries=0, timeout=120)
    # warm up the same path (LiteLLM imports parts of itself on first use: that is not the answer's cost)
    warm = client.chat.completions.create(model="echo", stream=stream, messages=[{"role": "user", "content": "hi"}])
    if stream:
        assert isinstance(warm, openai.Stream)
        list(warm)
    Path(f"/proc/{gateway.pid}/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _rss(gateway.pid)
    lat: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set() or len(lat) < 20:
            lat.extend(_probe(gateway, 10))

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    t0 = time.monotonic()
    try:
        if stream:
            events = list(client.chat.completions.create(model="big-huge", stream=True,
                                                         messages=[{"role": "user", "content": "big"}]))
            pytest.fail(f"the stream ended without an error ({len(events)} events)")
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="big-huge", messages=[{"role": "user", "content": "big"}])
        err: openai.APIError = caught.value
    except openai.APIError as exc:  # streaming: the error event
        err = exc
    finally:
        took = time.monotonic() - t0
        done.set()
        prober.join(timeout=30)
    peak = _rss(gateway.pid, "VmHWM")
    message = str(err.body if getattr(err, "body", None) else err)
    print(f"\n[{'stream' if stream else 'json'}] 300 MB answer refused in {took:.2f} s; peak RSS +"
          f"{(peak - before) / 2**20:.1f} MiB; liveliness meanwhile: n={len(lat)} p99 "
          f"{_p99(lat) * 1e3:.1f} ms max {max(lat) * 1e3:.1f} ms")
    assert "forwarding.max_response_bytes" in message, message
    if not stream:
        assert isinstance(err, openai.APIStatusError) and err.status_code == 502
    assert peak - before < 100 * 2**20, (before, peak)
    assert lat and max(lat) < 1.0  # the old code stalled the loop for 5.8 s
