"""Where the acquisitions stand under different AL settings: each setting's last-cycle mIoU per
acquisition, the per-seed change against random, and the ordering of the means.

    python scripts/compare_settings.py benchmark=docs/results/al_digits3_curve.csv \
        k50=outputs/balent_study/k50/curve.csv --random-from k50=benchmark --plot study.png

Each setting is ``<name>=<curve.csv>`` and is read at its last cycle. The change against random
pairs seeds with the setting's own random rows, or with another setting's (``--random-from
<setting>=<other>``) where what the setting changes cannot move random (random draws no MC
samples, so K does not change it). ``--paired-with <setting>=<other>`` adds a table of the
per-seed change of each acquisition from ``other`` to ``setting``, and whether the setting's
mean lies within ``other``'s seed spread (its mean ± std over seeds).
"""

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from al.cli import cli_entry
from al.plots import save_figure

RANDOM = "random"


def last_cycle(path: Path) -> tuple[int, dict[str, dict[int, float]]]:
    """The largest cycle of a curve.csv and ``{acquisition: {seed: mIoU (%)}}`` at it."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise SystemExit(f"{path} has no rows")
    cycle = max(int(row["cycle"]) for row in rows)
    final: dict[str, dict[int, float]] = {}
    for row in rows:
        if int(row["cycle"]) == cycle:
            final.setdefault(row["acquisition"], {})[int(row["seed"])] = 100 * float(row["miou"])
    return cycle, final


def changes_against(values: dict[int, float], reference: dict[int, float]) -> dict[int, float]:
    """Per-seed difference ``values - reference`` over the seeds both have."""
    return {seed: values[seed] - reference[seed] for seed in sorted(set(values) & set(reference))}


def settings_table(settings: dict[str, tuple[int, dict]], random_from: dict[str, str]) -> str:
    """Markdown: one row per (setting, acquisition): final mIoU mean ± std, the change against
    random (mean, then per seed), and the acquisition's rank by mean within its setting."""
    lines = ["| setting (last cycle) | acquisition | mIoU (%) | vs random: mean (seeds) | rank |", "|---|---|---|---|---|"]
    for name, (cycle, final) in settings.items():
        random_rows = settings[random_from.get(name, name)][1].get(RANDOM)
        order = sorted(final, key=lambda a: -np.mean(list(final[a].values())))
        for acquisition in order:
            values = final[acquisition]
            if acquisition == RANDOM or random_rows is None:
                against = "-"
            else:
                change = changes_against(values, random_rows)
                against = f"{np.mean(list(change.values())):+.1f} ({', '.join(f'{c:+.1f}' for c in change.values())})"
                if name in random_from:
                    against += f" [random of {random_from[name]}]"
            lines.append(f"| {name} ({cycle}) | {acquisition} | {np.mean(list(values.values())):.1f} ± "
                         f"{np.std(list(values.values())):.1f} | {against} | {order.index(acquisition) + 1} |")
    return "\n".join(lines)


def paired_table(settings: dict[str, tuple[int, dict]], pairs: dict[str, str]) -> str:
    """Markdown: per (setting, acquisition in both), the change from the paired setting, mean and
    per seed, the paired setting's std over seeds, and whether the mean change is within it."""
    lines = ["| setting vs other | acquisition | other mIoU (%) | setting mIoU (%) | change: mean (seeds) | "
             "within other's spread |", "|---|---|---|---|---|---|"]
    for name, other in pairs.items():
        final, reference = settings[name][1], settings[other][1]
        for acquisition in sorted(set(final) & set(reference)):
            values, base = final[acquisition], reference[acquisition]
            change = changes_against(values, base)
            mean, spread = np.mean(list(change.values())), np.std(list(base.values()))
            lines.append(f"| {name} vs {other} | {acquisition} | {np.mean(list(base.values())):.1f} ± {spread:.1f} | "
                         f"{np.mean(list(values.values())):.1f} ± {np.std(list(values.values())):.1f} | {mean:+.1f} "
                         f"({', '.join(f'{c:+.1f}' for c in change.values())}) | {'yes' if abs(mean) <= spread else 'no'} |")
    return "\n".join(lines)


def plot_settings(settings: dict[str, tuple[int, dict]], path: str) -> None:
    """Last-cycle mIoU per setting: one column of seed dots and a mean bar per acquisition."""
    acquisitions = sorted({a for _, final in settings.values() for a in final})
    figure = Figure(figsize=(1.6 + 1.4 * len(settings), 3.6))
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(acquisitions)
    for index, acquisition in enumerate(acquisitions):
        colour, label = f"C{index}", acquisition  # the legend names each acquisition once
        for position, (_, final) in enumerate(settings.values()):
            if acquisition not in final:
                continue
            x = position - 0.4 + width * (index + 0.5)
            values = list(final[acquisition].values())
            axes.scatter([x] * len(values), values, s=10, color=colour, alpha=0.6)
            axes.hlines(np.mean(values), x - width / 2, x + width / 2, color=colour, linewidth=2, label=label)
            label = None
    axes.set_xticks(range(len(settings)), list(settings), fontsize=8)
    axes.set(ylabel="val mIoU (%) at the last cycle", title="seeds as dots, mean as a bar")
    axes.legend(fontsize=7, ncol=2)
    save_figure(figure, path)


def parse_pairs(values: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, target = value.partition("=")
        if not sep or not name or not target:
            raise SystemExit(f"{what} {value!r}: expected <name>=<value>")
        pairs[name] = target
    return pairs


@cli_entry()  # an unreadable curve.csv or an unwritable --plot path
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help="<name>=<curve.csv>")
    parser.add_argument("--random-from", nargs="*", default=[], help="<setting>=<setting whose random rows it uses>")
    parser.add_argument("--paired-with", nargs="*", default=[], help="<setting>=<setting it is compared with, per seed>")
    parser.add_argument("--plot", default=None, help="PNG path")
    args = parser.parse_args(argv)
    paths = parse_pairs(args.settings, "setting")
    random_from = parse_pairs(args.random_from, "--random-from")
    paired = parse_pairs(args.paired_with, "--paired-with")
    for flag, pairs in (("--random-from", random_from), ("--paired-with", paired)):
        for name, other in pairs.items():
            if name not in paths or other not in paths:
                raise SystemExit(f"{flag} {name}={other}: both must be settings ({sorted(paths)})")
    for name, path in paths.items():
        if not Path(path).is_file():
            raise SystemExit(f"setting {name}: {path} is not a file (a curve.csv written by scripts/active_learning.py)")
    settings = {name: last_cycle(Path(path)) for name, path in paths.items()}
    print(settings_table(settings, random_from))
    if paired:
        print("\n" + paired_table(settings, paired))
    if args.plot:
        plot_settings(settings, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
