"""Training a segmenter on sparse pixel labels (cross-entropy with ignore_index) with accelerate,
optionally mixed with other sources (dense synthetic pairs), and evaluating it on a dense
validation set."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, WeightedRandomSampler, default_collate
from tqdm.auto import tqdm

from al.config import require
from al.data.base import DatasetError, Sample, SegmentationDataset
from al.data.folder import DATASET_JSON, load_folder
from al.data.transforms import TransformConfig, pad_to, round_to_multiple
from al.deal import difficulty_loss
from al.inference import View, input_multiple, size_groups
from al.labels import SparseLabels
from al.metrics import SegmentationScores, confusion_matrix
from al.models import Segmenter

LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 16
    lr: float = 5e-4  # PixelPick's Adam settings
    weight_decay: float = 2e-4
    # "constant" (PixelPick) or "cosine": decay to 0 over all steps, so the last epochs average out
    # the noise a constant Adam step leaves in the final weights
    lr_schedule: str = "constant"
    mixed_precision: str = "no"  # accelerate: "no", "fp16", "bf16"
    seed: int = 0

    def validate(self, prefix: str = "train") -> None:
        require(self.epochs >= 1, f"{prefix}.epochs", self.epochs, "an integer >= 1")
        require(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "an integer >= 1")
        require(math.isfinite(self.lr) and self.lr > 0, f"{prefix}.lr", self.lr, "a finite number > 0")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"{prefix}.weight_decay",
                self.weight_decay, "a finite number >= 0")
        require(self.lr_schedule in LR_SCHEDULES, f"{prefix}.lr_schedule", self.lr_schedule, f"one of {LR_SCHEDULES}")
        require(self.mixed_precision in MIXED_PRECISIONS, f"{prefix}.mixed_precision", self.mixed_precision,
                f"one of {MIXED_PRECISIONS} (accelerate's)")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean loss per epoch


class SparseTargetDataset(Dataset):
    """``{"image": [3,H,W], "target": [H,W]}`` with labelled pixels from ``labels``, ignore elsewhere."""

    def __init__(self, dataset: SegmentationDataset, labels: SparseLabels, ignore_index: int = 255):
        self.dataset, self.labels, self.ignore_index = dataset, labels, ignore_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.dataset[index]
        return {"image": sample.image, "target": self.labels.as_target(sample.id, self.ignore_index)}


class DenseTargetDataset(Dataset):
    """``{"image", "target"}`` with every pixel's ground truth: the fully supervised reference."""

    def __init__(self, dataset: SegmentationDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.dataset[index]
        return {"image": sample.image, "target": sample.mask}


@dataclass
class TrainingSource:
    """One source of ``{"image", "target"}`` items in a mixed run: the expected ``share`` of
    each batch it supplies, and the weight of its loss term."""

    dataset: Dataset
    share: float = 1.0
    loss_weight: float = 1.0
    name: str = "real"
    sparse: bool = False  # its targets are a few labelled pixels (resized point by point)


@dataclass
class SyntheticConfig:
    """Dense synthetic pairs (a ``guidedgen`` output folder) mixed into the real training data (the
    ``synthetic:`` block of an AL loop and of scripts/train_segmenter.py)."""

    root: Optional[str] = None  # None = real labels only
    share: float = 0.5  # expected fraction of each batch drawn from the synthetic pairs
    loss_weight: float = 1.0

    def validate(self, prefix: str = "synthetic") -> None:
        require(0.0 < self.share < 1.0, f"{prefix}.share", self.share,
                "a number in (0, 1): the expected fraction of each batch drawn from the synthetic pairs")
        require(self.root is None or Path(self.root, DATASET_JSON).is_file(), f"{prefix}.root", self.root,
                f"null or a folder written by scripts/generate.py (with a {DATASET_JSON})")

    def source(self, classes: list[str]) -> Optional[TrainingSource]:
        if self.root is None:
            return None
        dataset = load_folder(self.root)
        if list(dataset.classes) != list(classes):
            raise DatasetError(f"{self.root}: synthetic classes {list(dataset.classes)} differ from the real ones "
                               f"{list(classes)}; generate from masks of the same dataset")
        return TrainingSource(DenseTargetDataset(dataset), self.share, self.loss_weight, "synthetic")


class _Tagged(Dataset):
    def __init__(self, dataset: Dataset, source: int):
        self.dataset, self.source = dataset, source

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "source": self.source}


class TrainingCollate:
    """Batches of ``{"image", "target"[, "source"]}`` items of any size: each item as
    ``transforms`` shows it to training (resized, randomly cropped), then the batch padded at the
    bottom and right to one size that the model takes (image 0, target ``ignore_index``).
    ``sparse[s]``: source s's targets are sparse. Items of one size that the model takes, with
    default transforms, are stacked untouched."""

    def __init__(self, transforms: Optional[TransformConfig], sparse: Sequence[bool], ignore_index: int,
                 multiple: int = 1, generator: Optional[torch.Generator] = None):
        self.transforms, self.sparse, self.ignore_index = transforms or TransformConfig(), list(sparse), ignore_index
        self.multiple, self.generator = multiple, generator

    def __call__(self, items: list[dict]) -> dict:
        pairs = [self.transforms.training_pair(item["image"], item["target"], self.ignore_index,
                                               self.sparse[item.get("source", 0)], self.generator) for item in items]
        size = round_to_multiple((max(i.shape[-2] for i, _ in pairs), max(i.shape[-1] for i, _ in pairs)),
                                 self.multiple)
        return default_collate([{**item, "image": pad_to(image, size, 0.0),
                                 "target": pad_to(target, size, self.ignore_index)}
                                for item, (image, target) in zip(items, pairs)])


def crop_generator(seed: int) -> torch.Generator:
    """The random crops' own stream: without crops, the data order's stream is as it always was."""
    digest = hashlib.sha256(f"{seed}/crops".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _mixed_loader(sources: Sequence[TrainingSource], batch_size: int, generator: torch.Generator,
                  collate: Optional[TrainingCollate] = None) -> DataLoader:
    """Batches drawn with replacement so source s fills ``share_s`` of them in expectation; one
    epoch shows the first source's size / share items (its images once each, on average)."""
    for source in sources:
        if source.share <= 0 or len(source.dataset) == 0:
            raise ValueError(f"training source {source.name!r}: share must be > 0 and the dataset non-empty")
    total_share = sum(s.share for s in sources)
    weights = torch.cat([torch.full((len(s.dataset),), s.share / total_share / len(s.dataset), dtype=torch.float64)
                         for s in sources])
    epoch = max(1, round(len(sources[0].dataset) * total_share / sources[0].share))
    sampler = WeightedRandomSampler(weights, epoch, replacement=True, generator=generator)
    dataset = ConcatDataset([_Tagged(s.dataset, i) for i, s in enumerate(sources)])
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)


def mixed_cross_entropy(logits: Tensor, target: Tensor, source: Tensor, loss_weights: Sequence[float],
                        ignore_index: int = 255) -> Tensor:
    """Sum over sources of ``loss_weight_s`` x the mean CE over source s's labelled pixels.

    Shape: ``logits [N, C, H, W], target [N, H, W], source [N] -> []``.
    """
    total = logits.sum() * 0.0  # keeps the graph when a batch holds no labelled pixel
    for index, weight in enumerate(loss_weights):
        chosen = source == index
        if bool(chosen.any()):
            total = total + weight * sparse_cross_entropy(logits[chosen], target[chosen], ignore_index)
    return total


def collate_samples(samples: list[Sample]) -> dict:
    return {
        "id": [s.id for s in samples],
        "image": torch.stack([s.image for s in samples]),
        "mask": torch.stack([s.mask for s in samples]),
    }


def sparse_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Mean CE over labelled pixels; exactly 0 (with a graph) when a batch has none.

    Shape: ``logits [N, C, H, W], target [N, H, W] -> []``.
    """
    labelled = (target != ignore_index).sum()
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return total / labelled.clamp_min(1)


def train_segmenter(
    model: Segmenter,
    train_set: Union[Dataset, Sequence[TrainingSource]],
    config: TrainConfig,
    ignore_index: int = 255,
    accelerator: Optional[Accelerator] = None,
    progress: bool = True,
    transforms: Optional[TransformConfig] = None,
) -> TrainResult:
    """Train in place with Adam on ``{"image", "target"}`` items, from one dataset or mixed
    :class:`TrainingSource` s; returns the loss per epoch. Items of any size are brought to the
    model by ``transforms`` (:class:`TrainingCollate`). A segmenter with DEAL's difficulty
    branch also learns it: its weighted BCE against the segmenter's own errors on the labelled
    pixels is added to the loss (``al.deal.difficulty_loss``)."""
    config.validate()
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision)
    generator = torch.Generator().manual_seed(config.seed)
    sources = list(train_set) if isinstance(train_set, (list, tuple)) else [TrainingSource(train_set)]
    loss_weights = [s.loss_weight for s in sources]
    collate = TrainingCollate(transforms, [s.sparse for s in sources], ignore_index, input_multiple(model),
                              crop_generator(config.seed))
    if len(sources) == 1 and sources[0].loss_weight == 1.0:  # plain shuffling, every item once per epoch
        loader = DataLoader(_Tagged(sources[0].dataset, 0), batch_size=config.batch_size, shuffle=True,
                            generator=generator, collate_fn=collate)
    else:
        loader = _mixed_loader(sources, config.batch_size, generator, collate)
    optimizer = torch.optim.Adam(model.optimizer_groups(config.lr), lr=config.lr, weight_decay=config.weight_decay)
    schedule = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=0,
                             num_training_steps=config.epochs * len(loader))
    branch = model.difficulty_branch
    model, optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)
    model.train()
    result = TrainResult()
    bar = tqdm(range(config.epochs), desc="train", disable=not progress or not accelerator.is_local_main_process, leave=False)
    for _ in bar:
        total, batches = 0.0, 0
        for batch in loader:
            with accelerator.autocast():
                logits = model(batch["image"])
                loss = mixed_cross_entropy(logits, batch["target"], batch["source"], loss_weights, ignore_index)
                if branch is not None:  # gradients reach the logits too, as in DEAL
                    loss = loss + difficulty_loss(branch(logits.float()), logits, batch["target"], ignore_index)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            schedule.step()
            total, batches = total + loss.item(), batches + 1
        result.losses.append(total / max(1, batches))
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    model.eval()
    return result


@torch.no_grad()
def evaluate(model: nn.Module, dataset: SegmentationDataset, batch_size: int = 32, progress: bool = False,
             transforms: Optional[TransformConfig] = None) -> SegmentationScores:
    """mIoU of ``model.predict`` (a segmenter's argmax, an ensemble's majority vote) against the
    dense masks of ``dataset``, on the original pixels: images of one size are batched, shown at
    ``transforms``' scale padded to what the model takes, and the prediction is brought back."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    confusion = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.long)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=list)
    for samples in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        for group in size_groups([s.mask.shape for s in samples]):
            batch = collate_samples([samples[i] for i in group])
            view = View.of(batch["mask"].shape[1:], transforms, input_multiple(model))
            pred = view.labels(model.predict(view.images(batch["image"].to(device))))
            confusion += confusion_matrix(pred, batch["mask"].to(device), dataset.num_classes, dataset.ignore_index)
    model.train(was_training)
    return SegmentationScores.from_confusion(confusion)
