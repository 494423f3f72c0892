"""Pictures people look at before they read: histograms, grids, curves. Matplotlib, Agg backend."""

from __future__ import annotations

import io

import numpy as np


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def weight_histograms(weights: dict[str, np.ndarray], titles: dict[str, str] | None = None) -> bytes:
    """One panel per domain: the distribution of importance weights on a log axis (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(weights), figsize=(5.5 * len(weights), 3.6), squeeze=False)
    for ax, (name, w) in zip(axes[0], weights.items()):
        w = np.asarray(w, dtype=np.float64)
        pos = w[w > 0]
        lo, hi = (pos.min(), pos.max()) if pos.size else (1e-3, 1.0)
        bins = np.logspace(np.log10(lo), np.log10(hi * 1.0001) if hi > lo else np.log10(lo) + 1, 40)
        ax.hist(pos, bins=bins, color="tab:blue" if name == "syn" else "tab:orange", alpha=0.85)
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        zeros = int((w == 0).sum())
        ax.set_title((titles or {}).get(name, name) + (f"  ({zeros} zero)" if zeros else ""))
        ax.set_xlabel("weight (log scale; dashed = 1)")
        ax.set_ylabel("samples")
    fig.tight_layout()
    return _figure_bytes(fig)
