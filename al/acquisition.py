"""Every acquisition the loop can run, in one registry: the per-pixel scores of ``al.scores``
and DEAL's difficulty-based rules (``al.deal``).

A pixel-level acquisition maps a model's :class:`Predictions` to a per-pixel score ``[N, H, W]``
(each pool image then gets n pixels by the selection rule). An image-level one (DEAL's DS and
DE) maps them to one score per image ``[N]``: the loop ranks a random part of the pool and
spends the cycle's pixel budget on the best images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from al.deal import difficulty_entropy, difficulty_sum, pixel_difficulty
from al.mc import mc_moments
from al.models import Segmenter
from al.moments import MCMoments
from al.registry import Registry
from al.scores import SCORES, MCSamples, ScoreFn, entropy


@dataclass
class Predictions:
    """What a model says about a batch of pool images."""

    # [K, N, C, H, W] MC-dropout samples or ensemble members: a segmenter streams them as moments
    probs: MCSamples
    difficulty: Optional[Tensor] = None  # [N, H, W]: DEAL's difficulty map, when the model has the branch

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Predictions":
        """These predictions with ``fn`` applied to every ``[N, C, H, W]`` map (e.g.
        ``al.inference.View.maps``: back on the original pixels); ``fn`` must be linear with
        non-negative weights summing to 1, so the statistics stay valid (``MCMoments.map``)."""
        if isinstance(self.probs, MCMoments):
            probs = self.probs.map(fn)
        else:
            probs = fn(self.probs.flatten(0, 1)).unflatten(0, self.probs.shape[:2])
        return Predictions(probs, None if self.difficulty is None else fn(self.difficulty[:, None])[:, 0])


AcquisitionFn = Callable[[Predictions, Optional[torch.Generator]], Tensor]


@dataclass(frozen=True)
class Acquisition:
    name: str
    score: AcquisitionFn
    level: str = "pixel"  # "pixel": [N, H, W] scores; "image": [N] scores
    needs_difficulty: bool = False  # the model must carry DEAL's difficulty branch


def _from_score(name: str, score: ScoreFn) -> Acquisition:
    return Acquisition(name, lambda predictions, generator=None: score(predictions.probs, generator))


def _difficulty(predictions: Predictions) -> Tensor:
    if predictions.difficulty is None:
        raise ValueError("this acquisition needs DEAL's difficulty map; the model has no difficulty branch")
    return predictions.difficulty


def _deal(name: str, level: str, score: Callable[[Predictions], Tensor]) -> Acquisition:
    return Acquisition(name, lambda predictions, generator=None: score(predictions), level, needs_difficulty=True)


# DE's bin count (the paper: 8 for CamVid, 10 for Cityscapes; docs/methods.md#deal); DigitScenes is
# closer to CamVid's scale.
DE_BINS = 8

# The acquisitions beyond al.scores.SCORES (each of which is one too, see all_acquisitions);
# open: ACQUISITIONS.register("name", Acquisition(...)).
ACQUISITIONS: Registry[Acquisition] = Registry("acquisition", {
    "deal_ds": _deal("deal_ds", "image", lambda p: difficulty_sum(_difficulty(p))),
    "deal_de": _deal("deal_de", "image", lambda p: difficulty_entropy(_difficulty(p), DE_BINS)),
    "deal_pixel": _deal("deal_pixel", "pixel", lambda p: pixel_difficulty(_difficulty(p))),
    "deal_pixel_entropy": _deal("deal_pixel_entropy", "pixel", lambda p: pixel_difficulty(_difficulty(p), entropy(p.probs))),
})


@torch.no_grad()
def pool_predictions(model: nn.Module, images: Tensor, k: int, generator: Optional[torch.Generator] = None,
                     at_decoder_resolution: bool = False) -> Predictions:
    """K last-layer MC-dropout samples of a :class:`Segmenter` (plus its difficulty map when it
    has DEAL's branch), or the members of an ensemble that has ``mc_probs(images)``.
    ``at_decoder_resolution``: see :func:`al.mc.mc_moments`."""
    if not isinstance(model, Segmenter):
        return Predictions(model.mc_probs(images))
    difficulty = None
    if model.difficulty_branch is not None:
        was_training = model.training
        difficulty = model.eval().difficulty(model(images))
        model.train(was_training)
    return Predictions(mc_moments(model, images, k, generator, at_decoder_resolution), difficulty)


def all_acquisitions() -> Registry[Acquisition]:
    """Every acquisition a config may name, as registered now: each score of ``al.scores.SCORES``
    (scored per pixel from the MC samples) and each entry of :data:`ACQUISITIONS`."""
    return Registry("acquisition", {**{name: _from_score(name, score) for name, score in SCORES.items()},
                                    **ACQUISITIONS})


def get_acquisition(name: str) -> Acquisition:
    """Look up an acquisition by config name; an unknown name lists the valid ones."""
    return all_acquisitions().lookup(name)
