"""Train the small SD + ControlNet set on DigitScenes (VAE, then UNet + ControlNet).

    accelerate launch scripts/train_controlnet.py --config configs/controlnet_digits.yaml [key=value ...]
    python scripts/train_controlnet.py --config configs/controlnet_digits.yaml max_train_steps=20  # quick

A re-run resumes: the finished VAE is reused and stage 2 continues from its latest checkpoint.
"""

import shlex
import sys

from al.cli import cli_entry
from al.config import cli_parser, load_config
from guidedgen.training import TrainControlNetConfig, train_controlnet


@cli_entry()
def main(argv=None) -> int:
    args = cli_parser(__doc__).parse_args(argv)
    command = "python scripts/train_controlnet.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    config = load_config(TrainControlNetConfig, args.config, args.overrides)
    output = train_controlnet(config, command)  # FileExistsError (an OSError): output_dir holds another run
    print(f"saved the component set to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
