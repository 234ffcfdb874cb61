"""An active-learning experiment: several acquisitions x seeds on one dataset, with a fully
supervised reference, a learning-curve table (``curve.csv``) and plots in one output folder.

Each run keeps its own state folder (``<output_dir>/runs/<acquisition>/seed_<s>``), so runs can
be resumed, or split over several processes that share ``output_dir``; the table and plots are
rebuilt from every finished cycle found there.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from al.acquisition import all_acquisitions, get_acquisition, pool_predictions
from al.atomic import atomic_write_bytes
from al.config import require
from al.data.config import DATA_CONFIG_NAME, DATA_KINDS, DataConfig
from al.data.base import SegmentationDataset
from al.inference import View, input_multiple, size_groups
from al.labels import SparseLabels
from al.loop import ActiveLearningLoop
from al.loop_config import LoopConfig
from al.models import load_model
from al.oracles import GroundTruthOracle, HumanOracle
from al.resume import check_resume, identity
from al.plots import plot_learning_curves, plot_uncertainty_maps
from al.scores import balanced_entropy, bald, entropy, marginal_confidence, mean_prediction
from al.train import DenseTargetDataset, TrainConfig, evaluate, train_segmenter

ANNOTATORS = ("oracle", "human")
CURVE_FIELDS = ["acquisition", "seed", "cycle", "labelled_pixels", "labelled_percent", "miou"]


@dataclass
class ExperimentConfig:
    output_dir: str = "outputs/al_digits"
    acquisitions: list[str] = field(default_factory=lambda: ["balent", "entropy", "bald", "random"])
    seeds: list[int] = field(default_factory=lambda: [0])
    supervised_reference: bool = True
    uncertainty_map_images: int = 4
    device: str = "auto"  # "auto" = cuda if available, else cpu
    # "oracle": the training masks answer queries; "human": a person answers in scripts/annotate.py
    annotator: str = "oracle"
    progress: bool = True
    # Processes sharing the runs (acquisition x seed) and the supervised references; each gets
    # cpu_count // workers torch threads. Small CPU models scale better over processes than threads.
    workers: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)

    def validate(self) -> None:
        self.loop.validate("loop")
        for name in self.acquisitions:
            require(name in all_acquisitions(), "acquisitions", name, f"one of {sorted(all_acquisitions())}")
            require(self.loop.learner == "segmenter" or not get_acquisition(name).needs_difficulty, "acquisitions", name,
                    "an acquisition without DEAL's difficulty branch (only loop.learner=segmenter has it)")
        require(self.loop.learner == "segmenter" or not self.supervised_reference, "supervised_reference",
                self.supervised_reference, "false with loop.learner=diffusion_features (the reference is a segmenter)")
        require(len(self.acquisitions) > 0, "acquisitions", self.acquisitions, "a non-empty list")
        require(len(self.seeds) > 0, "seeds", self.seeds, "a non-empty list")
        require(self.device in ("auto", "cpu") or (self.device.startswith("cuda") and torch.cuda.is_available()),
                "device", self.device, "'auto', 'cpu' or 'cuda[:n]' on a machine with a CUDA GPU (none is visible)")
        require(self.data.kind != "masks", "data.kind", self.data.kind,
                f"one of {[k for k in DATA_KINDS if k != 'masks']} (active learning needs images)")
        self.data.validate("data")
        require(self.annotator in ANNOTATORS, "annotator", self.annotator, f"one of {ANNOTATORS}")
        require(self.workers >= 1, "workers", self.workers, "an integer >= 1")
        require(self.workers == 1 or self.annotator == "oracle", "workers", self.workers,
                "1 with annotator=human (the annotation page answers one run at a time)")
        require(self.annotator == "oracle" or not self.supervised_reference, "supervised_reference",
                self.supervised_reference, "false with annotator=human (it reads every training mask)")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def run_dir(output_dir: Path, acquisition: str, seed: int) -> Path:
    return output_dir / "runs" / acquisition / f"seed_{seed}"


def collect_curve(output_dir: Path) -> list[dict]:
    """Every evaluated cycle of every run under ``output_dir``."""
    rows = []
    for state_path in sorted((output_dir / "runs").glob("*/seed_*/state.json")):
        state = json.loads(state_path.read_text())
        for record in state["cycles"]:
            rows.append({"acquisition": state["acquisition"], "seed": state["seed"],
                         **{k: record[k] for k in CURVE_FIELDS[2:]}})
    return rows


def write_curve_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CURVE_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


def query_table(output_dir: Path, train_set: SegmentationDataset) -> str:
    """Markdown: what each acquisition queried per cycle, over seeds: the share of labels that
    fell on non-background classes and the number of distinct classes hit."""
    shares: dict = {}
    shapes = train_set.image_shapes()
    for state_path in sorted((output_dir / "runs").glob("*/seed_*/state.json")):
        state = json.loads(state_path.read_text())
        labels = SparseLabels(state_path.parent / "labels", shapes, train_set.num_classes,
                              train_set.ignore_index)
        for tag, classes in labels.classes_by_tag().items():
            values = np.array(classes)
            shares.setdefault((state["acquisition"], tag), []).append(
                (float((values != 0).mean()) * 100, len(set(values.tolist()) - {train_set.ignore_index})))
    tags = sorted({tag for _, tag in shares}, key=lambda t: (t != "initial", int(t[5:]) if t.startswith("cycle") else -1))
    acquisitions = sorted({a for a, _ in shares})
    lines = ["| queried in | " + " | ".join(acquisitions) + " |", "|---" * (1 + len(acquisitions)) + "|"]
    for tag in tags:
        cells = []
        for acquisition in acquisitions:
            found = shares.get((acquisition, tag))
            cells.append(f"{np.mean([f for f, _ in found]):.0f}% fg, {np.mean([c for _, c in found]):.1f} cls" if found else "-")
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(rows: list[dict]) -> str:
    """Markdown table: mean +- std mIoU (%) over seeds, one column per acquisition."""
    acquisitions = sorted({r["acquisition"] for r in rows})
    cycles = sorted({int(r["cycle"]) for r in rows})
    lines = ["| cycle | labelled px | " + " | ".join(acquisitions) + " |", "|---" * (2 + len(acquisitions)) + "|"]
    for cycle in cycles:
        cells, pixels = [], []
        for acquisition in acquisitions:
            values = [float(r["miou"]) * 100 for r in rows if r["acquisition"] == acquisition and int(r["cycle"]) == cycle]
            pixels += [int(r["labelled_pixels"]) for r in rows if r["acquisition"] == acquisition and int(r["cycle"]) == cycle]
            cells.append(f"{np.mean(values):.1f} ± {np.std(values):.1f} ({len(values)})" if values else "-")
        lines.append(f"| {cycle} | {int(np.mean(pixels))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def supervised_reference(config: ExperimentConfig, train_set, val_set, seed: int, device: torch.device) -> float:
    """mIoU of the same model trained on every pixel of the training set, for as many epochs as
    the last cycle's model had (cached per seed)."""
    path = Path(config.output_dir) / "supervised" / f"seed_{seed}.json"
    fingerprint = config.loop.fingerprint("supervised", seed)
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["fingerprint"] == fingerprint:
            return cached["miou"]
    torch.manual_seed(seed)
    model = config.loop.model.build(train_set.num_classes).to(device)
    # as many epochs as the last cycle's model has behind it (warm starts add up)
    train_config = TrainConfig(**{**asdict(config.loop.train), "epochs": config.loop.total_epochs(), "seed": seed})
    transforms = config.data.transforms
    train_segmenter(model, DenseTargetDataset(train_set), train_config, train_set.ignore_index,
                    progress=config.progress, transforms=transforms)
    miou = evaluate(model, val_set, transforms=transforms).miou
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"fingerprint": fingerprint, "miou": miou}).encode())
    return miou


def uncertainty_maps(config: ExperimentConfig, val_set: SegmentationDataset, model_dir: Path, path: Path, device: torch.device) -> None:
    """Image | GT | prediction | BalEnt | BALD | entropy | P_marg for a few validation images
    (the images of each size predicted together, every map on the pixels as read)."""
    model = load_model(model_dir, device)
    samples = [val_set[i] for i in range(min(config.uncertainty_map_images, len(val_set)))]
    generator = torch.Generator(device=device).manual_seed(0)
    scores = {"BalEnt": balanced_entropy, "BALD": bald, "entropy": entropy, "P_marg": marginal_confidence}
    maps, predictions = {name: [None] * len(samples) for name in scores}, [None] * len(samples)
    for group in size_groups([s.mask.shape for s in samples]):
        images = torch.stack([samples[i].image for i in group]).to(device)
        view = View.of(images.shape[-2:], config.data.transforms, input_multiple(model))
        found = pool_predictions(model, view.images(images), config.loop.mc_samples, generator,
                                 config.loop.mc_at_decoder_resolution)
        probs = (found if view.is_identity else found.map(view.maps)).probs
        for name, score in scores.items():
            for i, value in zip(group, score(probs).float().cpu().numpy()):
                maps[name][i] = value
        for i, value in zip(group, mean_prediction(probs).argmax(1).cpu().numpy()):
            predictions[i] = value
    plot_uncertainty_maps(
        images=[(s.image.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for s in samples],
        masks=[s.mask.numpy() for s in samples],
        predictions=predictions,
        maps=maps,
        path=path,
        num_classes=val_set.num_classes,
        ignore_index=val_set.ignore_index,
    )


def _init_worker(workers: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _claim_data(path: Path, data: DataConfig) -> None:
    """Record a run's data config, or refuse to resume a run that was made on other data (the
    loop's fingerprint covers the loop's settings only)."""
    recorded = {"data": json.loads(path.read_text())} if path.exists() else None
    if not check_resume(recorded, {"data": identity(data)}, path.parent, defaults={"data": identity(DataConfig())},
                        remedy="use another output_dir"):
        atomic_write_bytes(path, json.dumps(identity(data), indent=2).encode())


def _run_task(config: ExperimentConfig, task: tuple[str, int], train_set: Optional[SegmentationDataset] = None,
              val_set: Optional[SegmentationDataset] = None) -> Optional[float]:
    """One unit of an experiment: the supervised reference of a seed (returns its mIoU), or one
    (acquisition, seed) run to its end. A worker process builds the datasets itself."""
    if train_set is None:
        train_set, val_set = config.data.build(config.data.train_split), config.data.build(config.data.val_split)
    name, seed = task
    device = config.resolved_device()
    if name == "supervised":
        return supervised_reference(config, train_set, val_set, seed, device)
    state_dir = run_dir(Path(config.output_dir), name, seed)
    state_dir.mkdir(parents=True, exist_ok=True)
    _claim_data(state_dir / DATA_CONFIG_NAME, config.data)
    oracle = HumanOracle(train_set.image_shapes()) if config.annotator == "human" else GroundTruthOracle(train_set)
    loop = ActiveLearningLoop(config.loop, name, seed, train_set, val_set, state_dir, oracle,
                              device=device, progress=config.progress and config.workers == 1,
                              shared_dir=Path(config.output_dir) / "shared", transforms=config.data.transforms)
    loop.run()
    return None


def run_experiment(config: ExperimentConfig) -> str:
    """Run (or resume) every acquisition x seed; write curve.csv, plots and a summary table.
    Returns the markdown summary. With ``annotator=human`` it stops with
    :class:`al.oracles.AwaitingAnnotations` whenever queries wait for a person."""
    config.validate()
    output_dir, device = Path(config.output_dir), config.resolved_device()
    # Several processes may share output_dir, one acquisition each (each run's folder is locked by
    # its loop; the shared files are written whole, atomically)
    output_dir.mkdir(parents=True, exist_ok=True)
    train_set, val_set = config.data.build(config.data.train_split), config.data.build(config.data.val_split)
    references = {}
    tasks = ([("supervised", seed) for seed in config.seeds] if config.supervised_reference else [])
    tasks += [(acquisition, seed) for acquisition in config.acquisitions for seed in config.seeds]
    if config.workers == 1:
        results = [_run_task(config, task, train_set, val_set) for task in tasks]
    else:  # spawn: a fresh interpreter per worker, safe with torch threads (and CUDA)
        with ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(config.workers,)) as pool:
            results = list(tqdm(pool.map(_run_task, [config] * len(tasks), tasks), total=len(tasks),
                                desc=f"runs over {config.workers} workers", disable=not config.progress))
    if config.supervised_reference:
        values = [miou for (name, _), miou in zip(tasks, results) if name == "supervised"]
        references[f"fully supervised ({np.mean(values) * 100:.1f})"] = float(np.mean(values))
    rows = collect_curve(output_dir)
    write_curve_csv(rows, output_dir / "curve.csv")
    plot_learning_curves(rows, output_dir / "curve.png", references,
                         title=f"{config.data.kind}: {config.loop.pixels_per_image} px/image/cycle, {config.loop.selection}")
    shown = "balent" if "balent" in config.acquisitions else config.acquisitions[0]
    uncertainty_maps(config, val_set, run_dir(output_dir, shown, config.seeds[0]) / "model",
                     output_dir / "uncertainty_maps.png", device)
    summary = curve_table(rows)
    if references:
        summary += "\n\n" + "; ".join(references)
    summary += "\n\nWhat was queried (mean over seeds):\n\n" + query_table(output_dir, train_set)
    atomic_write_bytes(output_dir / "summary.md", (summary + "\n").encode())
    return summary

