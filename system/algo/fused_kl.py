"""Chunked output-head ops: log-prob of the sampled token and exact full-vocabulary KL from hidden states.

The learner never materialises [N, V] logits. ``fused_logprob_kl`` takes the policy's final hidden
states and output head plus the reference model's hidden states and (frozen) output head, and walks
over the N tokens in chunks of ``chunk_size`` rows. Per chunk it forms both [chunk, V] logit blocks and
from them the sampled token's log-prob, the per-row KL(pi_theta || pi_ref) and the policy entropy. Backward recomputes the same blocks chunk by chunk (custom autograd), so forward and backward
each hold O(chunk_size x V) floats, never O(N x V). docs/design.md (section 2) says why.

Numerics: all softmax/KL math and all matmul accumulation are fp32 (fp64 when the inputs are fp64,
so ``torch.autograd.gradcheck`` works). Low-precision inputs (bf16/fp16) are upcast: the hidden chunk
per chunk and the output head once per call (a transient V x H fp32 copy). Gradients come back in the
input dtype; the head's gradient is accumulated in fp32 across chunks.

Chunks span the whole vocabulary (no online softmax over vocabulary blocks yet), so the rows per
chunk follow the vocabulary: by default (chunk_size=None) ``auto_chunk_size(V)`` = CHUNK_ELEMENTS // V
rows, so that one [chunk, V] fp32 buffer is 128 MiB whatever V is (1024 rows at V = 32768, 220 at
Qwen's V = 151936, where a fixed 1024 rows would hold 1.8 GiB).

These functions are re-exported by ``system.algo.kl``; import them from there.
"""

from __future__ import annotations

import torch

# Elements per [chunk, V] buffer. Forward holds three such fp32 buffers, backward two (384 MiB /
# 256 MiB). Tuned with tests/benchmarks/kl_memory.py (1024 rows at V = 32768).
CHUNK_ELEMENTS = 2**25


def auto_chunk_size(vocab: int) -> int:
    """Rows per chunk for a vocabulary of `vocab`: CHUNK_ELEMENTS // vocab, at least 1."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def _rows(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None or chunk_size == 0:
        return auto_chunk_size(vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None/0 for auto), got {chunk_size}")
    return int(chunk_size)


def compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: what the log-softmax and the KL run in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _shift_exp_(z: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place over the last dim of logits z [c, V]: z <- z - max(z), scratch <- exp(z - max(z)).
    Returns (max [c, 1], log sum exp(z - max) [c, 1]); logsumexp(z) = max + log_sum.

    Written out because torch.logsumexp / log_softmax allocate fresh [c, V] tensors, which cost more
    than the arithmetic on CPU. The shifted logits stay small where the probability mass is, so the
    entropy and KL below lose no precision to large logit offsets.
    """
    m = z.amax(dim=-1, keepdim=True)  # [c, 1]
    z.sub_(m)
    torch.exp(z, out=scratch)
    return m, scratch.sum(dim=-1, keepdim=True).log_()


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) for [c, V] inputs without a [c, V] temporary. Returns [c]."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _logits_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, temperature: float) -> None:
    """out[c, V] <- (h[c, H] @ w[V, H].T) / temperature, in out's dtype (w already in that dtype)."""
    h = h.to(out.dtype)
    if temperature != 1.0:
        h = h / temperature  # scale the small [c, H] side, not the [c, V] logits
    torch.mm(h, w.t(), out=out)


def _ref_logits_into(out: torch.Tensor, ref_rows: torch.Tensor, ref_weight, temperature: float) -> None:
    """Reference logits of one chunk: from hidden states and the head, or given (ref_weight None)."""
    if ref_weight is None:
        torch.div(ref_rows.to(out.dtype), temperature, out=out)
    else:
        _logits_into(out, ref_rows, ref_weight, temperature)


class _FusedLogprobKL(torch.autograd.Function):
    """(hidden, weight, ref_hidden, ref_weight, tokens) -> (logp [N], kl [N], entropy [N]).

    Per row, with z, zr the policy and reference logits, m = max z, S = sum exp(z - m) (and m_r, S_r):
    log p = (z - m) - log S, so
        KL = sum_v p_v ((z - m) - (zr - m_r)) + log S_r - log S,   H = log S - sum_v p_v (z - m).
    Forward saves only m, log S, m_r, log S_r and KL per row ([N] each) for the backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, tokens, chunk_size, temperature):
        n, vocab = hidden.shape[0], weight.shape[0]
        cdt = compute_dtype(hidden)
        w = weight.detach().to(cdt)  # [V, H]
        rw = ref_weight.detach().to(cdt) if ref_weight is not None else None  # [V, H'] or logits given
        c_max = max(1, min(chunk_size, n))
        z_buf = hidden.new_empty(c_max, vocab, dtype=cdt)  # policy logits (shifted)
        zr_buf = hidden.new_empty(c_max, vocab, dtype=cdt)  # reference logits (shifted), then difference
        p_buf = hidden.new_empty(c_max, vocab, dtype=cdt)  # exp scratch, then policy probs
        logp, kl, entropy = (hidden.new_empty(n, dtype=cdt) for _ in range(3))
        stats = hidden.new_empty(4, n, 1, dtype=cdt)  # m, log S, m_r, log S_r

        for s in range(0, n, c_max):
            e = min(s + c_max, n)
            z, zr, p = z_buf[: e - s], zr_buf[: e - s], p_buf[: e - s]  # [c, V] each
            _ref_logits_into(zr, ref_hidden[s:e].detach(), rw, temperature)
            m_r, log_s_r = _shift_exp_(zr, p)
            _logits_into(z, hidden[s:e].detach(), w, temperature)
            m, log_s = _shift_exp_(z, p)
            p.div_(log_s.exp())  # softmax
            logp[s:e] = (z.gather(1, tokens[s:e, None]) - log_s).squeeze(1)
            entropy[s:e] = log_s.squeeze(1) - _rowdot(p, z)
            torch.sub(z, zr, out=zr)
            kl[s:e] = _rowdot(p, zr) + (log_s_r - log_s).squeeze(1)
            for i, t in enumerate((m, log_s, m_r, log_s_r)):
                stats[i, s:e] = t

        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, tokens, stats, kl)
        ctx.chunk_size, ctx.temperature = c_max, temperature
        ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)
        return logp, kl, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_kl, _grad_entropy):
        hidden, weight, ref_hidden, ref_weight, tokens, stats, kl = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp is None and grad_kl is None) or not (need_h or need_w):
            return None, None, None, None, None, None, None
        n, vocab = hidden.shape[0], weight.shape[0]
        c_max, temperature = ctx.chunk_size, ctx.temperature
        cdt = kl.dtype
        w = weight.detach().to(cdt)  # [V, H]
        rw = ref_weight.detach().to(cdt) if grad_kl is not None and ref_weight is not None else None
        grad_h = hidden.new_empty(hidden.shape, dtype=cdt) if need_h else None  # [N, H]
        grad_w = weight.new_zeros(weight.shape, dtype=cdt) if need_w else None  # [V, H], fp32 accumulator
        z_buf = hidden.new_empty(c_max, vocab, dtype=cdt)
        g_buf = hidden.new_empty(c_max, vocab, dtype=cdt) if grad_kl is not None else None

        for s in range(0, n, c_max):
            e = min(s + c_max, n)
            m, log_s, m_r, log_s_r = stats[:, s:e]  # [c, 1] each
            inv_s = (-log_s).exp()  # p = exp(z - m) * inv_s
            gl = grad_logp[s:e, None].to(cdt) if grad_logp is not None else None  # [c, 1]
            z = z_buf[: e - s]  # [c, V]
            _logits_into(z, hidden[s:e].detach(), w, temperature)
            if grad_kl is not None:
                # dKL/dz_v = p_v (log p_v - log q_v - KL), dlogp/dz = onehot - p; both in one pass:
                # g = exp(z - m) * (a * (z - zr) + b) (+ onehot * gl), with the per-row constants
                # a = gk / S, b = (gk * ((m_r - m) + (log S_r - log S) - KL) - gl) / S.
                gk = grad_kl[s:e, None].to(cdt)
                b = gk * ((m_r - m) + (log_s_r - log_s) - kl[s:e, None])
                if gl is not None:
                    b = b - gl
                g = g_buf[: e - s]
                _ref_logits_into(g, ref_hidden[s:e].detach(), rw, temperature)
                torch.sub(z, g, out=g)  # z - zr
                torch.addcmul(b * inv_s, g, gk * inv_s, out=g)
                g.mul_(z.sub_(m).exp_())
            else:
                g = z.sub_(m).exp_().mul_(-gl * inv_s)  # -p * grad_logp
            if gl is not None:
                g.scatter_add_(1, tokens[s:e, None], gl)  # + onehot * grad_logp
            # z = (h / T) @ W.T, so dz/dh = W / T and dz/dW = h / T.
            h = hidden[s:e].detach().to(cdt)
            if temperature != 1.0:
                h = h / temperature
            if need_h:
                torch.mm(g, w, out=grad_h[s:e])
                if temperature != 1.0:
                    grad_h[s:e].div_(temperature)
            if need_w:
                grad_w.addmm_(g.t(), h)

        grad_h = grad_h.to(hidden.dtype) if need_h else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None, None


def fused_logprob_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    tokens: torch.Tensor,
    chunk_size: int | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """Sampled-token log-prob and exact full-vocabulary KL(pi_theta || pi_ref), chunked over tokens.

    logits     = hidden @ weight.T / temperature          (never materialised beyond one chunk)
    ref_logits = ref_hidden @ ref_weight.T / temperature  (same temperature on both sides)
    logp[i]    = log_softmax(logits[i])[tokens[i]]
    kl[i]      = sum_v p_iv (log p_iv - log q_iv),   p = softmax(logits), q = softmax(ref_logits)

    Differentiable with respect to ``hidden`` and ``weight`` only; the reference side gets no
    gradient. The head may be tied (``weight is ref_weight``) or not; H' may differ from H.

    Args:
        hidden: [..., H] policy final hidden states (any float dtype).
        weight: [V, H] policy output head.
        ref_hidden: [..., H'] reference final hidden states, same leading shape as ``hidden``.
        ref_weight: [V, H'] frozen reference output head, or None when ``ref_hidden`` already holds
            the reference logits [..., V] (the `logits` transport).
        tokens: [...] int64 sampled token ids, all in [0, V).
        chunk_size: rows per chunk; memory is O(chunk_size * V). None (or 0): auto_chunk_size(V).
        temperature: sampling temperature the rollout used; divides both sides' logits.
        return_entropy: also return the policy entropy per row (free: same pass; detached).

    Returns:
        logp [...], kl [...] (and entropy [...] if ``return_entropy``), float32 (float64 for
        float64 inputs).
    """
    lead = hidden.shape[:-1]
    if ref_hidden.shape[:-1] != lead or tokens.shape != lead:
        raise ValueError(
            f"leading shapes differ: hidden {tuple(hidden.shape)}, ref_hidden {tuple(ref_hidden.shape)}, "
            f"tokens {tuple(tokens.shape)}"
        )
    if ref_weight is None:  # ref_hidden are the reference logits themselves ([..., V])
        if ref_hidden.shape[-1] != weight.shape[0]:
            raise ValueError(f"reference logits {tuple(ref_hidden.shape)} do not match vocabulary {weight.shape[0]}")
    elif weight.shape[0] != ref_weight.shape[0]:
        raise ValueError(f"vocabulary sizes differ: weight {tuple(weight.shape)}, ref_weight {tuple(ref_weight.shape)}")
    chunk_size = _rows(chunk_size, weight.shape[0])
    logp, kl, entropy = _FusedLogprobKL.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        ref_hidden.reshape(-1, ref_hidden.shape[-1]),
        ref_weight,
        tokens.reshape(-1).long(),
        int(chunk_size),
        float(temperature),
    )
    out = (logp.view(lead), kl.view(lead))
    return out + (entropy.view(lead),) if return_entropy else out


@torch.no_grad()
def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    chunk_size: int | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[tokens], chunked, no gradient.

    For pi_old / pi_ref log-probs of the sampled tokens. hidden [..., H], weight [V, H],
    tokens [...] int64 -> [...] float32 (float64 for float64 inputs).
    """
    lead = hidden.shape[:-1]
    h2, tok = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    n, cdt = h2.shape[0], compute_dtype(hidden)
    w = weight.detach().to(cdt)
    c_max = max(1, min(_rows(chunk_size, weight.shape[0]), n))
    z_buf = h2.new_empty(c_max, weight.shape[0], dtype=cdt)
    scratch = torch.empty_like(z_buf)
    out = h2.new_empty(n, dtype=cdt)
    for s in range(0, n, c_max):
        e = min(s + c_max, n)
        z = z_buf[: e - s]
        _logits_into(z, h2[s:e], w, temperature)
        _, log_s = _shift_exp_(z, scratch[: e - s])
        out[s:e] = (z.gather(1, tok[s:e, None]) - log_s).squeeze(1)
    return out.view(lead)
