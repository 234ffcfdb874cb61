"""Sparse-pixel active learning: several acquisitions x seeds, curves and uncertainty maps.

    python scripts/active_learning.py --config configs/al_digits.yaml [key=value ...]

Overrides use dotted keys, e.g. ``seeds=[0,1,2] loop.cycles=3 loop.train.epochs=5``.
Re-running with the same output_dir resumes; runs may be split over several processes.
"""

import sys

from al.cli import cli_entry
from al.config import cli_parser, load_config
from al.experiment import ExperimentConfig, run_experiment
from al.loop import StateMismatchError
from al.oracles import AwaitingAnnotations
from al.select import NotEnoughPixelsError


# besides the common ones: a run folder made with another config, a pool with too few pixels left to query
@cli_entry(StateMismatchError, NotEnoughPixelsError)
def main(argv=None) -> int:
    args = cli_parser(__doc__).parse_args(argv)
    config = load_config(ExperimentConfig, args.config, args.overrides)
    try:
        summary = run_experiment(config)
    except AwaitingAnnotations as waiting:  # not an error: the human annotator's turn
        print(f"waiting: {waiting}")
        return 0
    print(summary)
    print(f"\nwrote {config.output_dir}/curve.csv, curve.png, uncertainty_maps.png, summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
