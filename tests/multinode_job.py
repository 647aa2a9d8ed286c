"""Run in its own process by test_cluster.py: a head and a second node joined to it (two raylets
on this machine), then a job on them: prepare, cache with 2 encoder replicas, train with 2
workers spread over the nodes, generate with 2 replicas and filter with 2 detectors. Prints the
stage outputs and the two nodes' ids as JSON on the last line (the driver runs on the head)."""

import json
import sys
from pathlib import Path

from ray.cluster_utils import Cluster


def main(work: Path, model: str, images: str) -> None:
    from diffplat.config import parse_config
    from diffplat.runner import run_job

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    nodes = {"head": cluster.head_node.node_id, "worker": worker.node_id}
    try:
        config = parse_config({
            "name": "two-nodes",
            "ray": {"address": cluster.address},
            "prepare": {"source": "folder", "folder": {"images": images}, "rows_per_shard": 1},
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
        })  # fmt: skip
        result = run_job(config, work)
    finally:
        cluster.shutdown()
    outputs = {stage: {k: v for k, v in out.items() if isinstance(v, (int, float, str))}
               for stage, out in result.outputs.items()}  # fmt: skip
    print(json.dumps({**outputs, "nodes": nodes}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
