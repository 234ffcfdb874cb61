"""The pipeline's report: its finished rows (one per seed and training set) into results.csv, the
summary table (summary.md, with each seed's paired change against real only and against the
unguided set) and miou.png (mean ± std val mIoU per training set)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from al.atomic import atomic_write_bytes
from al.plots import save_figure

REAL_ONLY = "real only"


def paired_changes(rows: list[dict], condition: str, reference: str) -> list[float]:
    """val mIoU (percentage points) of ``condition`` minus ``reference``, for each seed that has
    both, in seed order; empty when the condition is the reference or either is missing."""
    by_seed = {name: {row["seed"]: row["val_miou"] for row in rows if row["condition"] == name}
               for name in (condition, reference)}
    if condition == reference:
        return []
    return [100 * (by_seed[condition][s] - by_seed[reference][s]) for s in sorted(by_seed[condition])
            if s in by_seed[reference]]


def _change_cell(changes: list[float]) -> str:
    if not changes:
        return "-"
    return f"{np.mean(changes):+.1f} ± {np.std(changes):.1f} (" + ", ".join(f"{c:+.1f}" for c in changes) + ")"


def write_results(rows: list[dict], output: Path) -> str:
    fields = sorted({k for row in rows for k in row}, key=lambda k: (k not in ("seed", "condition", "val_miou"), k))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(output / "results.csv", buffer.getvalue().encode())
    conditions = list(dict.fromkeys(row["condition"] for row in rows))
    objective_keys = [k for k in fields if k.startswith(("objective_", "fidelity_", "labelled_", "seconds_"))]
    lines = ["| training data | val mIoU (%) | seeds | paired vs real only | paired vs unguided | "
             + " | ".join(k.replace("objective_", "") for k in objective_keys) + " |",
             "|---" * (5 + len(objective_keys)) + "|"]
    means, spreads = [], []
    for condition in conditions:
        chosen = [row for row in rows if row["condition"] == condition]
        mious = np.array([row["val_miou"] for row in chosen]) * 100
        means.append(mious.mean())
        spreads.append(mious.std())
        unguided = chosen[0].get("reference", REAL_ONLY)  # real only has no unguided reference
        changes = [_change_cell(paired_changes(rows, condition, reference)) for reference in (REAL_ONLY, unguided)]
        cells = [f"{np.mean([row[k] for row in chosen if k in row]):.4f}" if any(k in row for row in chosen) else "-"
                 for k in objective_keys]
        lines.append(f"| {condition} | {mious.mean():.1f} ± {mious.std():.1f} | {len(chosen)} | "
                     + " | ".join(changes + cells) + " |")
    summary = "\n".join(lines) + ("\n\nPaired columns: mean ± std over seeds of the val mIoU change against the same "
                                  "seed's reference (against the unguided set of the same mode, filter and recipe), per seed in brackets. "
                                  "Objective columns: mean value of each informativeness objective on the "
                                  "synthetic set, under the stage-1 segmenters (higher = the guiding model finds it harder). "
                                  "fidelity_miou / fidelity_agreement (with a judge): its mIoU against the masks and the share "
                                  "of labelled pixels where it reads the mask's class (real only: on the real images); "
                                  "fidelity_region_generated / _real (instance mode): that share on the regenerated pixels, "
                                  "and on the same pixels of the real images. labelled_share: the share of the kept synthetic pairs' "
                                  "labelled pixels that stay labelled for training (below 1 after a filter). seconds_per_kept: the set's "
                                  "generation wall time over the pairs kept from it (all variants generated count).\n")
    atomic_write_bytes(output / "summary.md", summary.encode())
    figure = Figure(figsize=(1.6 + 1.3 * len(conditions), 3.4))
    axes = figure.add_subplot(1, 1, 1)
    axes.bar(range(len(conditions)), means, yerr=spreads, capsize=4, color="#4c72b0")
    axes.set_xticks(range(len(conditions)), conditions, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel("val mIoU (%)")
    axes.set_title("train on real -> generate -> retrain (mean ± std over seeds)", fontsize=9)
    save_figure(figure, output / "miou.png")
    return summary
