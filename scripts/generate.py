"""Generate a synthetic segmentation dataset with guided ControlNet sampling.

    accelerate launch scripts/generate.py --config configs/demo.yaml [key=value ...]
    python scripts/generate.py --config configs/demo.yaml            # one process

Re-running with the same output_dir resumes; a different config there is refused unless
``overwrite=true``. Writes a contact sheet (``contact_sheet_file``) beside the dataset.
"""

import sys

import torch
from accelerate import PartialState

from al.cli import cli_entry
from al.config import cli_parser, load_config
from guidedgen.generate import GenerateConfig, run_generation, write_contact_sheet


@cli_entry()
def main(argv=None) -> int:
    args = cli_parser(__doc__).parse_args(argv)
    config = load_config(GenerateConfig, args.config, args.overrides)
    state = PartialState(cpu=not torch.cuda.is_available())
    output = run_generation(config, state)
    if state.is_main_process:
        sheet = write_contact_sheet(config, output / config.contact_sheet_file)
        print(f"wrote {output}" + (f" and {sheet}" if sheet else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
