"""The pipeline's report: its finished rows (one per seed and training set) into results.csv, the
summary table (summary.md, with each seed's paired change against real only and against the
unguided set) and miou.png (each set's paired change against real only: per seed and mean ± std)."""

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
    for condition in conditions:
        chosen = [row for row in rows if row["condition"] == condition]
        mious = np.array([row["val_miou"] for row in chosen]) * 100
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
    save_figure(paired_change_figure(rows, conditions), output / "miou.png")
    return summary


def paired_change_figure(rows: list[dict], conditions: list[str]) -> Figure:
    """One line per training set: its val mIoU change against real only, each seed a dot and the
    mean ± std over seeds a bar, real only's mIoU in the title. Paired changes, not mIoU bars from
    zero: the seed-to-seed spread of real only would hide differences of a few points."""
    sets = [c for c in conditions if c != REAL_ONLY]
    figure = Figure(figsize=(7.5, 1.0 + 0.28 * len(sets)))
    axes = figure.add_subplot(1, 1, 1)
    for line, condition in enumerate(sets):
        changes = paired_changes(rows, condition, REAL_ONLY)
        axes.scatter(changes, [line] * len(changes), s=12, color="#999999", zorder=2)
        axes.errorbar(np.mean(changes), line, xerr=np.std(changes), fmt="o", color="#4c72b0", capsize=3, zorder=3)
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_yticks(range(len(sets)), sets, fontsize=7)
    axes.invert_yaxis()  # table order, top to bottom
    axes.set_xlabel("val mIoU change against real only, same seed (points)")
    real = np.array([row["val_miou"] for row in rows if row["condition"] == REAL_ONLY]) * 100
    axes.set_title(f"real only {real.mean():.1f} ± {real.std():.1f} mIoU; grey: seeds, blue: mean ± std", fontsize=9)
    figure.tight_layout()
    return figure
