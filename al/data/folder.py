"""The project's on-disk dataset layout (docs/methods.md#dataset-folder-format): reader and
atomic, resumable writer.

```
<root>/images/<id>.png      RGB
<root>/masks/<id>.png       uint8 class ids (ignore value in dataset.json)
<root>/ignore/<id>.png      optional: non-zero = pixel the quality check distrusts
<root>/metadata.jsonl       one JSON object per finished sample (a sample counts only then); its
                            file_name (= image) lets datasets' imagefolder load the folder
<root>/dropped.jsonl        one JSON object per sample finished without files (e.g. degenerate)
<root>/dataset.json         classes, palette, ignore_index, generator config, versions
```
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image

from al.atomic import atomic_write_bytes, is_temporary, temporary_name
from al.data.base import DatasetError, FileDataset, check_pair, read_index_mask

DATASET_JSON = "dataset.json"
METADATA_JSONL = "metadata.jsonl"
# Dropped samples have their own file: datasets' imagefolder reads every metadata.jsonl line as a
# row, and a line without an image would stop it. (Older folders hold them in metadata.jsonl.)
DROPPED_JSONL = "dropped.jsonl"
SAMPLE_FOLDERS = ("images", "masks", "ignore")


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete the staging files that writes killed mid-way left in ``root`` and its sample folders;
    returns them. Only the folder's one writer (its lock holder) may call this: any other writer's
    staging file would be in flight."""
    stale = [p for folder in (root, *(root / sub for sub in SAMPLE_FOLDERS)) if folder.is_dir()
             for p in folder.iterdir() if is_temporary(p)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_save_png(array: np.ndarray, path: Path) -> None:
    tmp = temporary_name(path)
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    """The lines of ``path`` (none if it is missing); a torn last line (crash mid-append) is skipped."""
    if not path.exists():
        return []
    records = []
    lines = path.read_bytes().splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no newline")
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break
            raise DatasetError(f"{path}: line {number} is not valid JSON; fix or delete that line") from None
    return records


def read_metadata(root: Path) -> list[dict]:
    """Finished samples: the written ones in write order, then the dropped ones (``dropped: <reason>``;
    a folder written before ``dropped.jsonl`` has them among the written ones)."""
    records, seen = [], set()
    for record in _read_jsonl(Path(root) / METADATA_JSONL) + _read_jsonl(Path(root) / DROPPED_JSONL):
        if record["id"] not in seen:
            seen.add(record["id"])
            records.append(record)
    return records


def _ignore_map(root: Path, ignore_index: int):
    def apply(mask: np.ndarray, mask_path: Path) -> np.ndarray:
        ignore_path = root / "ignore" / mask_path.name
        if not ignore_path.exists():
            return mask
        distrusted = read_index_mask(ignore_path) != 0
        if distrusted.shape != mask.shape:
            raise DatasetError(f"{ignore_path}: ignore map is {distrusted.shape}, mask is {mask.shape}; they must match")
        return np.where(distrusted, ignore_index, mask)

    return apply


def load_folder(root: Union[str, os.PathLike], masks_only: bool = False) -> FileDataset:
    """Read a dataset in the project layout. Samples are those with a metadata line, or (for a
    hand-made folder without ``metadata.jsonl``) every ``masks/*.png``. ``masks_only`` reads
    just ``dataset.json`` and ``masks/`` (input to generation); images are then zeros."""
    root = Path(root)
    info_path = root / DATASET_JSON
    if not info_path.is_file():
        raise DatasetError(
            f"{info_path} is missing; a dataset folder needs it, e.g. "
            '{"classes": ["background", "cat"], "ignore_index": 255}'
        )
    try:
        info = json.loads(info_path.read_text())
        classes, ignore_index = info["classes"], int(info.get("ignore_index", 255))
    except (ValueError, KeyError) as error:
        raise DatasetError(f"{info_path}: not valid ({error!r}); it needs 'classes' (list of names)") from None
    records = read_metadata(root)
    if records:
        ids = [r["id"] for r in records if not r.get("dropped")]
    else:
        ids = sorted(p.stem for p in (root / "masks").glob("*.png"))
    pairs = [(i, None if masks_only else root / "images" / f"{i}.png", root / "masks" / f"{i}.png") for i in ids]
    return FileDataset(pairs, classes, ignore_index, label_map=_ignore_map(root, ignore_index), source=str(root))


class DatasetWriter:
    """Writes samples in the project layout; every file appears atomically and a sample counts
    only once its metadata line is appended, so a killed run resumes without duplicates."""

    def __init__(
        self,
        root: Union[str, os.PathLike],
        classes: Sequence[str],
        ignore_index: int = 255,
        palette: Optional[Sequence[Sequence[int]]] = None,
        info: Optional[dict[str, Any]] = None,
    ):
        self.root = Path(root)
        self.classes, self.ignore_index = list(classes), ignore_index
        for sub in ("images", "masks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # as JSON reads it back (tuples become lists), so a resume compares like with like
        header = json.loads(json.dumps({"classes": self.classes, "ignore_index": ignore_index, "palette": palette,
                                        **(info or {})}))
        info_path = self.root / DATASET_JSON
        if info_path.exists():
            existing = json.loads(info_path.read_text())
            if existing != header:
                raise DatasetError(
                    f"{info_path} describes a different dataset (classes, palette or config differ); "
                    f"write to another folder or delete this one"
                )
        else:
            atomic_write_bytes(info_path, json.dumps(header, indent=2).encode())
        self._done = {r["id"] for r in read_metadata(self.root)}

    def done_ids(self) -> set[str]:
        return set(self._done)

    def _append_metadata(self, record: dict, name: str = METADATA_JSONL) -> None:
        # One O_APPEND write of a whole line: concurrent writers never interleave within a line.
        fd = os.open(self.root / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._done.add(record["id"])

    def record_dropped(self, sample_id: str, reason: str, metadata: Optional[dict] = None) -> None:
        """Mark a sample as finished without files (e.g. a degenerate image): a resumed run
        does not retry it and readers skip it."""
        if sample_id not in self._done:
            self._append_metadata({"id": sample_id, "dropped": reason, **(metadata or {})}, DROPPED_JSONL)

    def write(self, sample_id: str, image: np.ndarray, mask: np.ndarray, ignore: Optional[np.ndarray] = None, metadata: Optional[dict] = None) -> None:
        """``image`` uint8 [H, W, 3], ``mask`` [H, W] class ids, ``ignore`` bool [H, W] or None."""
        if sample_id in self._done:
            return
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise DatasetError(f"sample {sample_id!r}: image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        check_pair(image, mask, len(self.classes), self.ignore_index, where=f"sample {sample_id!r}")
        record = {"id": sample_id, "image": f"images/{sample_id}.png", "mask": f"masks/{sample_id}.png", **(metadata or {})}
        atomic_save_png(image, self.root / record["image"])
        atomic_save_png(mask.astype(np.uint8), self.root / record["mask"])
        if ignore is not None:
            (self.root / "ignore").mkdir(exist_ok=True)
            record["ignore"] = f"ignore/{sample_id}.png"
            atomic_save_png(ignore.astype(np.uint8) * 255, self.root / record["ignore"])
        # Hugging Face imagefolder's link from a metadata line to its image (relative to this file's
        # folder); after "image", which it then replaces with the decoded image
        record["file_name"] = record["image"]
        self._append_metadata(record)
