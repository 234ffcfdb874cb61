"""Instance-level augmentation: regenerate one object inside a real image, keep the rest real.

The mode of Kupyn & Rupprecht, "Dataset Enhancement with Instance-Level Augmentations" (ECCV 2024),
per instance (a connected component of one class in the mask):

1. crop a square around it: its box grown by ``context`` x its size on each side, shifted and
   clipped into the image (diffusers' ``padding_mask_crop`` is the same idea);
2. resize the crop to the model's ``size`` (image: antialiased bilinear; mask: nearest);
3. regenerate the instance's pixels, dilated by an ellipse of ``inpaint_dilation`` (the sampler's
   ``KnownRegion``: the rest of the crop is the real image's latents);
4. resize the generated crop back and composite it over the real image with the instance mask
   dilated by a ``blend_dilation`` ellipse and blurred by a ``blend_blur`` Gaussian as alpha.

The label of the augmented image is the real mask: the regenerated object keeps its shape.
Morphology and blur are OpenCV's, as in the reference code (``cv2.getStructuringElement(
cv2.MORPH_ELLIPSE)``, ``cv2.dilate``, ``cv2.GaussianBlur`` with sigma from the kernel size).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from al.config import require
from al.data.base import SegmentationDataset


@dataclass
class InstanceConfig:
    """Which instances are regenerated and how (defaults: the reference's, for 512 px images)."""

    size: int = 512  # the generator's resolution: crops are resized to size x size
    classes: Optional[list[str]] = None  # class names whose instances are regenerated; null = all but "background"
    min_area: int = 1000  # pixels, in the image
    max_per_image: int = 10  # the largest instances of an image
    probability: float = 1.0  # each instance is a unit with this probability (the reference swaps with 0.5)
    context: float = 0.9  # the box grows by this share of its width / height on each side
    inpaint_dilation: int = 13  # ellipse kernel (pixels of the crop at ``size``) around the regenerated instance
    blend_dilation: int = 5  # ellipse kernel of the compositing alpha, in image pixels
    blend_blur: int = 5  # Gaussian kernel of the compositing alpha (odd)
    strength: float = 1.0  # the share of the schedule run inside the region (1 = from pure noise)

    def validate(self) -> None:
        require(self.size >= 8, "instances.size", self.size, "the generator's resolution in pixels (e.g. 512)")
        require(self.min_area >= 1, "instances.min_area", self.min_area, "an integer >= 1 (pixels)")
        require(self.max_per_image >= 1, "instances.max_per_image", self.max_per_image, "an integer >= 1")
        require(0.0 < self.probability <= 1.0, "instances.probability", self.probability, "a number in (0, 1]")
        require(self.context >= 0.0, "instances.context", self.context, "a number >= 0 (share of the box per side)")
        for key in ("inpaint_dilation", "blend_dilation"):
            require(getattr(self, key) >= 1, f"instances.{key}", getattr(self, key), "an integer >= 1 (1 = no dilation)")
        require(self.blend_blur >= 1 and self.blend_blur % 2 == 1, "instances.blend_blur", self.blend_blur,
                "an odd integer >= 1 (1 = no blur)")
        require(0.0 < self.strength <= 1.0, "instances.strength", self.strength, "a number in (0, 1]")

    def class_ids(self, classes: Sequence[str]) -> list[int]:
        if self.classes is None:
            return [i for i, name in enumerate(classes) if name != "background"]
        for name in self.classes:
            require(name in classes, "instances.classes", name, f"class names of the data {list(classes)}")
        return [classes.index(name) for name in self.classes]


@dataclass(frozen=True)
class Instance:
    """One regenerable object: ``rank`` among its image's chosen instances (largest first)."""

    source_index: int
    rank: int
    class_id: int
    area: int


@dataclass
class Crop:
    box: tuple[int, int, int]  # top, left, side in image pixels
    image: Tensor  # [3, size, size] in [0, 1]
    mask: Tensor  # [size, size] class ids
    regenerate: Tensor  # [size, size] bool: the instance dilated by inpaint_dilation


def components(mask: np.ndarray, class_ids: Sequence[int], min_area: int, max_count: int) -> list[tuple[int, np.ndarray]]:
    """``(class id, bool [H, W])`` of the connected components (8-connected) of ``class_ids`` in
    ``mask`` with at least ``min_area`` pixels, the ``max_count`` largest, largest first (ties:
    lower class id, then raster order of the component)."""
    found = []
    for class_id in class_ids:
        labels, count = ndimage.label(mask == class_id, structure=np.ones((3, 3), dtype=bool))
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        found += [(int(areas[k]), class_id, k, labels == k) for k in range(1, count + 1) if areas[k] >= min_area]
    found.sort(key=lambda item: (-item[0], item[1], item[2]))
    return [(class_id, component) for _, class_id, _, component in found[:max_count]]


def _unit_draw(seed: int, source_index: int, rank: int) -> float:
    """A uniform draw in [0, 1), a pure function of its key (so units do not depend on order)."""
    digest = hashlib.sha256(f"instance:{seed}:{source_index}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2 ** 64


def find_instances(dataset: SegmentationDataset, config: InstanceConfig, seed: int) -> list[Instance]:
    """Every unit of instance mode over ``dataset``, in source order."""
    class_ids = config.class_ids(list(dataset.classes))
    units = []
    for index in range(len(dataset)):
        mask = dataset[index].mask.numpy()
        for rank, (class_id, component) in enumerate(components(mask, class_ids, config.min_area, config.max_per_image)):
            if config.probability == 1.0 or _unit_draw(seed, index, rank) < config.probability:
                units.append(Instance(index, rank, class_id, int(component.sum())))
    return units


def instance_mask(mask: np.ndarray, instance: Instance, config: InstanceConfig, class_ids: Sequence[int]) -> np.ndarray:
    """The bool ``[H, W]`` pixels of ``instance`` in its source's ``mask``."""
    return components(mask, class_ids, config.min_area, config.max_per_image)[instance.rank][1]


def crop_box(instance: np.ndarray, context: float) -> tuple[int, int, int]:
    """``(top, left, side)`` of a square around the bool ``[H, W]`` ``instance``: its box grown by
    ``context`` x its height / width on each side, the longer side kept, centred on the box and
    shifted into the image; no larger than the image's short side."""
    height, width = instance.shape
    rows, cols = np.nonzero(instance)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = int(round(max((bottom - top) * (1 + 2 * context), (right - left) * (1 + 2 * context))))
    side = min(max(side, 1), height, width)
    centre_row, centre_col = (top + bottom) / 2, (left + right) / 2
    crop_top = int(np.clip(round(centre_row - side / 2), 0, height - side))
    crop_left = int(np.clip(round(centre_col - side / 2), 0, width - side))
    return crop_top, crop_left, side


def ellipse(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def dilate(mask: np.ndarray, size: int) -> np.ndarray:
    """bool ``[H, W]`` dilated by a ``size`` x ``size`` ellipse."""
    return cv2.dilate(mask.astype(np.uint8), ellipse(size)).astype(bool)


def blend_alpha(instance: np.ndarray, dilation: int, blur: int) -> np.ndarray:
    """float32 ``[H, W]`` in [0, 1]: the instance dilated, then Gaussian-blurred (the reference's alpha)."""
    alpha = dilate(instance, dilation).astype(np.float32)
    return cv2.GaussianBlur(alpha, (blur, blur), 0) if blur > 1 else alpha


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """``[3, h, w]`` -> ``[3, *size]``, antialiased bilinear, clipped to [0, 1]."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def make_crop(image: Tensor, mask: Tensor, instance: np.ndarray, config: InstanceConfig) -> Crop:
    """The crop around ``instance`` at the model's size, with its regenerated region."""
    top, left, side = crop_box(instance, config.context)
    window = (slice(top, top + side), slice(left, left + side))
    size = (config.size, config.size)
    crop_mask = F.interpolate(mask[window][None, None].float(), size=size, mode="nearest")[0, 0].long()
    crop_instance = F.interpolate(torch.from_numpy(instance[window])[None, None].float(), size=size, mode="nearest")[0, 0]
    regenerate = torch.from_numpy(dilate(crop_instance.bool().numpy(), config.inpaint_dilation))
    return Crop((top, left, side), resize_image(image[:, window[0], window[1]], size), crop_mask, regenerate)


def paste(image: Tensor, generated: Tensor, instance: np.ndarray, box: tuple[int, int, int], config: InstanceConfig) -> Tensor:
    """``image [3, H, W]`` with the ``generated [3, size, size]`` crop composited in at ``box``
    through the instance's blend alpha (outside the crop, and where alpha is 0, the image as it was)."""
    top, left, side = box
    alpha = torch.from_numpy(blend_alpha(instance, config.blend_dilation, config.blend_blur)).to(image)
    back = torch.zeros_like(image)
    back[:, top:top + side, left:left + side] = resize_image(generated.to(image), (side, side))
    inside = torch.zeros_like(alpha)
    inside[top:top + side, left:left + side] = 1
    alpha = alpha * inside  # the alpha's blur may reach past a crop that is clipped by the image
    return alpha * back + (1 - alpha) * image
