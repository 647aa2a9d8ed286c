"""The KubeRay manifests make the choices cluster.yaml and serve/diffplat.yaml make: image and
Ray version, resources and autoscaling per GPU group, token auth, nothing exposed, no secrets."""

from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]


def _docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((REPO / "k8s" / name).read_text()))


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _cluster_specs():
    job, service = _docs("rayjob-train.yaml")[0], _docs("rayservice.yaml")[0]
    return {"rayjob": job["spec"]["rayClusterSpec"], "rayservice": service["spec"]["rayClusterConfig"]}


@pytest.mark.parametrize("which", ["rayjob", "rayservice"])
def test_each_cluster_spec_matches_the_launcher_config(which, launcher):
    spec = _cluster_specs()[which]
    assert spec["rayVersion"] == ray.__version__  # the Ray the tests ran
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0" and launcher["available_node_types"]["head"]["resources"] == {"CPU": 0}
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile
    for group in spec["workerGroupSpecs"]:
        node = launcher["available_node_types"][group["groupName"]]
        container = group["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == node["resources"]["GPU"]
        assert int(limits["cpu"]) == node["resources"]["CPU"]
        assert group["minReplicas"] == node["min_workers"] and group["maxReplicas"] == node["max_workers"]
        assert container["image"] == spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def test_the_training_job_runs_a_shipped_job_with_the_dashboard_on_loopback():
    from diffplat.config import load_config

    job = _docs("rayjob-train.yaml")[0]
    assert job["kind"] == "RayJob" and job["spec"]["submissionMode"] == "SidecarMode"
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    words = job["spec"]["entrypoint"].split()
    # no address: KubeRay sets RAY_ADDRESS for the entrypoint and diffplat joins that cluster
    assert words[:2] == ["diffplat", "run"] and not [w for w in words if "ray.address" in w]
    load_config(REPO / words[2])  # a job file that exists and parses


def test_the_serve_app_is_serve_diffplat_yaml():
    service, policy = _docs("rayservice.yaml")
    shipped = yaml.safe_load((REPO / "serve" / "diffplat.yaml").read_text())
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve["applications"] == shipped["applications"]
    assert policy["kind"] == "NetworkPolicy"


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayservice.yaml"])
def test_every_pod_is_unprivileged_and_only_ray_reaches_it(name):
    """Non-root, no privilege escalation, no capabilities, a read-only root filesystem with /tmp and
    ~/.cache as scratch, on the head and every worker group; a NetworkPolicy over every Ray pod."""
    cluster, policy = _docs(name)[0]["spec"], _docs(name)[-1]
    spec = cluster.get("rayClusterSpec") or cluster["rayClusterConfig"]
    templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    for template in templates:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
            assert context["readOnlyRootFilesystem"] is True
            scratch = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/tmp", "/home/ray/.cache"} <= scratch
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    sources = policy["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}} in sources


def test_the_image_runs_as_a_user_without_sudo_and_leaves_the_checkout_out():
    dockerfile = (REPO / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users[-1] == "ray" and "sudo" in next(line for line in dockerfile if "purge" in line)
    assert any("--require-hashes -r requirements.lock" in line for line in dockerfile)
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "demo-output", "mlflow.db"} <= ignored


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayservice.yaml"])
def test_nothing_is_exposed_and_no_secret_is_written(name):
    for doc in _docs(name):
        assert doc["kind"] not in ("Ingress", "Service")
        assert all(v == "ClusterIP" for v in _all(doc, "serviceType")) and not list(_all(doc, "type"))
        assert not list(_all(doc, "hostNetwork")) and not list(_all(doc, "hostPort"))
        for env in _all(doc, "env"):
            for var in env:
                assert "value" not in var or not any(w in var["name"] for w in ("TOKEN", "KEY", "PASSWORD", "SECRET"))


def _all(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _all(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _all(v, key)
