"""Cluster operations, for real on this machine, as the README does them: a head with token
authentication, a second node joined to it with `ray start --address`, and jobs submitted
through the Jobs API with nothing naming the cluster: a job over both nodes (prepare, cache,
train, generate, filter), source 5's `diffplat generate`, and `serve deploy` of the shipped
config."""

import json
import os
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
from helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a hang guard: 564 s seen beside a CPU hog

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent



def _pictures(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (48, 40), (40 * i, 90, 200)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"a road picture {i}")
    return folder


def _ours(temp_dirs: list[Path]) -> list:
    import psutil

    return [p for p in psutil.process_iter(["cmdline"])
            if any(str(d) in a for d in temp_dirs for a in p.info["cmdline"] or [])]  # fmt: skip


def _stop_nodes(temp_dirs: list[Path]) -> list[int]:
    """Stop exactly the nodes started with `temp_dirs`: their processes and their children (Ray's
    workers rename themselves `ray::...`, so they are found under the raylet). `ray stop` would
    stop every Ray on the machine, this test session's own included."""
    import psutil

    procs = {p.pid: p for r in _ours(temp_dirs) for p in [r, *r.children(recursive=True)]}
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    # a killed process can take a while to go on a busy machine (seen: one in disk sleep): wait for it
    psutil.wait_procs(alive, timeout=60)
    address_file = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if address_file.is_file() and any(str(d) in address_file.read_text() for d in temp_dirs):
        address_file.unlink()
    return sorted(procs)


def _node_ports() -> list[str]:
    # Every port of its own: the agents' defaults (52365, ...) are taken while this session's Ray
    # runs, and a node whose job agent cannot bind answers every submission "no available agent".
    return [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "runtime-env-agent-port", "metrics-export-port",
                                                    "node-manager-port", "object-manager-port")]  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    """A head (token authentication, Ray 2.60's default for `ray start`) and a second node
    joined to it: (dashboard address, environment of a client of it, the head's temp dir)."""
    dirs = [Path(tempfile.mkdtemp(prefix=p, dir="/tmp")) for p in ("rh", "rw")]  # short: socket paths have a limit
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}  # the job's `diffplat` is this environment's
    # the HTTP API's key in the cluster's environment: serve/diffplat.yaml (auth: key) refuses to build without it
    env["DIFFPLAT_API_KEY"] = "a-key-for-this-test"
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    client = {**env, "RAY_AUTH_MODE": "token"}  # a client of a token-auth cluster (FACTS: ~/.ray/auth_token)
    try:
        head = subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
                               "--temp-dir", str(dirs[0]), "--disable-usage-stats",
                               f"--ray-client-server-port={free_port()}", *_node_ports()],
                              env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
        assert head.returncode == 0, head.stderr[-3000:]
        node = subprocess.run([str(BIN / "ray"), "start", "--address", f"127.0.0.1:{port}", "--node-ip-address",
                               "127.0.0.1", "--num-cpus", "2", "--temp-dir", str(dirs[1]), "--disable-usage-stats",
                               *_node_ports()], env=client, capture_output=True, text=True, timeout=180)  # fmt: skip
        assert node.returncode == 0, node.stderr[-3000:]
        yield f"http://127.0.0.1:{dashboard}", client, dirs
    finally:
        stopped = _stop_nodes(dirs)
    assert stopped and not _ours(dirs)


def _submit(cluster, *entrypoint: str) -> str:
    """`ray job submit` as the README writes it: nothing in the job or on the command line names
    the cluster; `ray job submit` sets RAY_ADDRESS and diffplat joins it."""
    address, client, _ = cluster
    for _ in range(10):  # a head just started takes a few seconds to take jobs
        done = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
                               *entrypoint], cwd=REPO, env=client, capture_output=True, text=True, timeout=600)  # fmt: skip
        logs = done.stdout + done.stderr
        if "No available agent to submit job" not in logs:
            break
        time.sleep(3)
    assert done.returncode == 0 and "succeeded" in logs, logs[-4000:]
    return logs


def _state(cluster, what: str) -> list[dict]:
    """Ray's state API on the cluster (`ray list nodes`, `ray list actors`)."""
    address, client, _ = cluster
    state = subprocess.run([str(BIN / "ray"), "list", what, "--address", address, "--format", "json", "--limit",
                            "10000", "--detail"], env=client, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert state.returncode == 0, state.stderr[-2000:]
    return json.loads(state.stdout)


def test_the_head_answers_only_with_the_token_and_only_on_loopback(cluster):
    import psutil

    address, _, dirs = cluster
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert refused.value.code == 401
    # the dashboard and Jobs API listen on loopback only (the GCS port listens on every
    # interface, as Ray binds it: token auth guards it, and no firewall may open it)
    dashboard = int(address.rsplit(":", 1)[1])
    listening = {c.laddr.port: c.laddr.ip for p in _ours(dirs[:1]) for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == dashboard}  # fmt: skip
    assert listening == {dashboard: "127.0.0.1"}


def test_jobs_submitted_with_no_address_run_over_both_nodes(cluster, tmp_path, tiny_sdxl):
    """A job over two nodes: cache with an encoder a node, train with a worker a node, generate
    with a replica a node, filter with a detector a node. Workers write, the driver (on the head)
    coordinates: every file names the node whose replica wrote it, and what reached the driver
    is a small fraction of what was written."""
    import mlflow

    nodes = _state(cluster, "nodes")
    head = next(n["node_id"] for n in nodes if n["is_head_node"])
    worker = next(n["node_id"] for n in nodes if not n["is_head_node"])
    images, work, model = _pictures(tmp_path / "pics", 8), tmp_path / "work", str(tiny_sdxl)
    job = tmp_path / "two-nodes.yaml"
    job.write_text(yaml.safe_dump({
        "name": "two-nodes",
        "prepare": {"source": "folder", "folder": {"images": str(images)}, "rows_per_shard": 1},
        # an encoder a node (SPREAD), each with a CPU left on its node for Ray Data's decode tasks
        "cache": {"data": "data/shards", "base_model": model, "resolution": [32, 32], "batch_size": 1,
                  "rows_per_shard": 1, "replicas": 2, "cpus_per_replica": 1},
        "train": {"base_model": model, "data": "data/shards", "resolution": [32, 32], "lora": {"rank": 4},
                  "max_train_steps": 2, "train_batch_size": 1, "checkpointing_steps": 1,
                  # STRICT: one worker a node, or the run waits (SPREAD alone may pack a busy machine)
                  "scaling": {"num_workers": 2, "cpus_per_worker": 1, "placement_strategy": "STRICT_SPREAD",
                              # storage every node sees (here: this machine's disk; on a cluster: NFS, s3://)
                              "storage_path": str(work / "shared" / "ray_results")},
                  "deepspeed": {"zero_stage": 2}},
        "generate": {"base_model": model, "lora": "adapters/lora", "prompts": ["a road", "a car"],
                     # enough images that the second replica, up a few seconds after the first, gets some
                     "num_generations": 6, "resolution": [32, 32], "num_inference_steps": 1, "batch_size": 1,
                     # a replica takes a whole node's 2 CPUs: the two can only be on different nodes
                     "replicas": 2, "cpus_per_replica": 2, "output": "generations"},
        "filter": {"images": "generations", "model": "yolov8n.yaml", "imgsz": 32, "batch_size": 1,
                   "replicas": 2, "cpus_per_replica": 2},
    }))  # fmt: skip
    logs = _submit(cluster, "diffplat", "run", str(job), "--workdir", str(work))
    assert "[diffplat] generate: 12 images in" in logs  # the job's logs were followed to the end
    info = json.loads((work / "adapters" / "lora" / "adapter_info.json").read_text())
    assert info["worker_nodes"] == 2  # rank 0 and rank 1 on different nodes
    # checkpoints in the shared storage the job named, the adapter and images where the driver expects
    assert list((work / "shared" / "ray_results").glob("two-nodes-train-*/checkpoint_*/adapter"))
    assert len(list((work / "generations" / "images").glob("*.png"))) == 12
    cache = json.loads((work / "cache" / "cache_info.json").read_text())
    assert sum(s["rows"] for s in cache["shards"]) == 8 and {s["node"] for s in cache["shards"]} == {head, worker}
    assert sorted(p.name for p in (work / "cache").glob("shard-*.parquet")) == sorted(s["file"] for s in cache["shards"])
    made = [json.loads(line) for line in (work / "generations" / "metadata.jsonl").read_text().splitlines()]
    assert {m["node"] for m in made} == {head, worker}
    report = json.loads((work / "generations" / "filter_report.json").read_text())
    assert report["nodes"] == 2 and {v["node"] for v in report["per_image"].values()} == {head, worker}
    for name, verdict in report["per_image"].items():  # each image's label, annotated copy and dataset copy
        assert (work / "generations" / "labels" / f"{Path(name).stem}.txt").is_file()
        assert (work / "generations" / "annotated" / name).is_file()
        assert (work / "generations" / "dataset" / "images" / "train" / name).is_file() == verdict["kept"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("diffplat").experiment_id])
    stages = {r.data.tags.get("diffplat.stage"): r.data.metrics for r in runs}
    for stage in ("cache", "generate"):  # 32x32 images: a record is a few % of one (bench/driver_load.py: real sizes)
        assert stages[stage]["nodes"] == 2 and stages[stage]["driver_bytes"] < 0.1 * stages[stage]["output_bytes"]

    # source 5's generation command, submitted the same way
    out = tmp_path / "generated"
    logs = _submit(cluster, "diffplat", "generate", "--prompt", "a road", "--base-model", model, "--image-size", "32",
                   "--num-inference-steps", "2", "--num-images", "2", "--output-dir", str(out))  # fmt: skip
    assert f"2 images in {out}" in logs and len(list((out / "images").glob("*.png"))) == 2
    # Ray's state API: the generation replicas of both jobs ran in this cluster (a Ray of the
    # driver's own would have held them, and died with the job)
    replicas = [a for a in _state(cluster, "actors") if "MapBatches(Generator)" in a.get("class_name", "")]
    assert len({a["job_id"] for a in replicas}) == 2, replicas


def test_serve_deploy_of_the_shipped_config_builds_and_a_local_job_beside_it_runs(cluster, tmp_path):
    """`serve deploy` of serve/diffplat.yaml: the cluster builds the app from import_path and args
    alone, its API key from the cluster's environment (its GPU replicas wait for GPUs this
    machine lacks; the build must not fail). Then a job run here with no address, while that
    cluster runs: it starts a Ray of its own (joining would refuse the job's num_cpus)."""
    address, client, _ = cluster
    deploy = subprocess.run([str(BIN / "serve"), "deploy", str(REPO / "serve" / "diffplat.yaml"), "--address", address],
                            env=client, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert deploy.returncode == 0, (deploy.stdout + deploy.stderr)[-3000:]
    deadline, status = time.time() + 180, {}
    while time.time() < deadline:
        shown = subprocess.run([str(BIN / "serve"), "status", "--address", address], env=client, capture_output=True,
                               text=True, timeout=60)  # fmt: skip
        status = (yaml.safe_load(shown.stdout) or {}).get("applications", {}).get("diffplat", {})
        if status.get("status") == "DEPLOY_FAILED" or len(status.get("deployments") or {}) == 5:
            break
        time.sleep(3)
    assert status.get("status") != "DEPLOY_FAILED", status.get("message")
    assert set(status.get("deployments") or {}) == {"Generator", "PanelFiller", "MapGenerator", "Detector", "Api"}, status

    images = _pictures(tmp_path / "pics", 3)
    local = tmp_path / "local.yaml"
    local.write_text(json.dumps({"name": "beside-a-cluster", "ray": {"num_cpus": 1},
                                 "prepare": {"source": "folder", "folder": {"images": str(images)}}}))  # fmt: skip
    env = {k: v for k, v in client.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    beside = subprocess.run([str(BIN / "diffplat"), "run", str(local), "--workdir", str(tmp_path / "local")], env=env,
                            capture_output=True, text=True, timeout=180)  # fmt: skip
    assert beside.returncode == 0, beside.stderr[-3000:]
    assert "prepare" in beside.stdout and (tmp_path / "local" / "data" / "prepare_report.json").is_file()
