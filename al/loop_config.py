"""Settings of the active-learning loop: ``LoopConfig`` (checks itself, names a run by its
fingerprint), with its synthetic-data and DEAL sections."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from al.acquisition import all_acquisitions, get_acquisition
from al.config import require
from al.diffusion_features import DiffusionFeaturesConfig
from al.models import ModelConfig
from al.select import SELECTION_RULES
from al.train import SyntheticConfig, TrainConfig


@dataclass
class DealConfig:
    """DEAL's settings, used by the acquisitions that need its difficulty branch."""

    # The attention is N x N over the logits resized to this; the paper uses about 1/6 of the
    # image side (CamVid 60x80 for 360x480), which is 11 for 64-pixel DigitScenes.
    size: list[int] = field(default_factory=lambda: [16, 16])
    # Image-level rules (deal_ds, deal_de) score a random part of the pool per cycle, as the paper,
    pool_fraction: float = 0.5
    # and spend the cycle's pixel budget (pixels_per_image x pool) on this share of the pool's
    # images, at random pixels inside them: the sparse-label stand-in for labelling whole images.
    image_share: float = 0.1


LEARNERS = ("segmenter", "diffusion_features")


@dataclass
class LoopConfig:
    """Settings shared by the runs of an experiment; a run adds (acquisition, seed)."""

    selection: str = "topn"
    pixels_per_image: int = 5
    cycles: int = 5
    mc_samples: int = 20
    # True: where the head upsamples (DeepLabV3+, FPN), the K softmaxes at the decoder's
    # resolution and their statistics upsampled once (al.mc.mc_moments): 1.24x a forward instead
    # of 3.9x on DeepLabV3+ at 512 px (docs/results/benchmarks.md). Off by default: the reference
    # upsamples first, and on the AL benchmark it kept entropy and margin but moved BALD (-4.6) and
    # BalEnt (+11.9) (docs/results/mc_resolution.md)
    mc_at_decoder_resolution: bool = False
    inference_batch_size: int = 32
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    learner: str = "segmenter"  # or "diffusion_features": a pixel-MLP ensemble on diffusion-UNet features
    # False (PixelPick): every cycle retrains from the same initial weights. True: cycle c > 0
    # fine-tunes cycle c-1's model for warm_start_epochs (None = train.epochs), so a small CPU
    # budget per cycle still adds up to a well-trained model by the last cycle.
    warm_start: bool = False
    warm_start_epochs: Optional[int] = None
    diffusion_features: DiffusionFeaturesConfig = field(default_factory=DiffusionFeaturesConfig)
    deal: DealConfig = field(default_factory=DealConfig)

    def validate(self, prefix: str = "loop") -> None:
        """Every setting of the loop, checked before anything is built (``prefix`` names the keys)."""
        require(self.learner in LEARNERS, f"{prefix}.learner", self.learner, f"one of {LEARNERS}")
        require(self.learner == "segmenter" or self.synthetic.root is None, f"{prefix}.synthetic.root",
                self.synthetic.root, f"null with {prefix}.learner=diffusion_features (it trains on real labels only)")
        require(0.0 < self.deal.pool_fraction <= 1.0, f"{prefix}.deal.pool_fraction", self.deal.pool_fraction,
                "a number in (0, 1]")
        require(0.0 < self.deal.image_share <= self.deal.pool_fraction, f"{prefix}.deal.image_share",
                self.deal.image_share, f"a number in (0, {prefix}.deal.pool_fraction]")
        require(self.selection in SELECTION_RULES, f"{prefix}.selection", self.selection, f"one of {sorted(SELECTION_RULES)}")
        require(self.pixels_per_image >= 1, f"{prefix}.pixels_per_image", self.pixels_per_image, "an integer >= 1")
        require(self.cycles >= 0, f"{prefix}.cycles", self.cycles, "an integer >= 0")
        require(self.mc_samples >= 2, f"{prefix}.mc_samples", self.mc_samples,
                "an integer >= 2 (BalEnt and BALD need a variance)")
        self.train.validate(f"{prefix}.train")
        self.model.validate(f"{prefix}.model")
        require(not self.warm_start or self.learner == "segmenter", f"{prefix}.warm_start", self.warm_start,
                f"false with {prefix}.learner=diffusion_features (its ensemble is refitted every cycle)")
        require(self.warm_start_epochs is None or self.warm_start_epochs >= 1, f"{prefix}.warm_start_epochs",
                self.warm_start_epochs, "null or an integer >= 1")
        self.synthetic.validate(f"{prefix}.synthetic")

    def epochs_of(self, cycle: int) -> int:
        """Training epochs of ``cycle``'s model (from its starting weights)."""
        if self.warm_start and cycle > 0 and self.warm_start_epochs is not None:
            return self.warm_start_epochs
        return self.train.epochs

    def total_epochs(self) -> int:
        """Epochs behind the last cycle's model, counted from the initial weights: the budget
        a fully supervised reference gets."""
        if not self.warm_start:
            return self.train.epochs
        return sum(self.epochs_of(cycle) for cycle in range(self.cycles + 1))

    def fingerprint(self, acquisition: str, seed: int) -> str:
        values = asdict(self)
        # settings a run does not use stay out, so earlier runs keep their fingerprint
        if self.synthetic.root is None:
            values.pop("synthetic")
        if not self.mc_at_decoder_resolution:  # earlier runs predate it
            values.pop("mc_at_decoder_resolution")
        if not self.warm_start:  # earlier runs predate warm starts
            values.pop("warm_start")
            values.pop("warm_start_epochs")
        if self.learner == "segmenter":
            values.pop("learner")
            values.pop("diffusion_features")
        else:
            values.pop("model")
        if acquisition not in all_acquisitions() or not get_acquisition(acquisition).needs_difficulty:
            values.pop("deal")
        identity = {"acquisition": acquisition, "seed": seed, **values}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
