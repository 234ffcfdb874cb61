"""Few densely labelled images: the diffusion-feature pixel ensemble against smp segmenters
trained from scratch and from a pretrained encoder (the comparison of Baranchuk et al.).

Every (model, number of labelled images, seed) cell is trained, evaluated on the dense
validation set and written to ``cells/`` as soon as it is done, so a re-run resumes; the table
(``results.csv``, ``summary.md``) and the plot (``miou.png``) are rebuilt from the cells.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from al.atomic import atomic_write_bytes
from al.config import require
from al.data.config import DataConfig
from al.diffusion_features import DiffusionFeaturesConfig, DiffusionFeatureSegmenter
from al.inference import input_multiple
from al.models import ModelConfig
from al.plots import save_figure
from al.resume import check_resume, identity
from al.train import (
    DenseTargetDataset,
    TrainConfig,
    TrainingCollate,
    crop_generator,
    evaluate,
    train_segmenter,
)

DIFFUSION_FEATURES = "diffusion features"
DENSE_CEILING = "dense ceiling"


@dataclass
class DenseCeilingConfig:
    """The reference every few-label model is read against: one of the smp segmenters trained on
    all ``data.num_train_images`` dense scenes, per seed."""

    segmenter: Optional[str] = None  # a name in ``segmenters``; None: no ceiling
    train_steps: int = 1344


@dataclass
class FewLabelsConfig:
    output_dir: str = "outputs/few_labels_digits"
    label_counts: list[int] = field(default_factory=lambda: [5, 10, 20])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data: DataConfig = field(default_factory=lambda: DataConfig(num_train_images=20))
    diffusion_features: DiffusionFeaturesConfig = field(default_factory=DiffusionFeaturesConfig)
    # smp segmenters by display name; the same optimizer-step budget for every label count
    segmenters: dict[str, ModelConfig] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    train_steps: int = 400
    dense_ceiling: DenseCeilingConfig = field(default_factory=DenseCeilingConfig)
    progress: bool = True
    overwrite: bool = False  # replace cells computed with other settings (refused otherwise)

    def validate(self) -> None:
        require(len(self.label_counts) > 0 and min(self.label_counts) >= 1, "label_counts", self.label_counts,
                "a non-empty list of positive integers")
        require(max(self.label_counts) <= self.data.num_train_images, "label_counts", self.label_counts,
                f"counts <= data.num_train_images ({self.data.num_train_images})")
        require(DIFFUSION_FEATURES not in self.segmenters, "segmenters", list(self.segmenters),
                f"names other than {DIFFUSION_FEATURES!r}")
        require(self.train_steps >= 1, "train_steps", self.train_steps, "an integer >= 1")
        require(self.dense_ceiling.segmenter in (None, *self.segmenters), "dense_ceiling.segmenter",
                self.dense_ceiling.segmenter, f"null or one of {list(self.segmenters)}")
        require(self.dense_ceiling.train_steps >= 1, "dense_ceiling.train_steps", self.dense_ceiling.train_steps,
                "an integer >= 1")

    def models(self) -> list[str]:
        return [DIFFUSION_FEATURES, *self.segmenters]

    def cells(self) -> list[tuple[str, int, int]]:
        """(model, labelled images, seed) of every cell; the dense ceiling's read all training scenes."""
        cells = [(m, n, s) for s in self.seeds for n in self.label_counts for m in self.models()]
        if self.dense_ceiling.segmenter is not None:
            cells += [(DENSE_CEILING, self.data.num_train_images, s) for s in self.seeds]
        return cells


def _cell_path(output: Path, model: str, count: int, seed: int) -> Path:
    return output / "cells" / f"{model.replace(' ', '_')}_{count}_{seed}.json"


def train_cell(config: FewLabelsConfig, model_name: str, count: int, seed: int, device: torch.device) -> float:
    """Train one model on the first ``count`` scenes of the seed's training set; val mIoU."""
    data = replace(config.data, seed=seed)
    train_set, val_set = data.build(data.train_split), data.build(data.val_split)
    labelled = DenseTargetDataset(Subset(train_set, list(range(count))))
    torch.manual_seed(seed)
    if model_name == DIFFUSION_FEATURES:
        model = DiffusionFeatureSegmenter(config.diffusion_features, train_set.num_classes, seed=seed, device=device)
        collate = TrainingCollate(data.transforms, [False], train_set.ignore_index, input_multiple(model),
                                  crop_generator(seed))
        loader = DataLoader(labelled, batch_size=config.diffusion_features.extraction_batch_size, collate_fn=collate)
        model.fit(((b["image"], b["target"]) for b in loader), train_set.ignore_index,
                  torch.Generator().manual_seed(seed))
    else:
        steps = config.train_steps
        if model_name == DENSE_CEILING:
            model_name, steps = config.dense_ceiling.segmenter, config.dense_ceiling.train_steps
        model = config.segmenters[model_name].build(train_set.num_classes).to(device)
        epochs = math.ceil(steps * config.train.batch_size / count)
        train_config = replace(config.train, epochs=epochs, seed=seed)
        train_segmenter(model, labelled, train_config, train_set.ignore_index, progress=False,
                        transforms=data.transforms)
    return evaluate(model, val_set, transforms=data.transforms).miou


def cell_identity(config: dict, model_name: str) -> dict:
    """What one cell's mIoU depends on: the settings but the grid's extent (seeds, counts, other
    models) and where and how visibly it runs."""
    values = identity(config, ("output_dir", "progress", "overwrite", "label_counts", "seeds"))
    ceiling = values.pop("dense_ceiling", None) or {}
    if model_name == DENSE_CEILING:  # a ceiling cell depends on its own segmenter and budget only
        model_name, values["train_steps"] = ceiling["segmenter"], ceiling["train_steps"]
    values["segmenter"] = values.pop("segmenters", {}).get(model_name)  # None: the diffusion-feature ensemble
    return values


def run_few_labels(config: FewLabelsConfig) -> str:
    """Run (or resume) every cell; write results.csv, summary.md and miou.png. Returns the summary."""
    config.validate()
    output = Path(config.output_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cells = config.cells()
    for model_name, count, seed in tqdm(cells, desc="few labels", disable=not config.progress):
        path = _cell_path(output, model_name, count, seed)
        recorded = cell_identity(json.loads(path.read_text())["config"], model_name) if path.exists() else None
        if check_resume(recorded, cell_identity(asdict(config), model_name), path.parent, config.overwrite,
                        defaults=cell_identity(asdict(FewLabelsConfig()), model_name)):
            continue
        miou = train_cell(config, model_name, count, seed, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({"config": identity(config), "model": model_name, "labelled_images": count,
                                             "seed": seed, "miou": miou}).encode())
    rows = [json.loads(_cell_path(output, m, n, s).read_text()) for m, n, s in cells]
    return write_results(config, rows, output)


def write_results(config: FewLabelsConfig, rows: list[dict], output: Path) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["model", "labelled_images", "seed", "miou"])
    writer.writeheader()
    writer.writerows({k: row[k] for k in writer.fieldnames} for row in rows)
    atomic_write_bytes(output / "results.csv", buffer.getvalue().encode())
    lines = ["| model | " + " | ".join(f"{n} images" for n in config.label_counts) + " |",
             "|---|" + "---|" * len(config.label_counts)]
    figure = Figure(figsize=(5.5, 3.6))
    axes = figure.add_subplot(1, 1, 1)
    for model_name in config.models():
        means, spreads = [], []
        for count in config.label_counts:
            values = [100 * r["miou"] for r in rows if r["model"] == model_name and r["labelled_images"] == count]
            means.append(np.mean(values))
            spreads.append(np.std(values))
        lines.append(f"| {model_name} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in zip(means, spreads)) + " |")
        axes.errorbar(config.label_counts, means, yerr=spreads, marker="o", capsize=3, label=model_name)
    ceiling = [100 * r["miou"] for r in rows if r["model"] == DENSE_CEILING]
    if ceiling:
        mean, spread = np.mean(ceiling), np.std(ceiling)
        name = f"{DENSE_CEILING} ({config.dense_ceiling.segmenter}, {config.data.num_train_images} images)"
        lines.append(f"| {name} | " + " | ".join([f"{mean:.1f} ± {spread:.1f}"] * len(config.label_counts)) + " |")
        axes.axhline(mean, color="black", linestyle="--", linewidth=1, label=name)
        axes.axhspan(mean - spread, mean + spread, color="black", alpha=0.1)
    axes.set(xlabel="densely labelled images", ylabel="val mIoU (%)", xticks=config.label_counts,
             title=f"{config.data.kind}: mean ± std over {len(config.seeds)} seeds")
    axes.legend(fontsize=8)
    save_figure(figure, output / "miou.png")
    summary = "\n".join(lines) + f"\n\nval mIoU (%) on {config.data.num_val_images} dense validation scenes.\n"
    atomic_write_bytes(output / "summary.md", summary.encode())
    return summary
