"""Segmentation datasets: one interface for in-memory arrays and for files on disk.

A dataset yields :class:`Sample` objects: ``image`` float32 ``[3, H, W]`` in [0, 1], ``mask``
int64 ``[H, W]`` of class ids ``0..C-1`` or ``ignore_index``. Every error about a file names the
file and says how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset


class DatasetError(ValueError):
    """Bad dataset input; the message names the file (or key) and the fix."""


@dataclass
class Sample:
    id: str
    image: Tensor  # [3, H, W] float32 in [0, 1]
    mask: Tensor  # [H, W] int64 class ids or ignore_index


def read_rgb(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] from any image file PIL reads."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found; check the dataset root and split list") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"{path}: cannot read image ({error}); re-export it or remove it from the dataset") from None


def read_index_mask(path: Path) -> np.ndarray:
    """uint8/uint16 [H, W] class indices from a single-channel (L, P, I;16 or I) PNG."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I;16", "I"):
                raise DatasetError(
                    f"{path}: mask has mode {image.mode!r}; expected a single-channel PNG of class ids "
                    f"(mode L or P). Colour-coded masks must be converted to class ids first."
                )
            return np.array(image)
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask file not found; every image needs a mask of the same name") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"{path}: cannot read mask ({error}); re-export it as a PNG of class ids") from None


def to_sample(sample_id: str, image: np.ndarray, mask: np.ndarray) -> Sample:
    return Sample(
        id=sample_id,
        image=torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0),
        mask=torch.from_numpy(mask.astype(np.int64)),
    )


def check_pair(image: np.ndarray, mask: np.ndarray, num_classes: int, ignore_index: int, where: str) -> None:
    """Raise :class:`DatasetError` if sizes differ or the mask holds values that are no class."""
    if image.shape[:2] != mask.shape[:2]:
        raise DatasetError(
            f"{where}: image is {image.shape[1]}x{image.shape[0]} but mask is {mask.shape[1]}x{mask.shape[0]}; "
            f"image and mask must have the same size"
        )
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if bad.size:
        raise DatasetError(
            f"{where}: mask holds values {bad.tolist()[:10]} that are not class ids (0..{num_classes - 1}) "
            f"nor the ignore value {ignore_index}; fix the mask or the class list"
        )


class SegmentationDataset(Dataset):
    """Base: ``ids``, ``classes`` (names), ``ignore_index``; ``__getitem__`` returns a Sample."""

    classes: Sequence[str]
    ignore_index: int
    ids: list[str]
    has_images: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, sample_id: str) -> int:
        if not hasattr(self, "_index"):
            self._index = {sample_id: i for i, sample_id in enumerate(self.ids)}
        return self._index[sample_id]

    def image_shapes(self) -> dict[str, tuple[int, int]]:
        """``{id: (H, W)}`` of every sample."""
        return {s.id: tuple(s.mask.shape) for s in (self[i] for i in range(len(self)))}

    def validate(self) -> None:
        """Read every sample once (each read checks its own pair)."""
        for i in range(len(self)):
            self[i]


class ArrayDataset(SegmentationDataset):
    """In-memory dataset: ``images`` uint8 ``[N, H, W, 3]``, ``masks`` integer ``[N, H, W]``."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, classes: Sequence[str], ids: Sequence[str], ignore_index: int = 255):
        if len(images) == 0:
            raise DatasetError("dataset is empty: no images were given")
        if not (len(images) == len(masks) == len(ids)):
            raise DatasetError(f"{len(images)} images, {len(masks)} masks and {len(ids)} ids: counts must match")
        self.images, self.masks = images, masks
        self.classes, self.ids, self.ignore_index = list(classes), list(ids), ignore_index
        for i, sample_id in enumerate(self.ids):
            check_pair(images[i], masks[i], self.num_classes, ignore_index, where=f"sample {sample_id!r}")

    def __getitem__(self, index: int) -> Sample:
        return to_sample(self.ids[index], self.images[index], self.masks[index])

    def image_shapes(self) -> dict[str, tuple[int, int]]:
        return {sample_id: tuple(self.masks[i].shape) for i, sample_id in enumerate(self.ids)}


class FileDataset(SegmentationDataset):
    """Image/mask file pairs; ``label_map`` turns the stored values into class ids (e.g.
    Cityscapes labelIds -> trainIds) before the check against ``classes``."""

    def __init__(
        self,
        pairs: Sequence[tuple[str, Optional[Path], Path]],
        classes: Sequence[str],
        ignore_index: int = 255,
        label_map: Optional[Callable[[np.ndarray, Path], np.ndarray]] = None,
        source: str = "dataset",
    ):
        if not pairs:
            raise DatasetError(f"{source}: dataset is empty (no image/mask pairs found); check the root and split")
        self.pairs = list(pairs)
        self.ids = [sample_id for sample_id, _, _ in self.pairs]
        # A masks-only set (image path None) serves generation; its images are zeros.
        self.has_images = all(image_path is not None for _, image_path, _ in self.pairs)
        self.classes, self.ignore_index, self.label_map = list(classes), ignore_index, label_map

    def __getitem__(self, index: int) -> Sample:
        sample_id, image_path, mask_path = self.pairs[index]
        mask = read_index_mask(mask_path)
        image = read_rgb(image_path) if image_path is not None else np.zeros((*mask.shape[:2], 3), np.uint8)
        if self.label_map is not None:
            mask = self.label_map(mask, mask_path)
        check_pair(image, mask, self.num_classes, self.ignore_index, where=str(mask_path))
        return to_sample(sample_id, image, mask)

    def image_shapes(self) -> dict[str, tuple[int, int]]:
        shapes = {}
        for sample_id, _, mask_path in self.pairs:
            with Image.open(mask_path) as mask:
                shapes[sample_id] = (mask.height, mask.width)
        return shapes


def lookup_table(table: dict[int, int], size: int = 256) -> Callable[[np.ndarray, Path], np.ndarray]:
    """A label map from stored value to class id; values outside ``table`` are errors."""
    lut = np.full(size, -1, dtype=np.int64)
    for stored, class_id in table.items():
        lut[stored] = class_id

    def apply(mask: np.ndarray, path: Path) -> np.ndarray:
        if mask.max(initial=0) >= size or (lut[mask] < 0).any():
            known = sorted(table)
            unknown = sorted(set(np.unique(mask).tolist()) - set(known))
            raise DatasetError(f"{path}: mask values {unknown[:10]} are not in this layout's label table {known[0]}..{known[-1]}")
        return lut[mask]

    return apply
