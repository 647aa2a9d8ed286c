"""Which Ray a command runs on, found the way Ray's own tools find it; and what that cluster has.

One rule for every command that starts Ray (`diffplat run`, `demo`, `generate`, `infer`, `serve`):

1. an address in the job (`ray.address`) is joined;
2. else a set `RAY_ADDRESS` is joined: `ray job submit`, KubeRay and `ray exec` set it, and a
   submitted job's `working_dir` package lives only in that cluster (a Ray of the driver's own
   could not fetch it);
3. else a Ray of this process's own starts (`address="local"`), even where an unrelated cluster
   runs on the machine: plain `ray.init()` would join that one and refuse `num_cpus`.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("diffplat")


def init_options(address: str | None, num_cpus: int | None = None, dashboard: bool = False) -> dict:
    """ray.init's arguments by the rule above. `num_cpus` and `dashboard` only shape a Ray of our own."""
    if address:
        return {"address": address}
    if os.environ.get("RAY_ADDRESS"):
        if num_cpus is not None:
            log.info("ray: joining the cluster at RAY_ADDRESS (%s); ray.num_cpus is that cluster's to set",
                     os.environ["RAY_ADDRESS"])  # fmt: skip
        return {}  # ray.init() reads RAY_ADDRESS itself
    return {
        "address": "local",
        "num_cpus": num_cpus,
        "include_dashboard": dashboard,
        "dashboard_host": "127.0.0.1",  # the dashboard runs code for whoever reaches it
    }


def starts_own_ray(options: dict) -> bool:
    """Whether `init_options`' result starts a Ray of this process's own (which it then stops)."""
    return options.get("address") == "local"


# Settings for a Ray of our own, on one machine. Ray Train: nothing there can be preempted (the
# watcher only adds an actor and a warning line), and a 2 s status poll, Ray's default for big
# groups, is a tenth of a short run's whole time (it is paid twice as a run ends). Ray Serve kills
# an HTTP proxy not ready within 5 s and serve.start then fails: a busy laptop can take longer.
ONE_MACHINE_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
}


def settle_on_one_machine() -> None:
    """ONE_MACHINE_ENV, where the user has not set them (Ray Train passes them to its controller)."""
    for name, value in ONE_MACHINE_ENV.items():
        os.environ.setdefault(name, value)


# How long a stage's replicas (pipelines, detectors) may take to start, a model download or a node
# coming up under an autoscaler included, before the stage says the cluster cannot hold them.
REPLICA_START_TIMEOUT_S = 1800


def replica_pool(size: int):
    """Ray Data's actor pool of `size` replicas that starts its work only once every replica is
    up: each gets a share, instead of the first one loaded taking everything while the others
    load (on a cluster: every node writes), and a cluster too small for them says so after
    REPLICA_START_TIMEOUT_S instead of running on fewer."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.wait_for_min_actors_s = max(context.wait_for_min_actors_s, REPLICA_START_TIMEOUT_S)
    return ray.data.ActorPoolStrategy(size=size)


def cluster_gpus() -> int:
    """GPUs in the whole cluster (Ray must be up): what 'every GPU' means, not the driver's own,
    which is none on a CPU head."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def record_bytes(row: dict) -> int:
    """About how many bytes a record brought to the driver: its strings, byte strings and arrays
    counted by size, anything else as one 8-byte number (what the driver-load benchmark adds up)."""
    total = 0
    for value in row.values():
        if isinstance(value, (bytes, str)):
            total += len(value)
        else:
            total += getattr(value, "nbytes", 8)
    return total
