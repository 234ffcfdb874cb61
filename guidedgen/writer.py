"""Resumable, atomic, multi-process dataset writer for generated samples (DESIGN.md layout).

Sample ``i`` has id ``f"{i:06d}"`` and seed ``sample_seed(global_seed, i)``, never derived from the
process rank: any number of processes produce the same dataset, and a re-run resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from al.data.base import DatasetError
from al.data.folder import DATASET_JSON, DatasetWriter


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
    ):
        self.root = Path(root)
        self.config_hash = config_hash(config)
        info_path = self.root / DATASET_JSON
        if info_path.exists():
            existing = json.loads(info_path.read_text()).get("generator", {}).get("config_hash")
            if existing != self.config_hash:
                if not overwrite:
                    raise DatasetError(
                        f"{self.root} holds samples of another generation config (hash {existing}, now "
                        f"{self.config_hash}); use another output_dir or pass overwrite=true to replace it"
                    )
                shutil.rmtree(self.root)
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
