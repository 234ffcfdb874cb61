"""Class-id masks <-> colour control images for segmentation ControlNets, and prompts.

The seg ControlNets (``lllyasviel/control_v11p_sd15_seg``) were trained on the ADE20K-150 palette,
so a user's classes are drawn in the colours of the ADE20K classes they resemble. Pixels with the
ignore value are black, as ADE20K's "other".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from al.data.standard import ADE20K_CLASSES

# ADE20K-150 palette, class id order (RGB triples).
_ADE20K_PALETTE_TEXT = """
120 120 120, 180 120 120, 6 230 230, 80 50 50, 4 200 3, 120 120 80, 140 140 140, 204 5 255, 230 230 230, 4 250 7,
224 5 255, 235 255 7, 150 5 61, 120 120 70, 8 255 51, 255 6 82, 143 255 140, 204 255 4, 255 51 7, 204 70 3,
0 102 200, 61 230 250, 255 6 51, 11 102 255, 255 7 71, 255 9 224, 9 7 230, 220 220 220, 255 9 92, 112 9 255,
8 255 214, 7 255 224, 255 184 6, 10 255 71, 255 41 10, 7 255 255, 224 255 8, 102 8 255, 255 61 6, 255 194 7,
255 122 8, 0 255 20, 255 8 41, 255 5 153, 6 51 255, 235 12 255, 160 150 20, 0 163 255, 140 140 140, 250 10 15,
20 255 0, 31 255 0, 255 31 0, 255 224 0, 153 255 0, 0 0 255, 255 71 0, 0 235 255, 0 173 255, 31 0 255,
11 200 200, 255 82 0, 0 255 245, 0 61 255, 0 255 112, 0 255 133, 255 0 0, 255 163 0, 255 102 0, 194 255 0,
0 143 255, 51 255 0, 0 82 255, 0 255 41, 0 255 173, 10 0 255, 173 255 0, 0 255 153, 255 92 0, 255 0 255,
255 0 245, 255 0 102, 255 173 0, 255 0 20, 255 184 184, 0 31 255, 0 255 61, 0 71 255, 255 0 204, 0 255 194,
0 255 82, 0 10 255, 0 112 255, 51 0 255, 0 194 255, 0 122 255, 0 255 163, 255 153 0, 0 255 10, 255 112 0,
143 255 0, 82 0 255, 163 255 0, 255 235 0, 8 184 170, 133 0 255, 0 255 92, 184 0 255, 255 0 31, 0 184 255,
0 214 255, 255 0 112, 92 255 0, 0 224 255, 112 224 255, 70 184 160, 163 0 255, 153 0 255, 71 255 0, 255 0 163,
255 204 0, 255 0 143, 0 255 235, 133 255 0, 255 0 235, 245 0 255, 255 0 122, 255 245 0, 10 190 212, 214 255 0,
0 204 255, 20 0 255, 255 255 0, 0 153 255, 0 41 255, 0 255 204, 41 0 255, 41 255 0, 173 0 255, 0 245 255,
71 0 255, 122 0 255, 0 255 184, 0 92 255, 184 255 0, 0 133 255, 255 214 0, 25 194 194, 102 255 0, 92 0 255
"""
ADE20K_PALETTE = np.array(
    [[int(v) for v in item.split()] for item in _ADE20K_PALETTE_TEXT.replace("\n", " ").split(",")], dtype=np.uint8
)
# Colours closer than this (Euclidean, 0-255 RGB) are hard for a ControlNet to tell apart.
MIN_COLOUR_DISTANCE = 30.0
DEFAULT_PROMPT_TEMPLATE = "{classes}, realistic looking, high-quality, extremely detailed"
DEFAULT_NEGATIVE_PROMPT = "low quality, bad quality, sketches"


@dataclass(frozen=True)
class Palette:
    """One RGB colour per class id (``colours [C, 3]`` uint8); ignore pixels become ``void_colour``."""

    classes: tuple[str, ...]
    colours: np.ndarray
    ignore_index: int = 255
    void_colour: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self):
        if len(self.classes) != len(self.colours):
            raise ValueError(f"{len(self.classes)} classes but {len(self.colours)} colours")
        close = closest_pairs(self.colours)
        if close:
            names = ", ".join(f"{self.classes[i]!r}/{self.classes[j]!r} ({d:.0f})" for i, j, d in close)
            warnings.warn(f"palette colours too close to tell apart (distance < {MIN_COLOUR_DISTANCE:.0f}): {names}")

    @classmethod
    def from_ade20k(cls, classes: Sequence[str], mapping: Optional[Mapping[str, str]] = None,
                    ignore_index: int = 255) -> "Palette":
        """Colour each class like an ADE20K class: ``mapping[name]`` (an ADE20K class name) or,
        if the name itself is an ADE20K class, that one."""
        mapping = dict(mapping or {})
        colours = []
        for name in classes:
            ade_name = mapping.get(name, name)
            if ade_name not in ADE20K_CLASSES:
                raise KeyError(
                    f"class {name!r} has no ADE20K colour: map it to one of the 150 ADE20K class names "
                    f"(e.g. mapping={{{name!r}: 'wall'}})"
                )
            colours.append(ADE20K_PALETTE[ADE20K_CLASSES.index(ade_name)])
        return cls(tuple(classes), np.stack(colours), ignore_index)

    def colourise(self, masks: Tensor) -> Tensor:
        """Control images in [0, 1]. Shape: ``masks [N, H, W]`` int -> ``[N, 3, H, W]`` float."""
        bad = masks[(masks < 0) | ((masks >= len(self.classes)) & (masks != self.ignore_index))]
        if bad.numel():
            raise ValueError(
                f"mask holds class ids {sorted(set(bad.tolist()))[:10]} outside 0..{len(self.classes) - 1} "
                f"(ignore value {self.ignore_index}); fix the masks or the class list"
            )
        table = torch.from_numpy(np.concatenate([self.colours, np.array([self.void_colour], np.uint8)]))
        index = torch.where(masks == self.ignore_index, len(self.classes), masks).long().cpu()
        return table[index].permute(0, 3, 1, 2).float().div(255.0).to(masks.device)


def distinct_ade20k_colours(count: int) -> np.ndarray:
    """``count`` ADE20K colours picked greedily to be far apart (starting from ADE20K's first),
    for classes with no ADE20K counterpart. ``[count, 3]`` uint8."""
    if count > len(ADE20K_PALETTE):
        raise ValueError(f"{count} classes but the ADE20K palette has {len(ADE20K_PALETTE)} colours; give colours")
    rgb = ADE20K_PALETTE.astype(np.float64)
    chosen = [0]
    nearest = np.sqrt(((rgb - rgb[0]) ** 2).sum(1))
    while len(chosen) < count:
        pick = int(nearest.argmax())
        chosen.append(pick)
        nearest = np.minimum(nearest, np.sqrt(((rgb - rgb[pick]) ** 2).sum(1)))
    return ADE20K_PALETTE[chosen]


def closest_pairs(colours: np.ndarray, threshold: float = MIN_COLOUR_DISTANCE) -> list[tuple[int, int, float]]:
    """Pairs of class ids whose colours are closer than ``threshold``."""
    rgb = colours.astype(np.float64)
    distance = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1))
    rows, cols = np.nonzero(np.triu(distance < threshold, k=1))
    return [(int(i), int(j), float(distance[i, j])) for i, j in zip(rows, cols)]


def prompt_for(mask: Tensor, classes: Sequence[str], template: str = DEFAULT_PROMPT_TEMPLATE,
               skip: Sequence[str] = ("background",)) -> str:
    """``template`` with ``{classes}`` = the names of the classes present in ``mask [H, W]``."""
    present = [classes[i] for i in torch.unique(mask).tolist() if 0 <= i < len(classes) and classes[i] not in skip]
    return template.format(classes=", ".join(present) if present else "a scene")


@dataclass
class PaletteConfig:
    ade20k_mapping: Optional[dict[str, str]] = None  # class name -> ADE20K class name
    colours: Optional[list[list[int]]] = None  # custom RGB per class
    # neither: C far-apart ADE20K colours (distinct_ade20k_colours)


def build_palette(config: PaletteConfig, classes: list[str], ignore_index: int) -> Palette:
    if config.colours is not None:
        return Palette(tuple(classes), np.array(config.colours, dtype=np.uint8), ignore_index)
    if config.ade20k_mapping is not None:
        return Palette.from_ade20k(classes, config.ade20k_mapping, ignore_index)
    return Palette(tuple(classes), distinct_ade20k_colours(len(classes)), ignore_index)
