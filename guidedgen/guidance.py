"""Informativeness objectives that steer generation (Kniesel et al., 2025).

Each objective is called as ``objective(images [N, 3, H, W] in [0, 1], masks [N, H, W]) -> [N]``,
differentiable w.r.t. ``images``; the sampler *increases* it. The per-pixel math is shared with
``al.scores``, so a score means the same thing when ranking real pixels and when guiding.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from al.config import ConfigError
from al.mc import sample_head
from al.models import Segmenter
from al.registry import Registry
from al.scores import bald, entropy, mean_std


def valid_mean(per_pixel: Tensor, masks: Tensor, ignore_index: int) -> Tensor:
    """Mean over non-ignored pixels per image. ``[N, H, W] -> [N]``."""
    valid = (masks != ignore_index).to(per_pixel.dtype)
    return (per_pixel * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1.0)


def last_layer_gradient_norm(inputs: Tensor, probs: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Norm of d CE / d (W, b) of a 1x1 classifier, per image, in closed form.

    For ``logits = W x + b`` per pixel, ``dCE/dW = mean_pixels (p - y) x^T`` and
    ``dCE/db = mean_pixels (p - y)``; differentiable w.r.t. ``inputs`` and ``probs``.

    Shape: ``inputs [N, D, H, W], probs [N, C, H, W], labels [N, H, W] -> [N]``.
    """
    valid = labels != ignore_index
    one_hot = F.one_hot(torch.where(valid, labels, 0).long(), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    residual = (probs - one_hot) * valid[:, None].to(probs.dtype)  # [N, C, H, W]
    count = valid.flatten(1).sum(1).clamp_min(1).to(probs.dtype)[:, None]
    grad_weight = torch.einsum("nchw,ndhw->ncd", residual, inputs) / count[..., None]
    grad_bias = residual.flatten(2).sum(2) / count
    return (grad_weight.square().flatten(1).sum(1) + grad_bias.square().sum(1)).sqrt()


@runtime_checkable
class Guide(Protocol):
    """What every objective asks of a guiding model (an ``nn.Module``): its members' softmax,
    differentiable w.r.t. the images. :class:`al.models.Segmenter` has one member; a
    diffusion-feature ensemble has several; :class:`LogitsGuide` wraps any other model."""

    num_members: int

    def member_probs(self, images: Tensor) -> Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> ``[num_members, N, C, H, W]``."""


@runtime_checkable
class LastLayerGuide(Guide, Protocol):
    """What an objective on the last layer asks too (expected model change, MC-dropout std): the
    trunk and the dropout + 1x1 head apart, as :class:`al.models.Segmenter` has them."""

    def features(self, images: Tensor) -> Tensor: ...

    def classifier_inputs(self, features: Tensor) -> Tensor: ...

    def classify(self, features: Tensor, stochastic: bool = False, upsample: bool = True) -> Tensor: ...

    def upsample(self, maps: Tensor) -> Tensor: ...


class LogitsGuide(nn.Module):
    """Any segmentation model as a one-member :class:`Guide`: ``model(images)`` returns logits
    ``[N, C, h, w]`` (or an output with ``.logits``, as Hugging Face models do), upsampled
    bilinearly to the images' size. ``normalize``: turns the [0, 1] images into what the model
    expects (e.g. ImageNet mean/std)."""

    num_members = 1

    def __init__(self, model: nn.Module, normalize: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__()
        self.model, self.normalize = model, normalize

    def member_probs(self, images: Tensor) -> Tensor:
        output = self.model(self.normalize(images) if self.normalize is not None else images)
        logits = getattr(output, "logits", output)
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits.softmax(1)[None]


class SegmenterObjective(nn.Module):
    """Holds the guiding segmenters (frozen, eval mode) and the ignore value of the masks."""

    min_segmenters = 1
    guide: type = Guide  # the protocol every guiding model must follow for this objective
    # True: forward takes generators=[one per sample] for its random draws (the sampler passes them),
    # so a sample's draws do not depend on the batch around it
    draws = False

    def __init__(self, segmenters: Sequence[Guide], ignore_index: int = 255):
        super().__init__()
        for segmenter in segmenters:
            if not isinstance(segmenter, self.guide):
                raise ConfigError(f"{type(self).__name__} needs guides that follow {self.guide.__name__} "
                                  f"(guidedgen.guidance); a {type(segmenter).__name__} does not"
                                  + ("" if self.guide is Guide else ": guide with entropy or committee instead"))
        members = sum(segmenter.num_members for segmenter in segmenters)
        if members < self.min_segmenters:
            raise ValueError(f"{type(self).__name__} needs at least {self.min_segmenters} committee members, got {members}")
        self.segmenters = nn.ModuleList(segmenters)
        self.ignore_index = ignore_index
        for segmenter in self.segmenters:
            segmenter.eval().requires_grad_(False)

    def member_probs(self, images: Tensor) -> Tensor:
        """Softmax of every segmenter stacked as the K axis: ``[K, N, C, H, W]``. An ensemble
        (``al.diffusion_features.DiffusionFeatureSegmenter``) contributes each of its members."""
        return torch.cat([segmenter.member_probs(images) for segmenter in self.segmenters])


class PredictiveEntropy(SegmenterObjective):
    """Mean per-pixel entropy of the (committee-averaged) prediction."""

    def forward(self, images: Tensor, masks: Tensor) -> Tensor:
        return valid_mean(entropy(self.member_probs(images)), masks, self.ignore_index)


class CommitteeDisagreement(SegmenterObjective):
    """Disagreement of >= 2 segmenters (seeds, epoch snapshots, or pixel-MLP ensemble members).

    ``kind="kl"``: mean KL of each member to the consensus (= BALD over members).
    ``kind="vote_entropy"``: entropy of the averaged soft votes (hard votes have no gradient).
    """

    min_segmenters = 2

    def __init__(self, segmenters: Sequence[Segmenter], ignore_index: int = 255, kind: str = "kl"):
        super().__init__(segmenters, ignore_index)
        if kind not in ("kl", "vote_entropy"):
            raise ValueError(f"committee kind {kind!r}; choose 'kl' or 'vote_entropy'")
        self.kind = kind

    def forward(self, images: Tensor, masks: Tensor) -> Tensor:
        per_pixel = (bald if self.kind == "kl" else entropy)(self.member_probs(images))
        return valid_mean(per_pixel, masks, self.ignore_index)


class ExpectedModelChange(SegmenterObjective):
    """Norm of the segmenter's last-layer gradient of CE (averaged over the committee).

    ``labels="mask"``: the conditioning mask is the label (the synthetic sample's mask is known).
    ``labels="sampled"``: classic expected gradient length, averaged over ``num_label_samples``
    label maps drawn from the model's own prediction.
    """

    guide = LastLayerGuide

    def __init__(self, segmenters: Sequence[Segmenter], ignore_index: int = 255, labels: str = "mask",
                 num_label_samples: int = 4, generator: Optional[torch.Generator] = None):
        super().__init__(segmenters, ignore_index)
        if labels not in ("mask", "sampled"):
            raise ValueError(f"expected_model_change labels {labels!r}; choose 'mask' or 'sampled'")
        self.labels, self.num_label_samples, self.generator = labels, num_label_samples, generator
        self.draws = labels == "sampled"

    def forward(self, images: Tensor, masks: Tensor, generators: Optional[Sequence[torch.Generator]] = None) -> Tensor:
        norms = []
        for segmenter in self.segmenters:
            features = segmenter.features(images)
            inputs = segmenter.classifier_inputs(features)
            probs = segmenter.classify(features).softmax(1)
            if self.labels == "mask":
                norms.append(last_layer_gradient_norm(inputs, probs, masks, self.ignore_index))
                continue
            per_image = probs.detach().permute(0, 2, 3, 1).reshape(len(probs), -1, probs.shape[1])
            for _ in range(self.num_label_samples):
                if generators is None:
                    drawn = torch.multinomial(per_image.flatten(0, 1), 1, generator=self.generator).view(masks.shape)
                else:
                    drawn = torch.stack([torch.multinomial(p, 1, generator=g).view(masks.shape[1:])
                                         for p, g in zip(per_image, generators)])
                drawn = torch.where(masks == self.ignore_index, self.ignore_index, drawn)
                norms.append(last_layer_gradient_norm(inputs, probs, drawn, self.ignore_index) / self.num_label_samples)
        return torch.stack(norms).sum(0) / len(self.segmenters)


class MCDropoutStd(SegmenterObjective):
    """Ablation: mean per-pixel std of last-layer MC-dropout samples (found too noisy to guide)."""

    guide = LastLayerGuide
    draws = True

    def __init__(self, segmenters: Sequence[Segmenter], ignore_index: int = 255, k: int = 8,
                 generator: Optional[torch.Generator] = None):
        super().__init__(segmenters, ignore_index)
        self.k, self.generator = k, generator

    def forward(self, images: Tensor, masks: Tensor, generators: Optional[Sequence[torch.Generator]] = None) -> Tensor:
        segmenter = self.segmenters[0]
        features = segmenter.features(images)
        if generators is None:
            samples = sample_head(segmenter, features, self.k, self.generator)
        else:  # each sample's dropout masks from its own generator
            samples = torch.cat([sample_head(segmenter, features[j:j + 1], self.k, g)
                                 for j, g in enumerate(generators)], dim=1)
        return valid_mean(mean_std(samples), masks, self.ignore_index)


class CrossEntropyToMask(SegmenterObjective):
    """Ablation: CE of the prediction against the conditioning mask (ill-posed: raising it can
    push the image towards other classes)."""

    def forward(self, images: Tensor, masks: Tensor) -> Tensor:
        logits = torch.stack([segmenter(images) for segmenter in self.segmenters]).mean(0)
        per_pixel = F.cross_entropy(logits, torch.where(masks == self.ignore_index, 0, masks).long(), reduction="none")
        return valid_mean(per_pixel, masks, self.ignore_index)


ObjectiveFactory = Callable[..., nn.Module]

# Config name -> objective class; each is built as cls(segmenters, ignore_index, **options).
# Open: register_objective("name", cls).
OBJECTIVES: Registry[ObjectiveFactory] = Registry("guidance objective", {
    "entropy": PredictiveEntropy,
    "committee": CommitteeDisagreement,
    "expected_model_change": ExpectedModelChange,
    "mc_dropout_std": MCDropoutStd,
    "cross_entropy": CrossEntropyToMask,
})
register_objective = OBJECTIVES.register


def build_objective(name: str, segmenters: Sequence[Segmenter], ignore_index: int = 255, **options) -> nn.Module:
    """Build a registered objective; an unknown name lists the valid ones."""
    return OBJECTIVES.lookup(name)(segmenters, ignore_index, **options)
