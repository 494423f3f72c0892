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


def _smooth(values: np.ndarray, factor: float) -> np.ndarray:
    """TensorBoard-style exponential smoothing (the paper's Figure 7 uses 0.5)."""
    out = np.empty(len(values), dtype=np.float64)
    last = values[0] if len(values) else 0.0
    for i, v in enumerate(values):
        last = factor * last + (1 - factor) * v
        out[i] = last
    return out


def loss_curves(runs: dict[str, list[dict]], keys: tuple[str, ...] = ("gen_total", "dis_total"),
                smoothing: float = 0.5, titles: dict[str, str] | None = None) -> bytes:
    """Generator and discriminator loss curves (PNG bytes), one panel per key, one line per run:
    `runs` maps a label (e.g. "random pairs", "SP-Feat") to records with "step" and the keys
    (metrics.jsonl lines). Raw values faint, smoothed values solid, as the paper's Figure 7.
    `titles`: a panel title per key (default: "generator loss (gen_total)" and the like)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (label, records) in enumerate(runs.items()):
            rows = [r for r in records if key in r]
            if not rows:
                continue
            steps = np.array([r["step"] for r in rows])
            values = np.array([r[key] for r in rows], dtype=np.float64)
            color = f"C{i}"
            ax.plot(steps, values, color=color, alpha=0.25, lw=0.8)
            ax.plot(steps, _smooth(values, smoothing), color=color, lw=1.5, label=label)
        default = {"gen_total": "generator", "dis_total": "discriminator"}.get(key, key) + f" loss ({key})"
        ax.set_title((titles or {}).get(key, default))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend()
    fig.tight_layout()
    return _figure_bytes(fig)


def image_grid(columns: list[np.ndarray], gap: int = 2) -> bytes:
    """PNG bytes of a grid: column j shows the images of columns[j] (each (N, H, W, 3) uint8),
    row i the i-th image of every column; e.g. synthetic | translated | paired real."""
    from PIL import Image

    n, h, w, _ = columns[0].shape
    grid = np.full((n * h + (n - 1) * gap, len(columns) * w + (len(columns) - 1) * gap, 3), 255, np.uint8)
    for j, col in enumerate(columns):
        for i in range(n):
            grid[i * (h + gap): i * (h + gap) + h, j * (w + gap): j * (w + gap) + w] = col[i]
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()


def confusion_matrix(cm: np.ndarray, names: list[str] | tuple[str, ...], title: str = "") -> bytes:
    """PNG bytes of a confusion matrix (rows: ground truth, columns: prediction), each row
    normalised by its ground-truth pixels; a row without any is left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.full_like(cm, np.nan), where=rows > 0)
    n = len(names)
    fig, ax = plt.subplots(figsize=(0.42 * n + 2.5, 0.42 * n + 1.5))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    for i in range(n):
        for j in range(n):
            if np.isfinite(share[i, j]) and share[i, j] >= 0.005:
                ax.text(j, i, f"{100 * share[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04, label="share of the row's ground-truth pixels")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _figure_bytes(fig)


def iou_bars(rows: list[tuple[str, float]], title: str = "") -> bytes:
    """PNG bytes of horizontal bars: IoU per class (fractions 0..1), classes in the given order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, values = [n for n, _ in rows], [100 * v for _, v in rows]
    fig, ax = plt.subplots(figsize=(6.5, 0.28 * len(rows) + 1.2))
    ax.barh(range(len(rows)), values, color="tab:green")
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    for y, v in enumerate(values):
        ax.text(min(v + 1, 92), y, f"{v:.1f}", va="center", fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _figure_bytes(fig)
