"""The PNGs of a finished run: training curves and test digits with their reconstructions."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .. import data
from ..nn import capsule_lengths

__all__ = ["plot_curves", "plot_reconstructions"]


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and classification error per epoch, train and test, in ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss (margin + reconstruction)", title="Loss")
    ax_err.plot(epochs, [100 * (1 - h["train_accuracy"]) for h in history], "o-", label="train")
    ax_err.plot(epochs, [100 * h["test_error"] for h in history], "s-", label="test")
    ax_err.set(xlabel="epoch", ylabel="error (%)", title="Classification error")
    if all(100 * h["test_error"] > 0 and h["train_accuracy"] < 1 for h in history):
        ax_err.set_yscale("log")
    for ax in (ax_loss, ax_err):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_reconstructions(model: torch.nn.Module, x_all, y_all, device, path: Path, count: int = 16) -> bool:
    """The first ``count`` digits of ``x_all`` above the model's reconstructions from their
    longest capsule, in ``path``. False, and no file, for a model without a decoder (its
    reconstruction is None)."""
    model.eval()
    count = min(count, len(x_all))
    x, y_all = data.to_float(x_all[:count]).to(device), y_all[:count].cpu()
    v, reconstruction = model(x)
    if reconstruction is None:
        return False

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = capsule_lengths(v).argmax(1).cpu()
    images = x.squeeze(1).cpu()
    recon = reconstruction.float().reshape(count, *images.shape[1:]).cpu()
    cols = 8
    rows = 2 * math.ceil(count / cols)  # each row of digits above the row of their reconstructions
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.35), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(count):
        r, c = 2 * (i // cols), i % cols
        axes[r, c].imshow(images[i].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r, c].set_title(f"label {int(y_all[i])}", fontsize=8)
        axes[r + 1, c].imshow(recon[i].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r + 1, c].set_title(f"recon. {int(pred[i])}", fontsize=8, color="black" if pred[i] == y_all[i] else "red")
    fig.suptitle(
        "Test digits (odd rows) and reconstructions from the longest capsule (even rows)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
