"""Segmenters over segmentation-models-pytorch with a last-layer MC-dropout head.

The smp head is replaced by ``Dropout -> 1x1 classifier -> upsampling`` so that MC dropout
(``al.mc``) can run the expensive encoder/decoder once and only the cheap head K times.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from al.config import require
from al.deal import DifficultyBranch
from al.diffusion_features import ENSEMBLE_RECORD, DiffusionFeatureSegmenter
from al.pretrained import LOCAL_ENCODER_WEIGHTS
from al.registry import Registry

# Config name (model.arch) -> smp class; open: ARCHITECTURES.register("name", cls).
ARCHITECTURES: Registry[type] = Registry("architecture", {
    "unet": smp.Unet,
    "deeplabv3plus": smp.DeepLabV3Plus,
    "fpn": smp.FPN,
})

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class SegmenterConfig:
    """Constructor arguments of a :class:`Segmenter`; saved beside its weights."""

    arch: str
    encoder: str
    num_classes: int
    dropout: float = 0.2
    in_channels: int = 3
    encoder_depth: int = 5
    # smp's own decoder width argument (a list for Unet, an int for DeepLabV3Plus); None = smp default.
    decoder_channels: Optional[Union[int, tuple[int, ...]]] = None
    # DEAL's difficulty branch on the logits (al.deal), at this (h, w); None = no branch.
    difficulty_size: Optional[tuple[int, int]] = None


class Segmenter(nn.Module):
    """An smp model whose head is ``Dropout -> 1x1 conv -> upsample``.

    ``features(x)`` runs encoder + decoder once; ``classify(features)`` runs the head.
    ``forward(x) = classify(features(x))`` returns logits ``[N, C, H, W]``. With
    ``config.difficulty_size`` it also carries DEAL's difficulty branch (``difficulty(logits)``),
    trained by ``al.train`` beside the segmentation loss.
    """

    def __init__(self, config: SegmenterConfig, encoder_weights: Optional[str] = None):
        super().__init__()
        architecture = ARCHITECTURES.lookup(config.arch.lower())
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
        self.config = config
        decoder = {} if config.decoder_channels is None else {"decoder_channels": config.decoder_channels}
        local_weights = LOCAL_ENCODER_WEIGHTS.get(encoder_weights) if encoder_weights else None
        try:
            self.net = architecture(
                encoder_name=config.encoder,
                encoder_weights=None if local_weights else encoder_weights,
                encoder_depth=config.encoder_depth,
                in_channels=config.in_channels,
                classes=config.num_classes,
                **decoder,
            )
        except (TypeError, KeyError, ValueError) as error:
            raise ValueError(f"cannot build {config.arch} with encoder {config.encoder!r}: {error}") from error
        if local_weights:
            local_weights(getattr(self.net.encoder, "model", self.net.encoder))
        _drop_unused_blocks(getattr(self.net.encoder, "model", None))
        # Inputs are images in [0, 1]; ImageNet statistics suit pretrained and random encoders alike.
        self.register_buffer("pixel_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        conv = self.net.segmentation_head[0]
        # A 1x1 classifier, so that dropout before it is per-pixel last-layer MC dropout.
        self.net.segmentation_head[0] = nn.Conv2d(conv.in_channels, config.num_classes, kernel_size=1)
        self.difficulty_branch = (DifficultyBranch(config.num_classes, config.difficulty_size)
                                  if config.difficulty_size is not None else None)

    def difficulty(self, logits: Tensor) -> Tensor:
        """DEAL's difficulty map of these logits, ``[N, C, H, W] -> [N, H, W]`` in (0, 1)."""
        if self.difficulty_branch is None:
            raise ValueError("this segmenter has no difficulty branch; build it with difficulty_size=(h, w)")
        return self.difficulty_branch(logits)

    def optimizer_groups(self, lr: float) -> list[dict]:
        """Adam parameter groups: DEAL's attention gamma learns 10x faster, as in the reference."""
        if self.difficulty_branch is None:
            return [{"params": list(self.parameters()), "lr": lr}]
        branch = {id(p) for p in self.difficulty_branch.parameters()}
        rest = [p for p in self.parameters() if id(p) not in branch]
        return [{"params": rest, "lr": lr}, *self.difficulty_branch.parameter_groups(lr)]

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    num_members = 1  # as a guide (guidedgen.guidance.Guide): one member

    @property
    def input_multiple(self) -> int:
        """Input sides must be multiples of this (``al.inference`` pads to it): the encoder's output
        stride. smp's Unet would take other sizes by resizing its skip features, but padded
        inputs keep them aligned, as the other architectures require."""
        return self.net.encoder.output_stride

    def member_probs(self, images: Tensor) -> Tensor:
        """The softmax as a one-member stack, differentiable. ``[N, 3, H, W] -> [1, N, C, H, W]``."""
        return self(images).softmax(1)[None]

    def features(self, images: Tensor) -> Tensor:
        """Decoder output for images in [0, 1]. Shape: ``[N, 3, H, W] -> [N, D, h, w]``."""
        self.net.check_input_shape(images)
        if images.shape[1] == 3:
            images = (images - self.pixel_mean) / self.pixel_std
        return self.net.decoder(self.net.encoder(images))

    def classify(self, features: Tensor, stochastic: Optional[bool] = None, upsample: bool = True) -> Tensor:
        """Dropout + classifier + upsampling. Shape: ``[N, D, h, w] -> [N, C, H, W]`` logits
        (``[N, C, h, w]`` with ``upsample=False``: the classifier at the decoder's resolution).

        Dropout (element-wise, as trained) is active when ``stochastic`` (default:
        ``self.training``); reproducible MC samples come from ``al.mc``.
        """
        stochastic = self.training if stochastic is None else stochastic
        logits = self.classifier(F.dropout(features, p=self.config.dropout, training=stochastic))
        return self.net.segmentation_head[2](self.upsample(logits) if upsample else logits)  # [2]: identity

    def upsample(self, maps: Tensor) -> Tensor:
        """The head's upsampling to output resolution (identity where the decoder already runs
        at it, as Unet's). Shape: ``[N, *, h, w] -> [N, *, H, W]``."""
        return self.net.segmentation_head[1](maps)

    def classifier_inputs(self, features: Tensor) -> Tensor:
        """The classifier's input brought to output resolution, ``[N, D, H, W]``. Because the
        classifier is 1x1 and the upsampling linear (weights summing to 1), logits equal
        ``W @ classifier_inputs + b`` per pixel: the last layer's gradient in closed form."""
        return self.net.segmentation_head[1](features)

    @property
    def classifier(self) -> nn.Conv2d:
        return self.net.segmentation_head[0]

    def forward(self, images: Tensor) -> Tensor:
        logits = self.classify(self.features(images))
        if logits.shape[-2:] != images.shape[-2:]:
            # e.g. smp's FPN upsamples by a fixed 4x, which only fits encoder_depth=5
            raise ValueError(
                f"{self.config.arch} with encoder_depth={self.config.encoder_depth} predicts "
                f"{tuple(logits.shape[-2:])} for a {tuple(images.shape[-2:])} input; use another encoder_depth"
            )
        return logits

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Class ids, ``[N, 3, H, W] -> [N, H, W]``."""
        return self(images).argmax(1)

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``config.json`` + ``model.safetensors``; each file appears atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp_weights = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp_weights))
        os.replace(tmp_weights, directory / WEIGHTS_NAME)
        tmp_config = directory / (CONFIG_NAME + ".tmp")
        tmp_config.write_text(json.dumps({"class": type(self).__name__, **asdict(self.config)}, indent=2))
        os.replace(tmp_config, directory / CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], map_location: str = "cpu") -> "Segmenter":
        """Load a segmenter written by :meth:`save_pretrained`, in eval mode (as transformers and
        diffusers load models)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; expected a folder written by Segmenter.save_pretrained")
        try:
            raw = json.loads(config_path.read_text())
            raw.pop("class", None)
            for key in ("decoder_channels", "difficulty_size"):
                if isinstance(raw.get(key), list):
                    raw[key] = tuple(raw[key])
            config = SegmenterConfig(**raw)
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{config_path} is not a valid segmenter config: {error}") from error
        model = cls(config)
        state, own = load_file(str(weights_path), device=map_location), model.state_dict()
        # folders saved before _drop_unused_blocks still hold those blocks' weights
        stale = [k for k in state if k not in own and k.startswith("net.encoder.model.blocks.")]
        model.load_state_dict({k: v for k, v in state.items() if k not in stale})
        return model.eval()


def dropout_keep_mask(shape: torch.Size, keep: float, generator: Optional[torch.Generator] = None,
                      device: Union[str, torch.device, None] = None) -> tuple[Tensor, float]:
    """Independent Bernoulli keep draws for MC dropout, four per 64-bit random number.

    Each 16-bit slice of a uniform 64-bit integer is uniform on 65,536 values, so comparing it
    with ``keep`` rounded to 1/65536 is an exact Bernoulli draw at the rounded rate; that rate
    (0.8000031 for keep 0.8) is returned for the inverted-dropout scale, which keeps the mean
    of every feature exact. On CPU this is ~2.5x cheaper than ``torch.rand(shape) < keep``,
    which spends a 32-bit draw and a float conversion per element.

    Returns a bool mask of ``shape`` and the keep rate it was drawn at.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep (1 - dropout) must be in (0, 1], got {keep}")
    threshold = max(round(keep * 65536), 1)
    if threshold == 65536:  # a keep rate within 1/131072 of 1: the slice comparison cannot say "always"
        return torch.ones(shape, dtype=torch.bool, device=device), 1.0
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-2 ** 63, None, generator=generator)  # the full 64-bit range: every bit uniform
    slices = words.view(torch.int16)[:count].view(shape)  # uniform on [-32768, 32767]
    return slices < threshold - 32768, threshold / 65536


def _drop_unused_blocks(encoder: Optional[nn.Module]) -> None:
    """timm's EfficientNet / MobileNet feature extractors build and run all their blocks even
    when ``encoder_depth`` < 5 returns only earlier stages (at depth 4, 72% of Lite0's
    parameters feed nothing). Drop the blocks after the last returned stage, so they are
    neither computed nor saved; the outputs, gradients and random streams stay the same."""
    blocks, info = getattr(encoder, "blocks", None), getattr(encoder, "feature_info", None)
    if isinstance(blocks, nn.Sequential) and info is not None and getattr(encoder, "feature_hooks", True) is None:
        encoder.blocks = blocks[: max(f["stage"] for f in info.get_dicts())]  # stage s is blocks[s - 1]'s output


def is_encoder(name: str) -> bool:
    """Whether smp can build encoder ``name``: one of its own, or ``tu-<a timm model>``."""
    return name in smp.encoders.get_encoder_names() or (name.startswith("tu-") and timm.is_model(name[3:]))


def build_segmenter(
    arch: str,
    encoder: str,
    num_classes: int,
    dropout: float = 0.2,
    encoder_weights: Optional[str] = None,
    in_channels: int = 3,
    encoder_depth: int = 5,
    decoder_channels: Optional[Union[int, tuple[int, ...]]] = None,
    difficulty_size: Optional[tuple[int, int]] = None,
) -> Segmenter:
    """Build a :class:`Segmenter`: any smp architecture in ``ARCHITECTURES`` and any smp encoder.

    ``encoder_weights=None`` (the default) initialises randomly; a name in
    ``al.pretrained.LOCAL_ENCODER_WEIGHTS`` loads weights shipped in an installed package; other
    values are passed to smp, which may download them. ``difficulty_size`` adds DEAL's
    difficulty branch.
    """
    config = SegmenterConfig(arch, encoder, num_classes, dropout, in_channels, encoder_depth, decoder_channels,
                             tuple(difficulty_size) if difficulty_size is not None else None)
    return Segmenter(config, encoder_weights)


@dataclass
class ModelConfig:
    arch: str = "unet"
    encoder: str = "tu-resnet10t"
    dropout: float = 0.2
    encoder_weights: Optional[str] = None
    encoder_depth: int = 4
    decoder_channels: Optional[list[int]] = field(default_factory=lambda: [64, 32, 16, 16])

    def validate(self, prefix: str = "model") -> None:
        """The architecture, encoder and shape settings, checked before anything is built."""
        require(self.arch.lower() in ARCHITECTURES, f"{prefix}.arch", self.arch, f"one of {sorted(ARCHITECTURES)}")
        require(is_encoder(self.encoder), f"{prefix}.encoder", self.encoder,
                "an smp encoder name or 'tu-<timm model>' (smp.encoders.get_encoder_names(), timm.list_models())")
        require(0.0 <= self.dropout < 1.0, f"{prefix}.dropout", self.dropout, "a number in [0, 1)")
        require(1 <= self.encoder_depth <= 5, f"{prefix}.encoder_depth", self.encoder_depth, "an integer in [1, 5]")
        require(self.decoder_channels is None or (len(self.decoder_channels) == self.encoder_depth
                                                  and min(self.decoder_channels) >= 1),
                f"{prefix}.decoder_channels", self.decoder_channels,
                f"null or {self.encoder_depth} positive integers (one per encoder stage)")

    def build(self, num_classes: int, difficulty_size: Optional[tuple[int, int]] = None) -> Segmenter:
        decoder = tuple(self.decoder_channels) if self.decoder_channels is not None else None
        return build_segmenter(
            self.arch, self.encoder, num_classes, self.dropout, self.encoder_weights,
            encoder_depth=self.encoder_depth, decoder_channels=decoder, difficulty_size=difficulty_size,
        )



def load_model(directory: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Any model the project saves: a :class:`Segmenter`, or a diffusion-feature pixel ensemble
    (``al.diffusion_features.DiffusionFeatureSegmenter``, recognised by its ``segmenter.json``)."""
    if (Path(directory) / ENSEMBLE_RECORD).is_file():
        return DiffusionFeatureSegmenter.from_pretrained(directory, device)
    return Segmenter.from_pretrained(directory).to(device)
