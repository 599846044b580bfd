"""PNG figures of the evals (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def format_length(n: int) -> str:
    """512 -> '512', 4096 -> '4k', 131072 -> '128k', 1536 -> '1.5k'."""
    if n >= 1024 and n % 512 == 0:
        k = n / 1024
        return f"{k:g}k"
    return str(n)


def niah_heatmap(path: str | Path, lengths: Sequence[int], depths: Sequence[float], accuracy: Sequence[Sequence[float]],
                 title: str) -> Path:
    """Accuracy (0..100) as a depth x length grid; accuracy[d][l] for depths[d], lengths[l]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(3.0 + 0.8 * max(len(lengths), 2), 2.0 + 0.4 * max(len(depths), 2)))
    im = ax.imshow(accuracy, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(accuracy):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_curves(path: str | Path, curves: Sequence[tuple[str, Sequence[float], Sequence[float]]], title: str,
                ylabel: str = "next-token loss (nats)", train_lengths: Sequence[int | None] | None = None) -> Path:
    """One line per (label, positions, losses), log-scaled x; a dotted vertical line of the same
    colour marks each curve's training length when given and inside the plotted range."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for n, (label, x, y) in enumerate(curves):
        (line,) = ax.plot(x, y, label=label, linewidth=1.4)
        L = train_lengths[n] if train_lengths else None
        if L and x and L < max(x):
            ax.axvline(L, color=line.get_color(), linestyle=":", linewidth=1.0)
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
