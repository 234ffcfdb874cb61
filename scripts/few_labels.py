"""Few densely labelled images: diffusion-feature pixel ensemble vs smp segmenters.

    python scripts/few_labels.py --config configs/few_labels_digits3.yaml [key=value ...]

Re-running with the same output_dir resumes; results.csv, summary.md and miou.png are rebuilt.
"""

import sys

from al.cli import cli_entry
from al.config import cli_parser, load_config
from al.few_labels import FewLabelsConfig, run_few_labels


@cli_entry()
def main(argv=None) -> int:
    args = cli_parser(__doc__).parse_args(argv)
    config = load_config(FewLabelsConfig, args.config, args.overrides)
    summary = run_few_labels(config)
    print(summary)
    print(f"wrote {config.output_dir}/results.csv, summary.md, miou.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
