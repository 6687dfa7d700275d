"""Pictures a person would rather look at than read: LR-finder curves and training curves."""

from __future__ import annotations

import io

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def lr_find_plot(lrs: list[float], losses: list[float], suggestion: float) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested lr {suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("smoothed training loss")
    ax.set_title("LR finder")
    ax.legend()
    return _png(fig)


def training_curves(history: list[dict], title: str = "") -> bytes:
    """Train loss per epoch, and every validation metric, one panel each."""
    val_keys = sorted({k for h in history for k, v in h.items()
                       if k.startswith("val_") and isinstance(v, (int, float)) and not k.endswith("bicubic")})
    n = 1 + len(val_keys)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    x = list(range(1, len(history) + 1))
    axes[0][0].plot(x, [h.get("train_loss") for h in history], marker="o")
    axes[0][0].set_title("train loss")
    for ax, k in zip(axes[0][1:], val_keys):
        ax.plot(x, [h.get(k) for h in history], marker="o", label="model")
        if any(f"{k}_bicubic" in h for h in history):
            ax.plot(x, [h.get(f"{k}_bicubic") for h in history], linestyle="--", label="bicubic")
            ax.legend()
        ax.set_title(k)
    for ax in axes[0]:
        ax.set_xlabel("epoch (all stages)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, y=1.03)
    return _png(fig)
