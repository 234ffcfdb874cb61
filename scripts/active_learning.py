"""Sparse-pixel active learning: several acquisitions x seeds, curves and uncertainty maps.

    python scripts/active_learning.py --config configs/al_digits.yaml [key=value ...]

Overrides use dotted keys, e.g. ``seeds=[0,1,2] loop.cycles=3 loop.train.epochs=5``.
Re-running with the same output_dir resumes; runs may be split over several processes.
"""

import sys

from al.config import ConfigError, cli_parser, load_config
from al.data.base import DatasetError
from al.experiment import ExperimentConfig, run_experiment
from al.labels import JournalCorruptError
from al.loop import AwaitingAnnotations, StateMismatchError
from al.select import NotEnoughPixelsError


def main(argv=None) -> int:
    args = cli_parser(__doc__).parse_args(argv)
    try:
        config = load_config(ExperimentConfig, args.config, args.overrides)
        summary = run_experiment(config)
    except AwaitingAnnotations as waiting:
        print(f"waiting: {waiting}")
        return 0
    except (ConfigError, DatasetError, StateMismatchError, NotEnoughPixelsError, JournalCorruptError,
            OSError) as error:  # OSError: an unwritable output_dir, a folder another run holds (FolderLockedError)
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary)
    print(f"\nwrote {config.output_dir}/curve.csv, curve.png, uncertainty_maps.png, summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
