"""`qwen-ref compare A B --plot FILE.png` on two traces: NMSE per layer and name, the threshold and the culprit.

matplotlib is an optional extra (`pip install 'qwen-ref[plot]'`), imported only here and only when asked.
"""

from __future__ import annotations

import math
from pathlib import Path

from qwen_ref.errors import QwenRefError
from qwen_ref.trace import LAYER_NAMES, parse_key
from qwen_ref.trace_diff import TraceDiff


def plot(diff: TraceDiff, path: Path) -> None:
    """A PNG of NMSE per layer, one line per name, on a log scale, with the threshold and the culprit marked."""
    try:
        # no pyplot: no global figure state, no display backend
        from matplotlib import colormaps
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise QwenRefError("--plot needs matplotlib: pip install 'qwen-ref[plot]'") from None
    finite = [d.nmse for d in diff.tensors.values() if 0 < d.nmse < math.inf]
    floor = min([*finite, diff.max_nmse]) / 10  # where exact agreement (NMSE 0) is drawn
    ceiling = max([*finite, diff.max_nmse]) * 10  # where non-finite values (NMSE inf) are drawn
    fig = Figure(figsize=(10, 6))
    ax = fig.add_subplot()
    ax.set_prop_cycle(color=colormaps["tab20"].colors)  # a colour of its own for each of the 15 names
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    layers = [layer for key in diff.tensors if (layer := parse_key(key)[1]) is not None]
    # the tensors outside the layers stand one step before the first layer and one after the last
    where = {"inp_embd": min(layers, default=0) - 1, "result_norm": max(layers, default=-1) + 1}
    where["result_output"] = where["result_norm"]

    def x_of(key: str) -> int:
        name, layer = parse_key(key)
        return where[name] if layer is None else layer

    def y_of(key: str) -> float:
        return min(max(diff.tensors[key].nmse, floor), ceiling)

    for name in LAYER_NAMES:
        points = [(x_of(k), y_of(k)) for k in diff.tensors if parse_key(k)[0] == name]
        if points:
            ax.plot(*zip(*points), marker=".", label=name)
    for name, marker in (("inp_embd", "s"), ("result_norm", "^"), ("result_output", "v")):
        if name in diff.tensors:
            ax.plot(x_of(name), y_of(name), marker, color="black", fillstyle="none", label=name)
    ax.axhline(diff.max_nmse, color="black", linestyle="--", label="threshold")
    if diff.culprit is not None:
        ax.plot(x_of(diff.culprit.key), y_of(diff.culprit.key), "rx", markersize=14,
                label=f"first culprit {diff.culprit.key}")
    ax.set_yscale("log")
    ax.set_xlabel("layer (inp_embd before the first, result_* after the last)")
    ax.set_ylabel(f"NMSE (0 drawn at {floor:.0e}, non-finite at {ceiling:.0e})")
    ax.set_title("culprit: " + (diff.culprit.key if diff.culprit else "none"))
    ax.legend(fontsize="small", ncol=2)
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise QwenRefError(f"cannot write {path}: {exc.strerror or exc}") from None
