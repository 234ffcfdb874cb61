"""Compare two active-learning runs cycle by cycle, paired by seed: a markdown table and one plot.

    python scripts/compare_curves.py docs/results/curve.csv:balent outputs/al_digits_synthetic/curve.csv:balent \
        --labels "BalEnt, real sparse only" "BalEnt + synthetic" --plot docs/results/al_digits_synthetic_curve.png

Each run is ``<curve.csv>:<acquisition>``; the table has mean ± std over seeds for each run and
the paired change (second minus first) over the seeds both runs have.
"""

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from al.cli import cli_entry
from al.plots import plot_learning_curves


def read_run(spec: str) -> list[dict]:
    path, _, acquisition = spec.rpartition(":")
    if not path or not Path(path).is_file():
        raise SystemExit(f"{spec!r}: expected <curve.csv>:<acquisition> with an existing curve.csv")
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["acquisition"] == acquisition]
    if not rows:
        raise SystemExit(f"{path} has no rows for acquisition {acquisition!r}")
    return rows


def paired_table(first: list[dict], second: list[dict], labels: tuple[str, str]) -> str:
    """Markdown: per cycle, labelled pixels, mean ± std mIoU (%) of each run, and the mean paired
    change over the seeds both runs reached that cycle (per seed in brackets)."""
    def by_cycle(rows):
        table = {}
        for row in rows:
            table.setdefault(int(row["cycle"]), {})[int(row["seed"])] = (int(row["labelled_pixels"]), 100 * float(row["miou"]))
        return table

    def cell(run: dict) -> str:
        values = [m for _, m in run.values()]
        return f"{np.mean(values):.1f} ± {np.std(values):.1f}"

    a, b = by_cycle(first), by_cycle(second)
    lines = [f"| cycle | labelled px | {labels[0]} | {labels[1]} | paired change (seeds) |", "|---|---|---|---|---|"]
    for cycle in sorted(set(a) & set(b)):
        seeds = sorted(set(a[cycle]) & set(b[cycle]))
        if not seeds:
            continue
        change = [b[cycle][s][1] - a[cycle][s][1] for s in seeds]
        lines.append(f"| {cycle} | {a[cycle][seeds[0]][0]} | {cell(a[cycle])} | {cell(b[cycle])} | "
                     f"{np.mean(change):+.1f} ({', '.join(f'{c:+.1f}' for c in change)}; seeds {', '.join(map(str, seeds))}) |")
    return "\n".join(lines)


@cli_entry()  # an unreadable curve.csv or an unwritable --plot path
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs=2, help="<curve.csv>:<acquisition>, twice")
    parser.add_argument("--labels", nargs=2, default=None)
    parser.add_argument("--plot", default=None, help="PNG path for both curves")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    labels = tuple(args.labels or args.runs)
    first, second = (read_run(spec) for spec in args.runs)
    print(paired_table(first, second, labels))
    if args.plot:
        rows = [dict(r, acquisition=labels[0]) for r in first] + [dict(r, acquisition=labels[1]) for r in second]
        plot_learning_curves(rows, args.plot, title=args.title)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
