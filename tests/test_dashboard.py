"""`diffplat mlflow`: a real MLflow server on 127.0.0.1 with a SQLite store; a job logs to it
through MLFLOW_TRACKING_URI and its run is read back through the REST API."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from PIL import Image
from helpers import free_port

pytestmark = pytest.mark.slow



def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_job_logs_to_the_dashboard_and_reads_back_over_rest(tmp_path, local_ray, monkeypatch):
    from diffplat.config import parse_config
    from diffplat.runner import run_job

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "diffplat.cli", "mlflow", "--workdir", str(tmp_path / "board"),
                               "--port", str(port)], start_new_session=True, stderr=subprocess.PIPE, text=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # only against a hang
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "the MLflow server did not come up"
                time.sleep(0.5)
        # it listens on loopback only
        listening = list(_listening(server.pid, port))
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)

        folder = tmp_path / "pics"
        folder.mkdir()
        for i in range(3):
            Image.new("RGB", (32, 24), (60 * i, 10, 200)).save(folder / f"p{i}.png")
            (folder / f"p{i}.txt").write_text(f"picture {i}")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
        config = parse_config({"name": "board-test", "tracking": {"experiment": "board"},
                               "prepare": {"source": "folder", "folder": {"images": str(folder)}}})  # fmt: skip
        result = run_job(config, tmp_path / "work")
        assert result.tracking_uri == base

        experiment = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=board")["experiment"]
        runs = _post(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        by_stage = {_tags(r).get("diffplat.stage", "job"): r for r in runs}
        assert set(by_stage) == {"job", "prepare"}
        prepare = by_stage["prepare"]
        assert prepare["info"]["run_name"] == "board-test/prepare"
        assert _tags(prepare)["diffplat.dataset"] == f"folder:{folder}" and _tags(by_stage["job"])["diffplat.job"] == "board-test"
        assert {m["key"]: m["value"] for m in prepare["data"]["metrics"]}["rows_written"] == 3
        # the artifact went through the server into the dashboard's own folder
        files = _get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={prepare['info']['run_id']}")["files"]
        assert [f["path"] for f in files] == ["prepare_report.json"]
        assert list((tmp_path / "board" / "mlartifacts").rglob("prepare_report.json"))
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=30)


def _tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _listening(pid: int, port: int):
    import psutil

    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                yield conn


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_the_dashboard_stops_its_server_on_a_signal(tmp_path, sig):
    """SIGTERM, or SIGHUP as when the SSH session of `ray exec ... --port-forward` ends: the MLflow
    server it started stops with it, every process of it, and the port is free again."""
    import psutil

    port = free_port()
    board = subprocess.Popen([sys.executable, "-m", "diffplat.cli", "mlflow", "--workdir", str(tmp_path), "--port",
                              str(port)], start_new_session=True, stderr=subprocess.DEVNULL)  # fmt: skip
    family = [psutil.Process(board.pid)]
    try:
        deadline = time.time() + 300  # only against a hang: a busy machine starts it late, not never
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert board.poll() is None and time.time() < deadline, "the MLflow server did not come up"
                time.sleep(0.5)
        family += psutil.Process(board.pid).children(recursive=True)
        assert len(family) > 1  # the server runs in processes of its own
        # no GenAI job runner and task consumers beside it (MLflow 3 starts nine processes otherwise)
        assert not [p for p in family if "huey" in " ".join(p.cmdline()) or "_job_runner" in " ".join(p.cmdline())]
        board.send_signal(sig)
        assert board.wait(timeout=30) is not None
        _, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:  # a failure above leaves nothing running either
        for process in family:
            with contextlib.suppress(psutil.Error):
                process.kill()
    with socket.socket() as s:  # the port is free: a new server binds it again
        # as servers do (uvicorn, gunicorn): a closed connection's TIME_WAIT does not block the
        # bind, a process still listening does
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
