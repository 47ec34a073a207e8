"""Config: YAML + dotlist overrides, and one-line errors that name the key."""

from __future__ import annotations

import pytest

from system.config import ConfigError, load_config, to_yaml
from system.config_checks import ignored_keys

DEBUG = "configs/debug.yaml"


def test_overrides_apply_and_resolved_config_round_trips(tmp_path):
    cfg = load_config(DEBUG, ["algo.kl.mode=k3", "trainer.steps=5", "learner.lr=1e-5"])
    assert (cfg.algo.kl.mode, cfg.trainer.steps, cfg.learner.lr) == ("k3", 5, 1e-5)
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("override, key, reason", [
    ("algo.kl.mod=k3", "algo.kl.mod", "not in"),
    ("trainer.steps=abc", "trainer.steps", "could not be converted"),
    ("rollout.group_size=1", "rollout.group_size", ">= 2"),
    ("algo.clip_low=0.5", None, None),  # valid on its own
    ("algo.kl.coef=-0.1", "algo.kl.coef", ">= 0"),
    ("algo.kl.mode=k4", "algo.kl.mode", "must be one of"),
    ("algo.aggregation=mean", "algo.aggregation", "must be one of"),
    ("learner.zero_stage=4", "learner.zero_stage", "0, 1, 2 or 3"),
    ("learner.optimizer=adam", "learner.optimizer", "adamw or sgd"),
    ("reference.transport=topk", "reference.transport", "hidden or logits"),
    ("learner.minibatches=5", "trainer.prompts_per_step", "divide evenly"),
    ("reward.functions=[{nme: math}]", "reward.functions[0]", "nme"),
    ("data.source=file", "data.train_path", "required"),
    ("bogus", "bogus", "key=value"),
    ("rollout.resources=[1,2]", "rollout.resources", "incompatible"),  # a list where a mapping goes
])
def test_bad_values_name_the_key(override, key, reason):
    if key is None:
        load_config(DEBUG, [override])
        return
    with pytest.raises(ConfigError) as err:
        load_config(DEBUG, [override])
    message = str(err.value)
    assert "\n" not in message
    assert key in message and reason in message, message


def test_rollout_ahead_needs_the_learners_sampling_distribution():
    assert load_config(DEBUG).trainer.rollout_ahead == 1  # on by default
    with pytest.raises(ConfigError) as err:  # a truncated distribution is not what the learner computes
        load_config(DEBUG, ["rollout.top_p=0.9"])
    assert str(err.value).startswith("rollout.top_p") and "trainer.rollout_ahead=0" in str(err.value)
    cfg = load_config(DEBUG, ["rollout.top_p=0.9", "trainer.rollout_ahead=0"])  # on-policy: any sampling
    assert cfg.trainer.rollout_ahead == 0
    # the learner computes the tempered distribution, so the sampler's log-probs at any T are pi_old
    assert load_config(DEBUG, ["rollout.temperature=0.7"]).rollout.temperature == 0.7


@pytest.mark.parametrize("overrides, key, reason", [
    (["trainer.rollout_ahead=-1"], "trainer.rollout_ahead", ">= 0"),
    (["algo.pi_old=behavior"], "algo.pi_old", "must be one of"),
    (["algo.rollout_correction=icepop"], "algo.rollout_correction", "must be one of"),
    # with pi_old=sampler the ratio already divides by the sampler: a second weight counts it twice
    (["algo.rollout_correction=tis"], "algo.rollout_correction", "needs algo.pi_old=proximal"),
    (["algo.pi_old=proximal", "algo.rollout_correction=tis", "algo.tis_cap=0.5"], "algo.tis_cap", ">= 1"),
    (["algo.pi_old=proximal", "algo.rollout_correction=mis", "algo.mis_bounds=[2.0,0.5]"],
     "algo.mis_bounds", "lo <= 1 <= hi"),
    (["algo.pi_old=proximal", "algo.rollout_correction=mis", "algo.mis_level=batch"],
     "algo.mis_level", "token, sequence"),
    # the proximal objective's weight divides by the sampler's log-probs, of the untruncated distribution
    (["trainer.rollout_ahead=0", "algo.pi_old=proximal", "rollout.top_p=0.9"], "rollout.top_p", "algo.pi_old=proximal"),
])
def test_impossible_off_policy_combinations(overrides, key, reason):
    with pytest.raises(ConfigError) as err:
        load_config(DEBUG, overrides)
    assert str(err.value).startswith(key) and reason in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_off_policy_settings_load():
    cfg = load_config(DEBUG, ["trainer.rollout_ahead=4", "algo.pi_old=proximal",
                              "algo.rollout_correction=mis", "algo.mis_level=sequence"])
    assert (cfg.trainer.rollout_ahead, cfg.algo.pi_old, cfg.algo.mis_level) == (4, "proximal", "sequence")
    defaults = load_config(DEBUG).algo
    assert (defaults.pi_old, defaults.rollout_correction, defaults.tis_cap, defaults.mis_bounds) == (
        "sampler", "none", 2.0, [0.5, 2.0])


@pytest.mark.parametrize("overrides, key, reason", [
    (["rollout.kv_cache_gb=0"], "rollout.kv_cache_gb", "on CPU (rollout.num_gpus=0) needs the KV-cache size"),
    (["rollout.enforce_eager=false"], "rollout.enforce_eager", "runs eager"),
    (["rollout.tensor_parallel_size=2"], "rollout.tensor_parallel_size", "1 GPU per engine"),
    (["rollout.kv_cache_gb=-1"], "rollout.kv_cache_gb", ">= 0"),
    (["rollout.num_gpus=1", "rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization", "(0, 1]"),
])
def test_vllm_engine_settings_are_checked(overrides, key, reason):
    load_config(DEBUG, ["rollout.backend=vllm"])  # the debug config runs vLLM on CPU as it is
    with pytest.raises(ConfigError) as err:
        load_config(DEBUG, ["rollout.backend=vllm", *overrides])
    assert str(err.value).startswith(key) and reason in str(err.value), str(err.value)


@pytest.mark.parametrize("overrides, key, reason", [
    (["learner.lora.rank=-1"], "learner.lora.rank", ">= 0"),
    (["learner.lora.rank=8", "learner.lora.alpha=0"], "learner.lora.alpha", "> 0"),
    (["learner.lora.rank=8", "learner.lora.dropout=1.0"], "learner.lora.dropout", "[0, 1)"),
    (["learner.lora.rank=8", "learner.lora.target_modules=[]"], "learner.lora.target_modules", "non-empty"),
    (["reference.source=adapters_off"], "reference.source", "needs LoRA"),
    (["reference.source=frozen"], "reference.source", "auto, worker or adapters_off"),
    (["learner.lora.rank=8", "sync.lora=deltas"], "sync.lora", "auto, merged or adapters"),
    (["learner.lora.rank=8", "sync.lora=adapters", "rollout.backend=vllm"], "sync.lora", "rollout.backend=hf"),
])
def test_lora_settings_are_checked(overrides, key, reason):
    with pytest.raises(ConfigError) as err:
        load_config(DEBUG, overrides)
    assert str(err.value).startswith(key) and reason in str(err.value), str(err.value)


def test_lora_sync_mode_and_ignored_keys():
    from system.config import lora_sync_mode

    lora = ["learner.lora.rank=8"]
    assert load_config(DEBUG).reference.source == "worker"
    assert load_config(DEBUG, lora).reference.source == "adapters_off"  # auto, made concrete
    assert load_config(DEBUG, [*lora, "reference.source=worker"]).reference.source == "worker"
    assert lora_sync_mode(load_config(DEBUG)) == "full"
    assert lora_sync_mode(load_config(DEBUG, lora)) == "adapters"
    assert lora_sync_mode(load_config(DEBUG, [*lora, "rollout.backend=vllm"])) == "merged"
    assert lora_sync_mode(load_config(DEBUG, [*lora, "sync.lora=merged"])) == "merged"
    assert [w.split(":")[0] for w in ignored_keys(load_config(DEBUG, ["learner.lora.alpha=8"]))] == \
        ["learner.lora.alpha"]
    warned = ignored_keys(load_config(DEBUG, [*lora, "reference.transport=logits"]))
    assert "reference.transport" in [w.split(":")[0] for w in warned]


def test_reversed_clip_bounds_are_rejected():
    with pytest.raises(ConfigError, match="algo.clip"):
        load_config(DEBUG, ["algo.clip_low=0.3", "algo.clip_high=-0.5"])


def test_missing_config_file_and_missing_model_path():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/nope.yaml")
    with pytest.raises(ConfigError, match="model.path"):
        load_config(None, [])


def test_cli_prints_one_line_error_and_exit_code(capsys):
    from system.train import main

    assert main(["--config", DEBUG, "rollout.group_size=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "config error: rollout.group_size: must be >= 2 (group advantages need a group)"


def test_output_dir_inside_rays_working_dir_copy_is_refused(tmp_path, monkeypatch):
    """`ray job submit --working-dir` runs the driver in Ray's per-session copy of the working dir:
    a relative output_dir (the default too) would land there and vanish with the session."""
    import os

    debug = os.path.abspath(DEBUG)
    copy = tmp_path / "session_2026-01-01_00-00-00_000000_1" / "runtime_resources" / "working_dir_files"
    (copy / "_ray_pkg_0123abcd").mkdir(parents=True)
    monkeypatch.chdir(copy / "_ray_pkg_0123abcd")
    for overrides in ([], ["output_dir=outputs"], [f"output_dir={copy / 'out'}"]):
        with pytest.raises(ConfigError) as err:
            load_config(debug, overrides)
        message = str(err.value)
        assert message.startswith("output_dir: ") and "\n" not in message
        assert "absolute path on shared storage" in message
    # an absolute path elsewhere is fine; so is the default outside such a copy
    assert load_config(debug, [f"output_dir={tmp_path / 'out'}"]).output_dir == str(tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    assert load_config(debug).output_dir == "outputs"


def test_keys_the_mode_ignores_get_one_warning_each():
    # the shipped configs are quiet, debug.yaml's vllm settings under backend=hf included
    for path in (DEBUG, "configs/qwen2.5-0.5b-gsm8k.yaml", "configs/qwen2.5-1.5b-math.yaml"):
        assert ignored_keys(load_config(path)) == [], path
    warned = ignored_keys(load_config(DEBUG, ["data.train_path=/data/train.jsonl", "reward.timeout_s=3"]))
    assert [w.split(":")[0] for w in warned] == ["data.train_path", "reward.timeout_s"]
    assert warned[0].startswith("data.train_path: ignored with data.source=synthetic (")
    # a key set to its default is not "set"; the same key is used (no warning) in the mode that reads it
    assert ignored_keys(load_config(DEBUG, ['data.train_path=""', "data.template=plain"])) == []
    assert ignored_keys(load_config(DEBUG, ["reward.num_workers=2", "reward.timeout_s=3"])) == []


def test_cli_prints_the_warning_and_goes_on(tmp_path, capsys):
    from system.train import main

    # a file-source config whose model directory is missing: the warning comes first, then the error
    code = main(["--config", "configs/qwen2.5-0.5b-gsm8k.yaml", f"output_dir={tmp_path}",
                 f"model.path={tmp_path / 'no-model'}", "model.debug_cache=/elsewhere"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2
    assert err[0] == ("config warning: model.debug_cache: ignored with model.path other than debug "
                      "(only model.path=debug builds the debug model)")
    assert err[1].startswith("config error: model.path:")


@pytest.mark.parametrize("gpus, backend", [
    (["learner.num_gpus=1", "rollout.num_gpus=1"], "nccl"),  # each on a GPU of its own
    (["learner.num_gpus=1", "rollout.num_gpus=0.5"], "gloo"),  # rollout workers may share one
    ([], "gloo"),  # CPU
])
def test_sync_backend_auto_is_made_concrete_from_the_gpus(gpus, backend):
    assert load_config(DEBUG, gpus).sync.backend == backend


@pytest.mark.parametrize("overrides, key, reason", [
    # NCCL refuses two ranks of one group on one GPU: tests/gpu gave every role a fraction of one
    (["sync.backend=nccl", "learner.num_gpus=1", "learner.num_ranks=1", "rollout.num_gpus=0.3"],
     "sync.backend", "rollout.num_gpus=0.3"),
    (["sync.backend=nccl", "learner.num_gpus=0.3", "learner.num_ranks=1", "rollout.num_gpus=1"],
     "sync.backend", "sync.backend=gloo, or whole GPUs"),
    (["sync.backend=nccl"], "sync.backend", "learner.num_gpus=0, rollout.num_gpus=0"),
    (["learner.num_gpus=0.5"], "learner.num_gpus", "learner.num_ranks=2"),
    (["sync.timeout_s=0"], "sync.timeout_s", "> 0"),
])
def test_nccl_between_roles_that_share_a_gpu_is_refused_naming_the_fix(overrides, key, reason):
    with pytest.raises(ConfigError) as err:
        load_config(DEBUG, overrides)
    assert str(err.value).startswith(key) and reason in str(err.value), str(err.value)


@pytest.mark.parametrize("overrides, key, reason", [
    (["algo.kl.seq_weight=suffix"], "algo.kl.seq_weight", "must be one of"),
    (["algo.kl.prefix_cap=0.5"], "algo.kl.prefix_cap", ">= 1"),
    (["algo.kl.baseline=mean"], "algo.kl.baseline", "must be one of"),
    (["algo.kl.mode=full_seq", "algo.aggregation=seq-mean-token-mean"], "algo.aggregation", "token sum"),
])
def test_full_seq_settings_name_the_key(overrides, key, reason):
    with pytest.raises(ConfigError) as err:
        load_config(DEBUG, overrides)
    assert str(err.value).startswith(key) and reason in str(err.value), str(err.value)


def test_the_debug_model_cache_is_an_absolute_path(tmp_path, monkeypatch):
    """Actors run in other working directories than the driver that builds the debug model (a
    submitted job's copy of the repository on another node): they get an absolute path."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["model.path=debug", "model.debug_cache=rel/cache"])
    assert cfg.model.debug_cache == str(tmp_path / "rel" / "cache")


def test_full_seq_keys_ignored_by_other_modes():
    cfg = load_config(DEBUG, ["algo.kl.mode=full_seq", "algo.kl.seq_weight=prefix", "algo.kl.prefix_cap=5"])
    assert (cfg.algo.kl.seq_weight, cfg.algo.kl.prefix_cap, ignored_keys(cfg)) == ("prefix", 5.0, [])
    assert [w.split(":")[0] for w in ignored_keys(load_config(DEBUG, ["algo.kl.prefix_cap=5"]))] == \
        ["algo.kl.prefix_cap"]
    assert [w.split(":")[0] for w in ignored_keys(load_config(DEBUG, [
        "algo.kl.mode=full_seq", "algo.kl.prefix_cap=5"]))] == ["algo.kl.prefix_cap"]


@pytest.mark.parametrize("layer, key, where", [
    ("model.debug_settings.task.show_steps=true", "model.debug_settings.task", "data.synthetic"),
    ("rollout.return_logprobs=true", "rollout.return_logprobs", "algo.pi_old"),
    ("model:\n  path: debug\n  debug_settings:\n    task: {n_terms: 4}\n", "model.debug_settings.task",
     "data.synthetic"),
])
def test_moved_keys_name_where_they_went(layer, key, where, tmp_path):
    if "\n" in layer:  # a YAML file of an older release
        path = tmp_path / "old.yaml"
        path.write_text(layer)
        args = (str(path), [])
    else:
        args = (DEBUG, [layer])
    with pytest.raises(ConfigError, match=rf"^{key}: .*{where}"):
        load_config(*args)


@pytest.mark.parametrize("override, reason", [
    ("data.synthetic.n_terms=1", "must be >= 2"),
    ("data.synthetic.ops=+/", "operators"),
    ("data.synthetic.n_train=0", "must be >= 1"),
    ("data.synthetic.max_operand=0", "must be >= 1"),
])
def test_synthetic_task_settings_are_checked(override, reason):
    with pytest.raises(ConfigError, match=rf"^{override.split('=')[0]}: .*{reason}"):
        load_config(DEBUG, [override])


def test_the_synthetic_task_is_data_synthetic():
    cfg = load_config(DEBUG, ["data.synthetic.show_steps=true", "data.synthetic.n_terms=4"])
    assert (cfg.data.synthetic.show_steps, cfg.data.synthetic.n_terms) == (True, 4)
    warned = ignored_keys(load_config(DEBUG, ["data.synthetic.n_terms=4", "data.source=file",
                                              "data.train_path=configs/data/arith_train.jsonl"]))
    assert [w.split(":")[0] for w in warned] == ["data.synthetic"]


def test_every_auto_is_made_concrete_at_load():
    """The saved config shows what the run used: no `auto`/null left for the actors to resolve."""
    lora = ["learner.lora.rank=8"]
    assert load_config(DEBUG, lora).sync.lora == "adapters"
    assert load_config(DEBUG, [*lora, "rollout.backend=vllm"]).sync.lora == "merged"
    assert load_config(DEBUG).sync.lora == "auto"  # no LoRA: the key does not apply (a warning if set)
    assert load_config(DEBUG, ["rollout.backend=vllm"]).rollout.enforce_eager is True  # CPU build
    gpu = ["rollout.backend=vllm", "rollout.num_gpus=1", "learner.num_gpus=1"]
    assert load_config(DEBUG, gpu).rollout.enforce_eager is False
    cfg = load_config(DEBUG, [*lora, "rollout.backend=vllm"])
    assert "auto" not in (cfg.sync.backend, cfg.sync.lora, cfg.reference.source)
