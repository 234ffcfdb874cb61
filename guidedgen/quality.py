"""Quality of generated samples: does the image show its mask, and is it degenerate?"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from torch import Tensor

from al.data.base import DatasetError
from al.inference import View, input_multiple
from al.metrics import SegmentationScores, confusion_matrix
from al.models import Segmenter

# The committed independent judge of mask fidelity (a segmenter trained on real DigitScenes
# scenes only) and the command that makes it.
JUDGE_DIR = "models/digitscenes-judge"
JUDGE_RECIPE = ("python scripts/train_segmenter.py --config configs/segmenter_judge.yaml "
                "output_dir=models/digitscenes-judge")


@dataclass
class SampleQuality:
    mask_miou: float  # agreement of the segmenter's prediction with the conditioning mask
    image_std: float
    degenerate: bool


@torch.no_grad()
def assess(segmenter: Segmenter, images: Tensor, masks: Tensor, ignore_index: int = 255,
           min_image_std: float = 0.02) -> tuple[list[SampleQuality], Tensor]:
    """Per-sample quality and the disagreement map (prediction != mask, not on ignore pixels).

    Shape: ``images [N, 3, H, W] in [0, 1], masks [N, H, W] -> (N qualities, [N, H, W] bool)``.
    A near-constant image (std below ``min_image_std``, e.g. black) is degenerate. Images of a
    size the segmenter does not take (instance mode writes the real images' sizes) are padded.
    """
    view = View.of(images.shape[-2:], multiple=input_multiple(segmenter))
    prediction = view.labels(segmenter.eval().predict(view.images(images)))
    disagree = (prediction != masks) & (masks != ignore_index)
    qualities = []
    for i in range(len(images)):
        confusion = confusion_matrix(prediction[i], masks[i], segmenter.num_classes, ignore_index)
        std = float(images[i].std())
        qualities.append(SampleQuality(SegmentationScores.from_confusion(confusion).miou, std, std < min_image_std))
    return qualities, disagree


def load_judge(directory: Union[str, os.PathLike] = JUDGE_DIR,
               device: Union[str, torch.device] = "cpu") -> tuple[Segmenter, dict]:
    """The judge segmenter (a ``Segmenter.save_pretrained`` folder) and its training record
    (``training.json``, written by ``scripts/train_segmenter.py``: config, val mIoU, losses)."""
    directory = Path(directory)
    missing = [name for name in ("config.json", "model.safetensors", "training.json") if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"no judge segmenter at {directory} (missing {', '.join(missing)}): create it with "
                                f"`{JUDGE_RECIPE}` (about 42 minutes on 2 cores), or give another judge folder")
    try:
        record = json.loads((directory / "training.json").read_text())
    except ValueError as error:
        raise DatasetError(f"{directory / 'training.json'} is not valid JSON ({error}); remake the judge with "
                         f"`{JUDGE_RECIPE}`") from None
    return Segmenter.from_pretrained(directory).to(device).eval(), record
