"""Figures of the value-bias analysis, each saved as PNG and PDF.

Figures are drawn on `matplotlib.figure.Figure` objects (Agg canvas) so no GUI backend or global pyplot
state is touched.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from rmjax.analysis.cells import FRAMINGS
from rmjax.analysis.comparison import significance_stars
from rmjax.analysis.similarity import METRICS, similarity_matrix

FAMILY_COLOURS = {"gemma": "#DB4437", "llama": "#0064E0"}
_OTHER_COLOURS = ["#2CA02C", "#9467BD", "#8C564B", "#E377C2", "#7F7F7F", "#BCBD22", "#17BECF", "#FF7F0E"]
METRIC_TITLES = {"kendall_tau": "Kendall tau-b", "spearman": "Spearman rho", "rbo": "RBO (p = 0.9)"}


def family_colours(families: Sequence[str]) -> dict[str, str]:
    others = iter(_OTHER_COLOURS * (1 + len(families) // len(_OTHER_COLOURS)))
    return {f: FAMILY_COLOURS.get(f) or next(others) for f in families}


def save(figure: Figure, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    figure.savefig(paths[0], dpi=150, bbox_inches="tight")
    figure.savefig(paths[1], bbox_inches="tight")
    return paths


def plot_panels(cells: pd.DataFrame, comparison: pd.DataFrame | None, stem: Path, n_words: int) -> list[Path]:
    """Cell values by family, one panel per (framing row, category column); rank 1 (best) at the top."""
    framings = [f for f in FRAMINGS if f in set(cells["framing"])]
    categories = list(dict.fromkeys(cells["category"]))
    families = sorted(cells["family"].unique())
    colours = family_colours(families)
    figure = Figure(figsize=(1.0 + 2.0 * len(categories) * max(1, len(families) / 2), 1.0 + 3.0 * len(framings)))
    axes = figure.subplots(len(framings), len(categories), squeeze=False, sharey="row")
    jitter = np.random.default_rng(0)  # fixed: the figure is the same on every run
    for r, framing in enumerate(framings):
        for c, category in enumerate(categories):
            ax = axes[r, c]
            panel = cells[(cells["framing"] == framing) & (cells["category"] == category)]
            values = [panel.loc[panel["family"] == f, "median_rank"].to_numpy() for f in families]
            positions = np.arange(len(families))
            drawn = [(p, v) for p, v in zip(positions, values) if len(v)]
            if drawn:
                box = ax.boxplot([v for _, v in drawn], positions=[p for p, _ in drawn], widths=0.55,
                                 showfliers=False, patch_artist=True,
                                 medianprops={"color": "black", "linewidth": 0.8})
                for patch, (p, _) in zip(box["boxes"], drawn):
                    patch.set(facecolor="none", edgecolor=colours[families[p]])
            for p, v in drawn:
                ax.scatter(p + jitter.uniform(-0.18, 0.18, len(v)), v, s=5, alpha=0.3, color=colours[families[p]],
                           linewidths=0)
                ax.scatter([p], [v.mean()], marker="D", s=22, color="black", zorder=3)
            ax.set_xticks(positions, families, fontsize=8)
            label = _panel_label(comparison, framing, category)
            ax.set_title(f"{category}, {framing}" + (f"\n{label}" if label else ""), fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{framing} prompts\nmedian rank (1 = best of {n_words})", fontsize=8)
        if not axes[r, 0].yaxis_inverted():
            axes[r, 0].invert_yaxis()
    figure.tight_layout()
    return save(figure, stem)


def _panel_label(comparison: pd.DataFrame | None, framing: str, category: str) -> str:
    if comparison is None or comparison.empty or "family_a" in comparison.columns:
        return ""  # with several family pairs one label per panel would be ambiguous; see comparison.csv
    row = comparison[(comparison["framing"] == framing) & (comparison["category"] == category)]
    if row.empty:
        return ""
    row = row.iloc[0]
    stars = significance_stars(row["p_bonferroni"])
    return f"d = {row['cohens_d']:+.2f}, p_bonf = {row['p_bonferroni']:.2g} {stars}"


def plot_similarity(similarity: pd.DataFrame, models: Sequence[str], families: Mapping[str, str],
                    stem: Path) -> list[Path]:
    """One heatmap per similarity measure; models grouped by family."""
    ordered = sorted(models, key=lambda m: (families[m], m))
    figure = Figure(figsize=(5.2 * len(METRICS), 5.0))
    axes = figure.subplots(1, len(METRICS), squeeze=False)[0]
    colours = family_colours(sorted({families[m] for m in models}))
    for ax, metric in zip(axes, METRICS):
        matrix = similarity_matrix(similarity, metric, ordered).to_numpy()
        image = ax.imshow(matrix, cmap="viridis", vmin=np.nanmin(matrix), vmax=1.0)
        ax.set_xticks(range(len(ordered)), ordered, rotation=90, fontsize=6)
        ax.set_yticks(range(len(ordered)), ordered, fontsize=6)
        for tick, model in zip(ax.get_yticklabels(), ordered):
            tick.set_color(colours[families[model]])
        for tick, model in zip(ax.get_xticklabels(), ordered):
            tick.set_color(colours[families[model]])
        if len(ordered) <= 16:
            for i in range(len(ordered)):
                for j in range(len(ordered)):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=5, color="white")
        ax.set_title(f"{METRIC_TITLES[metric]}, mean over prompts", fontsize=9)
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    figure.tight_layout()
    return save(figure, stem)


def plot_mds(coordinates: pd.DataFrame, stem: Path) -> list[Path]:
    """Models placed so that distances follow 1 - mean Kendall tau."""
    colours = family_colours(sorted(coordinates["family"].unique()))
    figure = Figure(figsize=(6.0, 5.0))
    ax = figure.subplots()
    for family, group in coordinates.groupby("family"):
        ax.scatter(group["x"], group["y"], color=colours[family], label=family, s=30)
    for row in coordinates.itertuples(index=False):
        ax.annotate(row.model, (row.x, row.y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("MDS 1")
    ax.set_ylabel("MDS 2")
    ax.set_title("Models by word-ranking similarity (distance 1 - Kendall tau)", fontsize=9)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return save(figure, stem)
