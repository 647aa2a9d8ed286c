"""Every shipped job file parses; bad files fail with the field named."""

import subprocess
import sys
from pathlib import Path

import pytest

from diffplat.config import ConfigError, load_config, parse_config
from diffplat.demo import demo_config_paths

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(REPO.glob("jobs/*.yaml")) + sorted(REPO.glob("jobs/*.yml")) + demo_config_paths()  # .yml: ai-toolkit's


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_job_parses(path):
    config = load_config(path)
    assert config.stages(), path


def test_jobs_folder_is_not_empty():
    assert list(REPO.glob("jobs/*.yaml"))


def _minimal(**train):
    return {"name": "t", "train": {"base_model": "m", "data": "d", "max_train_steps": 1, **train}}


def test_unknown_field_is_named():
    with pytest.raises(ConfigError) as err:
        parse_config(_minimal(lora={"rank": 4, "alfa": 4}), "job.yaml")
    assert "job.yaml" in str(err.value) and "train.lora.alfa" in str(err.value)


def test_bad_resolution_is_named():
    with pytest.raises(ConfigError) as err:
        parse_config(_minimal(resolution=[1280, 721]))
    assert "train.resolution" in str(err.value) and "multiples of 8" in str(err.value)


def test_a_job_needs_a_stage():
    with pytest.raises(ConfigError, match="at least one of"):
        parse_config({"name": "empty"})


def test_resolution_is_width_then_height():
    config = parse_config(_minimal(resolution=[1280, 720]))
    assert config.train.resolution == (1280, 720)


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: t\ntrain: {base_model: m, data: d, max_train_steps: 5}\n")
    config = load_config(path, ["train.max_train_steps=7", "train.lora.rank=2"])
    assert config.train.max_train_steps == 7 and config.train.lora.rank == 2
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(path, ["nonsense"])


def test_cli_check_reports_bad_file_with_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: t\ngenerate: {base_model: m, prompts: [a], num_generations: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "diffplat", "check", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "generate.num_generations" in proc.stderr


def test_cluster_yaml_is_a_valid_ray_launcher_config_with_safe_defaults():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert all("RAY_AUTH_MODE=token" in c for c in raw["worker_start_ray_commands"] if "ray start" in c)
    gpu_groups = [t for t in raw["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_groups and all(t["min_workers"] == 0 < t["max_workers"] for t in gpu_groups)  # autoscaled


@pytest.mark.parametrize("content, message", [
    (None, "no such job file"),
    ("a: [1,\n", "not valid YAML at line 2, column 1: expected the node content"),
    ("- a list\n", "must be a YAML mapping, got list"),
    (b"\xff\xfe name: x", "not UTF-8"),
])  # fmt: skip
def test_a_file_that_is_not_a_job_is_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "job.yaml"
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(err.value).startswith(str(path)) and len(str(err.value).splitlines()) == 1
