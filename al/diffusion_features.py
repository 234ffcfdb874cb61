"""Diffusion-feature pixel classifiers (Baranchuk et al., ICLR 2022; see
docs/methods.md#diffusion-feature-pixel-classifiers).

Features: for each timestep t, ``x_t = q_sample(x0, t, noise)`` with ONE fixed noise tensor shared
by all images, one UNet forward, the outputs of chosen decoder blocks (forward hooks), each
upsampled bilinearly to the label size and concatenated over channels. A pixel-MLP ensemble then
classifies every pixel; its members are the K axis of ``mc_probs``, so every ``al.scores``
function works on it.

Unlike the reference (which keeps dense float32 features of every training pixel: ~210 GB for 50
images at 256^2), training pixels are sampled, their features interpolated from the blocks'
low-resolution outputs at those pixels only, streamed image by image and stored in half precision
inside a byte budget.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor, nn

from al.atomic import atomic_write_bytes

Encode = Callable[[Tensor], Tensor]


ENSEMBLE_RECORD = "segmenter.json"  # beside the weights: marks a saved DiffusionFeatureSegmenter

@dataclass
class FeatureConfig:
    # Names of UNet submodules whose outputs are taken. Default: every decoder level of a
    # diffusers UNet (``up_blocks.i``, one per resolution), so coarse semantics and fine detail
    # both enter. The reference's {5, 6, 7, 8, 12} index guided-diffusion's 18 output blocks
    # (middle-to-fine resolutions); our DigitScenes UNet has only 3 decoder levels (4x4, 8x8 and
    # 16x16 latents for 64x64 images), so all of them: 128 + 64 + 32 = 224 channels per step.
    blocks: Optional[list[str]] = None
    # Our UNets use the same 1000-step DDPM schedule family as the reference, where these steps
    # keep most of the image (scaled-linear betas: alpha_bar = 0.95, 0.83, 0.67), so the
    # reference's {50, 150, 250} carry over: low noise for detail, more noise for semantics.
    timesteps: list[int] = field(default_factory=lambda: [50, 150, 250])
    noise_seed: int = 0


class DiffusionFeatureExtractor:
    """Per-pixel features of images from a diffusers UNet (``UNet2DModel`` or
    ``UNet2DConditionModel``).

    ``encode`` maps images in [0, 1] to the UNet's input space (default: ``2x - 1`` for pixel
    diffusion; pass a VAE encoder for latent diffusion). ``encoder_hidden_states`` is the
    conditioning of a ``UNet2DConditionModel`` (e.g. the empty prompt's embedding).
    """

    def __init__(self, unet: nn.Module, scheduler, config: Optional[FeatureConfig] = None,
                 encode: Optional[Encode] = None, encoder_hidden_states: Optional[Tensor] = None,
                 encode_factor: int = 1):
        """``encode_factor``: how much ``encode`` shrinks the images (a VAE's 8; 1 for pixels)."""
        config = config if config is not None else FeatureConfig()
        self.unet, self.scheduler, self.config = unet.eval(), scheduler, config
        # image sides that the encoder and every UNet level divide without remainder
        self.input_multiple = encode_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        self.encode = encode or (lambda images: images * 2.0 - 1.0)
        self.encoder_hidden_states = encoder_hidden_states
        modules = dict(unet.named_modules())
        self.blocks = config.blocks or [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
        missing = [name for name in self.blocks if name not in modules]
        if missing:
            raise KeyError(f"UNet has no submodules {missing}; e.g. {[n for n in modules if n.startswith('up_blocks')][:6]}")
        self._modules = [modules[name] for name in self.blocks]
        self._noise: Optional[Tensor] = None

    def noise(self, like: Tensor) -> Tensor:
        """The one noise tensor shared by all images, ``[C, h, w]``."""
        if self._noise is None or self._noise.shape != like.shape[1:]:
            generator = torch.Generator().manual_seed(self.config.noise_seed)
            self._noise = torch.randn(like.shape[1:], generator=generator)
        return self._noise.to(like.device, like.dtype)

    def activations(self, images: Tensor) -> list[Tensor]:
        """The hooked blocks' outputs at their own resolution, block after block within each
        timestep: the order of the feature channels. Shape: ``images [N, 3, H, W] in [0, 1] ->
        [N, C_i, h_i, w_i]`` per (timestep, block)."""
        x0 = self.encode(images)
        captured: list[Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
                 for m in self._modules]
        try:
            for t in self.config.timesteps:
                timestep = torch.full((len(images),), t, device=images.device, dtype=torch.long)
                noisy = self.scheduler.add_noise(x0, self.noise(x0).expand_as(x0), timestep)
                if self.encoder_hidden_states is not None:
                    states = self.encoder_hidden_states.to(noisy.device, noisy.dtype).expand(len(images), -1, -1)
                    self.unet(noisy, timestep, encoder_hidden_states=states)
                else:
                    self.unet(noisy, timestep)
        finally:
            for hook in hooks:
                hook.remove()
        return [c.float() for c in captured]

    def features(self, images: Tensor, size: Optional[tuple[int, int]] = None) -> Tensor:
        """Differentiable w.r.t. ``images`` (for guidance); :meth:`__call__` is the no-grad form.
        Shape: ``images [N, 3, H, W] in [0, 1] -> [N, D, *size]`` (default size: ``H, W``)."""
        size = tuple(size or images.shape[-2:])
        return torch.cat([F.interpolate(a, size=size, mode="bilinear", align_corners=False)
                          for a in self.activations(images)], dim=1)

    @torch.no_grad()
    def __call__(self, images: Tensor, size: Optional[tuple[int, int]] = None) -> Tensor:
        return self.features(images, size)

    @property
    def dim(self) -> int:
        """Feature channels per pixel (D)."""
        channels = [getattr(module, "resnets")[-1].out_channels for module in self._modules]
        return sum(channels) * len(self.config.timesteps)


def load_feature_extractor(pretrained_model_name_or_path: str, config: Optional[FeatureConfig] = None,
                           device: Union[str, torch.device] = "cpu", local_files_only: bool = True
                           ) -> DiffusionFeatureExtractor:
    """A feature extractor over a diffusers folder (or hub id): its ``unet`` and ``scheduler``;
    for a latent ``UNet2DConditionModel`` also its ``vae`` (images are encoded to the latent
    mean) and ``text_encoder`` + ``tokenizer`` (the empty prompt conditions the UNet)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        UNet2DConditionModel,
        UNet2DModel,
    )

    path, common = pretrained_model_name_or_path, dict(local_files_only=local_files_only)
    try:
        unet_class = json.loads(Path(path, "unet", "config.json").read_text())["_class_name"] if Path(path).is_dir() else None
        if unet_class == "UNet2DModel":
            unet = UNet2DModel.from_pretrained(path, subfolder="unet", **common)
            encode, states, factor = None, None, 1
        else:
            from transformers import CLIPTextModel, CLIPTokenizer

            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **common)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **common).to(device).eval().requires_grad_(False)
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common)
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **common).to(device).eval()
            tokens = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                               return_tensors="pt").input_ids.to(device)
            with torch.no_grad():
                states = text_encoder(tokens)[0]

            def encode(images: Tensor) -> Tensor:
                return vae.encode(images * 2.0 - 1.0).latent_dist.mean * vae.config.scaling_factor

            factor = 2 ** (len(vae.config.block_out_channels) - 1)

        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common)
    except (OSError, ValueError, KeyError) as error:
        raise OSError(f"cannot load a diffusion UNet for features from {path!r}: {error}. Pass a folder in the "
                      f"diffusers layout (unet/, scheduler/, and vae/, text_encoder/, tokenizer/ for latent models)") from error
    unet = unet.to(device).eval().requires_grad_(False)
    return DiffusionFeatureExtractor(unet, scheduler, config, encode, states, factor)


def upsampled_at(maps: Tensor, rows: Tensor, cols: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(maps[None], size, mode="bilinear", align_corners=False)[0, :, rows, cols].T``
    without upsampling: the bilinear values at just those pixels.
    Shape: ``maps [C, h, w], rows and cols [P] (pixels of the ``size`` grid) -> [P, C]``."""
    # grid_sample (align_corners=False) reads normalised g at input coordinate ((g + 1) h - 1) / 2;
    # g = (2 row + 1) / H - 1 makes that (row + 0.5) h / H - 0.5, interpolate's source of output row
    # `row`. "border" clamps it below at 0 as interpolate does, and above at h - 1, where interpolate
    # blends row h - 1 with itself: the same value.
    grid = torch.stack([(2 * cols + 1) / size[1] - 1, (2 * rows + 1) / size[0] - 1], dim=-1)
    sampled = F.grid_sample(maps[None], grid[None, None].to(maps.dtype), mode="bilinear", padding_mode="border",
                            align_corners=False)  # [1, C, 1, P]
    return sampled[0, :, 0].T


@torch.no_grad()
def sample_pixels(
    activations: Callable[[Tensor], list[Tensor]],
    batches: Iterable[tuple[Tensor, Tensor]],
    pixels_per_image: int,
    budget_bytes: int,
    ignore_index: int = 255,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """Training pixels: up to ``pixels_per_image`` labelled pixels of each image with their
    features in float16, streamed batch by batch. ``activations`` is
    :meth:`DiffusionFeatureExtractor.activations`: the features are interpolated at the chosen
    pixels only (:func:`upsampled_at`), so no image's feature map is ever upsampled whole.

    When more pixels arrive than ``budget_bytes`` of fp16 features hold, a uniform sample of all
    of them is kept (reservoir sampling), so memory is bounded whatever the number of images.
    ``batches`` yields ``(images [B, 3, H, W], targets [B, H, W])`` (sparse or dense labels).
    Returns ``(features [P, D] fp16, labels [P])``.
    """
    buffer: Optional[Tensor] = None
    labels: Optional[Tensor] = None
    filled = seen = 0
    for images, targets in batches:
        maps = activations(images)  # [B, C_i, h_i, w_i] per (timestep, block), at the blocks' resolution
        if buffer is None:
            dim = sum(m.shape[1] for m in maps)
            capacity = budget_bytes // (dim * 2)
            if capacity < 1:
                raise MemoryError(f"the feature budget of {budget_bytes} bytes holds no {dim}-dim pixel")
            # allocated once at the budget's size rather than grown by concatenation (which
            # holds the old and the new copy at once); the OS backs pages only as rows are written
            buffer = torch.empty(capacity, dim, dtype=torch.float16)
            labels = torch.empty(capacity, dtype=torch.long)
        width = targets.shape[-1]
        for b in range(len(images)):
            flat = targets[b].reshape(-1)
            index = (flat != ignore_index).nonzero().squeeze(1)
            if index.numel() > pixels_per_image:
                index = index[torch.randperm(index.numel(), generator=generator)[:pixels_per_image]]
            rows, cols = (index // width).to(images.device), (index % width).to(images.device)
            chosen = torch.cat([upsampled_at(m[b], rows, cols, targets.shape[-2:]) for m in maps], dim=1)
            chosen = chosen.to(torch.float16).cpu()  # [p, D]
            classes = flat[index].cpu().long()
            room = min(capacity - filled, len(chosen))
            if room > 0:  # the reservoir is not full yet: keep everything
                buffer[filled:filled + room], labels[filled:filled + room] = chosen[:room], classes[:room]
                filled, seen = filled + room, seen + room
                chosen, classes = chosen[room:], classes[room:]
            if len(chosen):  # candidate j replaces slot r_j ~ U{0, ..., seen + j} when r_j < capacity
                draws = (torch.rand(len(chosen), generator=generator, dtype=torch.float64)
                         * (seen + 1 + torch.arange(len(chosen), dtype=torch.float64))).long()
                keep = (draws < capacity).nonzero().squeeze(1)
                slots, order = draws[keep], keep
                # a later candidate wins a slot drawn twice, as in the sequential algorithm
                last = torch.zeros(capacity, dtype=torch.long).scatter_reduce(0, slots, order, "amax", include_self=False)
                winners = torch.unique(slots)
                buffer[winners], labels[winners] = chosen[last[winners]], classes[last[winners]]
                seen += len(chosen)
    if buffer is None:
        raise ValueError("no images to sample training pixels from")
    return buffer[:filled], labels[:filled]


@dataclass
class EnsembleConfig:
    in_features: int
    num_classes: int
    num_members: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    max_epochs: int = 20
    patience: int = 50  # iterations without improvement, checked after min_epochs
    min_epochs: int = 3
    seed: int = 0

    @property
    def widths(self) -> tuple[int, int]:
        return (128, 32) if self.num_classes < 30 else (256, 128)


def pixel_classifier(config: EnsembleConfig) -> nn.Sequential:
    """Linear -> ReLU -> BatchNorm1d -> Linear -> ReLU -> BatchNorm1d -> Linear, N(0, 0.02) init."""
    first, second = config.widths
    mlp = nn.Sequential(
        nn.Linear(config.in_features, first), nn.ReLU(), nn.BatchNorm1d(first),
        nn.Linear(first, second), nn.ReLU(), nn.BatchNorm1d(second),
        nn.Linear(second, config.num_classes),
    )
    for module in mlp:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.02)
            nn.init.zeros_(module.bias)
    return mlp


class PixelEnsemble(nn.Module):
    """Ensemble of pixel MLPs. ``forward(features [P, D]) -> member probabilities [K, P, C]``."""

    def __init__(self, config: EnsembleConfig):
        super().__init__()
        self.config = config
        self.members = nn.ModuleList()
        for i in range(config.num_members):
            torch.manual_seed(config.seed * 1000 + i)
            self.members.append(pixel_classifier(config))

    def forward(self, features: Tensor) -> Tensor:
        features = features.float()
        return torch.stack([member(features).softmax(-1) for member in self.members])

    @torch.no_grad()
    def mc_probs(self, feature_maps: Tensor, chunk: int = 65536) -> Tensor:
        """Members as the K axis. Shape: ``[N, D, H, W] -> [K, N, C, H, W]``."""
        self.eval()
        n, d, h, w = feature_maps.shape
        flat = feature_maps.permute(0, 2, 3, 1).reshape(-1, d)
        probs = torch.cat([self(flat[i:i + chunk]) for i in range(0, len(flat), chunk)], dim=1)  # [K, NHW, C]
        return probs.view(len(self.members), n, h, w, -1).permute(0, 1, 4, 2, 3)

    def fit(self, features: Tensor, labels: Tensor) -> list[int]:
        """Train each member with Adam and CE on shuffled pixels; stop a member when its loss
        has not improved for ``patience`` iterations after ``min_epochs``. Returns iterations."""
        config = self.config
        iterations = []
        for i, member in enumerate(self.members):
            generator = torch.Generator().manual_seed(config.seed * 1000 + i)
            optimizer = torch.optim.Adam(member.parameters(), lr=config.lr)
            member.train()
            best, since_best, step = float("inf"), 0, 0
            for epoch in range(config.max_epochs):
                order = torch.randperm(len(features), generator=generator)
                stop = False
                for start in range(0, len(order), config.batch_size):
                    batch = order[start:start + config.batch_size]
                    if len(batch) < 2:  # BatchNorm needs two samples
                        continue
                    loss = F.cross_entropy(member(features[batch].float()), labels[batch].long())
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    step += 1
                    if loss.item() < best:
                        best, since_best = loss.item(), 0
                    else:
                        since_best += 1
                    if epoch >= config.min_epochs and since_best >= config.patience:
                        stop = True
                        break
                if stop:
                    break
            member.eval()
            iterations.append(step)
        return iterations

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / "model.safetensors",
                           save({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}))
        atomic_write_bytes(directory / "config.json",
                           json.dumps({"class": "PixelEnsemble", **asdict(self.config)}, indent=2).encode())

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "PixelEnsemble":
        directory = Path(directory)
        raw = json.loads((directory / "config.json").read_text())
        raw.pop("class", None)
        model = cls(EnsembleConfig(**raw))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval()


def majority_vote(mc_probs: Tensor) -> Tensor:
    """Per-pixel majority of the members' argmaxes (ties: lowest class id).
    Shape: ``[K, N, C, *S] -> [N, *S]``."""
    votes = F.one_hot(mc_probs.argmax(2), mc_probs.shape[2]).sum(0)  # [N, *S, C]
    return votes.argmax(-1)


@dataclass
class DiffusionFeaturesConfig:
    """A pixel-MLP ensemble on diffusion-UNet features, as a model of the active-learning loop."""

    pretrained_model_name_or_path: str = "models/digitscenes-controlnet"
    features: FeatureConfig = field(default_factory=FeatureConfig)
    pixels_per_image: int = 2000  # training pixels sampled per image (sparse labels: all, up to this)
    feature_budget_mb: int = 1024  # training features (fp16) may not exceed this
    extraction_batch_size: int = 8  # images per UNet forward; each adds ~9 MB of activations (64^2 DigitScenes)
    num_members: int = 10
    max_epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3


class DiffusionFeatureSegmenter(nn.Module):
    """Feature extractor + :class:`PixelEnsemble`, with the segmenter interface the loop uses:
    ``predict`` (majority vote), ``mc_probs`` (members as K), ``member_probs`` (differentiable,
    for the ``committee`` guidance objective), ``forward`` (log of the mean member softmax) and
    ``save_pretrained``/``from_pretrained`` (the ensemble's weights; the UNet is referenced by path).
    """

    def __init__(self, config: DiffusionFeaturesConfig, num_classes: int, seed: int = 0,
                 device: Union[str, torch.device] = "cpu"):
        super().__init__()
        self.config, self.num_classes, self.seed = config, num_classes, seed
        self.extractor = load_feature_extractor(config.pretrained_model_name_or_path, config.features, device)
        self.ensemble = PixelEnsemble(EnsembleConfig(
            in_features=self.extractor.dim, num_classes=num_classes, num_members=config.num_members, lr=config.lr,
            batch_size=config.batch_size, max_epochs=config.max_epochs, seed=seed)).to(device)

    @property
    def num_members(self) -> int:
        return self.config.num_members

    @property
    def input_multiple(self) -> int:
        """Input sides must be multiples of this (``al.inference`` pads to it)."""
        return self.extractor.input_multiple

    def fit(self, batches: Iterable[tuple[Tensor, Tensor]], ignore_index: int = 255,
            generator: Optional[torch.Generator] = None) -> list[int]:
        """Sample training pixels of ``(images, targets)`` batches (a uniform sample of them once
        they exceed the feature budget) and train every member; returns each member's iterations."""
        device = next(self.ensemble.parameters()).device
        features, labels = sample_pixels(
            self.extractor.activations, ((images.to(device), targets) for images, targets in batches),
            self.config.pixels_per_image, self.config.feature_budget_mb * 2**20, ignore_index, generator)
        if len(labels) < 2:
            raise ValueError(f"the pixel ensemble needs at least 2 labelled pixels, got {len(labels)}")
        return self.ensemble.fit(features.to(device), labels.to(device))

    def member_probs(self, images: Tensor) -> Tensor:
        """Differentiable w.r.t. ``images``. Shape: ``[N, 3, H, W] -> [K, N, C, H, W]``."""
        self.ensemble.eval()
        maps = self.extractor.features(images)
        n, d, h, w = maps.shape
        probs = self.ensemble(maps.permute(0, 2, 3, 1).reshape(-1, d))
        return probs.view(len(probs), n, h, w, -1).permute(0, 1, 4, 2, 3)

    @torch.no_grad()
    def mc_probs(self, images: Tensor) -> Tensor:
        """Shape: ``[N, 3, H, W] -> [K, N, C, H, W]``."""
        return self.ensemble.mc_probs(self.extractor(images))

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Majority vote of the members. Shape: ``[N, 3, H, W] -> [N, H, W]``."""
        return majority_vote(self.mc_probs(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.member_probs(images).mean(0).clamp_min(1e-12).log()

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        directory = Path(directory)
        self.ensemble.save_pretrained(directory)
        record = {"class": type(self).__name__, "num_classes": self.num_classes, "seed": self.seed,
                  "config": asdict(self.config)}
        atomic_write_bytes(directory / ENSEMBLE_RECORD, json.dumps(record, indent=2).encode())

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"
                        ) -> "DiffusionFeatureSegmenter":
        directory = Path(directory)
        record = json.loads((directory / ENSEMBLE_RECORD).read_text())
        raw = record["config"]
        config = DiffusionFeaturesConfig(**{**raw, "features": FeatureConfig(**raw["features"])})
        model = cls(config, record["num_classes"], record["seed"], device)
        model.ensemble.load_state_dict(PixelEnsemble.from_pretrained(directory).state_dict())
        return model.eval()
