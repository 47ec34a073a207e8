"""A short debug run on a Ray cluster of several nodes on 127.0.0.1 (test_multinode.py runs this
in a process and a session of its own, with RAY_TMPDIR pointing at a private folder).

    RAY_TMPDIR=$(mktemp -d) python -m tests.integration.multinode_run <out_dir> [--lose-at N] [key=value ...]

Steps: (1) start a head with no CPUs (it holds the driver only, like the head pod in deploy/k8s)
and three worker nodes tagged with a custom resource, as `ray start --resources` would: one
learner_node (2 CPUs) and two sampler_nodes (1 CPU each);
(2) run system.train on that cluster with the placement a user writes for a real one: learners on
learner_node, rollout and reference on sampler_node; with --lose-at N, remove the node that holds
the rollout worker just before step N (Ray reschedules its bundle on the other sampler node);
(3) print `RESULT {json}`: train's exit code, each node's id by tag, the lost node. The cluster
is shut down at the end, also when the run fails.
"""

from __future__ import annotations

import json
import sys

PLACEMENT = ["learner.resources={learner_node: 0.5}", "rollout.resources={sampler_node: 0.5}",
             "reference.resources={sampler_node: 0.25}"]


def _lose_rollout_node_before(cluster, step: int, lost: dict) -> None:
    """Just before Trainer.train_step(step), kill every process of the rollout worker's node."""
    import psutil
    from ray._private import ray_constants

    from system.trainer import Trainer

    original = Trainer.train_step

    def train_step(self, at):
        if at == step and not lost:
            (node_id,) = set(self.rollout.nodes())
            (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
            print(f"[test] removing node {node_id[:6]} (the rollout worker's) before step {at}", flush=True)
            # a lost machine takes its actors' processes with it at once; remove_node kills the
            # raylet and its daemons, and an orphaned worker could serve calls for a while longer
            raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
            workers = raylet.children(recursive=True)
            cluster.remove_node(node, allow_graceful=False)
            for proc in workers:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            lost["node"] = node_id
        return original(self, at)

    Trainer.train_step = train_step


def main(output_dir: str, args: list) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from system.train import main as train

    lose_at = int(args[args.index("--lose-at") + 1]) if "--lose-at" in args else None
    overrides = [a for i, a in enumerate(args) if "--lose-at" not in (a, args[i - 1] if i else None)]
    local = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                              **local})
    try:
        nodes = {}
        for tag, cpus in (("learner_node", 2), ("sampler_node", 1), ("sampler_node", 1)):
            node = cluster.add_node(num_cpus=cpus, resources={tag: 1}, **local)
            nodes.setdefault(tag, []).append(node.node_id)
        lost = {}
        if lose_at:
            _lose_rollout_node_before(cluster, lose_at, lost)
        code = train(["--config", "configs/debug.yaml", f"ray.address={cluster.address}",
                      f"output_dir={output_dir}", *PLACEMENT, *overrides])
        print("RESULT " + json.dumps({"code": code, "nodes": nodes, "lost": lost.get("node")}), flush=True)
        return 0
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
