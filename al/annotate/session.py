"""What a person answers in one active-learning state folder, independent of any web framework.

The open *tag* is the AL step whose queries still wait for answers (``initial`` or ``cycle<k>``);
every answer goes straight into the run's :class:`~al.labels.SparseLabels` journal, so a closed
tab or a killed server loses nothing, and a repeated answer (two tabs) is a no-op.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from al.data.base import SegmentationDataset
from al.data.config import DATA_CONFIG_NAME, DataConfig
from al.labels import SparseLabels
from al.models import Segmenter
from al.plots import class_colours


class AnnotationError(ValueError):
    """A request the session refuses; ``status`` is the HTTP status that fits it."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def load_pool(state_dir: Path) -> SegmentationDataset:
    """The run's training pool, rebuilt from the ``data.json`` that ``run_experiment`` wrote."""
    path = state_dir / DATA_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: --state must be a run folder of scripts/active_learning.py "
                                f"(<output_dir>/runs/<acquisition>/seed_<s>)")
    config = DataConfig(**json.loads(path.read_text()))
    return config.build(config.train_split)


class AnnotationSession:
    """Pending queries of one AL run and the answers to them. Thread-safe."""

    def __init__(self, state_dir: Union[str, Path], dataset: Optional[SegmentationDataset] = None,
                 device: Union[str, torch.device] = "cpu"):
        self.state_dir = Path(state_dir)
        self.dataset = dataset if dataset is not None else load_pool(self.state_dir)
        self.classes = list(self.dataset.classes)
        self.void_index = self.dataset.ignore_index
        self.shapes = self.dataset.image_shapes()
        self.labels = SparseLabels(self.state_dir / "labels", self.shapes, len(self.classes), self.void_index)
        self.colours = (class_colours(len(self.classes)) * 255).round().astype(np.uint8)
        self.device = torch.device(device)
        model_dir = self.state_dir / "model"
        self.model = Segmenter.from_pretrained(model_dir).to(self.device).eval() \
            if (model_dir / "config.json").exists() else None
        self._lock = threading.Lock()
        self._predictions: dict[str, bytes] = {}

    # -- reading -------------------------------------------------------------------------------
    @property
    def tag(self) -> Optional[str]:
        """The open tag: the first with pending queries, else the last one queried."""
        tags = self.labels.query_tags()
        for tag in tags:
            if any(self.labels.pending(i, tag) for i in self.labels.query_images(tag)):
                return tag
        return tags[-1] if tags else None

    def progress(self) -> dict:
        tag = self.tag
        images = self.labels.query_images(tag) if tag else []
        total = sum(len(self.labels.queried(i, tag)) for i in images)
        pending = sum(len(self.labels.pending(i, tag)) for i in images)
        return {"tag": tag, "answered": total - pending, "total": total,
                "images": [{"id": i, "pending": len(self.labels.pending(i, tag))} for i in images]}

    def classes_info(self) -> list[dict]:
        return [{"id": i, "name": name, "colour": "#%02x%02x%02x" % tuple(self.colours[i])}
                for i, name in enumerate(self.classes)]

    def _check_image(self, image_id: str) -> None:
        if image_id not in self.shapes:
            raise AnnotationError(f"unknown image id {image_id!r}", 404)

    def image_info(self, image_id: str) -> dict:
        self._check_image(image_id)
        tag, held = self.tag, self.labels.pixels(image_id)
        height, width = self.shapes[image_id]
        queries = [{"row": r, "col": c, "class_id": held.get((r, c))} for r, c in self.labels.queried(image_id, tag)]
        return {"id": image_id, "height": height, "width": width, "tag": tag, "queries": queries,
                "void_index": self.void_index, "has_prediction": self.model is not None}

    def image_png(self, image_id: str) -> bytes:
        self._check_image(image_id)
        image = self.dataset[self.dataset.index_of(image_id)].image
        return _png((image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))

    def prediction_png(self, image_id: str) -> bytes:
        """The current model's prediction as an RGBA overlay (class colours, half transparent)."""
        self._check_image(image_id)
        if self.model is None:
            raise AnnotationError("no model yet: the first model is trained after the initial labels", 404)
        with self._lock:
            if image_id not in self._predictions:
                image = self.dataset[self.dataset.index_of(image_id)].image[None].to(self.device)
                with torch.no_grad():
                    prediction = self.model(image).argmax(1)[0].cpu().numpy()
                rgba = np.concatenate([self.colours[prediction], np.full(prediction.shape + (1,), 140, np.uint8)], -1)
                self._predictions[image_id] = _png(rgba)
            return self._predictions[image_id]

    # -- answering -----------------------------------------------------------------------------
    def _check_query(self, image_id: str, row: int, col: int) -> str:
        self._check_image(image_id)
        tag = self.tag
        if tag is None or (row, col) not in self.labels.queried(image_id, tag):
            raise AnnotationError(f"pixel ({row}, {col}) of {image_id!r} is not a query of {tag!r}", 409)
        return tag

    def answer(self, image_id: str, row: int, col: int, class_id: Optional[int]) -> dict:
        """Label a queried pixel; ``class_id=None`` is "unsure" (void: never asked again)."""
        if class_id is not None and not 0 <= class_id < len(self.classes):
            raise AnnotationError(f"class id {class_id} is not one of 0..{len(self.classes) - 1}", 422)
        with self._lock:
            tag = self._check_query(image_id, row, col)
            value = self.void_index if class_id is None else class_id
            try:
                self.labels.add(image_id, [[row, col]], [value], tag=tag)
            except ValueError as error:  # already answered differently (another tab)
                raise AnnotationError(str(error), 409) from None
        return self.progress()

    def undo(self, image_id: str, row: int, col: int) -> dict:
        """Remove the answer of a queried pixel of the open tag; it becomes pending again."""
        with self._lock:
            self._check_query(image_id, row, col)
            self.labels.remove(image_id, [[row, col]])
        return self.progress()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
