"""Segmentation datasets: the project layout, standard layouts, and DigitScenes."""

from al.data.base import (
    ArrayDataset,
    DatasetError,
    FileDataset,
    Sample,
    SegmentationDataset,
)
from al.data.digitscenes import DIGIT_CLASSES, DigitScenesConfig, digit_scenes
from al.data.folder import DatasetWriter, load_folder
from al.data.standard import LAYOUTS, ade20k, camvid, cityscapes, voc

__all__ = [
    "ArrayDataset", "DatasetError", "FileDataset", "Sample", "SegmentationDataset", "DIGIT_CLASSES",
    "DigitScenesConfig", "digit_scenes", "DatasetWriter", "load_folder", "ade20k", "camvid", "cityscapes",
    "voc", "LAYOUTS",
]
