"""A short debug run on a Ray cluster of several nodes on 127.0.0.1 (test_multinode.py runs this
in a process and a session of its own, with RAY_TMPDIR pointing at a private folder).

    RAY_TMPDIR=$(mktemp -d) python -m tests.integration.multinode_run <out_dir> \
        [--lose rollout@2] [--lose learner@3] [--resume-on-fresh-cluster] [key=value ...]

Steps: (1) start a head with no CPUs (it holds the driver only, like the head pod in deploy/k8s)
and three worker nodes tagged with a custom resource, as `ray start --resources` would: one
learner_node (2 CPUs) and two sampler_nodes (1 CPU each);
(2) run system.train on that cluster with the placement a user writes for a real one: learners on
learner_node, rollout and reference on sampler_node; each `--lose ROLE@N` removes the node that
holds ROLE's rank 0 (rollout, reference or learner) just before step N, as a crashed machine would;
(3) with --resume-on-fresh-cluster, if the run stopped, shut the whole cluster down, start a new one
the same way and run the same command with trainer.resume=auto (the state lives on disk only);
(4) print `RESULT {json}`: each run's exit code, each cluster's node ids by tag, the nodes lost
(role -> node id). The cluster is shut down at the end, also when a run fails.
"""

from __future__ import annotations

import json
import sys

PLACEMENT = ["learner.resources={learner_node: 0.5}", "rollout.resources={sampler_node: 0.5}",
             "reference.resources={sampler_node: 0.25}"]
GROUPS = {"rollout": "rollout", "reference": "reference", "learner": "learners"}  # role -> Trainer attribute


def _remove_node(cluster, node_id: str) -> None:
    """Take a worker node away at once, with every process on it."""
    import psutil
    from ray._private import ray_constants

    (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
    # a lost machine takes its actors' processes with it at once; remove_node kills the raylet and
    # its daemons, and an orphaned worker could serve calls for a while longer
    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    workers = raylet.children(recursive=True)
    cluster.remove_node(node, allow_graceful=False)
    for proc in workers:
        try:
            proc.kill()
        except psutil.Error:
            pass


def _lose_nodes(cluster_ref: dict, losses: dict, lost: dict) -> None:
    """Just before Trainer.train_step(step), remove the node of the role losses[step] names."""
    from system.trainer import Trainer

    original = Trainer.train_step

    def train_step(self, at):
        role = losses.pop(at, None)
        if role is not None:
            node_id = getattr(self, GROUPS[role]).nodes()[0]
            print(f"[test] removing node {node_id[:6]} (the {role} worker's) before step {at}", flush=True)
            _remove_node(cluster_ref["cluster"], node_id)
            lost[role] = node_id
        return original(self, at)

    Trainer.train_step = train_step


def _start_cluster():
    """(cluster, {tag: [node ids]}): a head without CPUs and three tagged worker nodes."""
    from ray.cluster_utils import Cluster

    local = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                              **local})
    nodes = {}
    for tag, cpus in (("learner_node", 2), ("sampler_node", 1), ("sampler_node", 1)):
        node = cluster.add_node(num_cpus=cpus, resources={tag: 1}, **local)
        nodes.setdefault(tag, []).append(node.node_id)
    return cluster, nodes


def _parse(args: list) -> tuple[dict, bool, list]:
    """({step: role} of every --lose ROLE@STEP, --resume-on-fresh-cluster, the config overrides)."""
    losses, fresh, overrides, i = {}, False, [], 0
    while i < len(args):
        if args[i] == "--lose":
            role, step = args[i + 1].split("@")
            assert role in GROUPS, f"--lose {args[i + 1]}: role must be one of {sorted(GROUPS)}"
            losses[int(step)] = role
            i += 2
            continue
        if args[i] == "--resume-on-fresh-cluster":
            fresh = True
        else:
            overrides.append(args[i])
        i += 1
    return losses, fresh, overrides


def main(output_dir: str, args: list) -> int:
    import ray

    from system.train import main as train

    losses, fresh, overrides = _parse(args)
    lost, runs, clusters = {}, [], []
    ref = {}
    _lose_nodes(ref, losses, lost)
    try:
        ref["cluster"], nodes = _start_cluster()
        clusters.append(nodes)

        def run(*extra):
            print(f"[test] run {len(runs) + 1} on cluster {len(clusters)}", flush=True)
            runs.append(train(["--config", "configs/debug.yaml", f"ray.address={ref['cluster'].address}",
                               f"output_dir={output_dir}", *PLACEMENT, *overrides, *extra]))

        run()
        if fresh and runs[-1] != 0:
            ray.shutdown()
            ref["cluster"].shutdown()
            ref["cluster"], nodes = _start_cluster()
            clusters.append(nodes)
            run("trainer.resume=auto")
        print("RESULT " + json.dumps({"codes": runs, "clusters": clusters, "lost": lost}), flush=True)
        return 0
    finally:
        ray.shutdown()
        if "cluster" in ref:
            ref["cluster"].shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
