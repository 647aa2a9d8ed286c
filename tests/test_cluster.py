"""Cluster operations, for real on this machine: a job submitted through the Jobs API to a head
with token authentication (as the README says), and a job spread over two nodes."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pictures(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (48, 40), (40 * i, 90, 200)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"a road picture {i}")
    return folder


def _stop_head(temp_dir: Path) -> list[int]:
    """Stop exactly the head started with `temp_dir`: its processes and their children (Ray's
    workers rename themselves `ray::...`, so they are found under the raylet). `ray stop` would
    stop every Ray on the machine, this test session's own included."""
    import psutil

    roots = [p for p in psutil.process_iter(["cmdline"]) if any(str(temp_dir) in a for a in p.info["cmdline"] or [])]
    procs = {p.pid: p for r in roots for p in [r, *r.children(recursive=True)]}
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
    for p in alive:
        p.kill()
    for address_file in (temp_dir / "ray_current_cluster", Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"):
        if address_file.is_file() and str(temp_dir) in _session_of(address_file):
            address_file.unlink()
    return sorted(procs)


def _session_of(address_file: Path) -> str:
    return address_file.read_text()


def test_a_job_submitted_to_a_head_with_token_auth(tmp_path, tiny_sdxl):
    import psutil

    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port, dashboard = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}  # the job's `diffplat` is this environment's
    # the HTTP API's key in the cluster's environment: serve/diffplat.yaml (auth: key) refuses to build without it
    env["DIFFPLAT_API_KEY"] = "a-key-for-this-test"
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)  # Ray 2.60's default: token authentication on for `ray start`
    # Every port of its own: the agents' defaults (52365, ...) are taken while this session's Ray runs,
    # and a head whose job agent cannot bind answers every submission "no available agent".
    ports = [f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "runtime-env-agent-port", "metrics-export-port",
                                                     "ray-client-server-port", "node-manager-port", "object-manager-port")]  # fmt: skip
    start = subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
                            "--temp-dir", str(temp_dir), "--disable-usage-stats", *ports],
                           env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        # token authentication: the Jobs API refuses a call without the token
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/jobs/", timeout=10)
        assert refused.value.code == 401
        # the dashboard and Jobs API listen on loopback only (the GCS port listens on every
        # interface, as Ray binds it: token auth guards it, and no firewall may open it)
        head = [p for p in psutil.process_iter(["cmdline"]) if any(str(temp_dir) in a for a in p.info["cmdline"] or [])]
        ports = {c.laddr.port: c.laddr.ip for p in head for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == dashboard}  # fmt: skip
        assert ports == {dashboard: "127.0.0.1"}

        images = _pictures(tmp_path / "pics", 3)
        work = tmp_path / "work"
        job = tmp_path / "job.yaml"
        job.write_text(json.dumps({
            "name": "submitted",
            "prepare": {"source": "folder", "folder": {"images": str(images)}},
            "generate": {"base_model": str(tiny_sdxl), "prompts_from_shards": "data/shards", "num_generations": 1,
                         "max_images": 2, "resolution": [32, 32], "num_inference_steps": 2, "output": "generations"},
        }))  # fmt: skip
        # the README's command, as written there: nothing in the job or on the command line names
        # the cluster; `ray job submit` sets RAY_ADDRESS and diffplat joins it
        submit_env = {**env, "RAY_AUTH_MODE": "token"}

        def submit(*entrypoint: str) -> str:
            for attempt in range(10):  # a head just started takes a few seconds to take jobs
                done = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                                       "--working-dir", ".", "--", *entrypoint], cwd=REPO, env=submit_env,
                                      capture_output=True, text=True, timeout=420)  # fmt: skip
                logs = done.stdout + done.stderr
                if "No available agent to submit job" not in logs:
                    break
                time.sleep(3)
            assert done.returncode == 0 and "succeeded" in logs, logs[-4000:]
            return logs

        logs = submit("diffplat", "run", str(job), "--workdir", str(work))
        assert "[diffplat] generate: 2 images in" in logs  # the job's logs were followed to the end
        assert len(list((work / "generations" / "images").glob("*.png"))) == 2
        assert (work / "mlflow.db").is_file() and (work / "data" / "shards" / "_manifest.json").is_file()
        # source 5's generation command, submitted the same way
        gen_out = tmp_path / "generated"
        logs = submit("diffplat", "generate", "--prompt", "a road", "--base-model", str(tiny_sdxl), "--image-size", "32",
                      "--num-inference-steps", "2", "--num-images", "2", "--output-dir", str(gen_out))  # fmt: skip
        assert f"2 images in {gen_out}" in logs and len(list((gen_out / "images").glob("*.png"))) == 2

        # Ray's state API on that head: the generation replicas of both jobs ran in its cluster
        # (a Ray of the driver's own would have held them, and died with the job)
        state = subprocess.run([str(BIN / "ray"), "list", "actors", "--address", f"http://127.0.0.1:{dashboard}",
                                "--format", "json", "--limit", "10000", "--detail"], env=submit_env,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert state.returncode == 0, state.stderr[-2000:]
        replicas = [a for a in json.loads(state.stdout) if "MapBatches(Generator)" in a.get("class_name", "")]
        assert len({a["job_id"] for a in replicas}) == 2, [a.get("class_name") for a in json.loads(state.stdout)]

        # `serve deploy` of the shipped GPU config: the cluster builds the app from import_path and
        # args alone, its API key from the cluster's environment (its GPU replicas wait for GPUs
        # this machine lacks; the build must not fail)
        deploy = subprocess.run([str(BIN / "serve"), "deploy", str(REPO / "serve" / "diffplat.yaml"), "--address",
                                 f"http://127.0.0.1:{dashboard}"], env=submit_env, capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        assert deploy.returncode == 0, (deploy.stdout + deploy.stderr)[-3000:]
        deadline, status = time.time() + 120, {}
        while time.time() < deadline:
            shown = subprocess.run([str(BIN / "serve"), "status", "--address", f"http://127.0.0.1:{dashboard}"],
                                   env=submit_env, capture_output=True, text=True, timeout=60)  # fmt: skip
            status = (yaml.safe_load(shown.stdout) or {}).get("applications", {}).get("diffplat", {})
            if status.get("status") == "DEPLOY_FAILED" or len(status.get("deployments") or {}) == 5:
                break
            time.sleep(3)
        assert status.get("status") != "DEPLOY_FAILED", status.get("message")
        assert set(status.get("deployments") or {}) == {"Generator", "PanelFiller", "MapGenerator", "Detector", "Api"}, status

        # a job run here, with no address, while that head runs: it starts a Ray of its own
        # (joining the head instead would refuse the job's num_cpus)
        local = tmp_path / "local.yaml"
        local.write_text(json.dumps({"name": "beside-a-head", "ray": {"num_cpus": 1},
                                     "prepare": {"source": "folder", "folder": {"images": str(images)}}}))  # fmt: skip
        beside = subprocess.run([str(BIN / "diffplat"), "run", str(local), "--workdir", str(tmp_path / "local")],
                                env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
        assert beside.returncode == 0, beside.stderr[-3000:]
        assert "prepare" in beside.stdout and (tmp_path / "local" / "data" / "prepare_report.json").is_file()
    finally:
        stopped = _stop_head(temp_dir)
    assert stopped
    import psutil as ps

    assert not [p for p in ps.process_iter(["cmdline"]) if any(str(temp_dir) in a for a in p.info["cmdline"] or [])]


def test_a_job_over_two_nodes(tmp_path, tiny_sdxl):
    images = _pictures(tmp_path / "pics", 8)
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "multinode_job.py"), str(work), str(tiny_sdxl),
                           str(images)], capture_output=True, text=True, timeout=540)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    outputs = json.loads(proc.stdout.strip().splitlines()[-1])
    head, worker = outputs["nodes"]["head"], outputs["nodes"]["worker"]  # the driver runs on the head
    assert outputs["train"]["worker_nodes"] == 2  # rank 0 and rank 1 on different nodes
    assert outputs["generate"]["images"] == 12 and outputs["generate"]["nodes"] == 2  # a replica on each node
    # checkpoints in the shared storage the job named, the adapter and images where the driver expects
    assert list((work / "shared" / "ray_results").glob("two-nodes-train-*/checkpoint_*/adapter"))
    assert (work / "adapters" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert len(list((work / "generations" / "images").glob("*.png"))) == 12

    # Workers write, the driver coordinates: every file names the node whose replica wrote it, the
    # second node wrote its share, and what reached the driver is a small fraction of what was written.
    cache = json.loads((work / "cache" / "cache_info.json").read_text())
    assert sum(s["rows"] for s in cache["shards"]) == outputs["cache"]["rows"] == 8
    assert {s["node"] for s in cache["shards"]} == {head, worker}
    assert sorted(p.name for p in (work / "cache").glob("shard-*.parquet")) == sorted(s["file"] for s in cache["shards"])
    made = [json.loads(line) for line in (work / "generations" / "metadata.jsonl").read_text().splitlines()]
    assert {m["node"] for m in made} == {head, worker}
    report = json.loads((work / "generations" / "filter_report.json").read_text())
    assert report["nodes"] == 2 and {v["node"] for v in report["per_image"].values()} == {head, worker}
    for name, verdict in report["per_image"].items():  # each image's label, annotated copy and dataset copy
        assert (work / "generations" / "labels" / f"{Path(name).stem}.txt").is_file()
        assert (work / "generations" / "annotated" / name).is_file()
        assert (work / "generations" / "dataset" / "images" / "train" / name).is_file() == verdict["kept"]
    for stage in ("cache", "generate"):  # 32x32 images: a record is a few % of one (bench/driver_load.py: real sizes)
        assert outputs[stage]["driver_bytes"] < 0.1 * outputs[stage]["output_bytes"], outputs[stage]
