"""Plots people would rather look at than read: marginal timelines and convergence traces.

All functions take an optional matplotlib Axes and return it; none calls ``plt.show()``.
The Agg backend is selected when no backend was chosen, so they work without a screen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["plot_marginal_timeline", "plot_trace", "save"]


def _axes(ax, figsize=(7, 3.5)):
    import matplotlib

    if ax is None and matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "png"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_marginal_timeline(marginals: torch.Tensor, labels: Sequence | None = None,
                           times: Sequence[float] | None = None, ax=None, title: str = ""):
    """Heat map of per-frame marginals.

    Args:
        marginals: ``(T, S)`` probabilities of S states over T frames.
        labels: optional names of the S states (y axis).
        times: optional frame times (x axis ticks).
    """
    ax = _axes(ax)
    m = torch.as_tensor(marginals).detach().cpu().double()
    if m.dim() != 2:
        raise ValueError(f"marginals must be (T, S), got shape {tuple(m.shape)}")
    image = ax.imshow(m.T.numpy(), aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1,
                      interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="marginal probability")
    ax.set_xlabel("frame" if times is None else "time")
    if times is not None:
        ax.set_xticks(range(len(times)))
        ax.set_xticklabels([f"{t:g}" for t in times])
    if labels is not None:
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels([str(lab) for lab in labels])
    ax.set_ylabel("state")
    if title:
        ax.set_title(title)
    return ax


def plot_trace(values: Sequence[float], reference: float | None = None, ax=None,
               ylabel: str = "ELBO", title: str = ""):
    """Line plot of a per-iteration quantity, with an optional reference line (e.g. log Z)."""
    ax = _axes(ax, figsize=(5, 3.5))
    ax.plot(range(1, len(values) + 1), list(values), marker="o", label=ylabel)
    if reference is not None:
        ax.axhline(reference, color="k", linestyle="--", label="exact log Z")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.legend()
    if title:
        ax.set_title(title)
    return ax


def save(ax, path) -> str:
    """Save the figure of ``ax`` to ``path`` (parents created) and close it."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    return str(path)
