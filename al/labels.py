"""Sparse pixel labels with an append-only, fsynced journal.

Each ``add`` appends one line ``<crc32 hex> <json>\\n`` and fsyncs before returning, so a label
is *acknowledged* once ``add`` returns. On load, a torn last line (crash mid-write: no newline,
bad checksum or bad JSON) is dropped and cut off the file; damage anywhere else is an error.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor

JOURNAL_NAME = "labels.journal"


class JournalCorruptError(RuntimeError):
    """A journal line other than the last is damaged: not a crash artefact, so never guessed at."""


def _encode(record: dict) -> bytes:
    payload = json.dumps(record, separators=(",", ":"), sort_keys=True)
    return f"{zlib.crc32(payload.encode()):08x} {payload}\n".encode()


def _integers(values, what: str) -> np.ndarray:
    """``values`` as int64, refusing booleans and fractional numbers instead of truncating them."""
    tensor = torch.as_tensor(values).cpu()
    if tensor.dtype == torch.bool or tensor.is_complex() or (tensor.is_floating_point() and
                                                           not torch.equal(tensor, tensor.round())):
        raise ValueError(f"{what} must be integers, got {tensor.dtype} values {tensor.flatten()[:4].tolist()}")
    return tensor.numpy().astype(np.int64)


def _decode(line: bytes) -> Optional[dict]:
    """The record of a complete line, or None if the line is damaged."""
    if not line.endswith(b"\n"):
        return None
    try:
        checksum, payload = line[:-1].decode().split(" ", 1)
        if int(checksum, 16) != zlib.crc32(payload.encode()):
            return None
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None


class SparseLabels:
    """Which pixels of which images are labelled, and with which class.

    ``image_shapes`` maps every image id that may be labelled to its ``(H, W)``. ``void_index``
    is the class value recorded for pixels nobody can label (void in the ground truth, or an
    annotator's "unsure"): they count as queried, are never queried again, and are ignored in
    training.
    """

    def __init__(
        self,
        directory: Union[str, os.PathLike],
        image_shapes: Mapping[str, tuple[int, int]],
        num_classes: int,
        void_index: int = 255,
    ):
        self.directory = Path(directory)
        self.path = self.directory / JOURNAL_NAME
        self.image_shapes = dict(image_shapes)
        self.num_classes = num_classes
        self.void_index = void_index
        self._labels: dict[str, dict[tuple[int, int], int]] = {}
        self._label_tags: dict[str, dict[tuple[int, int], object]] = {}
        self._tags: dict[str, set] = {}
        self._queries: dict = {}  # tag -> image id -> [(row, col)] in query order
        self.directory.mkdir(parents=True, exist_ok=True)
        self._replay()

    # -- journal -------------------------------------------------------------------------------
    def _replay(self) -> None:
        if not self.path.exists():
            return
        good_bytes = 0
        with open(self.path, "rb") as handle:
            lines = handle.readlines()
        for number, line in enumerate(lines, start=1):
            record = _decode(line)
            if record is None:
                if number == len(lines):
                    break  # torn last record: it was never acknowledged
                raise JournalCorruptError(
                    f"{self.path}: line {number} of {len(lines)} is damaged (bad checksum or JSON); "
                    f"it is not the last line, so this is not a crash artefact. Restore the file "
                    f"from a backup or delete the damaged line by hand."
                )
            problem = self._check(record)
            if problem:
                raise JournalCorruptError(
                    f"{self.path}: line {number} of {len(lines)} has a valid checksum but {problem}: the journal "
                    f"belongs to another dataset or was edited. Use the run's own dataset, or restore the file.")
            self._apply(record)
            good_bytes += len(line)
        if good_bytes < self.path.stat().st_size:
            with open(self.path, "r+b") as handle:
                handle.truncate(good_bytes)
                handle.flush()
                os.fsync(handle.fileno())

    def _check(self, record: dict) -> Optional[str]:
        """What is wrong with a replayed record for this store's images and classes, or None."""
        image_id = record.get("image")
        if image_id not in self.image_shapes:
            return f"names image {image_id!r}, which is not in this dataset"
        height, width = self.image_shapes[image_id]
        points = [p[:2] for p in record.get("pixels", ())] + list(record.get("remove", ())) + list(record.get("query", ()))
        for row, col in points:
            if not (isinstance(row, int) and isinstance(col, int) and 0 <= row < height and 0 <= col < width):
                return f"holds pixel ({row}, {col}), outside image {image_id!r} of size {height}x{width}"
        for *_, cls in record.get("pixels", ()):
            if not (isinstance(cls, int) and (0 <= cls < self.num_classes or cls == self.void_index)):
                return f"labels a pixel of {image_id!r} with {cls!r}, not a class id (0..{self.num_classes - 1}) nor void"
        return None

    def _apply(self, record: dict) -> None:
        image_id, tag = record["image"], record.get("tag")
        store = self._labels.setdefault(image_id, {})
        tags = self._label_tags.setdefault(image_id, {})
        for row, col, cls in record.get("pixels", ()):
            store[(row, col)] = cls
            tags[(row, col)] = tag
        for row, col in record.get("remove", ()):
            store.pop((row, col), None)
            tags.pop((row, col), None)
        if "query" in record:
            self._queries.setdefault(tag, {}).setdefault(image_id, []).extend(map(tuple, record["query"]))
        if tag is not None:
            self._tags.setdefault(image_id, set()).add(tag)

    def _append(self, record: dict) -> None:
        with open(self.path, "ab") as handle:
            handle.write(_encode(record))
            handle.flush()
            os.fsync(handle.fileno())
        self._apply(record)

    def _coords(self, image_id: str, coords) -> np.ndarray:
        if image_id not in self.image_shapes:
            raise KeyError(f"unknown image id {image_id!r}: it is not in this label store's dataset")
        height, width = self.image_shapes[image_id]
        coords = _integers(coords, "pixel coordinates").reshape(-1, 2)
        outside = coords[(coords[:, 0] < 0) | (coords[:, 0] >= height) | (coords[:, 1] < 0) | (coords[:, 1] >= width)]
        if len(outside):
            row, col = outside[0].tolist()
            raise ValueError(f"pixel ({row}, {col}) is outside image {image_id!r} of size {height}x{width}")
        return coords

    # -- public API ----------------------------------------------------------------------------
    def add(self, image_id: str, coords: Union[Tensor, np.ndarray, Iterable], classes: Union[Tensor, np.ndarray, Iterable], tag=None) -> int:
        """Label pixels ``coords [n, 2]`` (row, col) of ``image_id`` with ``classes [n]``.

        Idempotent: pixels already holding the same class are skipped. Relabelling a pixel with
        a different class is an error. Returns the number of newly labelled pixels; when it
        returns, they are on disk. ``tag`` (e.g. the AL cycle) is stored with the record.
        """
        coords = self._coords(image_id, coords)
        classes = _integers(classes, "classes").reshape(-1)
        if len(coords) != len(classes):
            raise ValueError(f"{len(coords)} coordinates but {len(classes)} classes")
        existing = self._labels.get(image_id, {})
        new, given = [], {}
        for (row, col), cls in zip(coords.tolist(), classes.tolist()):
            if given.setdefault((row, col), cls) != cls:
                raise ValueError(f"pixel ({row}, {col}) of {image_id!r} is given two classes in one call: "
                                 f"{given[(row, col)]} and {cls}")
            if not (0 <= cls < self.num_classes or cls == self.void_index):
                raise ValueError(
                    f"class {cls} for image {image_id!r} is not a class id (0..{self.num_classes - 1}) "
                    f"nor the void value {self.void_index}"
                )
            held = existing.get((row, col))
            if held is not None and held != cls:
                raise ValueError(f"pixel ({row}, {col}) of {image_id!r} is already labelled {held}, not {cls}")
            if held is None and (row, col, cls) not in new:
                new.append((row, col, cls))
        if not new and (tag is None or self.has_tag(image_id, tag)):
            return 0
        record = {"image": image_id, "pixels": [list(p) for p in new]}
        if tag is not None:
            record["tag"] = tag
        self._append(record)
        return len(new)

    def query(self, image_id: str, coords: Union[Tensor, np.ndarray, Iterable], tag) -> None:
        """Record that pixels ``coords [n, 2]`` of ``image_id`` are asked under ``tag`` (an AL
        cycle). They stay :meth:`pending` until labelled; ``has_tag`` is true from now on, so a
        resumed loop does not ask again."""
        coords = self._coords(image_id, coords)
        self._append({"image": image_id, "query": coords.tolist(), "tag": tag})

    def remove(self, image_id: str, coords: Union[Tensor, np.ndarray, Iterable]) -> int:
        """Undo the labels of pixels ``coords [n, 2]``; a queried pixel becomes pending again.
        Pixels that hold no label are skipped (so a repeated undo is harmless). Returns the number
        of labels removed."""
        coords = self._coords(image_id, coords)
        held = [p for p in dict.fromkeys(map(tuple, coords.tolist())) if p in self._labels.get(image_id, {})]
        if held:
            self._append({"image": image_id, "remove": [list(p) for p in held]})
        return len(held)

    def queried(self, image_id: str, tag) -> list[tuple[int, int]]:
        """Pixels of ``image_id`` queried under ``tag``, in query order."""
        return list(dict.fromkeys(self._queries.get(tag, {}).get(image_id, ())))

    def pending(self, image_id: str, tag) -> list[tuple[int, int]]:
        """Pixels queried under ``tag`` that hold no label yet."""
        store = self._labels.get(image_id, {})
        return [p for p in self.queried(image_id, tag) if p not in store]

    def query_tags(self) -> list:
        """Tags under which queries were recorded, in first-seen order."""
        return list(self._queries)

    def query_images(self, tag) -> list[str]:
        """Image ids with queries under ``tag``, in first-seen order."""
        return list(self._queries.get(tag, {}))

    def has_tag(self, image_id: str, tag) -> bool:
        """Whether a record with ``tag`` was acknowledged for ``image_id`` (resume bookkeeping)."""
        return tag in self._tags.get(image_id, set())

    def classes_by_tag(self) -> dict:
        """``{tag: [class of every pixel labelled under it]}`` (e.g. what each AL cycle queried)."""
        result: dict = {}
        for image_id, tags in self._label_tags.items():
            for pixel, tag in tags.items():
                if tag is not None:
                    result.setdefault(tag, []).append(self._labels[image_id][pixel])
        return result

    def pixels(self, image_id: str) -> dict[tuple[int, int], int]:
        """``{(row, col): class}`` of one image (a copy)."""
        return dict(self._labels.get(image_id, {}))

    def labelled_mask(self, image_id: str) -> Tensor:
        """BoolTensor[H, W]: pixels already queried (void included)."""
        height, width = self.image_shapes[image_id]
        mask = torch.zeros((height, width), dtype=torch.bool)
        for row, col in self._labels.get(image_id, {}):
            mask[row, col] = True
        return mask

    def as_target(self, image_id: str, ignore_index: int = 255) -> Tensor:
        """LongTensor[H, W]: the labelled class where known, ``ignore_index`` elsewhere and on void."""
        height, width = self.image_shapes[image_id]
        target = torch.full((height, width), ignore_index, dtype=torch.long)
        for (row, col), cls in self._labels.get(image_id, {}).items():
            target[row, col] = ignore_index if cls == self.void_index else cls
        return target

    def count(self, include_void: bool = True) -> int:
        """Number of queried pixels over all images."""
        return sum(
            1 for store in self._labels.values() for cls in store.values() if include_void or cls != self.void_index
        )
