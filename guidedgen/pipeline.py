"""The method end to end (Figure 1 of the ControlNet-guidance paper): train on real -> generate
guided -> retrain on real + synthetic -> evaluate, for several guidance conditions and seeds.

Every stage writes into one output folder and is skipped when its result is already there, so
a killed run resumes::

    <output_dir>/seed_<s>/segmenter_<k>/         stage 1: segmenters on the real labelled set
    <output_dir>/seed_<s>/generated/<condition>/  stage 2: synthetic pairs (resumable writer)
    <output_dir>/seed_<s>/retrained/<condition>/  stage 3+4: real + synthetic, then val mIoU
    <output_dir>/results.csv, summary.md, miou.png, stages.csv
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from matplotlib.figure import Figure

from al.config import require
from al.data.folder import atomic_write_bytes, load_folder
from al.experiment import DataConfig
from al.loop import ModelConfig
from al.models import Segmenter
from al.plots import save_figure
from al.train import (
    DenseTargetDataset,
    TrainConfig,
    TrainingSource,
    evaluate,
    train_segmenter,
)
from guidedgen.generate import GenerateConfig, run_generation
from guidedgen.guidance import OBJECTIVES, build_objective

UNGUIDED = "unguided"
REAL_ONLY = "real only"


@dataclass
class PipelineConfig:
    output_dir: str = "outputs/pipeline_digits"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data: DataConfig = field(default_factory=lambda: DataConfig(num_train_images=100, num_val_images=200))
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, batch_size=8, lr=1e-3))
    committee_size: int = 3  # segmenters trained in stage 1; the first guides, all form the committee
    # "unguided" or an objective of guidedgen.guidance.OBJECTIVES
    conditions: list[str] = field(default_factory=lambda: [UNGUIDED, "entropy", "committee", "expected_model_change"])
    num_synthetic: int = 100
    synthetic_share: float = 0.5
    synthetic_loss_weight: float = 1.0
    generation: GenerateConfig = field(default_factory=GenerateConfig)  # models, steps, guidance strength...
    progress: bool = True

    def validate(self) -> None:
        for condition in self.conditions:
            require(condition == UNGUIDED or condition in OBJECTIVES, "conditions", condition,
                    f"{UNGUIDED!r} or one of {sorted(OBJECTIVES)}")
        require(self.committee_size >= (2 if "committee" in self.conditions else 1), "committee_size",
                self.committee_size, "an integer >= 2 when 'committee' is a condition (>= 1 otherwise)")
        require(0.0 < self.synthetic_share < 1.0, "synthetic_share", self.synthetic_share, "a number in (0, 1)")
        require(self.num_synthetic >= 1, "num_synthetic", self.num_synthetic, "an integer >= 1")
        require(self.generation.guidance.strength > 0 or self.conditions == [UNGUIDED], "generation.guidance.strength",
                self.generation.guidance.strength, "a number > 0 (the strength of the guided conditions)")


class StageLog:
    """Wall time and peak memory (process max RSS so far) of each stage, appended to stages.csv.
    A stage already logged by an earlier run is resumed (a no-op when finished) but keeps its
    first row, so a re-run does not add zero-second entries."""

    def __init__(self, path: Path):
        self.path = path
        self.logged = {row["stage"] for row in csv.DictReader(open(path))} if path.exists() else set()

    def run(self, name: str, work: Callable[[], object]):
        start = time.perf_counter()
        result = work()
        if name in self.logged:
            return result
        self.logged.add(name)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        new = not self.path.exists()
        with open(self.path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["stage", "seconds", "peak_rss_mb"])
            writer.writerow([name, f"{time.perf_counter() - start:.1f}", f"{peak:.0f}"])
        return result


def _train(config: PipelineConfig, sources: list[TrainingSource], folder: Path, seed: int, num_classes: int, val_set,
           epochs: int) -> dict:
    """Train (or reuse) one segmenter in ``folder``; returns its record with the val mIoU."""
    record_path = folder / "training.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    torch.manual_seed(seed)
    model = config.model.build(num_classes)
    train_config = dataclasses.replace(config.train, seed=seed, epochs=epochs)
    losses = train_segmenter(model, sources, train_config, progress=config.progress).losses
    record = {"seed": seed, "val_miou": evaluate(model, val_set).miou, "losses": losses,
              "sources": [{"name": s.name, "items": len(s.dataset), "share": s.share} for s in sources]}
    model.save_pretrained(folder)
    atomic_write_bytes(record_path, json.dumps(record, indent=2).encode())  # last: marks the stage done
    return record


def generation_config(config: PipelineConfig, condition: str, segmenters: list[Path], folder: Path, seed: int) -> GenerateConfig:
    guidance = config.generation.guidance
    if condition == UNGUIDED:
        guidance = dataclasses.replace(guidance, objective=None, strength=0.0, segmenters=[str(segmenters[0])])
    else:
        chosen = segmenters if condition == "committee" else segmenters[:1]
        guidance = dataclasses.replace(guidance, objective=condition, segmenters=[str(p) for p in chosen])
    return dataclasses.replace(config.generation, output_dir=str(folder), num_samples=config.num_synthetic, seed=seed,
                               masks=config.data, masks_split=config.data.train_split, guidance=guidance,
                               quality_segmenter=str(segmenters[0]), progress=config.progress)


@torch.no_grad()
def objective_values(folder: Path, segmenters: list[Path], ignore_index: int) -> dict[str, float]:
    """Mean of each objective over a generated set, under the stage-1 segmenters."""
    dataset = load_folder(folder)
    if len(dataset) == 0:
        return {}
    models = [Segmenter.from_pretrained(p).eval() for p in segmenters]
    images = torch.stack([dataset[i].image for i in range(len(dataset))])
    masks = torch.stack([dataset[i].mask for i in range(len(dataset))])
    values = {}
    for name in ("entropy", "committee", "expected_model_change"):
        if name == "committee" and len(models) < 2:
            continue
        objective = build_objective(name, models if name == "committee" else models[:1], ignore_index)
        with torch.enable_grad():  # some objectives differentiate internally; values only are kept
            values[name] = float(torch.cat([objective(images[i:i + 32], masks[i:i + 32]).detach()
                                            for i in range(0, len(images), 32)]).mean())
    return values


def run_pipeline(config: PipelineConfig) -> str:
    """Run (or resume) every seed and condition; returns the markdown summary."""
    config.validate()
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    log = StageLog(output / "stages.csv")
    train_set, val_set = config.data.build(config.data.train_split), config.data.build(config.data.val_split)
    real = TrainingSource(DenseTargetDataset(train_set))
    rows, committees = [], {}
    for seed in config.seeds:  # stage 1 for every seed first: it needs no generative model
        base = output / f"seed_{seed}"
        committees[seed] = [base / f"segmenter_{k}" for k in range(config.committee_size)]
        for k, folder in enumerate(committees[seed]):
            record = log.run(f"seed {seed}: train on real ({folder.name})",
                             lambda f=folder, k=k: _train(config, [real], f, seed * 100 + k, train_set.num_classes, val_set,
                                                          config.train.epochs))
            if k == 0:
                rows.append({"seed": seed, "condition": REAL_ONLY, "val_miou": record["val_miou"]})
    # A mixed epoch shows len(real) / real_share items: fewer epochs keep the number of optimizer
    # steps equal to the real-only run's, so synthetic data is not credited with extra training.
    retrain_epochs = max(1, round(config.train.epochs * (1.0 - config.synthetic_share)))
    for seed in config.seeds:
        base, segmenters = output / f"seed_{seed}", committees[seed]
        for condition in config.conditions:
            generated = base / "generated" / condition
            log.run(f"seed {seed}: generate {condition}",
                    lambda c=condition, g=generated: run_generation(generation_config(config, c, segmenters, g, seed)))
            synthetic = TrainingSource(DenseTargetDataset(load_folder(generated)), config.synthetic_share,
                                       config.synthetic_loss_weight, "synthetic")
            real_share = dataclasses.replace(real, share=1.0 - config.synthetic_share)
            record = log.run(f"seed {seed}: retrain real + {condition}",
                             lambda g=generated, c=condition: _train(config, [real_share, synthetic],
                                                                     base / "retrained" / c, seed * 100,
                                                                     train_set.num_classes, val_set, retrain_epochs))
            values = objective_values(generated, segmenters, train_set.ignore_index)
            rows.append({"seed": seed, "condition": f"real + {condition}", "val_miou": record["val_miou"],
                         "synthetic_samples": len(load_folder(generated)), **{f"objective_{k}": v for k, v in values.items()}})
    return write_results(rows, output)


def write_results(rows: list[dict], output: Path) -> str:
    fields = sorted({k for row in rows for k in row}, key=lambda k: (k not in ("seed", "condition", "val_miou"), k))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(output / "results.csv", buffer.getvalue().encode())
    conditions = list(dict.fromkeys(row["condition"] for row in rows))
    objective_keys = [k for k in fields if k.startswith("objective_")]
    lines = ["| training data | val mIoU (%) | seeds | " + " | ".join(k[len("objective_"):] for k in objective_keys) + " |",
             "|---" * (3 + len(objective_keys)) + "|"]
    means, spreads = [], []
    for condition in conditions:
        chosen = [row for row in rows if row["condition"] == condition]
        mious = np.array([row["val_miou"] for row in chosen]) * 100
        means.append(mious.mean())
        spreads.append(mious.std())
        cells = [f"{np.mean([row[k] for row in chosen if k in row]):.4f}" if any(k in row for row in chosen) else "-"
                 for k in objective_keys]
        lines.append(f"| {condition} | {mious.mean():.1f} ± {mious.std():.1f} | {len(chosen)} | " + " | ".join(cells) + " |")
    summary = "\n".join(lines) + ("\n\nObjective columns: mean value of each informativeness objective on the "
                                  "synthetic set, under the stage-1 segmenters (higher = the guiding model finds it harder).\n")
    atomic_write_bytes(output / "summary.md", summary.encode())
    figure = Figure(figsize=(1.6 + 1.3 * len(conditions), 3.4))
    axes = figure.add_subplot(1, 1, 1)
    axes.bar(range(len(conditions)), means, yerr=spreads, capsize=4, color="#4c72b0")
    axes.set_xticks(range(len(conditions)), conditions, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel("val mIoU (%)")
    axes.set_title("train on real -> generate -> retrain (mean ± std over seeds)", fontsize=9)
    save_figure(figure, output / "miou.png")
    return summary
