"""Generate a synthetic segmentation dataset with guided ControlNet sampling.

    accelerate launch scripts/generate.py --config configs/demo.yaml [key=value ...]
    python scripts/generate.py --config configs/demo.yaml            # one process

Re-running with the same output_dir resumes; a different config there is refused unless
``overwrite=true``. Writes a contact sheet (``contact_sheet_file``) beside the dataset.
"""

import sys

import torch
from accelerate import PartialState

from al.config import ConfigError, cli_parser, load_config
from al.data.base import DatasetError
from guidedgen.generate import GenerateConfig, run_generation, write_contact_sheet


def main(argv=None) -> int:
    args = cli_parser(__doc__).parse_args(argv)
    try:
        config = load_config(GenerateConfig, args.config, args.overrides)
        state = PartialState(cpu=not torch.cuda.is_available())
        output = run_generation(config, state)
        if state.is_main_process:
            sheet = write_contact_sheet(config, output / config.contact_sheet_file)
            print(f"wrote {output}" + (f" and {sheet}" if sheet else ""))
    except (ConfigError, DatasetError, OSError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
