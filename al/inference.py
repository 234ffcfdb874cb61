"""Running a model on images of any size, with every output on the original pixels.

Images are batched by size (:func:`size_groups`). A batch is resized to the training scale
(``TransformConfig.short_side``) and padded at the bottom and right to a multiple the model takes
(:func:`input_multiple`); what comes out is cropped and resized back (:class:`View`). Scores,
predictions and the pixels the loop queries are therefore always in the coordinates of the image
as read, which are the label journal's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor, nn

from al.data.transforms import (
    Size,
    TransformConfig,
    crop_back,
    pad_to,
    resize_image,
    resize_labels,
    resize_maps,
    round_to_multiple,
)


def input_multiple(model: nn.Module) -> int:
    """The multiple of its input's sides that ``model`` needs (1: any size)."""
    return getattr(model, "input_multiple", 1)


def size_groups(sizes: Sequence[Sequence[int]]) -> list[list[int]]:
    """Positions of ``sizes`` grouped by size; groups in order of first appearance, positions in order."""
    groups: dict[tuple, list[int]] = {}
    for position, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(position)
    return list(groups.values())


@dataclass(frozen=True)
class View:
    """How a batch of ``original``-sized images is shown to a model: resized to ``scaled`` and
    padded to ``padded``; its outputs come back cropped and resized to ``original``."""

    original: Size
    scaled: Size
    padded: Size

    @classmethod
    def of(cls, size: Sequence[int], transforms: Optional[TransformConfig] = None, multiple: int = 1) -> "View":
        scaled = (transforms or TransformConfig()).scaled_size(*size)
        return cls(tuple(size), scaled, round_to_multiple(scaled, multiple))

    @property
    def is_identity(self) -> bool:
        return self.original == self.scaled == self.padded

    def images(self, images: Tensor) -> Tensor:
        """``[N, 3, *original] -> [N, 3, *padded]`` (padding black)."""
        return pad_to(resize_image(images, self.scaled), self.padded, 0.0)

    def maps(self, maps: Tensor) -> Tensor:
        """Probabilities or scores back on the original pixels: ``[N, C, *padded] -> [N, C, *original]``."""
        return resize_maps(crop_back(maps, self.scaled), self.original)

    def labels(self, labels: Tensor) -> Tensor:
        """Class ids back on the original pixels: ``[N, *padded] -> [N, *original]``."""
        return resize_labels(crop_back(labels, self.scaled), self.original)
