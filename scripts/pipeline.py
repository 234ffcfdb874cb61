"""Train on real -> generate (unguided and guided) -> retrain on real + synthetic -> evaluate.

    python scripts/pipeline.py --config configs/pipeline_digits.yaml [key=value ...]

Each stage is skipped when its output exists, so a re-run resumes. Writes results.csv,
summary.md (with paired changes per seed), miou.png, sets.png (the first seed's sets side
by side) and stages.csv (wall time, peak memory) into output_dir.
"""

import sys

from al.config import ConfigError, cli_parser, load_config
from al.data.base import DatasetError
from guidedgen.pipeline import PipelineConfig, run_pipeline


def main(argv=None) -> int:
    args = cli_parser(__doc__).parse_args(argv)
    try:
        config = load_config(PipelineConfig, args.config, args.overrides)
        summary = run_pipeline(config)
    except (ConfigError, DatasetError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary)
    print(f"wrote {config.output_dir}/results.csv, summary.md, miou.png, sets.png, stages.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
