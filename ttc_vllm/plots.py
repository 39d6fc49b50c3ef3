"""The accuracy-vs-compute figure every report of ttc-vllm draws (the demo, `job evaluate`,
the benchmarks): matplotlib without a display, one axes style, one way to save."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def style_accuracy_vs_tokens(ax, title: str, *, log_x: bool = True, y_max: float = 100,
                             legend_size: float = 7) -> None:
    """An accuracy-vs-generated-tokens panel: log x (unless `log_x` is false), 0-`y_max` %,
    grid, title and legend."""
    plt = pyplot()
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_ylim(0, y_max)
    ax.set_title(title)
    ax.set_xlabel("generated tokens per problem (log)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc="lower right")


def save_figure(fig, path: Path) -> None:
    """Lay out, write the PNG (120 dpi), and free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
