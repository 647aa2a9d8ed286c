"""Shared fixtures: offline settings, tiny SDXL and FLUX models, synthetic BDD data, one local Ray."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Nothing is fetched at run time; set before anything imports huggingface_hub or ultralytics.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["YOLO_OFFLINE"] = "1"
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("YOLO_CONFIG_DIR", str(REPO / ".cache" / "ultralytics"))
os.environ.pop("MLFLOW_TRACKING_URI", None)
# what diffplat sets when it starts a Ray of its own, for the tests' shared one too
from diffplat.cluster import settle_on_one_machine  # noqa: E402

settle_on_one_machine()
# two test processes share 2 cores (make test runs pytest -n 2): Ray Train's 60 s for a worker group
# to start is for an idle cluster
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
# ... and torch's threads: a test process (and what it starts) takes its share of the cores. Two
# processes of two threads each on 2 cores stall each other at every op (a tiny VAE's training
# steps, two processes at once: 63 each with two threads, 205 with one), and in-process torch
# tests ran 1.4x longer (203 s against 145 s for the 61 tests of test_tiny_model, _objectives,
# _gpu_bench, _gpu_generate_bench, _export, _quality, _ic_lora, _flux, _controlnet with -n 2).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # a test process of pytest -n N (not the controller)
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


def pytest_configure(config):
    """Before the test processes start: Ray's token (~/.ray/auth_token), made once here as Ray
    makes it. On a fresh machine two processes starting Ray at once could each write their own,
    and a cluster would then hold a token that the file no longer does."""
    if hasattr(config, "workerinput"):  # a test process of pytest -n
        return
    from ray._private.authentication.authentication_token_setup import (_get_default_token_path,
                                                                        generate_and_save_token)  # fmt: skip

    if not _get_default_token_path().is_file():
        generate_and_save_token()


# The files that take longest, first: `make test` hands whole files to its two processes in
# collection order (--no-loadscope-reorder), and the longest first leaves the least tail (in a
# fresh-clone run the demo file took 13 of 26 minutes; queued by test count it started minutes in).
# Each process starts with two files (the 1st and 3rd, the 2nd and 4th): the demo's second is a
# quick one, so nothing waits minutes behind it.
LONGEST_FIRST = ("test_demo.py", "test_cluster.py", "test_config.py", "test_train.py", "test_serve.py",
                 "test_generate.py", "test_evaluate.py")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept


_real_connect = socket.socket.connect


def _loopback_only(self, address):
    """The network is off as far as the code under test can tell: only this machine answers."""
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        if not (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("::ffff:127.")):
            raise OSError(f"test tried to reach {host}: nothing may be downloaded at run time")
    return _real_connect(self, address)


socket.socket.connect = _loopback_only


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from diffplat.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_inpaint(tmp_path_factory) -> Path:
    """The same text encoders and VAE as tiny_sdxl (same seed), with a 9-channel UNet."""
    from diffplat.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl-inpaint", "sdxl-inpaint")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A tiny FLUX.1-dev-like pipeline (guidance embedding; CLIP and T5)."""
    from diffplat.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-flux", "flux")


@pytest.fixture(scope="session")
def tiny_flux_fill(tmp_path_factory) -> Path:
    """The same encoders and VAE as tiny_flux (same seed), with a Fill transformer (384 channels)."""
    from diffplat.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-flux-fill", "flux-fill")


@pytest.fixture(scope="session")
def bdd_dir(tmp_path_factory) -> Path:
    from diffplat.data.synthetic_bdd import write_synthetic_bdd

    out = tmp_path_factory.mktemp("bdd")
    write_synthetic_bdd(out, num_images=12)
    return out


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """`diffplat demo`, run once for every test that reads what it wrote (its three jobs train a
    LoRA from the cache, a masked In-Context LoRA and a ControlNet, each on 2 workers):
    (output folder, stdout, stderr). While working on tests, DIFFPLAT_TEST_DEMO=<a demo's output
    folder> reads that one instead (its console output is then empty)."""
    import subprocess
    import sys

    if os.environ.get("DIFFPLAT_TEST_DEMO"):
        return Path(os.environ["DIFFPLAT_TEST_DEMO"]).resolve(), "", ""
    out = tmp_path_factory.mktemp("demo") / "demo-output"
    proc = subprocess.run([sys.executable, "-m", "diffplat", "demo", "--output", str(out)],
                          capture_output=True, text=True, timeout=2100, env=os.environ.copy())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout, proc.stderr


@pytest.fixture(scope="session")
def local_ray():
    """One embedded Ray for the in-process tests (a job's run reuses it)."""
    import ray

    # "local": this process's own Ray, even while a test's head (test_cluster.py) runs on the machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


# --- where the suite's CPU goes (DIFFPLAT_TEST_CPU_LOG=<file>): the suite is CPU-bound on 2 cores ---
if os.environ.get("DIFFPLAT_TEST_CPU_LOG"):

    def _tree_cpu() -> float:
        """CPU seconds of this process and every descendant, reaped ones included (a daemon
        that left the tree, such as `ray start`'s head, is not counted)."""
        import psutil

        total = 0.0
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return total

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        import time

        cpu, wall = _tree_cpu(), time.monotonic()
        yield
        line = f"{_tree_cpu() - cpu:.1f}\t{time.monotonic() - wall:.1f}\t{item.nodeid}\n"
        with open(os.environ["DIFFPLAT_TEST_CPU_LOG"], "a") as log:
            log.write(line)
