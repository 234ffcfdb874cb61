"""Distil a tiny decoder (AutoencoderTiny) from a component set's VAE for guidance (``guidance.decoder``).

    python scripts/distill_tiny_decoder.py --config configs/tiny_decoder_digits.yaml [key=value ...]
    python scripts/distill_tiny_decoder.py --config configs/tiny_decoder_digits.yaml steps=5 output_dir=/tmp/td  # quick

Refuses a non-empty output_dir unless ``overwrite=true``; the folder appears only when complete.
"""

import shlex
import sys

from al.cli import cli_entry
from al.config import cli_parser, load_config
from guidedgen.training.tiny_decoder import DistillTinyDecoderConfig, run_distillation


@cli_entry()
def main(argv=None) -> int:
    args = cli_parser(__doc__).parse_args(argv)
    command = "python scripts/distill_tiny_decoder.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    config = load_config(DistillTinyDecoderConfig, args.config, args.overrides)
    output = run_distillation(config, command)
    print(f"saved the tiny decoder to {output} (see its README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
