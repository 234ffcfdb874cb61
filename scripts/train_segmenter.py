"""Train a segmenter densely on a dataset and save it (safetensors + config.json).

    python scripts/train_segmenter.py --config configs/segmenter_digits.yaml [key=value ...]

``synthetic.root=<generated folder>`` mixes a set written by scripts/generate.py into every batch
(``synthetic.share`` of it): the retraining step of train -> generate -> retrain.

Skips training when ``output_dir`` already holds a segmenter trained with the same settings;
refuses one trained with other settings (naming them) unless ``overwrite=true``.
"""

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from al.atomic import atomic_write_bytes
from al.cli import cli_entry
from al.config import cli_parser, load_config
from al.data.base import DatasetError
from al.data.config import DataConfig
from al.folder_lock import FolderLock
from al.models import ModelConfig
from al.resume import check_resume, identity
from al.train import DenseTargetDataset, SyntheticConfig, TrainConfig, TrainingSource, evaluate, train_segmenter


@dataclass
class TrainSegmenterConfig:
    output_dir: str = "outputs/segmenter_digits"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Generated pairs of the same classes mixed into every batch; an epoch then shows
    # len(real) / (1 - share) items, so the real images are still seen once per epoch on average
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    progress: bool = True
    overwrite: bool = False  # replace a segmenter trained with other settings

    def validate(self) -> None:
        self.data.validate("data")
        self.train.validate("train")
        self.model.validate("model")
        self.synthetic.validate("synthetic")

    def as_record(self) -> dict:
        """This config as its training record holds it (``al.resume.identity``): without a synthetic
        set the block is left out, so segmenters trained before it existed keep their identity."""
        values = asdict(self)
        if self.synthetic.root is None:
            values.pop("synthetic")
        return values


NOT_IDENTITY = ("output_dir", "progress", "overwrite")  # settings that do not change the segmenter


@cli_entry()
def main(argv=None) -> int:
    args = cli_parser(__doc__).parse_args(argv)
    config = load_config(TrainSegmenterConfig, args.config, args.overrides)
    config.validate()
    output = Path(config.output_dir)
    # the folder's one writer, taken before training: an unwritable output_dir fails here, not after
    with FolderLock(output, "segmenter folder"):
        record = output / "training.json"
        recorded = identity(read_record(record)["config"], NOT_IDENTITY) if record.exists() else None
        if check_resume(recorded, identity(config, NOT_IDENTITY), output, config.overwrite,
                        defaults=identity(TrainSegmenterConfig(), NOT_IDENTITY)):
            print(f"{output} already holds this segmenter: {record.read_text()}")
            return 0
        train_set, val_set = config.data.build(config.data.train_split), config.data.build(config.data.val_split)
        real, synthetic = DenseTargetDataset(train_set), config.synthetic.source(list(train_set.classes))
        sources = [TrainingSource(real)] if synthetic is None else [TrainingSource(real, 1.0 - synthetic.share), synthetic]
        torch.manual_seed(config.seed)
        model = config.model.build(train_set.num_classes)
        result = train_segmenter(model, sources, config.train, train_set.ignore_index,
                                 progress=config.progress, transforms=config.data.transforms)
        scores = evaluate(model, val_set, batch_size=config.train.batch_size, transforms=config.data.transforms)
        model.save_pretrained(output)
        atomic_write_bytes(record, json.dumps({
            "config": config.as_record(), "val_miou": scores.miou, "losses": result.losses,
            "sources": [{"name": s.name, "items": len(s.dataset), "share": s.share} for s in sources],
        }, indent=2).encode())
    print(f"saved {output}: validation mIoU {scores.miou:.3f}")
    return 0


def read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except ValueError:
        record = None
    if not isinstance(record, dict) or "config" not in record:
        raise DatasetError(f"{path} is not a training record (damaged JSON or no 'config'); delete it to retrain "
                           f"into this folder")
    return record


if __name__ == "__main__":
    sys.exit(main())
