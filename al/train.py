"""Training a segmenter on sparse pixel labels (cross-entropy with ignore_index) with accelerate,
and evaluating it on a dense validation set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from al.data.base import Sample, SegmentationDataset
from al.labels import SparseLabels
from al.metrics import SegmentationScores, confusion_matrix
from al.models import Segmenter


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 16
    lr: float = 5e-4  # PixelPick's Adam settings
    weight_decay: float = 2e-4
    mixed_precision: str = "no"  # accelerate: "no", "fp16", "bf16"
    seed: int = 0


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
    train_set: Dataset,
    config: TrainConfig,
    ignore_index: int = 255,
    accelerator: Optional[Accelerator] = None,
    progress: bool = True,
) -> TrainResult:
    """Train in place with Adam on ``{"image", "target"}`` items; returns the loss per epoch."""
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=generator, drop_last=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    result = TrainResult()
    bar = tqdm(range(config.epochs), desc="train", disable=not progress or not accelerator.is_local_main_process, leave=False)
    for _ in bar:
        total, batches = 0.0, 0
        for batch in loader:
            with accelerator.autocast():
                loss = sparse_cross_entropy(model(batch["image"]), batch["target"], ignore_index)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        result.losses.append(total / max(1, batches))
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    model.eval()
    return result


@torch.no_grad()
def evaluate(model: Segmenter, dataset: SegmentationDataset, batch_size: int = 32, progress: bool = False) -> SegmentationScores:
    """mIoU of the argmax prediction against the dense masks of ``dataset``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    confusion = torch.zeros(dataset.num_classes, dataset.num_classes, dtype=torch.long)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_samples)
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        pred = model(batch["image"].to(device)).argmax(1)
        confusion += confusion_matrix(pred, batch["mask"].to(device), dataset.num_classes, dataset.ignore_index)
    model.train(was_training)
    return SegmentationScores.from_confusion(confusion)
