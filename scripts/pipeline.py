"""Train on real -> generate (unguided and guided) -> retrain on real + synthetic -> evaluate.

    python scripts/pipeline.py --config configs/pipeline_digits.yaml [key=value ...]

Each stage is skipped when its output exists, so a re-run resumes. Writes results.csv,
summary.md (with paired changes per seed), miou.png, sets.png (the first seed's sets side
by side) and stages.csv (wall time, peak memory) into output_dir.
"""

import sys

from al.cli import cli_entry
from al.config import cli_parser, load_config
from guidedgen.pipeline import PipelineConfig, run_pipeline


@cli_entry()
def main(argv=None) -> int:
    args = cli_parser(__doc__).parse_args(argv)
    config = load_config(PipelineConfig, args.config, args.overrides)
    summary = run_pipeline(config)
    print(summary)
    print(f"wrote {config.output_dir}/results.csv, summary.md, miou.png, sets.png, stages.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
