"""The active-learning loop: train -> MC inference -> score -> select -> label, per cycle.

All state lives in one directory (label journal, latest model, ``state.json``), so a killed run
resumes where it stopped: a trained cycle is not retrained, an image labelled in a cycle is not
labelled twice, and no acknowledged label is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from al.acquisition import get_acquisition, pool_predictions
from al.atomic import atomic_write_bytes
from al.config import require
from al.data.base import SegmentationDataset
from al.data.transforms import TransformConfig
from al.diffusion_features import DiffusionFeatureSegmenter
from al.folder_lock import FolderLock
from al.inference import View, input_multiple, size_groups
from al.labels import SparseLabels
from al.loop_config import LoopConfig
from al.models import load_model
from al.oracles import AwaitingAnnotations, GroundTruthOracle, Oracle
from al.resume import ResumeConflictError, differing_keys, identity
from al.select import SELECTION_RULES, NotEnoughPixelsError, top_n
from al.train import (
    SparseTargetDataset,
    TrainConfig,
    TrainingCollate,
    TrainingSource,
    collate_samples,
    crop_generator,
    evaluate,
    train_segmenter,
)


@dataclass
class CycleRecord:
    cycle: int
    labelled_pixels: int
    labelled_percent: float
    miou: float
    acquired: bool = False


def _derived_generator(device: torch.device, *key: Union[int, str]) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little")
    return torch.Generator(device=device).manual_seed(seed)


class StateMismatchError(ResumeConflictError):
    """The state directory belongs to a run with a different configuration."""


class ActiveLearningLoop:
    """One run (one acquisition, one seed) of sparse-pixel active learning."""

    def __init__(
        self,
        config: LoopConfig,
        acquisition: str,
        seed: int,
        train_set: SegmentationDataset,
        val_set: SegmentationDataset,
        state_dir: Union[str, os.PathLike],
        oracle: Optional[Oracle] = None,
        device: Union[str, torch.device] = "cpu",
        progress: bool = True,
        shared_dir: Optional[Union[str, os.PathLike]] = None,
        transforms: Optional[TransformConfig] = None,
    ):
        """``shared_dir``: where runs of one experiment share their cycle-0 model. Every
        acquisition of a seed starts from the same labels and weights, so that model is the
        same for all of them (but DEAL's, which trains a difficulty branch too).
        ``transforms`` (the data config's): how training, scoring and evaluation show images of
        any size to the model; labels, scores and queries stay on the pixels as read."""
        config.validate()
        self.config, self.acquisition, self.seed = config, acquisition, seed
        self.transforms = transforms or TransformConfig()
        self.shared_dir = Path(shared_dir) if shared_dir is not None else None
        self.train_set, self.val_set = train_set, val_set
        self.spec, self.rule = get_acquisition(acquisition), SELECTION_RULES.lookup(config.selection)
        require(not self.spec.needs_difficulty or config.learner == "segmenter", "acquisition", acquisition,
                f"an acquisition without DEAL's difficulty branch (only learner=segmenter has it; got {config.learner!r})")
        self.state_dir = Path(state_dir)
        self.oracle = oracle if oracle is not None else GroundTruthOracle(train_set)
        self.device, self.progress = torch.device(device), progress
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.state_dir / "state.json"
        self.records = self._load_state()
        self.shapes = train_set.image_shapes()
        self.total_pixels = sum(h * w for h, w in self.shapes.values())
        self.labels = SparseLabels(self.state_dir / "labels", self.shapes, train_set.num_classes, train_set.ignore_index)
        self.synthetic = config.synthetic.source(list(train_set.classes))

    @property
    def warm_start_dir(self) -> Path:
        return self.state_dir / "warm_start"

    # -- state -------------------------------------------------------------------------------
    def _load_state(self) -> list[CycleRecord]:
        if not self.state_path.exists():
            return []
        state = json.loads(self.state_path.read_text())
        if state["fingerprint"] != self.config.fingerprint(self.acquisition, self.seed):
            recorded = {k: state.get(k) for k in ("acquisition", "seed", "config")}
            current = identity({"acquisition": self.acquisition, "seed": self.seed, "config": asdict(self.config)})
            keys = ", ".join(differing_keys(identity(recorded), current)[:6])
            raise StateMismatchError(
                f"{self.state_dir} holds a run with a different configuration ({keys}); use another output_dir "
                f"or delete that folder to start over"
            )
        return [CycleRecord(**record) for record in state["cycles"]]

    def _save_state(self) -> None:
        state = {"fingerprint": self.config.fingerprint(self.acquisition, self.seed), "acquisition": self.acquisition,
                 "seed": self.seed, "config": asdict(self.config),
                 "cycles": [asdict(record) for record in self.records]}
        atomic_write_bytes(self.state_path, json.dumps(state, indent=2).encode())

    # -- steps -------------------------------------------------------------------------------
    def _query(self, tag: str, choose, image_ids) -> None:
        """For each image not yet queried under ``tag``: journal the query coords = choose(image_id, available)."""
        for image_id in image_ids:
            if self.labels.has_tag(image_id, tag):
                continue
            available = ~self.labels.labelled_mask(image_id) & ~self.oracle.void_mask(image_id).cpu()
            try:
                coords = choose(image_id, available)
            except NotEnoughPixelsError as error:
                raise NotEnoughPixelsError(f"image {image_id!r}: {error}") from None
            self.labels.query(image_id, coords, tag)

    def _answer(self, tag: str) -> None:
        """Ask the oracle for every pending query of ``tag``. A simulated oracle answers at once;
        with a person, the queries wait (:class:`AwaitingAnnotations`) until the annotation
        page has answered them. Both go through this one path."""
        for image_id in self.labels.query_images(tag):
            pending = self.labels.pending(image_id, tag)
            if pending:
                answers = self.oracle(image_id, torch.tensor(pending))
                if answers is not None:
                    self.labels.add(image_id, pending, answers, tag=tag)
        waiting = sum(len(self.labels.pending(i, tag)) for i in self.labels.query_images(tag))
        if waiting:
            self._save_state()
            raise AwaitingAnnotations(self.state_dir, tag, waiting)

    def initial_labels(self) -> None:
        """n random pixels per image; they depend on the seed only, so every acquisition of a
        seed starts from the same labels."""
        generator = _derived_generator(torch.device("cpu"), self.seed, "initial")
        n = self.config.pixels_per_image

        def choose(image_id: str, available: Tensor) -> Tensor:
            return top_n(torch.rand(available.shape, generator=generator), available, n)

        self._query("initial", choose, self.train_set.ids)

    def train_model(self, cycle: int) -> nn.Module:
        torch.manual_seed(self.seed)  # same initial weights every cycle
        real = SparseTargetDataset(self.train_set, self.labels, self.train_set.ignore_index)
        if self.config.learner == "diffusion_features":
            model = DiffusionFeatureSegmenter(self.config.diffusion_features, self.train_set.num_classes,
                                              seed=self.seed * 1000 + cycle, device=self.device)
            collate = TrainingCollate(self.transforms, [True], self.train_set.ignore_index, input_multiple(model),
                                      crop_generator(self.seed * 1000 + cycle))
            loader = DataLoader(real, batch_size=self.config.diffusion_features.extraction_batch_size,
                                collate_fn=collate)
            model.fit(((b["image"], b["target"]) for b in tqdm(loader, desc="features", disable=not self.progress,
                                                               leave=False)),
                      self.train_set.ignore_index, torch.Generator().manual_seed(self.seed * 1000 + cycle))
            return model
        if self.config.warm_start and cycle > 0:
            model = load_model(self.warm_start_dir, self.device)  # cycle - 1's model, saved after its acquisition
        else:
            difficulty_size = tuple(self.config.deal.size) if self.spec.needs_difficulty else None
            model = self.config.model.build(self.train_set.num_classes, difficulty_size).to(self.device)
        train_config = TrainConfig(**{**asdict(self.config.train), "epochs": self.config.epochs_of(cycle),
                                      "seed": self.seed * 1000 + cycle})
        sources = [TrainingSource(real, 1.0 - self.config.synthetic.share if self.synthetic else 1.0, sparse=True)]
        if self.synthetic is not None:
            sources.append(self.synthetic)
        train_segmenter(model, sources, train_config, self.train_set.ignore_index, progress=self.progress,
                        transforms=self.transforms)
        return model

    def _cycle0_model(self) -> nn.Module:
        """Cycle 0's model, trained once per (config, seed) when runs share ``shared_dir``."""
        if self.shared_dir is None or self.spec.needs_difficulty or self.config.learner != "segmenter":
            return self.train_model(0)
        cached = self.shared_dir / f"cycle0_{self.config.fingerprint('cycle0', self.seed)}"
        if (cached / "config.json").is_file():  # save_pretrained writes the config last
            return load_model(cached, self.device)
        model = self.train_model(0)
        model.save_pretrained(cached)
        return model

    def acquire(self, model: nn.Module, cycle: int) -> None:
        """Score the pool and query pixels: n per image by the selection rule (pixel-level
        acquisitions), or the cycle's budget spread over the best-scored images (image-level)."""
        tag = f"cycle{cycle}"
        if self.spec.level == "image":
            self._acquire_images(model, tag, cycle)
            return
        for ids, scores in self._score(model, self.train_set.ids, cycle, skip=tag):
            by_id = dict(zip(ids, scores))

            def choose(image_id: str, available: Tensor) -> Tensor:
                return self.rule(by_id[image_id], available, self.config.pixels_per_image,
                                 self._select_generator(cycle, image_id))

            self._query(tag, choose, ids)

    # Every random draw of an acquisition is keyed by (seed, acquisition, cycle) and the batch or
    # image it serves, never by what ran before it in this process: a run resumed mid-acquisition
    # draws what the uninterrupted run drew. Selection draws on CPU, so CUDA runs draw the same.
    def _select_generator(self, cycle: int, image_id: str) -> torch.Generator:
        return _derived_generator(torch.device("cpu"), self.seed, self.acquisition, cycle, "select", image_id)

    def _score(self, model: nn.Module, image_ids: list[str], cycle: int, skip: Optional[str] = None):
        """Yield ``(ids, scores)`` over ``image_ids`` in fixed batches (a batch whose images are all
        queried under ``skip`` is not scored), reading the images batch by batch instead of
        holding them all at once, and scoring the images of each size in a batch together
        (``al.inference``: the scores are on the pixels as read). A batch's MC dropout draws come
        from its own generator."""
        size = self.config.inference_batch_size
        for start in tqdm(range(0, len(image_ids), size), desc=f"acquire {self.acquisition}", disable=not self.progress,
                          leave=False):
            ids = image_ids[start:start + size]
            if skip is not None and all(self.labels.has_tag(i, skip) for i in ids):
                continue
            generator = _derived_generator(self.device, self.seed, self.acquisition, cycle, "batch", start)
            samples = [self.train_set[self.train_set.index_of(i)] for i in ids]
            for group in size_groups([s.mask.shape for s in samples]):
                batch = collate_samples([samples[i] for i in group])
                view = View.of(batch["mask"].shape[1:], self.transforms, input_multiple(model))
                images = view.images(batch["image"].to(self.device))
                predictions = pool_predictions(model, images, self.config.mc_samples, generator,
                                               self.config.mc_at_decoder_resolution)
                if not view.is_identity:
                    predictions = predictions.map(view.maps)
                yield batch["id"], self.spec.score(predictions, generator).cpu()

    def _acquire_images(self, model: nn.Module, tag: str, cycle: int) -> None:
        """DEAL's image-level rules: rank a random ``deal.pool_fraction`` of the pool and label
        random pixels of the best ``deal.image_share`` of it, as many as a pixel-level cycle."""
        deal, ids = self.config.deal, self.train_set.ids
        pool_generator = _derived_generator(torch.device("cpu"), self.seed, self.acquisition, cycle, "pool")
        sampled = torch.randperm(len(ids), generator=pool_generator)[:max(1, round(deal.pool_fraction * len(ids)))]
        candidates = [ids[i] for i in sorted(sampled.tolist())]
        by_id = {i: score for ids, scores in self._score(model, candidates, cycle) for i, score in zip(ids, scores)}
        scores = torch.stack([by_id[i] for i in candidates])
        count = min(len(candidates), max(1, round(deal.image_share * len(ids))))
        chosen = [candidates[i] for i in scores.topk(count).indices.tolist()]
        per_image = -(-self.config.pixels_per_image * len(ids) // count)

        def choose(image_id: str, available: Tensor) -> Tensor:
            draws = torch.rand(available.shape, generator=self._select_generator(cycle, image_id))
            return top_n(draws, available, min(per_image, int(available.sum())))

        self._query(tag, choose, chosen)

    def run(self) -> list[CycleRecord]:
        """Run (or resume) all cycles; returns one record per cycle (cycles + 1 evaluations).
        Raises :class:`AwaitingAnnotations` when queries wait for a person. The run's folder is
        locked meanwhile: a second loop or an annotation page on it is refused."""
        with FolderLock(self.state_dir, "active-learning run"):
            return self._run()

    def _run(self) -> list[CycleRecord]:
        self.initial_labels()
        self._answer("initial")
        model_dir = self.state_dir / "model"
        for cycle in tqdm(range(self.config.cycles + 1), desc=f"{self.acquisition} seed {self.seed}",
                          disable=not self.progress):
            done = cycle < len(self.records)
            if done and self.records[cycle].acquired:
                continue
            if done:  # trained and evaluated before a crash; only the acquisition is missing
                model = load_model(model_dir, self.device)
            else:
                model = self._cycle0_model() if cycle == 0 else self.train_model(cycle)
                model.save_pretrained(model_dir)
                scores = evaluate(model, self.val_set, transforms=self.transforms)
                labelled = self.labels.count()
                self.records.append(CycleRecord(cycle, labelled, 100.0 * labelled / self.total_pixels, scores.miou))
                self._save_state()
            if cycle < self.config.cycles:
                self.acquire(model, cycle)
                self._answer(f"cycle{cycle}")
                if self.config.warm_start:
                    # Written before the cycle counts as acquired: a crash while training the next
                    # cycle (which overwrites `model`) still finds this cycle's weights here.
                    model.save_pretrained(self.warm_start_dir)
            self.records[cycle].acquired = True
            self._save_state()
        return self.records
