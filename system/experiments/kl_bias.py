"""How biased is the gradient of each KL estimator when training is off-policy?

Setting (exact, float64, no sampling noise unless labelled MC): a few states, each with a categorical
policy over a small vocabulary whose logits z are the parameters. pi_old and pi_ref are fixed;
pi_theta has logits z_old + drift * d (d a random unit direction per state), i.e. the policy after
some updates on a batch sampled from pi_old. For every drift level the script computes

    true gradient   d/dz KL(pi_theta || pi_ref), closed form p_v((log p_v - log q_v) - KL), summed over states
    full            autograd of system.algo.kl.full_kl_from_logits at the state (needs no sample)
    k1 k2 k3 k3_is  the expected gradient of the per-token loss term E_{x~pi_old}[k(x)], by exact
                    enumeration: autograd of sum_x pi_old(x) k(logp(x), ref_logp(x), old_logp(x)),
                    with k from system.algo.kl.sampled_kl (k3 differentiated through logp, as usual)
    MC columns      the same with M samples per state drawn from pi_old (empirical frequencies
                    instead of pi_old), root-mean-square error over many draws: bias plus variance

and prints the relative error ||g_est - g_true|| / ||g_true|| per column, then plots it.

What to expect: `full` sits at floating-point level at every drift. k3 is biased even at drift 0
(its expected gradient is -E_{x~pi_ref}[grad log pi_theta(x)], the gradient of the *reverse* KL) and
the bias changes with drift. k3_is is exactly unbiased in expectation (E_{pi_old}[ratio * k3] equals
E_{pi_theta}[k3] = KL as a function of theta), but its sampled version gets noisier as the importance
ratios spread. k2 is unbiased on-policy only; k1's expected gradient is 0 on-policy.

Run:
    python -m system.experiments.kl_bias                    # table on stdout, plot in docs/kl_bias.png
    python -m system.experiments.kl_bias --vocab 16 --states 8 --samples 256 --out /tmp/kl_bias.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from system.algo.kl import ESTIMATORS, full_kl_from_logits, sampled_kl
from system.experiments import save_figure

DRIFTS = (0.0, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
MC_ESTIMATORS = ("k3", "k3_is")


def make_states(n_states: int, vocab: int, seed: int):
    """Fixed logits of pi_old and pi_ref [S, V] and unit drift directions d [S, V] (zero-sum: softmax
    is shift invariant)."""
    g = torch.Generator().manual_seed(seed)
    z_old = 1.5 * torch.randn(n_states, vocab, generator=g, dtype=torch.float64)
    z_ref = z_old + 0.5 * torch.randn(n_states, vocab, generator=g, dtype=torch.float64)
    d = torch.randn(n_states, vocab, generator=g, dtype=torch.float64)
    d = d - d.mean(-1, keepdim=True)
    return z_old, z_ref, d / d.norm(dim=-1, keepdim=True)


def true_grad(z: torch.Tensor, z_ref: torch.Tensor) -> torch.Tensor:
    """Closed-form d/dz sum_s KL(softmax(z_s) || softmax(z_ref_s)) [S, V]."""
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(z_ref, -1)
    p = logp.exp()
    kl = (p * (logp - logq)).sum(-1, keepdim=True)
    return p * (logp - logq - kl)


def full_grad(z: torch.Tensor, z_ref: torch.Tensor) -> torch.Tensor:
    z = z.clone().requires_grad_()
    (g,) = torch.autograd.grad(full_kl_from_logits(z, z_ref).sum(), z)
    return g


def estimator_grad(name: str, z, z_ref, z_old, weights: torch.Tensor) -> torch.Tensor:
    """d/dz sum_{s,x} weights[s, x] * k(x): weights = pi_old (exact expectation) or sample frequencies."""
    z = z.clone().requires_grad_()
    logp = torch.log_softmax(z, -1)  # [S, V]: log-prob of every possible sampled token x
    ref_logp, old_logp = torch.log_softmax(z_ref, -1), torch.log_softmax(z_old, -1)
    k = sampled_kl(logp, ref_logp, name, old_logp=old_logp)  # [S, V]
    (g,) = torch.autograd.grad((weights * k).sum(), z)
    return g


def rel_err(g: torch.Tensor, g_true: torch.Tensor) -> float:
    return ((g - g_true).norm() / g_true.norm()).item()


def run(vocab: int, n_states: int, samples: int, trials: int, seed: int):
    """Rows of (drift, KL(theta||old), {column: relative gradient error})."""
    z_old, z_ref, d = make_states(n_states, vocab, seed)
    p_old = torch.softmax(z_old, -1)
    gen = torch.Generator().manual_seed(seed + 1)
    rows = []
    for drift in DRIFTS:
        z = z_old + drift * d
        g_true = true_grad(z, z_ref)
        errs = {"full": rel_err(full_grad(z, z_ref), g_true)}
        for name in ESTIMATORS:
            errs[name] = rel_err(estimator_grad(name, z, z_ref, z_old, p_old), g_true)
        for name in MC_ESTIMATORS:
            # The estimate is linear in the sample frequencies: precompute grad k(x) for every x.
            per_x = torch.stack(
                [estimator_grad(name, z, z_ref, z_old, onehot) for onehot in torch.eye(vocab, dtype=z.dtype)], 1
            )  # [S, V(x), V(z)]
            draws = torch.multinomial(p_old.repeat(trials, 1), samples, replacement=True, generator=gen)
            freq = torch.zeros(trials * n_states, vocab, dtype=z.dtype).scatter_add_(
                1, draws, torch.ones_like(draws, dtype=z.dtype)
            ).view(trials, n_states, vocab) / samples  # [trials, S, V]
            g_mc = torch.einsum("tsx,sxv->tsv", freq, per_x)  # [trials, S, V]
            err = (g_mc - g_true).flatten(1).norm(dim=1) / g_true.norm()  # [trials]
            errs[f"{name} MC{samples}"] = err.pow(2).mean().sqrt().item()
        kl_old = full_kl_from_logits(z, z_old).mean().item()
        rows.append((drift, kl_old, errs))
    return rows


def format_table(rows, samples: int, trials: int) -> str:
    cols = list(rows[0][2])
    head = f"{'drift':>6} {'KL(th||old)':>11} " + " ".join(f"{c:>10}" for c in cols)
    lines = [head, "-" * len(head)]
    for drift, kl_old, errs in rows:
        lines.append(f"{drift:>6.2f} {kl_old:>11.4f} " + " ".join(f"{errs[c]:>10.2e}" for c in cols))
    lines.append(
        "relative gradient error ||g_est - g_true|| / ||g_true||, float64. Columns without MC: exact "
        f"expectation over x ~ pi_old by enumeration. MC{samples}: {samples} samples/state from pi_old, "
        f"RMS over {trials} draws (bias + variance)."
    )
    return "\n".join(lines)


def plot(rows, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drifts = [r[0] for r in rows]
    floor = 1e-17  # exact zeros on a log axis
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in rows[0][2]:
        ys = [max(r[2][c], floor) for r in rows]
        ax.plot(drifts, ys, "--" if "MC" in c else "-", marker="o", ms=3, label=c)
    ax.set_yscale("log")
    ax.set_xlabel("drift of pi_theta from pi_old (logit-space distance per state)")
    ax.set_ylabel("relative error of the KL gradient")
    ax.set_title("Expected gradient of KL estimators vs grad KL(pi_theta || pi_ref)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    save_figure(fig, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=12, help="vocabulary size of the toy policy")
    ap.add_argument("--states", type=int, default=4, help="number of states (contexts)")
    ap.add_argument("--samples", type=int, default=64, help="samples per state for the MC columns")
    ap.add_argument("--trials", type=int, default=200, help="independent draws for the MC RMS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("docs/kl_bias.png"), help="where to save the plot")
    args = ap.parse_args(argv)

    rows = run(args.vocab, args.states, args.samples, args.trials, args.seed)
    print(f"vocab={args.vocab} states={args.states} seed={args.seed}")
    print(format_table(rows, args.samples, args.trials))
    worst_full = max(r[2]["full"] for r in rows)
    if worst_full > 1e-12:
        raise SystemExit(f"full-vocabulary KL gradient error {worst_full:.2e}: expected floating-point level")
    plot(rows, args.out)
    print(f"plot saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
