"""The built wheel runs anywhere: installed into a new virtual environment, outside the repository.

The wheel is built from this checkout (``pip wheel --no-deps``) and installed with ``--no-deps`` into a
fresh venv in a temporary folder. The venv gets the project's *dependencies* (litellm, torch, ...)
from the test interpreter's site-packages through a plain path entry (a ``.pth`` line), which does
not run that environment's own ``.pth`` hooks, so the editable install of this checkout is not
visible: every module of the project comes from the wheel. Then, from a folder that is not the
repository and with no ``PYTHONPATH``: ``uniroute db upgrade`` migrates a new SQLite database (the
migrations ship inside the package), ``uniroute replay`` serves the demo dataset and ``uniroute serve``
with a config that names that dataset answers the official OpenAI SDK.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from routing.dataset import default_dataset_path
from tests.procs import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("wheel")
    # build from a copy of the files git would commit (setuptools writes build/ into the source folder)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    src = work / "src"
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(work / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheels = list((work / "dist").glob("uniroute_gateway-*.whl"))
    assert len(wheels) == 1, wheels
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = next((venv / "lib").glob("python3*/site-packages"))
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "zz_dependencies.pth").write_text("\n".join(deps) + "\n")
    py = venv / "bin" / "python"
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                           str(wheels[0])], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-3000:]
    yield venv


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "UNIROUTE_CONFIG", "UNIROUTE_DATABASE_URL")}
    env.update(HOME=str(tmp / "home"), LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_OFFLINE_MODE="true",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def test_the_wheel_imports_its_own_code_and_ships_the_migrations(wheel_venv: Path, tmp_path: Path) -> None:
    code = ("import gateway, replay, routing, profiling, gateway.store.engine as e; "
            "print(gateway.__file__); print(e.MIGRATIONS_DIR); print(e.Store.head_revision())")
    out = subprocess.run([str(wheel_venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    module_file, migrations, head = out.stdout.split()
    assert str(wheel_venv) in module_file and str(REPO) not in module_file
    assert Path(migrations, "env.py").is_file() and Path(migrations, "script.py.mako").is_file()
    assert head not in ("", "None")


def test_db_upgrade_then_serve_from_the_wheel(wheel_venv: Path, tmp_path: Path) -> None:
    dataset = default_dataset_path()
    if dataset is None or not (dataset / "models.csv").is_file():
        pytest.skip("no routing benchmark folder")
    from openai import OpenAI

    bin_ = wheel_venv / "bin"
    env = _env(tmp_path)
    replay_port, port = free_port(), free_port()
    (tmp_path / "config.yaml").write_text(textwrap.dedent(f"""\
        server: {{host: 127.0.0.1, port: {port}}}
        database_url: sqlite:///var/uniroute.db
        database: {{auto_migrate: false}}
        auth: {{mode: open}}
        router: {{policy: cheapest}}
        replay_models:
          dataset: {dataset}
          api_base: http://127.0.0.1:{replay_port}/v1
        """))
    up = subprocess.run([str(bin_ / "uniroute"), "db", "upgrade", "--config", "config.yaml"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
    assert (tmp_path / "var" / "uniroute.db").is_file()
    procs = [subprocess.Popen([str(bin_ / "uniroute"), "replay", "--dataset", str(dataset), "--port", str(replay_port)],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([str(bin_ / "uniroute"), "serve", "--config", "config.yaml"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        import time

        deadline = time.monotonic() + 120
        with httpx.Client(timeout=1) as poll:  # one client: httpx.get() costs ~30 ms of CPU per call
            while True:
                assert all(p.poll() is None for p in procs), "a server exited"
                try:
                    if poll.get(f"http://127.0.0.1:{port}/health/readiness").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the gateway from the wheel did not become ready"
                time.sleep(0.2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        names = {m.id for m in client.models.list()}
        assert "auto" in names and len(names) > 2
        resp = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hello"}])
        assert resp.choices[0].message.content and resp.model in names
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
