"""Resumable, atomic, multi-process dataset writer for generated samples (layout:
docs/methods.md#dataset-folder-format).

Sample ``i`` has id ``f"{i:06d}"`` and seed ``sample_seed(global_seed, i)``, never derived from the
process rank: any number of processes produce the same dataset, and a re-run resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from al.atomic import is_temporary
from al.data.base import DatasetError
from al.data.folder import (
    DATASET_JSON,
    DROPPED_JSONL,
    METADATA_JSONL,
    SAMPLE_FOLDERS,
    DatasetWriter,
    read_metadata,
    remove_stale_temporaries,
)
from al.folder_lock import LOCK_NAME
from al.resume import differing_keys, identity


def sample_seed(global_seed: int, index: int) -> int:
    """A 31-bit seed for sample ``index``, a pure function of ``(global_seed, index)``."""
    digest = hashlib.sha256(f"{global_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sample_id(index: int) -> str:
    return f"{index:06d}"


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard(indices: Sequence[int], process_index: int, num_processes: int) -> list[int]:
    """Contiguous, disjoint, unpadded split of ``indices`` (the same split accelerate's
    ``split_between_processes`` makes without padding)."""
    per, extra = divmod(len(indices), num_processes)
    start = process_index * per + min(process_index, extra)
    return list(indices[start:start + per + (1 if process_index < extra else 0)])


def read_info(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise DatasetError(f"{path} is not valid JSON ({error}); restore it, or delete the folder if it is yours") from None


def remove_generated(root: Path, keep: Sequence[str] = (), extra: Sequence[str] = ()) -> None:
    """Delete a generated dataset from ``root``: the files its metadata lists, its ``dataset.json``,
    ``metadata.jsonl`` and ``dropped.jsonl``, staging files and the ``extra`` names; nothing is deleted
    when ``root`` was not written by the generator or holds any other file (the error lists them)."""
    info = read_info(root / DATASET_JSON)
    if "generator" not in info:
        raise DatasetError(f"{root} holds a dataset that generate.py did not write ({DATASET_JSON} has no generator "
                           f"record), and overwrite=true replaces only generated ones: use another output_dir")
    ours = {root / name for name in (DATASET_JSON, METADATA_JSONL, DROPPED_JSONL, *keep, *extra)}
    ours |= {root / record[key] for record in read_metadata(root) for key in ("image", "mask", "ignore") if key in record}
    files = [p for p in root.rglob("*") if p.is_file()]
    foreign = sorted(str(p.relative_to(root)) for p in files if p not in ours and not is_temporary(p))
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise DatasetError(f"{root}: overwrite=true replaces a generated dataset, but the folder also holds files the "
                           f"generator did not write ({shown}); move them out or use another output_dir")
    for path in files:
        if path.name not in keep or path.parent != root:
            path.unlink()
    for sub in SAMPLE_FOLDERS:
        if (root / sub).is_dir() and not any((root / sub).iterdir()):
            (root / sub).rmdir()


class GenerationWriter:
    """Writes generated samples; refuses an output folder made with another configuration
    unless ``overwrite``. ``config`` is what defines the samples (not output paths or counts)."""

    def __init__(
        self,
        root: Union[str, os.PathLike],
        classes: Sequence[str],
        palette: Sequence[Sequence[int]],
        config: dict[str, Any],
        ignore_index: int = 255,
        overwrite: bool = False,
        versions: Optional[dict[str, str]] = None,
        owner: bool = True,
        own_files: Sequence[str] = (),
    ):
        """``owner``: this process holds the folder's lock (the main process of a launch): only it
        replaces an overwritten folder and clears staging files that a killed write left.
        ``own_files``: what the job writes into the folder besides the samples (a contact sheet)."""
        self.root = Path(root)
        self.config_hash = config_hash(config)
        info_path = self.root / DATASET_JSON
        if not info_path.exists() and self.root.is_dir():
            foreign = sorted(p.name for p in self.root.iterdir() if p.name != LOCK_NAME and not is_temporary(p))
            if foreign:
                raise DatasetError(f"{self.root} is not empty ({', '.join(foreign[:10])}) and holds no generated dataset "
                                   f"({DATASET_JSON} is missing): use a new or empty output_dir")
        if info_path.exists():
            generator = read_info(info_path).get("generator", {})
            existing = generator.get("config_hash")
            if existing != self.config_hash:
                if not overwrite:
                    keys = differing_keys(identity(generator.get("config") or {}), identity(config))
                    raise DatasetError(
                        f"{self.root} holds samples of another generation config ({', '.join(keys[:6])}; hash "
                        f"{existing}, now {self.config_hash}); use another output_dir or pass overwrite=true to replace it"
                    )
                remove_generated(self.root, keep=(LOCK_NAME,), extra=own_files)
        if owner:
            remove_stale_temporaries(self.root)
        generator = {"config": config, "config_hash": self.config_hash, "versions": versions or {}}
        self.writer = DatasetWriter(self.root, classes, ignore_index, [list(map(int, c)) for c in palette],
                                    info={"generator": generator})

    def pending(self, indices: Sequence[int]) -> list[int]:
        done = self.writer.done_ids()
        return [i for i in indices if sample_id(i) not in done]

    def write(self, index: int, image: np.ndarray, mask: np.ndarray, ignore: Optional[np.ndarray], metadata: dict) -> None:
        self.writer.write(sample_id(index), image, mask, ignore,
                          {"index": index, "config_hash": self.config_hash, **metadata})

    def drop(self, index: int, reason: str, metadata: dict) -> None:
        self.writer.record_dropped(sample_id(index), reason, {"index": index, "config_hash": self.config_hash, **metadata})
