"""`diffplat mlflow`: the MLflow dashboard for a work folder's runs, on 127.0.0.1.

It serves the store jobs write by default (`<workdir>/mlflow.db`, artifacts in
`<workdir>/mlartifacts`), so runs made before it started are there too. Jobs log to it when
`MLFLOW_TRACKING_URI` (or `tracking.uri`) is its address; artifacts then go through the server.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("diffplat")


def server_command(workdir: Path, host: str, port: int) -> list[str]:
    workdir = Path(workdir).resolve()
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination", str(workdir / "mlartifacts"), "--host", host, "--port", str(port),
            "--workers", "1"]  # fmt: skip


def experiment_pages(workdir: Path, address: str, limit: int = 3) -> list[tuple[str, str]]:
    """(name, runs page) of the store's most recently used experiments that hold runs."""
    if not (workdir / "mlflow.db").is_file():
        return []
    from mlflow import MlflowClient

    from diffplat.tracking import runs_page

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    found = client.search_experiments(order_by=["last_update_time DESC"], max_results=20)
    used = [e for e in found if client.search_runs([e.experiment_id], max_results=1)]
    return [(e.name, runs_page(address, e.experiment_id)) for e in used[:limit]]


def serve_dashboard(workdir: str | Path, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run the server until Ctrl-C; its exit status."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    address = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    log.info("MLflow on %s (store %s)", address, workdir / "mlflow.db")
    for name, page in experiment_pages(workdir, address):
        log.info("  %s: %s", name, page)
    log.info("jobs log to it with:  export MLFLOW_TRACKING_URI=%s   (or tracking.uri in the job)", address)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who reaches this port can read and change every run", host)
    else:
        log.info("from your machine, when this runs on a cluster's head:  ssh -L %d:127.0.0.1:%d <head>", port, port)
    # MLflow starts worker processes: in a process group of its own, which is stopped whole
    # however this process is asked to end (Ctrl-C, SIGTERM, or SIGHUP when the SSH session of
    # `ray exec ... --port-forward` ends): no server is left holding the port.
    # MLflow 3 starts a job runner and seven task consumers beside a SQL-backed server, for its GenAI
    # jobs (judges, evaluation): nine processes of about 300 MB that poll all the time. diffplat's
    # runs use none of it; the user's own setting wins.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    proc = subprocess.Popen(server_command(workdir, host, port), start_new_session=True, env=env)
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return proc.wait()
    except (KeyboardInterrupt, _Stopped):
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_group(proc)


class _Stopped(Exception):
    pass


def _stop(signum, frame):
    raise _Stopped(signal.Signals(signum).name)


def stop_group(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """End `proc`'s process group: SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
