"""Figures of SPoT (Vu et al., ACL 2022) as PNG files, with matplotlib (lazily: pip install -e '.[plots]').

Fig. 3 ........ plot_transfer_heatmap: relative error reduction of each source -> target transfer
Figs. 4, 7 .... plot_similarity_clustermap: task similarity, rows/columns in hierarchical-clustering order
Figs. 5, 8 .... plot_similarity_vs_transfer: similarity vs transfer per target, with Pearson r and p
The numbers come from retrieval.py and experiments/stats.py; table6_transferability.py and table3_retrieval.py
call these.
"""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script: repo root

import argparse
import math
from pathlib import Path

import numpy as np

from experiments.stats import pearson


def _figure(*size):
    from matplotlib.figure import Figure  # Figure + savefig renders with Agg, without pyplot's global state
    return Figure(figsize=size, layout="constrained")


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_transfer_heatmap(transfer, sources, targets, path, title="Relative error reduction (%)"):
    """Fig. 3: heatmap of transfer[source, target] (relative error reduction, %). Colours are clipped
    symmetrically at the largest gain, so a few large losses (e.g. into CB) do not wash out the rest."""
    from matplotlib.colors import TwoSlopeNorm
    transfer = np.asarray(transfer, dtype=np.float64)
    if transfer.shape != (len(sources), len(targets)):
        raise ValueError(f"transfer has shape {transfer.shape}, expected ({len(sources)}, {len(targets)})")
    lim = max(1.0, float(np.nanmax(np.abs(transfer.clip(min=0)))))
    fig = _figure(0.6 * len(targets) + 3, 0.35 * len(sources) + 1.5)
    ax = fig.subplots()
    im = ax.imshow(transfer.clip(-lim, lim), cmap="RdBu", norm=TwoSlopeNorm(0, -lim, lim), aspect="auto")
    ax.set_xticks(range(len(targets)), targets, rotation=45, ha="right")
    ax.set_yticks(range(len(sources)), sources)
    for (i, j), v in np.ndenumerate(transfer):
        ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_similarity_clustermap(matrix, names, path, title="Task similarity"):
    """Figs. 4, 7: similarity heatmap with rows and columns in the order of an average-linkage
    hierarchical clustering on distance 1 - similarity, its dendrogram on top. Returns the PNG path."""
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (len(names), len(names)) or len(names) < 2:
        raise ValueError(f"need a square matrix over >= 2 names, got shape {m.shape} for {len(names)} names")
    dist = (1 - (m + m.T) / 2).clip(min=0)
    np.fill_diagonal(dist, 0)
    tree = linkage(squareform(dist, checks=False), method="average")
    fig = _figure(0.45 * len(names) + 3, 0.45 * len(names) + 3.5)
    top, heat = fig.subplots(2, 1, height_ratios=[1, 4])
    order = dendrogram(tree, ax=top, no_labels=True, color_threshold=0)["leaves"]
    top.set_axis_off()
    im = heat.imshow(m[np.ix_(order, order)], cmap="viridis", aspect="auto")
    labels = [names[i] for i in order]
    heat.set_xticks(range(len(names)), labels, rotation=45, ha="right")
    heat.set_yticks(range(len(names)), labels)
    if len(names) <= 12:
        for (i, j), v in np.ndenumerate(m[np.ix_(order, order)]):
            heat.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8, color="w")
    top.set_title(title)
    fig.colorbar(im, ax=[top, heat])  # one colorbar for both keeps the dendrogram's leaves over the columns
    return _save(fig, path)


def plot_similarity_vs_transfer(panels, path, xlabel="similarity", ylabel="relative error reduction (%)"):
    """Figs. 5, 8: one scatter per target, {target: (x, y)}, titled with Pearson r and p.
    Returns {target: (r, p)}."""
    fig = _figure(3.2 * min(len(panels), 5), 2.8 * math.ceil(len(panels) / 5))
    axes = np.atleast_1d(fig.subplots(math.ceil(len(panels) / 5), min(len(panels), 5))).ravel()
    stats = {}
    for ax, (target, (x, y)) in zip(axes, panels.items()):
        stats[target] = pearson(x, y)
        ax.scatter(x, y, s=12)
        ax.set_title(f"{target}: r={stats[target][0]:.3f}, p={stats[target][1]:.3g}", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    _save(fig, path)
    return stats


if __name__ == "__main__":
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.parse_args()
    sys.exit("figures.py draws nothing by itself: run table6_transferability.py (Fig. 3) or "
             "table3_retrieval.py (Figs. 4, 5, 8), which call it")
