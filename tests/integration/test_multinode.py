"""Several Ray nodes on one machine: roles placed on different nodes by config, weights synced
between them, and nodes lost mid-run.

    pytest tests/integration/test_multinode.py

tests/integration/multinode_run.py starts a head and three worker nodes on 127.0.0.1 (each node its
own raylet, with its own CPUs and a custom resource: learner_node, sampler_node x2) and runs four
debug steps with the learners on one node and rollout + reference on the sampler nodes. It removes
the rollout worker's node before step 2 (the run must recover on the other sampler node) and the
learners' node before step 3 (the run must stop, naming the node); then it starts a fresh cluster
and runs the same command with trainer.resume=auto, which must finish the run. It runs in a process
and a session of its own, with a private RAY_TMPDIR (ray.cluster_utils writes the cluster's address
to <RAY_TMPDIR>/ray/ray_current_cluster, which `ray.init(address="auto")` elsewhere on this machine
would otherwise find) and token authentication on; whatever of that session is left afterwards is
killed by pid.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.conftest import TEST_OVERRIDES, stop_session

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _run_on_cluster(tmp_path: Path, *overrides: str) -> tuple:
    """(RESULT record, console output) of multinode_run.py in a session of its own."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="raymn-", dir="/tmp"))  # short: AF_UNIX socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
               # ray.init(address="127.0.0.1:<port>") swaps 127.0.0.1 for the machine's outward IP, where
               # nothing listens (the nodes bind 127.0.0.1); with this at 0 it stays on loopback
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    cmd = [sys.executable, "-m", "tests.integration.multinode_run", str(tmp_path), *TEST_OVERRIDES,
           "run_name=multinode", "ray.log_to_driver=false", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=720)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    finally:
        stop_session(proc.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    results = [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, f"multinode_run failed ({proc.returncode}):\n{out[-6000:]}"
    return results[0], out


def _placements(out: str) -> list[dict]:
    """{group: set of short node ids} from each `[placement] ...` line the driver printed."""
    return [{group: set(re.findall(r"@node (\w+)", where))
             for group, where in (part.split(": ", 1) for part in line[len("[placement] "):].split(" | "))}
            for line in out.splitlines() if line.startswith("[placement] ")]


@pytest.mark.timeout(900)
def test_run_across_nodes_survives_a_lost_rollout_node_and_resumes_after_a_lost_learner_node(tmp_path):
    """Learners on one node, rollout and reference on the sampler nodes, as placed by config; the
    weights cross nodes at every sync (a checksum mismatch would print a "[faults] weight sync"
    line, and a second one stops the run).

    Before step 2 the rollout worker's node is removed: Ray reschedules the worker on the other
    sampler node, it rejoins a new sync group and gets the current weights; the driver logs how long
    the recovery took. Before step 3 the learners' node is removed: DeepSpeed's group cannot lose a
    member, so the run stops with one line naming a learner rank, that node and the step-2
    checkpoint. A fresh cluster and trainer.resume=auto finish the run from there. One test for all
    of it: a cluster start costs more than the steps."""
    t0 = time.monotonic()
    result, out = _run_on_cluster(tmp_path, "trainer.steps=4", "checkpoint.every=2",
                                  "--lose", "rollout@2", "--lose", "learner@3", "--resume-on-fresh-cluster")
    assert result["codes"] == [1, 0], out[-6000:]
    first, fresh = result["clusters"]
    (learner_node,) = [n[:6] for n in first["learner_node"]]
    sampler_nodes = {n[:6] for n in first["sampler_node"]}
    placed, placed_again = _placements(out)
    assert placed["learner"] == {learner_node}
    assert placed["rollout"] | placed["reference"] <= sampler_nodes and learner_node not in sampler_nodes
    assert placed_again["learner"] == {n[:6] for n in fresh["learner_node"]}
    assert "[faults] weight sync" not in out

    # the rollout worker's node: restarted elsewhere, the run goes on
    assert result["lost"]["rollout"][:6] in placed["rollout"]
    faults = [l for l in out.splitlines() if l.startswith(("[faults]", "[test]", "error:"))]
    assert any(l.startswith("[faults] rollout worker 0 restarted") for l in faults), faults
    recovered = re.findall(r"^\[faults\] recovered in ([0-9.]+)s: .*rollout worker 0.* back$", out,
                           re.MULTILINE)
    assert len(recovered) == 1, faults

    # the learners' node: one line naming it and the checkpoint to resume from
    assert result["lost"]["learner"][:6] == learner_node
    saved = tmp_path / "multinode" / "checkpoints" / "step_000002"
    (error,) = [l for l in out.splitlines() if l.startswith("error: ")]
    assert re.match(rf"error: learner rank [01] on node {learner_node} \(127\.0\.0\.1\) died: ", error), error
    assert error.endswith(f"Resubmit the same command with trainer.resume=auto to continue from the "
                          f"latest checkpoint {saved}"), error

    # the fresh cluster: trainer.resume=auto finishes the run
    assert f"[resume] from {saved}: step 2" in out
    records = [json.loads(l) for l in (tmp_path / "multinode" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[-1]["policy_version"] == 4
    assert train[-1]["actor_restarts"] >= 1  # the checkpoint carries the count
    assert (tmp_path / "multinode" / "final" / "config.json").is_file()
    print(f"multi-node run: {time.monotonic() - t0:.0f}s; rollout worker's node lost, recovered in "
          f"{recovered[0]}s; learners' node lost, resumed on a fresh cluster")
