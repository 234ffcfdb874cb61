"""Which dataset a run reads: the config block every script shares (``data:`` / ``masks:``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from al.config import require
from al.data.base import SegmentationDataset
from al.data.digitscenes import DigitScenesConfig, DigitScenesLayout, digit_scenes
from al.data.folder import load_folder
from al.data.standard import LAYOUTS
from al.data.transforms import TransformConfig

DATA_KINDS = ("digitscenes", "folder", "masks", *LAYOUTS)  # "masks": a folder of masks only (generation)
DATA_CONFIG_NAME = "data.json"  # in each AL run folder: how scripts/annotate.py rebuilds the pool


@dataclass
class DataConfig(DigitScenesLayout):
    """A dataset with a train and a val split. ``digitscenes`` builds them in memory from the
    inherited layout fields; every other kind reads ``root/<split>`` from disk."""

    kind: str = "digitscenes"
    root: Optional[str] = None  # for every kind but digitscenes
    train_split: str = "train"
    val_split: str = "val"
    # DigitScenes only: scenes per split
    num_train_images: int = 200
    num_val_images: int = 200
    # How training, evaluation and pool scoring bring images of any size to the model; the
    # datasets built here always hold the images as read (the label journal's pixels)
    transforms: TransformConfig = field(default_factory=TransformConfig)

    def __post_init__(self):
        if isinstance(self.transforms, dict):  # rebuilt from a recorded data.json
            self.transforms = TransformConfig(**self.transforms)

    def validate(self, prefix: str = "data") -> None:
        require(self.kind in DATA_KINDS, f"{prefix}.kind", self.kind, f"one of {list(DATA_KINDS)}")
        require(self.kind == "digitscenes" or self.root is not None, f"{prefix}.root", self.root,
                f"the dataset folder (needed for {prefix}.kind={self.kind!r})")
        self.transforms.validate(f"{prefix}.transforms")

    def as_record(self) -> dict:
        """This config as runs record it (``al.resume.identity``): default transforms are left
        out, so what runs recorded before transforms existed still matches."""
        values = asdict(self)
        if self.transforms == TransformConfig():
            values.pop("transforms")
        return values

    def build(self, split: str) -> SegmentationDataset:
        if self.kind == "digitscenes":
            count = self.num_train_images if split == self.train_split else self.num_val_images
            layout = {**self.layout(), "digits": tuple(self.digits)}
            return digit_scenes(DigitScenesConfig(num_images=count, split=split, **layout))
        if self.kind in ("folder", "masks"):
            return load_folder(Path(self.root) / split, masks_only=self.kind == "masks")
        return LAYOUTS[self.kind](self.root, split)
