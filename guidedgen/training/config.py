"""What a training run is: the model architecture and the training settings, checked up front;
which of them a resumed run may change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from al.config import require
from al.data.config import DataConfig
from guidedgen.components import TORCH_DTYPES
from guidedgen.palette import DEFAULT_PROMPT_TEMPLATE, PaletteConfig


@dataclass
class ArchitectureConfig:
    unet_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    layers_per_block: int = 1
    vae_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # 3 levels: latents are 1/4 size
    conditioning_embedding_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    cross_attention_dim: int = 32
    text_max_length: int = 48


@dataclass
class TrainControlNetConfig:
    output_dir: str = "outputs/controlnet_digits"
    seed: int = 0
    data: DataConfig = field(default_factory=lambda: DataConfig(num_train_images=4000, num_val_images=16))
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    palette: PaletteConfig = field(default_factory=PaletteConfig)
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    # stage 1: VAE
    vae_steps: int = 800
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    # stage 3: decoder-only fine-tuning (as SD's ft-MSE VAE): sharper images, same latent space
    vae_decoder_steps: int = 0
    # stage 2: UNet + ControlNet (names follow diffusers' train_controlnet.py)
    max_train_steps: int = 8000
    max_train_minutes: Optional[float] = None  # stop stage 2 early (checkpointing first) after this long
    train_batch_size: int = 32
    learning_rate: float = 5e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 200
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    snr_gamma: Optional[float] = 5.0
    # Weight of latent pixels that cover an object (any class but "background") in the denoising
    # loss, relative to background ones; 1 = diffusers' plain MSE. Digits fill ~15% of a scene, so
    # unweighted, the loss is mostly about modelling background texture the masks do not constrain.
    foreground_loss_weight: float = 1.0
    proportion_empty_prompts: float = 0.1
    # Share of samples that see neither prompt nor mask (empty prompt, all-ignore control image):
    # the negative branch of classifier-free guidance *over the mask* (sample with
    # ``negative_mask_fill`` = the ignore index). Without it, both CFG branches see the mask and
    # guidance amplifies only the prompt.
    proportion_unconditional: float = 0.0
    use_ema: bool = True
    ema_decay: float = 0.999
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: Optional[str] = "latest"
    validation_steps: int = 1000  # sample sheet every N steps (0 = never)
    mixed_precision: str = "no"
    save_dtype: str = "fp16"  # weights on disk; loading casts to the requested dtype
    progress: bool = True

    def validate(self) -> None:
        self.data.validate("data")
        require(self.vae_steps >= 1, "vae_steps", self.vae_steps, "an integer >= 1")
        require(self.max_train_steps >= 1, "max_train_steps", self.max_train_steps, "an integer >= 1")
        require(self.checkpointing_steps >= 1, "checkpointing_steps", self.checkpointing_steps, "an integer >= 1")
        require(0.0 <= self.proportion_empty_prompts < 1.0, "proportion_empty_prompts", self.proportion_empty_prompts,
                "a number in [0, 1)")
        require(0.0 <= self.proportion_unconditional < 1.0, "proportion_unconditional", self.proportion_unconditional,
                "a number in [0, 1)")
        require(self.foreground_loss_weight > 0, "foreground_loss_weight", self.foreground_loss_weight,
                "a number > 0 (1 = unweighted)")
        require(self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision", self.mixed_precision, "no, fp16 or bf16")
        require(self.save_dtype in TORCH_DTYPES, "save_dtype", self.save_dtype, f"one of {sorted(TORCH_DTYPES)}")
        arch = self.architecture
        require(len(arch.conditioning_embedding_out_channels) == len(arch.vae_channels),
                "architecture.conditioning_embedding_out_channels", arch.conditioning_embedding_out_channels,
                f"{len(arch.vae_channels)} values: its stride-2 convs must match the VAE's downsampling")
        require(self.data.size % 2 ** (len(arch.vae_channels) - 1 + len(arch.unet_channels) - 1) == 0, "data.size",
                self.data.size, "a multiple of the VAE and UNet downsampling factors")


# Keys a resumed run may change: how long it runs and how it reports, not what it trains.
RUN_LENGTH_KEYS = ("max_train_steps", "max_train_minutes", "checkpointing_steps", "checkpoints_total_limit",
                   "validation_steps", "resume_from_checkpoint", "progress")


NOT_IDENTITY = ("output_dir", *RUN_LENGTH_KEYS)
