"""Pure tensor functions of the GRPO algorithm: advantages, the policy loss, and KL (exact
full-vocabulary, fused with the output head, and the sampled estimators).

    advantages.py  group_advantages
    losses.py      grpo_loss, aggregate, loss_normalizer, AGGREGATIONS
    kl.py          full_kl_from_logits, fused_logprob_kl, logprobs_from_hidden, logprobs_from_logits,
                   sampled_kl, KL_MODES / get_kl_mode / loss_kl, kl_in_reward
    kl_seq.py      seq_kl_term (full_seq: the sequence KL's gradient), SEQ_WEIGHTS, group_kl_baseline,
                   sequence_kl
    fused_kl.py    the chunked autograd op behind fused_logprob_kl (import it from kl.py)

Conventions: shapes in docstrings and ``# [B, T]`` comments; functions return ``(value, metrics)``
where there are statistics to report, and metrics are detached 0-d tensors (no host sync; the caller
reduces them across ranks and calls .item() when it logs). No logging, no collectives in here.
"""
