"""Weight sync into a vLLM engine (CPU build): after the learners have trained, the engine
generates exactly what the learner's own weights generate; a wrong weight in the engine fails the
checksum and the sync is retried."""

from __future__ import annotations

import pytest

from tests.integration.conftest import build_trainer, stop_trainer
from tests.vllm.conftest import VLLM_OVERRIDES, learner_greedy

pytestmark = pytest.mark.slow

CORRUPTED = 7  # the policy version whose first sync rollout worker 0 loads one value off by +1


@pytest.fixture(scope="module")
def trainer(actor_pool, tmp_path_factory):
    # a large learning rate, so that two updates change the greedy answers; on the session's
    # actors, which test_run.py then uses too
    t = build_trainer(tmp_path_factory.mktemp("vllm_sync"),
                      [*VLLM_OVERRIDES, "learner.lr=1e-2", f"faults.corrupt_sync_at=[{CORRUPTED}]"],
                      pool=actor_pool)
    yield t
    stop_trainer(t, actor_pool)


def _heldout(trainer) -> list[list[int]]:
    return [r["prompt_ids"] for r in trainer.prompts.heldout[:64]]


def test_after_training_vllm_greedy_equals_the_learners(trainer):
    from tests.integration.test_pipeline import _one_batch

    prompts, n = _heldout(trainer), trainer.cfg.rollout.max_new_tokens
    before = trainer.generate(prompts, 1, seed=0, greedy=True)
    for _ in range(2):
        batch, rewards = _one_batch(trainer)
        trainer.learn(batch, rewards, trainer.reference_rows(batch))
        trainer.version += 1
        trainer.actors.sync(trainer.version)  # raises ChecksumMismatch if the engine's weights differ
    after = trainer.generate(prompts, 1, seed=0, greedy=True)
    assert after != before, "two updates at lr 1e-2 changed no greedy answer: nothing was tested"
    assert after == learner_greedy(trainer, prompts, n)
    assert trainer.rollout.call("get_version") == [trainer.version]


def test_a_wrong_weight_in_the_engine_fails_the_checksum_and_is_retried(trainer, capsys):
    prompts, n = _heldout(trainer), trainer.cfg.rollout.max_new_tokens
    trainer.version = CORRUPTED  # its first sync loads one value wrong; the retry loads it right
    capsys.readouterr()
    trainer.faults.sync()
    out = capsys.readouterr().out
    assert "[faults] weight sync: rollout worker 0 checksum" in out
    assert f"(policy version {CORRUPTED}): retrying the sync once" in out
    assert out.count("retrying the sync once") == 1
    assert trainer.generate(prompts, 1, seed=0, greedy=True) == learner_greedy(trainer, prompts, n)
