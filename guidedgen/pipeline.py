"""The method end to end (Figure 1 of the ControlNet-guidance paper): train on real -> generate
guided -> retrain on real + synthetic -> evaluate, for several guidance conditions and seeds.

Every stage writes into one output folder and is skipped when its result is already there, so
a killed run resumes::

    <output_dir>/seed_<s>/segmenter_<k>/         stage 1: segmenters on the real labelled set
    <output_dir>/seed_<s>/segmenter_0_early/      stage 1: segmenter 0's recipe stopped early
                                                  (only for a "committee: snapshots" variant)
    <output_dir>/seed_<s>/generated/<condition>/  stage 2: synthetic pairs (resumable writer)
    <output_dir>/shared/generated/<condition>/    stage 2 of an unguided condition with share_unguided:
                                                  nothing seed-specific enters it, so all seeds train on it
    <output_dir>/seed_<s>/retrained/<condition>[_filtered|_loss-filtered|_resampled][_finetune]/
                                                  stage 3+4: real + the kept synthetic pairs (label-
                                                  filtered, loss-filtered or hardness-resampled; the
                                                  recipe), val mIoU
    <output_dir>/results.csv, summary.md, miou.png, stages.csv,
                 sets.png (the first seed's sets side by side, same masks)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from al.atomic import atomic_write_bytes
from al.config import ConfigError, require
from al.data.base import SegmentationDataset
from al.data.config import DataConfig
from al.data.folder import load_folder, read_metadata
from al.folder_lock import FolderLock
from al.metrics import confusion_matrix, iou_per_class
from al.models import ModelConfig, Segmenter
from al.resume import check_resume, identity
from al.train import (
    DenseTargetDataset,
    TrainConfig,
    TrainingSource,
    evaluate,
    train_segmenter,
)
from guidedgen.generate import GenerateConfig, GuidanceConfig, run_generation
from guidedgen.guidance import OBJECTIVES, build_objective
from guidedgen.instances import InstanceConfig, find_instances
from guidedgen.loss_filter import (
    DEFAULT_MARGIN,
    class_mean_losses,
    filter_by_loss,
    hardness_keep_counts,
    mask_hardness,
    pixel_losses,
)
from guidedgen.pipeline_report import REAL_ONLY, write_results
from guidedgen.quality import load_judge
from guidedgen.sheet import sets_sheet

UNGUIDED = "unguided"
REAL_PLUS = "real + "  # the condition of a retrained row: REAL_PLUS + set name
FILTERED = " filtered"  # set name suffix of a label-filtered set
LOSS_FILTERED = " loss-filtered"  # set name suffix of a set filtered by FreeMask's pixel filter
RESAMPLED = " resampled"  # set name suffix of a set kept by FreeMask's hardness-aware re-sampling
MODES = ("whole", "instance")  # whole images from the masks, or one instance regenerated in a real image
RECIPES = ("joint", "finetune")  # real + synthetic mixed in every batch, or synthetic first then real
FIRST = "first"  # the selection that keeps the first k variants of a unit (no ranking)
CONDITION_KEYS = ("committee", "mode", "select")  # variant keys besides generation.guidance's
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
    # Named conditions: the generation.guidance keys that differ, objective included, e.g.
    # {entropy_late: {objective: entropy, start: 0.5, end: 1.0}} (no objective: unguided), and
    # "committee: snapshots" (the committee is segmenter 0 and its recipe stopped after
    # snapshot_epochs; default: seeded members), "mode: instance" (instance-level augmentation with
    # the instances settings; default: whole), "select: <objective> | first" (how the kept variants
    # of a unit are chosen; default: the condition's objective, first k when unguided).
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshot_epochs: int = 10
    # An independent judge (guidedgen.quality.load_judge): each set's mask fidelity is reported and,
    # with label_filter, every set is retrained a second time with the pixels the judge reads as
    # another class than the mask's ignored (condition "<name> filtered").
    judge: Optional[str] = None
    label_filter: bool = False
    # FreeMask's pixel filter (guidedgen.loss_filter): with loss_filter, every set is also retrained
    # with the synthetic pixels ignored whose loss under the seed's segmenter 0 exceeds
    # loss_filter_margin x its class's mean loss on the real pixels (condition "<name> loss-filtered")
    loss_filter: bool = False
    loss_filter_margin: float = DEFAULT_MARGIN
    # FreeMask's hardness-aware re-sampling: with hardness_resampling, every set is also retrained
    # keeping, instead of keep_per_unit, between 1 and variants_per_unit variants per unit, more for
    # harder units (whole mode: the mask's pixel-weighted mean class loss under the seed's segmenter
    # 0; instance mode: the instance's class's mean loss), the top ones by the condition's
    # selection (condition "<name> resampled")
    hardness_resampling: bool = False
    # A unit is a real mask (whole mode) or an instance (instance mode): variants_per_unit are
    # generated per unit and keep_per_unit of them are kept, the top ones by the condition's
    # objective under the stage-1 segmenters (Figure 1's "generate many, keep the informative").
    variants_per_unit: int = 1
    keep_per_unit: int = 1
    instances: InstanceConfig = field(default_factory=InstanceConfig)  # for conditions in instance mode
    share_unguided: bool = False  # unguided sets generated once (seed 0's draws) and trained on by every seed
    synthetic_share: float = 0.5
    synthetic_loss_weight: float = 1.0
    # Each set is retrained with every recipe: "joint" (synthetic_share of each batch synthetic) or
    # "finetune" (synthetic alone, then real alone). Both take as many optimizer steps as real only,
    # split synthetic_share : 1 - synthetic_share, so synthetic data is not credited with extra training.
    recipes: list[str] = field(default_factory=lambda: ["joint"])
    generation: GenerateConfig = field(default_factory=GenerateConfig)  # models, steps, guidance strength...
    progress: bool = True
    # Segmenters and sets made with other settings are refused (naming them) unless overwrite:
    # then they are replaced; those made with these settings are reused either way.
    overwrite: bool = False

    def validate(self) -> None:
        self.train.validate("train")
        self.model.validate("model")
        for condition in self.conditions:
            require(condition == UNGUIDED or condition in OBJECTIVES or condition in self.variants, "conditions", condition,
                    f"{UNGUIDED!r}, one of {sorted(OBJECTIVES)} or a name in variants {sorted(self.variants)}")
        keys = {f.name for f in dataclasses.fields(GuidanceConfig)} - {"segmenters"}
        for name, changes in self.variants.items():
            require(name != UNGUIDED and name not in OBJECTIVES, "variants", name, "a name that is not an objective or 'unguided'")
            require(changes.get("objective") in (None, *OBJECTIVES), f"variants.{name}.objective", changes.get("objective"),
                    f"null (unguided) or one of {sorted(OBJECTIVES)}")
            require(changes.get("committee", "seeds") in ("seeds", "snapshots"), f"variants.{name}.committee",
                    changes.get("committee"), "'seeds' or 'snapshots'")
            require(changes.get("mode", MODES[0]) in MODES, f"variants.{name}.mode", changes.get("mode"), f"one of {MODES}")
            require(changes.get("select", FIRST) in (FIRST, *OBJECTIVES), f"variants.{name}.select", changes.get("select"),
                    f"{FIRST!r} or one of {sorted(OBJECTIVES)}")
            for key in set(changes) - keys - set(CONDITION_KEYS):
                require(False, f"variants.{name}", key, f"keys of generation.guidance {sorted(keys)} or one of {CONDITION_KEYS}")
        for name in self.conditions:
            guidance = self.condition(name).guidance
            if guidance is not None:
                guidance.validate_options(f"variants.{name}" if name in self.variants else "generation.guidance")
            try:
                if guidance is not None:
                    guidance.schedule()
            except ValueError as error:
                raise ConfigError(f"config key {'variants.' + name if name in self.variants else 'generation.guidance'!r}: "
                                  f"{error}") from None
        needed = self._segmenters_needed()
        require(self.committee_size >= needed, "committee_size", self.committee_size,
                f"an integer >= {needed}: the most members a condition's objective (guiding or selecting) needs")
        require(self.judge is not None or not self.label_filter, "judge", self.judge, "a judge folder when label_filter is on")
        require(self.loss_filter_margin > 0 and math.isfinite(self.loss_filter_margin), "loss_filter_margin",
                self.loss_filter_margin, "a finite number > 0 (FreeMask's is 1.25)")
        require(0.0 < self.synthetic_share < 1.0, "synthetic_share", self.synthetic_share, "a number in (0, 1)")
        require(self.variants_per_unit >= 1, "variants_per_unit", self.variants_per_unit, "an integer >= 1")
        require(1 <= self.keep_per_unit <= self.variants_per_unit, "keep_per_unit", self.keep_per_unit,
                f"an integer in [1, variants_per_unit={self.variants_per_unit}]")
        require(self.variants_per_unit >= 2 or not self.hardness_resampling, "variants_per_unit", self.variants_per_unit,
                "an integer >= 2 with hardness_resampling (it keeps 1 to variants_per_unit variants per unit)")
        for recipe in self.recipes:
            require(recipe in RECIPES, "recipes", recipe, f"one of {RECIPES}")
        if any(self.condition(c).mode == "instance" for c in self.conditions):
            self.instances.validate()
        require(self.generation.guidance.strength > 0 or all(self.condition(c).guidance is None for c in self.conditions),
                "generation.guidance.strength", self.generation.guidance.strength,
                "a number > 0 (the strength of the guided conditions)")

    def _segmenters_needed(self) -> int:
        """The most stage-1 segmenters an objective of a condition (guiding, or selecting the kept
        variants) needs from a committee of seeds; snapshot committees bring their own."""
        needs = [OBJECTIVES[name].min_segmenters for c in map(self.condition, self.conditions) if c.committee == "seeds"
                 for name in ((c.guidance.objective if c.guidance else None), c.select) if name in OBJECTIVES]
        return max([1, *needs])

    def condition(self, name: str) -> "Condition":
        changes = dict(self.variants.get(name, {} if name == UNGUIDED else {"objective": name}))
        extra = {key: changes.pop(key) for key in CONDITION_KEYS if key in changes}
        objective = changes.get("objective")
        guidance = None if objective is None else dataclasses.replace(self.generation.guidance, **changes)
        return Condition(guidance, extra.get("committee", "seeds"), extra.get("mode", MODES[0]),
                         extra.get("select", objective or FIRST))


@dataclass
class Condition:
    guidance: Optional[GuidanceConfig]  # None: unguided
    committee: str  # "seeds" or "snapshots"
    mode: str  # one of MODES
    select: str  # FIRST or the objective that ranks a unit's variants


class StageLog:
    """Wall time and peak memory (process max RSS so far) of each stage, appended to stages.csv.
    A stage already logged by an earlier run is resumed (a no-op when finished) but keeps its
    first row, so a re-run does not add zero-second entries."""

    def __init__(self, path: Path):
        self.path = path
        with open(path) if path.exists() else io.StringIO() as handle:
            self.seconds = {row["stage"]: float(row["seconds"]) for row in csv.DictReader(handle)}

    def run(self, name: str, work: Callable[[], object]):
        start = time.perf_counter()
        result = work()
        if name in self.seconds:
            return result
        self.seconds[name] = round(time.perf_counter() - start, 1)  # as stages.csv keeps it, so a resume reads the same
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        new = not self.path.exists()
        with open(self.path, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["stage", "seconds", "peak_rss_mb"])
            writer.writerow([name, f"{self.seconds[name]:.1f}", f"{peak:.0f}"])
        return result


Phase = tuple[list[TrainingSource], int]  # the sources of one training phase and its epochs


def _train(config: PipelineConfig, phases: list[Phase], folder: Path, seed: int, num_classes: int, val_set) -> dict:
    """Train (or reuse) one segmenter in ``folder``, phase after phase (each with its own LR
    schedule); returns its record with the val mIoU."""
    record_path = folder / "training.json"
    phases_record = [{"epochs": epochs, "sources": [{"name": s.name, "items": len(s.dataset), "share": s.share}
                                                    for s in sources]} for sources, epochs in phases]
    current = identity({"seed": seed, "phases": phases_record, "model": config.model, "train": config.train,
                        "data": config.data}, ignore=("train.seed", "train.epochs"))
    if record_path.exists():
        record = json.loads(record_path.read_text())
        # a record written before identities were stored pins its seed and phases only
        pinned = current if "identity" in record else {k: current[k] for k in ("seed", "phases")}
        if check_resume(record.get("identity", {"seed": record["seed"], "phases": record["phases"]}), pinned,
                        folder, config.overwrite):
            return record
    torch.manual_seed(seed)
    model = config.model.build(num_classes)
    losses = []
    for sources, epochs in phases:
        train_config = dataclasses.replace(config.train, seed=seed, epochs=epochs)
        losses += train_segmenter(model, sources, train_config, progress=config.progress).losses
    record = {"seed": seed, "val_miou": evaluate(model, val_set).miou, "losses": losses, "phases": phases_record,
              "identity": current}
    model.save_pretrained(folder)
    atomic_write_bytes(record_path, json.dumps(record, indent=2).encode())  # last: marks the stage done
    return record


def retraining_phases(config: PipelineConfig, recipe: str, real: TrainingSource, synthetic: list[dict]) -> list[Phase]:
    """The phases of a retraining with ``recipe``, with as many optimizer steps as real only (its
    ``train.epochs`` over the real set) split ``synthetic_share : 1 - synthetic_share`` (with
    "finetune", to within half an epoch of the synthetic set)."""
    share = config.synthetic_share
    real_epochs = max(1, round(config.train.epochs * (1.0 - share)))
    if recipe == "joint":  # a mixed epoch shows len(real) / (1 - share) items
        return [([dataclasses.replace(real, share=1.0 - share),
                  TrainingSource(synthetic, share, config.synthetic_loss_weight, "synthetic")], real_epochs)]
    batches = lambda items: math.ceil(len(items) / config.train.batch_size)  # noqa: E731 - steps per epoch
    synthetic_epochs = max(1, round(config.train.epochs * share * batches(real.dataset) / batches(synthetic)))
    return [([TrainingSource(synthetic, 1.0, config.synthetic_loss_weight, "synthetic")], synthetic_epochs),
            ([real], real_epochs)]


def units(config: PipelineConfig, mode: str, train_set: SegmentationDataset, seed: int) -> int:
    """How many units a condition in ``mode`` generates variants for: the real masks, or their instances."""
    return len(train_set) if mode == "whole" else len(find_instances(train_set, config.instances, seed))


def generation_config(config: PipelineConfig, condition: str, segmenters: list[Path], folder: Path, seed: int,
                      num_units: int) -> GenerateConfig:
    """``segmenters``: the seeded committee (segmenter 0 first), then segmenter 0 stopped early."""
    settings = config.condition(condition)
    if settings.guidance is None:
        guidance = dataclasses.replace(config.generation.guidance, objective=None, strength=0.0,
                                       segmenters=[str(segmenters[0])])
    else:
        guidance = settings.guidance
        chosen = committee_of(config, guidance.objective, settings.committee, segmenters)
        guidance = dataclasses.replace(guidance, segmenters=[str(p) for p in chosen])
    return dataclasses.replace(config.generation, output_dir=str(folder), num_samples=num_units * config.variants_per_unit,
                               seed=seed, masks=config.data, masks_split=config.data.train_split, guidance=guidance,
                               instances=config.instances if settings.mode == "instance" else None,
                               quality_segmenter=str(segmenters[0]), progress=config.progress,
                               overwrite=config.overwrite)


def committee_of(config: PipelineConfig, objective: str, committee: str, segmenters: list[Path]) -> list[Path]:
    """The stage-1 segmenters ``objective`` reads: segmenter 0 alone, or (for an objective that
    needs several) the committee."""
    seeded = segmenters[:config.committee_size]
    if OBJECTIVES.lookup(objective).min_segmenters < 2:
        return seeded[:1]
    return seeded if committee == "seeds" else [segmenters[0], segmenters[-1]]


@torch.no_grad()
def objective_scores(images: torch.Tensor, masks: torch.Tensor, name: str, models: list[Segmenter],
                     ignore_index: int) -> torch.Tensor:
    """``[N]`` values of objective ``name`` (higher = harder for ``models``) on a stack of pairs."""
    objective = build_objective(name, models, ignore_index)
    with torch.enable_grad():  # some objectives differentiate internally; values only are kept
        return torch.cat([objective(images[i:i + 32], masks[i:i + 32]).detach() for i in range(0, len(images), 32)])


def kept_variants(unit_keys: list, variants: list[int], scores: Optional[torch.Tensor], keep: int | dict) -> list[int]:
    """Positions of the ``keep`` variants kept per unit (one count, or a count per unit key): the
    highest ``scores`` (ties: lower variant), or the lowest variant numbers without scores; unit
    by unit, in the order the units first appear, each unit's best first."""
    by_unit: dict = {}
    for position, key in enumerate(unit_keys):
        by_unit.setdefault(key, []).append(position)
    kept = []
    for positions in by_unit.values():
        rank = (lambda p: (-float(scores[p]), variants[p])) if scores is not None else (lambda p: variants[p])
        kept += sorted(positions, key=rank)[:keep[unit_keys[positions[0]]] if isinstance(keep, dict) else keep]
    return kept


def unit_hardness(records: list[dict], masks: torch.Tensor, mode: str, class_means: torch.Tensor,
                  classes: list[str], ignore_index: int) -> torch.Tensor:
    """Each generated pair's unit's hardness for FreeMask's re-sampling: its real mask's (the pair's
    mask) pixel-weighted mean class loss in whole mode, its instance's class's mean loss in
    instance mode (the pixel-weighted mean over a one-class region). Shape: ``[N]`` float64."""
    if mode == "whole":
        return mask_hardness(masks, class_means, ignore_index)
    return class_means.double()[[classes.index(r["instance"]["class"]) for r in records]]


def unit_key(record: dict) -> tuple:
    """What one unit's variants share: their real mask, and in instance mode the instance."""
    return record["source_id"], record.get("instance", {}).get("rank")


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


@torch.no_grad()
def region_fidelity(images: torch.Tensor, real_images: torch.Tensor, masks: torch.Tensor, judge: Segmenter,
                    ignore_index: int) -> dict[str, float]:
    """How well the judge reads the regenerated pixels (those that differ from the real image at
    8 bits) in the augmented ``images``, and the same pixels in the ``real_images``: the share of
    labelled ones where it reads the mask's class."""
    changed = ((images * 255).round() != (real_images * 255).round()).any(1) & (masks != ignore_index)
    agreement = {}
    for name, batch in (("generated", images), ("real", real_images)):
        prediction = torch.cat([judge.predict(batch[i:i + 32]) for i in range(0, len(batch), 32)])
        agreement[f"fidelity_region_{name}"] = float(((prediction == masks) & changed).sum() / changed.sum().clamp_min(1))
    return agreement


def run_pipeline(config: PipelineConfig) -> str:
    """Run (or resume) every seed and condition; returns the markdown summary."""
    config.validate()
    output = Path(config.output_dir)
    with FolderLock(output, "pipeline run"):  # one pipeline writes its folder
        return _run_pipeline(config, output)


def _run_pipeline(config: PipelineConfig, output: Path) -> str:
    log = StageLog(output / "stages.csv")
    train_set, val_set = config.data.build(config.data.train_split), config.data.build(config.data.val_split)
    ignore_index, num_classes = train_set.ignore_index, train_set.num_classes
    judge = load_judge(config.judge)[0] if config.judge else None
    real = TrainingSource(DenseTargetDataset(train_set))
    conditions = {name: config.condition(name) for name in config.conditions}
    snapshots = any(c.committee == "snapshots" for c in conditions.values())
    real_phases = [([real], config.train.epochs)]
    rows, committees = [], {}
    for seed in config.seeds:  # stage 1 for every seed first: it needs no generative model
        base = output / f"seed_{seed}"
        committees[seed] = [base / f"segmenter_{k}" for k in range(config.committee_size)]
        for k, folder in enumerate(committees[seed]):
            record = log.run(f"seed {seed}: train on real ({folder.name})",
                             lambda f=folder, k=k: _train(config, real_phases, f, seed * 100 + k, num_classes, val_set))
            if k == 0:
                fidelity = judge_set(*stacked(train_set), judge, num_classes, ignore_index)[0] if judge else {}
                rows.append({"seed": seed, "condition": REAL_ONLY, "val_miou": record["val_miou"], **fidelity})
        if snapshots:  # segmenter 0's seed, data order and recipe, stopped early
            early = base / "segmenter_0_early"
            log.run(f"seed {seed}: train on real ({early.name})",
                    lambda f=early: _train(config, [([real], config.snapshot_epochs)], f, seed * 100, num_classes, val_set))
            committees[seed].append(early)
    shown = {}  # the first seed's kept sets, for sets.png
    for seed in config.seeds:
        base, segmenters = output / f"seed_{seed}", committees[seed]
        if config.loss_filter or config.hardness_resampling:  # FreeMask: segmenter 0's mean loss per class on the real pixels
            reader = Segmenter.from_pretrained(segmenters[0])
            real_images, real_masks = stacked(train_set)
            class_means = class_mean_losses(pixel_losses(reader, real_images, real_masks, ignore_index), real_masks,
                                            num_classes, ignore_index)
        for name, condition in conditions.items():
            shared = config.share_unguided and condition.guidance is None
            generator_seed, generator_segmenters = (0, committees[config.seeds[0]]) if shared else (seed, segmenters)
            generated = (output / "shared" if shared else base) / "generated" / name
            count = units(config, condition.mode, train_set, generator_seed)
            stage = f"{'all seeds' if shared else f'seed {seed}'}: generate {name}"
            log.run(stage, lambda n=name, g=generated: run_generation(
                generation_config(config, n, generator_segmenters, g, generator_seed, count)))
            images, masks, records = stacked(load_folder(generated)) + (
                [r for r in read_metadata(generated) if not r.get("dropped")],)
            # every objective's value on every pair, under this seed's stage-1 segmenters (the
            # condition's committee; committee disagreement needs two members)
            readers = {objective: committee_of(config, objective, condition.committee, segmenters)
                       for objective in ("entropy", "committee", "expected_model_change")}
            scores = {objective: objective_scores(images, masks, objective,
                                                  [Segmenter.from_pretrained(p).eval() for p in paths], ignore_index)
                      for objective, paths in readers.items() if len(paths) >= OBJECTIVES[objective].min_segmenters}
            keys, variant_numbers = [unit_key(r) for r in records], [r["index"] // count for r in records]
            ranking = None if condition.select == FIRST else scores[condition.select]

            def described(positions: list[int]) -> tuple[dict, torch.Tensor | None]:
                """A training set's objective means, generation cost per kept pair and judge fidelity,
                from its positions among the generated pairs; and its judge-filtered masks."""
                values = {f"objective_{k}": float(v[positions].mean()) for k, v in scores.items()}
                values["seconds_per_kept"] = log.seconds[stage] / len(positions)  # all variants generated count
                fidelity, filtered = judge_set(images[positions], masks[positions], judge, num_classes,
                                               ignore_index) if judge else ({}, None)
                if judge and condition.mode == "instance":  # the regenerated objects against the real ones
                    real_images = torch.stack([train_set[train_set.index_of(records[p]["source_id"])].image
                                               for p in positions])
                    fidelity.update(region_fidelity(images[positions], real_images, masks[positions], judge,
                                                    ignore_index))
                return {**values, **fidelity}, filtered

            kept = kept_variants(keys, variant_numbers, ranking, config.keep_per_unit)
            kept_images, kept_masks = images[kept], masks[kept]
            values, filtered = described(kept)
            if name not in shown:  # one kept pair per real mask shown, the same masks for every set
                sources = [records[p]["source_id"] for p in kept]
                shown[name] = torch.stack([kept_images[sources.index(i)] if i in sources else torch.ones_like(images[0])
                                           for i in train_set.ids[:SHEET_SAMPLES]])
            # each training set: images, training targets, their masks, its description
            training_sets = {name: (kept_images, kept_masks, kept_masks, values)}
            if config.label_filter:
                training_sets[name + FILTERED] = (kept_images, filtered, kept_masks, values)
            if config.loss_filter:
                training_sets[name + LOSS_FILTERED] = (kept_images, filter_by_loss(
                    pixel_losses(reader, kept_images, kept_masks, ignore_index), kept_masks, class_means, ignore_index,
                    config.loss_filter_margin), kept_masks, values)
            if config.hardness_resampling:
                hardness = unit_hardness(records, masks, condition.mode, class_means, train_set.classes, ignore_index)
                first = {}  # each unit's first pair, units in order of appearance
                for position, key in enumerate(keys):
                    first.setdefault(key, position)
                counts = hardness_keep_counts(hardness[list(first.values())], config.variants_per_unit)
                resampled = kept_variants(keys, variant_numbers, ranking, dict(zip(first, counts)))
                training_sets[name + RESAMPLED] = (images[resampled], masks[resampled], masks[resampled],
                                                   described(resampled)[0])
            for set_name, (set_images, targets, set_masks, values) in training_sets.items():
                items = [{"image": i, "target": t} for i, t in zip(set_images, targets)]
                labelled = float((targets != ignore_index).sum() / (set_masks != ignore_index).sum().clamp_min(1))
                for recipe in config.recipes:
                    label = set_name + ("" if recipe == "joint" else f" ({recipe})")
                    folder = base / "retrained" / (set_name.replace(" ", "_") + ("" if recipe == "joint" else f"_{recipe}"))
                    record = log.run(f"seed {seed}: retrain real + {label}",
                                     lambda r=recipe, i=items, f=folder: _train(
                                         config, retraining_phases(config, r, real, i), f, seed * 100, num_classes, val_set))
                    reference = unguided_reference(config, name) + set_name[len(name):]
                    rows.append({"seed": seed, "condition": REAL_PLUS + label, "val_miou": record["val_miou"],
                                 "reference": REAL_PLUS + reference + ("" if recipe == "joint" else f" ({recipe})"),
                                 "synthetic_samples": len(items), "generated_samples": len(records),
                                 "labelled_share": labelled, **values})
    sets_sheet(stacked(train_set)[1][:SHEET_SAMPLES].numpy(), {n: images.numpy() for n, images in shown.items()},
               num_classes, output / "sets.png")
    return write_results(rows, output)


def unguided_reference(config: PipelineConfig, name: str) -> str:
    """The unguided condition a condition is compared with: the first unguided one in its mode
    (the condition itself when it is unguided)."""
    mode = config.condition(name).mode
    return next((c for c in config.conditions if config.condition(c).guidance is None and config.condition(c).mode == mode),
                name)
