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


# ------------------------------------------------------------------------------------------ eval pictures
def _cell(ax, img, title: str = "", **kw) -> None:
    ax.imshow(img, interpolation="nearest", **kw)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def sr_sheet(rows, scale: int, protocol: str, model_name: str) -> bytes:
    """Before/after sheet: one row per image, bicubic | model | ground truth on the same crop, each titled
    with its whole-image PSNR under ``protocol``."""
    rows = [r for r in rows if r.crop]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3.2 * len(rows)), squeeze=False)
    for ax_row, r in zip(axes, rows):
        _cell(ax_row[0], r.crop["bicubic"], f"bicubic  {r.psnr_bicubic:.2f} dB")
        _cell(ax_row[1], r.crop["model"], f"{model_name}  {r.psnr:.2f} dB")
        _cell(ax_row[2], r.crop["hr"], "ground truth (HR)")
        ax_row[0].set_ylabel(r.image, fontsize=9)
    fig.suptitle(f"x{scale} super-resolution, {rows[0].crop['hr'].shape[0]} px crops at full size\n"
                 f"PSNR of the whole image, {protocol}", fontsize=10, y=1.0)
    fig.tight_layout()
    return _png(fig)


def overlay(photo, mask, colour=(255, 40, 40), alpha: float = 0.5):
    """The mask painted over the photo with transparency (the lesson's show_img(mask, alpha=0.5))."""
    import numpy as np

    out = photo.astype(np.float32).copy()
    m = np.asarray(mask, bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(colour, np.float32)
    return out.round().astype(np.uint8)


def seg_panel(row) -> bytes:
    """One image: photo | predicted mask over it | true mask over it, titled with its Dice."""
    p = row.pictures
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    _cell(axes[0], p["photo"], row.image)
    _cell(axes[1], overlay(p["photo"], p["pred"]), f"prediction  Dice {row.dice:.4f}")
    _cell(axes[2], overlay(p["photo"], p["true"], colour=(40, 200, 40)), "ground truth")
    fig.tight_layout()
    return _png(fig)


def seg_sheet(rows, title: str) -> bytes:
    """Several images, one line each: prediction over the photo | ground truth over the photo."""
    fig, axes = plt.subplots(len(rows), 2, figsize=(6.5, 3.2 * len(rows)), squeeze=False)
    for ax_row, r in zip(axes, rows):
        p = r.pictures
        _cell(ax_row[0], overlay(p["photo"], p["pred"]), f"{r.image}  Dice {r.dice:.4f}")
        _cell(ax_row[1], overlay(p["photo"], p["true"], colour=(40, 200, 40)), "ground truth")
    fig.suptitle(title, fontsize=10, y=1.0)
    fig.tight_layout()
    return _png(fig)


def style_grid(rows, style_image, title: str) -> bytes:
    """Style image on top, then one line per content image: content | stylised (with its loss)."""
    n = len(rows)
    fig, axes = plt.subplots(n + 1, 2, figsize=(6.5, 3.2 * (n + 1)), squeeze=False)
    _cell(axes[0][0], style_image, "style image")
    axes[0][1].axis("off")
    for ax_row, r in zip(axes[1:], rows):
        _cell(ax_row[0], r.pictures["content"], r.image)
        _cell(ax_row[1], r.pictures["stylised"], f"stylised  loss {r.loss:.3g}")
    fig.suptitle(title, fontsize=10, y=1.0)
    fig.tight_layout()
    return _png(fig)
