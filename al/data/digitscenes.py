"""DigitScenes: a deterministic segmentation benchmark built from real data shipped in wheels.

Real handwritten digit scans (``sklearn.datasets.load_digits``, 1,797 8x8 scans) are upscaled,
coloured and composited onto crops of real photographs bundled with scikit-image. Labels come
from each digit's own stroke intensity, so they are exact. Classes: background + digits 0-9.
Recognising 6 vs 8 vs 9 needs shape, so uncertainty and acquisition matter.

Scene ``i`` of a split depends only on ``(seed, split, i)``: any subset, order or count of
scenes reproduces bit for bit. The train and val splits use disjoint digit scans.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
from skimage import data as skdata
from skimage.transform import resize

from al.data.base import ArrayDataset, DatasetError

DIGIT_CLASSES = ["background", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Photographs bundled in the scikit-image wheel (never the pooch-fetched ones: no network).
BACKGROUNDS = ("brick", "grass", "gravel", "camera", "coffee", "chelsea", "astronaut", "rocket")
SPLITS = {"train": 0, "val": 1, "test": 2}
# Every 5th scan is held out for val/test so evaluation digits were never seen in training.
_HELD_OUT_EVERY = 5


@dataclass
class DigitScenesLayout:
    """How scenes are drawn: everything but which split and how many (shared with the
    experiments' data config, ``al.data.config.DataConfig``)."""

    size: int = 64
    seed: int = 0
    min_digits: int = 2
    max_digits: int = 4
    min_digit_size: int = 18
    max_digit_size: int = 30
    # The digit classes drawn, as digit values; class id i + 1 is digits[i]. A subset is a
    # documented variant (fewer classes), not a different benchmark: scene i keeps its layout.
    digits: tuple[int, ...] = tuple(range(10))

    @property
    def classes(self) -> list[str]:
        return ["background"] + [DIGIT_CLASSES[d + 1] for d in self.digits]

    def layout(self) -> dict:
        """This layout's fields, as keyword arguments for another layout-based config."""
        return {f.name: getattr(self, f.name) for f in fields(DigitScenesLayout)}


@dataclass
class DigitScenesConfig(DigitScenesLayout):
    num_images: int = 200
    split: str = "train"


@lru_cache(maxsize=1)
def _backgrounds() -> tuple[np.ndarray, ...]:
    images = []
    for name in BACKGROUNDS:
        image = getattr(skdata, name)().astype(np.float32) / 255.0
        images.append(np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3])
    return tuple(images)


@lru_cache(maxsize=1)
def _digit_scans() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def _split_indices(split: str, digits: tuple[int, ...]) -> np.ndarray:
    targets = _digit_scans()[1]
    held_out = np.arange(len(targets)) % _HELD_OUT_EVERY == 0
    return np.flatnonzero((~held_out if split == "train" else held_out) & np.isin(targets, digits))


def _background_crop(rng: np.random.Generator, size: int) -> np.ndarray:
    source = _backgrounds()[rng.integers(len(BACKGROUNDS))]
    height, width = source.shape[:2]
    side = int(rng.integers(size, min(height, width) + 1))
    top, left = rng.integers(height - side + 1), rng.integers(width - side + 1)
    crop = resize(source[top:top + side, left:left + side], (size, size), order=1, anti_aliasing=True)
    tint = rng.uniform(0.75, 1.0, size=3).astype(np.float32)
    return (crop * tint).astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, local_mean: float) -> np.ndarray:
    """A saturated colour, bright on a dark background and dark on a bright one."""
    hue = rng.uniform(0.0, 1.0, size=3)
    hue[rng.integers(3)], hue[rng.integers(3)] = 1.0, 0.0
    colour = 0.55 + 0.45 * hue if local_mean < 0.5 else 0.3 * hue
    return colour.astype(np.float32)


def render_scene(config: DigitScenesConfig, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` of a split: ``(image uint8 [S, S, 3], mask uint8 [S, S])``."""
    rng = np.random.default_rng([config.seed, SPLITS[config.split], index])
    scans, targets = _digit_scans()
    pool = _split_indices(config.split, config.digits)
    class_of = {digit: i + 1 for i, digit in enumerate(config.digits)}
    size = config.size
    image = _background_crop(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(config.min_digits, config.max_digits + 1))):
        scan = pool[rng.integers(len(pool))]
        side = int(rng.integers(config.min_digit_size, min(config.max_digit_size, size) + 1))
        intensity = np.clip(resize(scans[scan], (side, side), order=3), 0.0, 1.0)
        top, left = rng.integers(size - side + 1), rng.integers(size - side + 1)
        window = (slice(top, top + side), slice(left, left + side))
        # Sharpened alpha: the visible stroke edge sits where the label threshold (0.5) is.
        alpha = np.clip((intensity - 0.25) / 0.5, 0.0, 1.0)[..., None]
        colour = _contrasting_colour(rng, float(image[window].mean()))
        image[window] = image[window] * (1.0 - alpha) + colour * alpha
        mask[window][intensity > 0.5] = class_of[int(targets[scan])]  # occludes digits drawn before it
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mask


def digit_scenes(config: DigitScenesConfig = DigitScenesConfig()) -> ArrayDataset:
    """Build ``config.num_images`` scenes in memory as an :class:`ArrayDataset`."""
    if config.split not in SPLITS:
        raise DatasetError(f"DigitScenes split {config.split!r} is unknown; choose one of {sorted(SPLITS)}")
    if config.num_images < 1:
        raise DatasetError(f"DigitScenes num_images must be >= 1, got {config.num_images}")
    if not config.digits or len(set(config.digits)) != len(config.digits) or not set(config.digits) <= set(range(10)):
        raise DatasetError(f"DigitScenes digits must be distinct values in 0-9, got {list(config.digits)}")
    if not 1 <= config.min_digits <= config.max_digits:
        raise DatasetError(f"DigitScenes needs 1 <= min_digits <= max_digits, got {config.min_digits}, {config.max_digits}")
    if not 1 <= config.min_digit_size <= config.max_digit_size:
        raise DatasetError(f"DigitScenes needs 1 <= min_digit_size <= max_digit_size, got "
                           f"{config.min_digit_size}, {config.max_digit_size}")
    if config.size < config.min_digit_size:
        raise DatasetError(f"DigitScenes size {config.size} is smaller than min_digit_size {config.min_digit_size}")
    scenes = [render_scene(config, i) for i in range(config.num_images)]
    images = np.stack([image for image, _ in scenes])
    masks = np.stack([mask for _, mask in scenes])
    ids = [f"{config.split}_{config.seed}_{i:06d}" for i in range(config.num_images)]
    return ArrayDataset(images, masks, config.classes, ids)
