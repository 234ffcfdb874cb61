"""Who answers the loop's label queries: a simulated annotator reading dense masks, or a person
answering later in the annotation page (the loop then stops with ``AwaitingAnnotations``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol

import torch
from torch import Tensor

from al.data.base import SegmentationDataset


class Oracle(Protocol):
    """Answers label queries: the class of each queried pixel (or the void value)."""

    def void_mask(self, image_id: str) -> Tensor:
        """BoolTensor[H, W] of pixels known to be unlabellable before asking."""

    def __call__(self, image_id: str, coords: Tensor) -> Optional[Tensor]:
        """Classes ``[n]`` of pixels ``coords [n, 2]`` (row, col), or None when the answers
        arrive later (a person answers through ``scripts/annotate.py``)."""


class AwaitingAnnotations(RuntimeError):
    """Queries are journaled and wait for a person; re-run the loop once they are answered."""

    def __init__(self, state_dir: Path, tag: str, pending: int):
        super().__init__(f"{pending} queried pixels of {tag!r} wait for an annotator: run "
                         f"`python scripts/annotate.py --state {state_dir}`, answer them, then re-run this command")
        self.state_dir, self.tag, self.pending = state_dir, tag, pending


class HumanOracle:
    """A person answers later, in the annotation page: nothing is known before asking."""

    def __init__(self, shapes: dict[str, tuple[int, int]]):
        self.shapes = shapes

    def void_mask(self, image_id: str) -> Tensor:
        return torch.zeros(self.shapes[image_id], dtype=torch.bool)

    def __call__(self, image_id: str, coords: Tensor) -> None:
        return None


class GroundTruthOracle:
    """Simulated annotator reading the dense masks of a dataset."""

    def __init__(self, dataset: SegmentationDataset):
        self.dataset = dataset

    def _mask(self, image_id: str) -> Tensor:
        return self.dataset[self.dataset.index_of(image_id)].mask

    def void_mask(self, image_id: str) -> Tensor:
        return self._mask(image_id) == self.dataset.ignore_index

    def __call__(self, image_id: str, coords: Tensor) -> Tensor:
        mask = self._mask(image_id)
        return mask[coords[:, 0], coords[:, 1]]
