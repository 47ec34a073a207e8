"""Experiments that measure the project's claims (run each with python -m system.experiments.<name>)."""


def save_figure(fig, out) -> None:
    """Lay out a matplotlib figure, write it to `out` (a Path; folders made) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
