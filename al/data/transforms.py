"""Bringing images of any size to the sizes models need (docs/design.md#image-sizes).

VOC and ADE20K images vary in size, CamVid's 360x480 is no multiple of 32, and a batch needs one
size. Pure tensor functions: images are float ``[..., 3, H, W]`` in [0, 1], label maps integer
``[..., H, W]`` (class ids or the ignore value). Padding goes to the bottom and right, so a pixel
keeps its coordinates and :func:`crop_back` undoes it; the label journal (``al.labels``) only ever
sees the original pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from al.config import require

Size = tuple[int, int]  # (height, width)


def short_side_size(height: int, width: int, side: int) -> Size:
    """The size with the short side ``side`` and the aspect ratio kept (long side rounded)."""
    scale = side / min(height, width)
    if height <= width:
        return side, max(1, round(width * scale))
    return max(1, round(height * scale)), side


def round_to_multiple(size: Size, multiple: int, down: bool = False) -> Size:
    """Each side rounded up (or ``down``, never below ``multiple``) to a multiple of ``multiple``."""
    if down:
        return tuple(max(multiple, side // multiple * multiple) for side in size)
    return tuple(math.ceil(side / multiple) * multiple for side in size)


def resize_image(image: Tensor, size: Size) -> Tensor:
    """Antialiased bilinear, clipped to [0, 1]. Shape: ``[..., 3, H, W] -> [..., 3, *size]``."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    flat = image.reshape(-1, *image.shape[-3:])
    resized = F.interpolate(flat, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return resized.reshape(*image.shape[:-2], *size)


def resize_maps(maps: Tensor, size: Size) -> Tensor:
    """Probabilities or scores, antialiased bilinear: every output is a convex combination of
    inputs, so probabilities still sum to 1 and MC variances stay >= 0. ``[N, C, H, W] -> [N, C, *size]``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", antialias=True, align_corners=False)


def resize_labels(labels: Tensor, size: Size) -> Tensor:
    """Nearest neighbour (pixel centres, as PIL's): every value is one of the input's, never a
    blend of two classes. Shape: ``[..., H, W] -> [..., *size]``."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    flat = labels.reshape(-1, 1, *labels.shape[-2:]).float()  # class ids and 255 are exact in float32
    resized = F.interpolate(flat, size=size, mode="nearest-exact")
    return resized.to(labels.dtype).reshape(*labels.shape[:-2], *size)


def resize_points(target: Tensor, size: Size, ignore_index: int) -> Tensor:
    """A sparse target resized point by point: each labelled pixel lands on the pixel that holds
    its centre in the new grid; the rest is ``ignore_index``. Nearest resizing would drop most of a
    few labelled pixels when shrinking. Where two labelled pixels land on one, the first in raster
    order wins. Shape: ``[H, W] -> size``."""
    height, width = target.shape
    out = torch.full(size, ignore_index, dtype=target.dtype)
    rows, cols = (target != ignore_index).nonzero(as_tuple=True)
    if len(rows) == 0:
        return out
    new_rows = ((rows.double() + 0.5) * size[0] / height).long().clamp_(max=size[0] - 1)
    new_cols = ((cols.double() + 0.5) * size[1] / width).long().clamp_(max=size[1] - 1)
    flat = new_rows * size[1] + new_cols
    cells, owner = torch.unique(flat, return_inverse=True)
    first = torch.full((len(cells),), len(flat)).scatter_reduce(0, owner, torch.arange(len(flat)), "amin")
    out.view(-1)[cells] = target[rows[first], cols[first]]
    return out


def pad_to(x: Tensor, size: Size, value: float) -> Tensor:
    """``x [..., H, W]`` padded at the bottom and right to ``size`` (>= its own) with ``value``."""
    bottom, right = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if bottom < 0 or right < 0:
        raise ValueError(f"cannot pad {tuple(x.shape[-2:])} to the smaller {tuple(size)}")
    return F.pad(x, (0, right, 0, bottom), value=value) if bottom or right else x


def crop_back(x: Tensor, size: Size) -> Tensor:
    """The top-left ``size`` of ``x [..., H, W]``: undoes :func:`pad_to`."""
    return x[..., :size[0], :size[1]]


def random_crop_or_pad(image: Tensor, target: Tensor, size: Size, ignore_index: int,
                       generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """A random ``size`` window of ``image [3, H, W]`` and ``target [H, W]``; a side shorter than
    the window is padded first (image 0, target ``ignore_index``), so padding is never labelled."""
    padded = (max(size[0], image.shape[-2]), max(size[1], image.shape[-1]))
    image, target = pad_to(image, padded, 0.0), pad_to(target, padded, ignore_index)
    top = int(torch.randint(padded[0] - size[0] + 1, (1,), generator=generator))
    left = int(torch.randint(padded[1] - size[1] + 1, (1,), generator=generator))
    window = (slice(top, top + size[0]), slice(left, left + size[1]))
    return image[:, window[0], window[1]], target[window]


def centre_crop_or_pad(x: Tensor, size: Size, value: float) -> Tensor:
    """``x [..., H, W]`` brought to ``size``: each longer side cropped and each shorter side padded
    with ``value``, both centred."""
    for axis, want in ((-2, size[0]), (-1, size[1])):
        have = x.shape[axis]
        if have > want:
            x = x.narrow(axis, (have - want) // 2, want)
        elif have < want:
            before = (want - have) // 2
            pads = (before, want - have - before, 0, 0) if axis == -1 else (0, 0, before, want - have - before)
            x = F.pad(x, pads, value=value)
    return x


@dataclass
class TransformConfig:
    """How training, evaluation and pool scoring see images of any size (the ``transforms:`` block
    of a ``data:`` config). The defaults show every image as read: fixed-size sets need nothing."""

    # Resize (image bilinear, mask nearest) so the short side has this many pixels; evaluation and
    # scoring see the same scale, and their outputs are resized back to the original pixels.
    short_side: Optional[int] = None
    # Training only: a random [height, width] window of each (resized) image, padded with the
    # ignore value where the image is smaller. null: whole images, a batch padded to its largest.
    crop_size: Optional[list[int]] = None

    def validate(self, prefix: str = "transforms") -> None:
        require(self.short_side is None or self.short_side >= 1, f"{prefix}.short_side", self.short_side,
                "null or an integer >= 1 (pixels)")
        require(self.crop_size is None or (len(self.crop_size) == 2 and min(self.crop_size) >= 1),
                f"{prefix}.crop_size", self.crop_size, "null or [height, width] in pixels")

    def scaled_size(self, height: int, width: int) -> Size:
        """The size an image of ``(height, width)`` is shown at."""
        return (height, width) if self.short_side is None else short_side_size(height, width, self.short_side)

    def training_pair(self, image: Tensor, target: Tensor, ignore_index: int, sparse: bool = False,
                      generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """``image [3, H, W]`` and its ``target [H, W]`` as training sees them: resized, then a
        random crop. ``sparse``: the target holds a few labelled pixels, resized point by point."""
        size = self.scaled_size(*target.shape)
        if size != tuple(target.shape):
            image = resize_image(image, size)
            target = resize_points(target, size, ignore_index) if sparse else resize_labels(target, size)
        if self.crop_size is not None:
            image, target = random_crop_or_pad(image, target, tuple(self.crop_size), ignore_index, generator)
        return image, target
