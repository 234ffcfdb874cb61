"""The method end to end (Figure 1 of the ControlNet-guidance paper): train on real -> generate
guided -> retrain on real + synthetic -> evaluate, for several guidance conditions and seeds.

Every stage writes into one output folder and is skipped when its result is already there, so
a killed run resumes::

    <output_dir>/seed_<s>/segmenter_<k>/         stage 1: segmenters on the real labelled set
    <output_dir>/seed_<s>/segmenter_0_early/      stage 1: segmenter 0's recipe stopped early
                                                  (only for a "committee: snapshots" variant)
    <output_dir>/seed_<s>/generated/<condition>/  stage 2: synthetic pairs (resumable writer)
    <output_dir>/seed_<s>/retrained/<condition>/  stage 3+4: real + synthetic, then val mIoU
    <output_dir>/seed_<s>/retrained/<condition>_filtered/  the same with label_filter
    <output_dir>/results.csv, summary.md, miou.png, stages.csv,
                 sets.png (the first seed's sets side by side, same masks)
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
from typing import Any, Callable, Optional

import numpy as np
import torch
from matplotlib.figure import Figure

from al.config import require
from al.data.base import SegmentationDataset
from al.data.folder import atomic_write_bytes, load_folder
from al.experiment import DataConfig
from al.loop import ModelConfig
from al.metrics import confusion_matrix, iou_per_class
from al.models import Segmenter
from al.plots import save_figure
from al.train import (
    DenseTargetDataset,
    TrainConfig,
    TrainingSource,
    evaluate,
    train_segmenter,
)
from guidedgen.generate import GenerateConfig, GuidanceConfig, run_generation
from guidedgen.guidance import OBJECTIVES, build_objective
from guidedgen.quality import load_judge
from guidedgen.sheet import sets_sheet

UNGUIDED = "unguided"
REAL_ONLY = "real only"
REAL_PLUS = "real + "  # the condition of a retrained row: REAL_PLUS + set name
FILTERED = " filtered"  # set name suffix of a label-filtered set
SHEET_SAMPLES = 8  # pairs per set in sets.png


@dataclass
class PipelineConfig:
    output_dir: str = "outputs/pipeline_digits"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data: DataConfig = field(default_factory=lambda: DataConfig(num_train_images=100, num_val_images=200))
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, batch_size=8, lr=1e-3))
    committee_size: int = 3  # segmenters trained in stage 1; the first guides, all form the committee
    # "unguided", an objective of guidedgen.guidance.OBJECTIVES (at generation.guidance), or a variant
    conditions: list[str] = field(default_factory=lambda: [UNGUIDED, "entropy", "committee", "expected_model_change"])
    # Named guided conditions: the generation.guidance keys that differ, objective included, e.g.
    # {entropy_late: {objective: entropy, start: 0.5, end: 1.0}}; "committee: snapshots" makes the
    # committee segmenter 0 and its recipe stopped after snapshot_epochs (default: seeded members).
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshot_epochs: int = 10
    # An independent judge (guidedgen.quality.load_judge): each set's mask fidelity is reported and,
    # with label_filter, every set is retrained a second time with the pixels the judge reads as
    # another class than the mask's ignored (condition "<name> filtered").
    judge: Optional[str] = None
    label_filter: bool = False
    num_synthetic: int = 100
    synthetic_share: float = 0.5
    synthetic_loss_weight: float = 1.0
    generation: GenerateConfig = field(default_factory=GenerateConfig)  # models, steps, guidance strength...
    progress: bool = True

    def validate(self) -> None:
        for condition in self.conditions:
            require(condition == UNGUIDED or condition in OBJECTIVES or condition in self.variants, "conditions", condition,
                    f"{UNGUIDED!r}, one of {sorted(OBJECTIVES)} or a name in variants {sorted(self.variants)}")
        keys = {f.name for f in dataclasses.fields(GuidanceConfig)} - {"segmenters"}
        for name, changes in self.variants.items():
            require(name != UNGUIDED and name not in OBJECTIVES, "variants", name, "a name that is not an objective or 'unguided'")
            require(changes.get("objective") in OBJECTIVES, f"variants.{name}.objective", changes.get("objective"),
                    f"one of {sorted(OBJECTIVES)}")
            require(changes.get("committee", "seeds") in ("seeds", "snapshots"), f"variants.{name}.committee",
                    changes.get("committee"), "'seeds' or 'snapshots'")
            for key in set(changes) - keys - {"committee"}:
                require(False, f"variants.{name}", key, f"keys of generation.guidance {sorted(keys)} or 'committee'")
        require(self.committee_size >= (2 if self._objectives_seen("committee") else 1), "committee_size",
                self.committee_size, "an integer >= 2 when 'committee' is a condition (>= 1 otherwise)")
        require(self.judge is not None or not self.label_filter, "judge", self.judge, "a judge folder when label_filter is on")
        require(0.0 < self.synthetic_share < 1.0, "synthetic_share", self.synthetic_share, "a number in (0, 1)")
        require(self.num_synthetic >= 1, "num_synthetic", self.num_synthetic, "an integer >= 1")
        require(self.generation.guidance.strength > 0 or self.conditions == [UNGUIDED], "generation.guidance.strength",
                self.generation.guidance.strength, "a number > 0 (the strength of the guided conditions)")

    def _objectives_seen(self, objective: str) -> bool:
        return any(c == objective or self.variants.get(c, {}).get("objective") == objective
                   and self.variants[c].get("committee", "seeds") == "seeds" for c in self.conditions)

    def guidance(self, condition: str) -> tuple[GuidanceConfig, str]:
        """The guidance of a guided condition and where its committee comes from."""
        changes = dict(self.variants.get(condition, {"objective": condition}))
        committee = changes.pop("committee", "seeds")
        return dataclasses.replace(self.generation.guidance, **changes), committee


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
    """``segmenters``: the seeded committee (segmenter 0 first), then segmenter 0 stopped early."""
    if condition == UNGUIDED:
        guidance = dataclasses.replace(config.generation.guidance, objective=None, strength=0.0,
                                       segmenters=[str(segmenters[0])])
    else:
        guidance, committee = config.guidance(condition)
        seeded = segmenters[:config.committee_size]
        chosen = seeded[:1] if guidance.objective != "committee" else (seeded if committee == "seeds" else
                                                                         [segmenters[0], segmenters[-1]])
        guidance = dataclasses.replace(guidance, segmenters=[str(p) for p in chosen])
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
    images, masks = stacked(dataset)
    values = {}
    for name in ("entropy", "committee", "expected_model_change"):
        if name == "committee" and len(models) < 2:
            continue
        objective = build_objective(name, models if name == "committee" else models[:1], ignore_index)
        with torch.enable_grad():  # some objectives differentiate internally; values only are kept
            values[name] = float(torch.cat([objective(images[i:i + 32], masks[i:i + 32]).detach()
                                            for i in range(0, len(images), 32)]).mean())
    return values


def stacked(dataset: SegmentationDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All images ``[N, 3, H, W]`` and masks ``[N, H, W]`` of a (small) dataset."""
    samples = [dataset[i] for i in range(len(dataset))]
    return torch.stack([s.image for s in samples]), torch.stack([s.mask for s in samples])


@torch.no_grad()
def judge_set(images: torch.Tensor, masks: torch.Tensor, judge: Segmenter, num_classes: int,
              ignore_index: int) -> tuple[dict[str, float], torch.Tensor]:
    """How well an independent judge reads each mask in its image, and the label-filtered masks.

    Returns ``{"fidelity_miou": mIoU of the judge's prediction against the masks over the
    ``num_classes`` classes of the data, "fidelity_agreement": share of labelled pixels where it
    reads the mask's class}`` and the masks with the other labelled pixels set to ``ignore_index``.
    """
    require(judge.num_classes >= num_classes, "judge", judge.num_classes,
            f"a judge with at least the data's {num_classes} classes")
    prediction = torch.cat([judge.predict(images[i:i + 32]) for i in range(0, len(images), 32)])
    iou = iou_per_class(confusion_matrix(prediction, masks, judge.num_classes, ignore_index))[:num_classes]
    labelled = masks != ignore_index
    agree = (prediction == masks) & labelled
    scores = {"fidelity_miou": float(iou.nanmean()), "fidelity_agreement": float(agree.sum() / labelled.sum().clamp_min(1))}
    return scores, torch.where(agree | ~labelled, masks, torch.full_like(masks, ignore_index))


def run_pipeline(config: PipelineConfig) -> str:
    """Run (or resume) every seed and condition; returns the markdown summary."""
    config.validate()
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    log = StageLog(output / "stages.csv")
    train_set, val_set = config.data.build(config.data.train_split), config.data.build(config.data.val_split)
    ignore_index = train_set.ignore_index
    judge = load_judge(config.judge)[0] if config.judge else None
    real = TrainingSource(DenseTargetDataset(train_set))
    snapshots = any(config.guidance(c)[1] == "snapshots" for c in config.conditions if c != UNGUIDED)
    rows, committees = [], {}
    for seed in config.seeds:  # stage 1 for every seed first: it needs no generative model
        base = output / f"seed_{seed}"
        committees[seed] = [base / f"segmenter_{k}" for k in range(config.committee_size)]
        for k, folder in enumerate(committees[seed]):
            record = log.run(f"seed {seed}: train on real ({folder.name})",
                             lambda f=folder, k=k: _train(config, [real], f, seed * 100 + k, train_set.num_classes, val_set,
                                                          config.train.epochs))
            if k == 0:
                fidelity = judge_set(*stacked(train_set), judge, train_set.num_classes, ignore_index)[0] if judge else {}
                rows.append({"seed": seed, "condition": REAL_ONLY, "val_miou": record["val_miou"], **fidelity})
        if snapshots:  # segmenter 0's seed, data order and recipe, stopped early
            early = base / "segmenter_0_early"
            log.run(f"seed {seed}: train on real ({early.name})",
                    lambda f=early: _train(config, [real], f, seed * 100, train_set.num_classes, val_set, config.snapshot_epochs))
            committees[seed].append(early)
    # A mixed epoch shows len(real) / real_share items: fewer epochs keep the number of optimizer
    # steps equal to the real-only run's, so synthetic data is not credited with extra training.
    retrain_epochs = max(1, round(config.train.epochs * (1.0 - config.synthetic_share)))
    real_share = dataclasses.replace(real, share=1.0 - config.synthetic_share)
    for seed in config.seeds:
        base, segmenters = output / f"seed_{seed}", committees[seed]
        for condition in config.conditions:
            generated = base / "generated" / condition
            log.run(f"seed {seed}: generate {condition}",
                    lambda c=condition, g=generated: run_generation(generation_config(config, c, segmenters, g, seed)))
            dataset = load_folder(generated)
            values = {f"objective_{k}": v
                      for k, v in objective_values(generated, segmenters[:config.committee_size], ignore_index).items()}
            images, masks = stacked(dataset)
            fidelity, filtered = judge_set(images, masks, judge, train_set.num_classes, ignore_index) if judge else ({}, None)
            training_sets = {condition: DenseTargetDataset(dataset)}
            if config.label_filter:
                training_sets[condition + FILTERED] = [{"image": i, "target": t} for i, t in zip(images, filtered)]
            for name, items in training_sets.items():
                synthetic = TrainingSource(items, config.synthetic_share, config.synthetic_loss_weight, "synthetic")
                record = log.run(f"seed {seed}: retrain real + {name}",
                                 lambda s=synthetic, n=name: _train(config, [real_share, s],
                                                                    base / "retrained" / n.replace(" ", "_"), seed * 100,
                                                                    train_set.num_classes, val_set, retrain_epochs))
                rows.append({"seed": seed, "condition": REAL_PLUS + name, "val_miou": record["val_miou"],
                             "synthetic_samples": len(dataset), **values, **fidelity})
    first = output / f"seed_{config.seeds[0]}" / "generated"
    shown = [stacked(load_folder(first / c)) for c in config.conditions]
    count = min([len(masks) for _, masks in shown] + [SHEET_SAMPLES])
    sets_sheet(shown[0][1][:count].numpy(), {c: images[:count].numpy() for c, (images, _) in zip(config.conditions, shown)},
               train_set.num_classes, output / "sets.png")
    return write_results(rows, output)


def paired_changes(rows: list[dict], condition: str, reference: str) -> list[float]:
    """val mIoU (percentage points) of ``condition`` minus ``reference``, for each seed that has
    both, in seed order; empty when the condition is the reference or either is missing."""
    by_seed = {name: {row["seed"]: row["val_miou"] for row in rows if row["condition"] == name}
               for name in (condition, reference)}
    if condition == reference:
        return []
    return [100 * (by_seed[condition][s] - by_seed[reference][s]) for s in sorted(by_seed[condition])
            if s in by_seed[reference]]


def _change_cell(changes: list[float]) -> str:
    if not changes:
        return "-"
    return f"{np.mean(changes):+.1f} ± {np.std(changes):.1f} (" + ", ".join(f"{c:+.1f}" for c in changes) + ")"


def write_results(rows: list[dict], output: Path) -> str:
    fields = sorted({k for row in rows for k in row}, key=lambda k: (k not in ("seed", "condition", "val_miou"), k))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(output / "results.csv", buffer.getvalue().encode())
    conditions = list(dict.fromkeys(row["condition"] for row in rows))
    objective_keys = [k for k in fields if k.startswith(("objective_", "fidelity_"))]
    lines = ["| training data | val mIoU (%) | seeds | paired vs real only | paired vs unguided | "
             + " | ".join(k.replace("objective_", "") for k in objective_keys) + " |",
             "|---" * (5 + len(objective_keys)) + "|"]
    means, spreads = [], []
    for condition in conditions:
        chosen = [row for row in rows if row["condition"] == condition]
        mious = np.array([row["val_miou"] for row in chosen]) * 100
        means.append(mious.mean())
        spreads.append(mious.std())
        unguided = f"{REAL_PLUS}{UNGUIDED}" + (FILTERED if condition.endswith(FILTERED) else "")
        changes = [_change_cell(paired_changes(rows, condition, reference)) for reference in (REAL_ONLY, unguided)]
        cells = [f"{np.mean([row[k] for row in chosen if k in row]):.4f}" if any(k in row for row in chosen) else "-"
                 for k in objective_keys]
        lines.append(f"| {condition} | {mious.mean():.1f} ± {mious.std():.1f} | {len(chosen)} | "
                     + " | ".join(changes + cells) + " |")
    summary = "\n".join(lines) + ("\n\nPaired columns: mean ± std over seeds of the val mIoU change against the same "
                                  "seed's reference (filtered sets against unguided filtered), per seed in brackets. "
                                  "Objective columns: mean value of each informativeness objective on the "
                                  "synthetic set, under the stage-1 segmenters (higher = the guiding model finds it harder). "
                                  "fidelity_miou / fidelity_agreement (with a judge): its mIoU against the masks and the share "
                                  "of labelled pixels where it reads the mask's class (real only: on the real images).\n")
    atomic_write_bytes(output / "summary.md", summary.encode())
    figure = Figure(figsize=(1.6 + 1.3 * len(conditions), 3.4))
    axes = figure.add_subplot(1, 1, 1)
    axes.bar(range(len(conditions)), means, yerr=spreads, capsize=4, color="#4c72b0")
    axes.set_xticks(range(len(conditions)), conditions, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel("val mIoU (%)")
    axes.set_title("train on real -> generate -> retrain (mean ± std over seeds)", fontsize=9)
    save_figure(figure, output / "miou.png")
    return summary
