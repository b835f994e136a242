"""The needle grid as a PNG heat map, laid out as the published needle-in-a-haystack plots: context length
on x, needle depth on y (0% at the top), colour the score. matplotlib is the optional extra `plot`,
imported only here."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qwen_ref.errors import QwenRefError


def require_matplotlib():
    """matplotlib.pyplot with a non-interactive backend, or one clear error (checked before a long run starts)."""
    try:
        import matplotlib
    except ImportError:
        raise QwenRefError("the heat map needs matplotlib: pip install 'qwen-ref[plot]' (or pass --no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _context_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _panel(fig, ax, colours, values: np.ndarray, contexts: Sequence[int], depths: Sequence[float], title: str,
           colorbar: str, vmin: float, vmax: float, fmt: str) -> None:
    image = ax.imshow(np.ma.masked_invalid(values), cmap=colours, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(contexts)), [_context_label(c) for c in contexts])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("Context length (tokens)")
    ax.set_ylabel("Needle depth (% of the haystack)")
    ax.set_title(title)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            r, g, b, _ = colours(image.norm(v))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.45  # white figures on the dark ends of the scale
            ax.text(j, i, "-" if math.isnan(v) else format(v, fmt), ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")
    fig.colorbar(image, ax=ax, label=colorbar)


def write_heatmap(path: Path, model_name: str, contexts: Sequence[int], depths: Sequence[float],
                  exact: np.ndarray, mean_logprob: np.ndarray) -> None:
    """Two panels side by side: exact retrieval (0 or 1) and the answer's mean log-probability per token;
    both [depths, contexts], nan for cells not run."""
    plt = require_matplotlib()
    colours = plt.get_cmap("RdYlGn").with_extremes(bad="#dddddd")  # red low, green high; grey: not run yet
    fig, (left, right) = plt.subplots(1, 2, figsize=(6 + 1.6 * len(contexts), 1.5 + 0.55 * len(depths)),
                                      constrained_layout=True)
    _panel(fig, left, colours, exact, contexts, depths, "Exact retrieval (greedy answer)", "Score (1 = found)",
           0.0, 1.0, ".0f")
    finite = mean_logprob[np.isfinite(mean_logprob)]
    low = float(finite.min()) if finite.size else -1.0
    high = float(finite.max()) if finite.size else 0.0
    if high - low < 1e-3:  # a flat grid still gets a readable scale
        low, high = low - 0.5, high + 0.5
    _panel(fig, right, colours, mean_logprob, contexts, depths, "Answer log-likelihood",
           "Mean log p per answer token (nats)", low, high, ".2f")
    fig.suptitle(f"Needle in a haystack: {model_name}")
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise QwenRefError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
