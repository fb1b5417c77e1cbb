"""Value bias over training (Christian et al., Figure 4a): the category ranks of RMs at every saved checkpoint.

Input: per run and saved step a score table (``response`` + one column per prompt, the layout of
``rmjax vocab-scan --mode words --rm``), and each run's family (its base model). Per run and step
the dictionary words are ranked within each prompt (1 = highest score) and the cell value is the
median rank per (prompt, category), as in ``rmjax value-bias``; a trajectory point is the mean cell
over the prompts of one framing. Runs train for different numbers of steps, so the x axis is the
training progress (step / the run's last step); the family difference (later family minus earlier,
alphabetically, as in ``compare_families``; negative = the later family ranks the category better)
is taken on the union of the runs' progress points, each run's curve interpolated linearly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rmjax.analysis.cells import FRAMINGS, compute_cells, rank_words
from rmjax.analysis.dictionary import Dictionary, normalise_word
from rmjax.analysis.scores import ScoreSet


def trajectory(tables: dict[tuple[str, int], pd.DataFrame], families: dict[str, str],
               dictionary: Dictionary) -> pd.DataFrame:
    """One row per (run, step, framing, category): family, progress, mean_median_rank."""
    indexed = {}
    for (run, step), table in tables.items():
        frame = table.copy()
        frame.index = frame.pop("response").map(normalise_word).to_numpy()
        indexed[f"{run}@{step}"] = frame.groupby(level=0).max()
    prompts = list(next(iter(indexed.values())).columns)
    scores = ScoreSet(indexed, {}, prompts)
    words = sorted(set.intersection(*(set(t.index) for t in indexed.values())) & set(dictionary.memberships))
    cells = compute_cells(rank_words(scores, words), dictionary, {m: families[m.rsplit("@", 1)[0]] for m in indexed})
    cells[["run", "step"]] = cells["model"].str.rsplit("@", n=1, expand=True)
    cells["step"] = cells["step"].astype(int)
    out = (cells.groupby(["run", "family", "step", "framing", "category"], sort=False)["median_rank"].mean()
           .rename("mean_median_rank").reset_index())
    last = out.groupby("run")["step"].transform("max")
    out.insert(3, "progress", out["step"] / last)
    return out.sort_values(["run", "step", "framing", "category"]).reset_index(drop=True)


def family_difference(points: pd.DataFrame) -> pd.DataFrame:
    """Per (framing, category, progress): each family's mean over its runs and later minus earlier."""
    families = sorted(points["family"].unique())
    grid = np.unique(points["progress"].to_numpy())
    rows = []
    for (framing, category), panel in points.groupby(["framing", "category"], sort=False):
        means = {}
        for family in families:
            curves = []
            for _, run in panel[panel["family"] == family].groupby("run"):
                run = run.sort_values("progress")
                curves.append(np.interp(grid, run["progress"], run["mean_median_rank"], left=np.nan))
            means[family] = np.nanmean(curves, axis=0) if curves else np.full(len(grid), np.nan)
        for i, progress in enumerate(grid):
            row = {"framing": framing, "category": category, "progress": progress,
                   **{f"{f}_mean": means[f][i] for f in families}}
            if len(families) == 2:
                row["difference"] = means[families[1]][i] - means[families[0]][i]
            rows.append(row)
    return pd.DataFrame(rows)


def plot_trajectory(points: pd.DataFrame, difference: pd.DataFrame, stem: Path) -> list[Path]:
    """Rows: framings; left: each run's category rank over training; right: the family difference."""
    from matplotlib.figure import Figure

    # matplotlib loads only when a figure is drawn
    from rmjax.analysis.figures import family_colours, save

    framings = [f for f in FRAMINGS if f in set(points["framing"])]
    categories = list(dict.fromkeys(points["category"]))
    colours = family_colours(sorted(points["family"].unique()))
    styles = dict(zip(categories, ["-", "--", ":", "-.", (0, (1, 3))] * 4))
    figure = Figure(figsize=(10.0, 1.0 + 3.0 * len(framings)))
    axes = figure.subplots(len(framings), 2, squeeze=False)
    for r, framing in enumerate(framings):
        left, right = axes[r]
        for (run, category), group in points[points["framing"] == framing].groupby(["run", "category"], sort=False):
            family = group["family"].iloc[0]
            left.plot(group["progress"], group["mean_median_rank"], styles[category], color=colours[family],
                      marker="o", markersize=3, label=f"{run} {category}")
        left.set_title(f"{framing} prompts: mean median rank (1 = best)", fontsize=8)
        left.invert_yaxis()
        left.legend(fontsize=5)
        if "difference" in difference:
            for category in categories:
                d = difference[(difference["framing"] == framing) & (difference["category"] == category)]
                right.plot(d["progress"], d["difference"], styles[category], color="black", marker="o",
                           markersize=3, label=category)
            right.axhline(0, color="grey", linewidth=0.6)
            families = sorted(points["family"].unique())
            right.set_title(f"{framing}: {families[1]} - {families[0]} (negative = {families[1]} ranks better)",
                            fontsize=8)
            right.legend(fontsize=6)
        for ax in (left, right):
            ax.set_xlabel("training progress (step / last step)", fontsize=8)
    figure.tight_layout()
    return save(figure, stem)
