"""required_resources / check_cluster_resources: totals over actor groups and a one-line error."""

from pathlib import Path

import pytest

from system.config import load_config
from system.resources import ResourceError, check_cluster_resources, required_resources

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*overrides):
    return load_config(str(ROOT / "configs/debug.yaml"), list(overrides))


def test_cpu_config_sums_cpus_over_groups():
    # debug.yaml: rollout 1 x 0.5 + reference 1 x 0.5 + learner 2 x 0.5 CPU, no GPU
    assert required_resources(_cfg()) == {"CPU": 2.0, "GPU": 0.0}


def test_counts_multiply_per_actor_amounts():
    cfg = _cfg("rollout.num_workers=2", "rollout.num_gpus=1", "rollout.num_cpus=2",
               "reference.num_gpus=0.5", "learner.num_ranks=4", "learner.num_gpus=1",
               "learner.num_cpus=1")
    assert required_resources(cfg) == {"CPU": 2 * 2 + 0.5 + 4 * 1, "GPU": 2 + 0.5 + 4}


@pytest.mark.parametrize("name", ["qwen2.5-0.5b-gsm8k", "qwen2.5-1.5b-math"])
def test_real_configs_fit_exactly_their_documented_gpus(name):
    cfg = load_config(str(ROOT / f"configs/{name}.yaml"))
    gpus = required_resources(cfg)["GPU"]
    assert gpus == {"qwen2.5-0.5b-gsm8k": 4, "qwen2.5-1.5b-math": 7}[name]
    check_cluster_resources(cfg, {"CPU": 16.0, "GPU": gpus})
    with pytest.raises(ResourceError):
        check_cluster_resources(cfg, {"CPU": 16.0, "GPU": gpus - 1})


def test_enough_resources_pass_and_missing_gpu_key_counts_as_zero():
    check_cluster_resources(_cfg(), {"CPU": 2.0})  # exactly enough; CPU-only cluster has no "GPU" key
    with pytest.raises(ResourceError, match="GPU"):
        check_cluster_resources(_cfg("learner.num_gpus=1"), {"CPU": 8.0})


def test_error_names_the_group_its_keys_and_the_breakdown():
    cfg = _cfg("rollout.num_gpus=1", "reference.num_gpus=1", "learner.num_ranks=4",
               "learner.num_gpus=1")
    with pytest.raises(ResourceError) as err:
        check_cluster_resources(cfg, {"CPU": 64.0, "GPU": 2.0})
    message = str(err.value)
    assert message == (
        "learner: 4 GPU needed (learner.num_ranks=4 x learner.num_gpus=1), cluster has 2 GPU in all "
        "(rollout 1 + reference 1 + learner 4 = 6 needed)"
    )
    assert "\n" not in message
    assert isinstance(err.value, ValueError)


def test_cpu_shortfall_is_reported_with_cpu_keys():
    cfg = _cfg("rollout.num_cpus=3")
    with pytest.raises(ResourceError) as err:
        check_cluster_resources(cfg, {"CPU": 2.0, "GPU": 0.0})
    assert str(err.value).startswith("rollout: 3 CPU needed (rollout.num_workers=1 x rollout.num_cpus=3)")
    assert "cluster has 2 CPU in all (rollout 3 + reference 0.5 + learner 1 = 4.5 needed)" in str(err.value)


def test_custom_resources_place_groups_and_are_checked_like_cpus():
    """`<group>.resources` asks each actor for a custom resource that only tagged nodes hold (`ray
    start --resources='{"learner_node": 1}'`): it is summed and checked, and a missing one named."""
    cfg = _cfg("learner.resources={learner_node: 0.5}", "rollout.resources={sampler_node: 0.25}",
               "reference.resources={sampler_node: 0.25}")
    assert required_resources(cfg) == {"CPU": 2.0, "GPU": 0.0, "learner_node": 1.0, "sampler_node": 0.5}
    check_cluster_resources(cfg, {"CPU": 2.0, "learner_node": 1.0, "sampler_node": 1.0})
    with pytest.raises(ResourceError) as err:
        check_cluster_resources(cfg, {"CPU": 8.0, "sampler_node": 1.0})
    assert str(err.value) == (
        "learner: 1 learner_node needed (learner.num_ranks=2 x learner.resources.learner_node=0.5), "
        "cluster has 0 learner_node in all (rollout 0 + reference 0 + learner 1 = 1 needed)")


@pytest.mark.parametrize("override,reason", [
    ("learner.resources={GPU: 1}", "own keys"),
    ("rollout.resources={sampler_node: 0}", "amounts > 0"),
    ("reference.resources={sampler_node: yes}", "amounts > 0"),
])
def test_bad_custom_resources_name_the_key(override, reason):
    from system.config import ConfigError

    with pytest.raises(ConfigError, match=rf"^{override.split('=')[0]}: .*{reason}"):
        _cfg(override)


def test_a_group_the_busy_cluster_cannot_place_stops_with_one_line_and_frees_its_reservation(ray_cluster, capsys):
    """The totals fit but others hold the rest: the wait is announced, then ends in ResourceError
    naming the group, what it asked for and what is free; nothing stays reserved."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from system.actor_group import _wait_placed

    free = ray.available_resources().get("CPU", 0)
    pg = placement_group([{"CPU": free + 1}])
    with pytest.raises(ResourceError) as err:
        _wait_placed(pg, "rollout", 1, {"CPU": free + 1}, timeout_s=1.0)
    message = str(err.value)
    assert "\n" not in message and "the rollout group (1 x {CPU: " in message and "free" in message
    assert f"CPU: {free:g}" in message and "rollout.num_cpus" in message
    assert "[placement] waiting for the rollout group" in capsys.readouterr().out
    assert placement_group_table(pg)["state"] == "REMOVED"
