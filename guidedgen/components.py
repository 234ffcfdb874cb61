"""The Stable-Diffusion + ControlNet component set: real checkpoints loaded with
``from_pretrained(path_or_id)``, or a tiny random set built in code for tests and CPU demos.

The folder layout is the diffusers one (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``), so a saved tiny set loads through exactly the code that loads SD-1.5.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from al.registry import Registry

# Config name -> scheduler class; every one exposes alphas_cumprod and scale_model_input. Open:
# SCHEDULERS.register("name", cls).
SCHEDULERS: Registry[type] = Registry("scheduler", {
    "ddim": DDIMScheduler,
    "unipc": UniPCMultistepScheduler,
    "dpm_solver": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
})

TORCH_DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weights_dtype(mixed_precision: str, device: Optional[torch.device] = None) -> torch.dtype:
    """The dtype the weights are loaded in: ``mixed_precision``'s, except fp16 off CUDA, which falls
    back to float32 with a warning (CPU half-precision kernels are missing or far slower than
    float32 ones, and the guidance gradient underflows more easily). bf16 runs on CPU as asked."""
    if mixed_precision not in TORCH_DTYPES:
        raise ValueError(f"mixed_precision={mixed_precision!r}; choose one of {sorted(TORCH_DTYPES)}")
    dtype = TORCH_DTYPES[mixed_precision]
    if dtype == torch.float16 and device is not None and torch.device(device).type != "cuda":
        warnings.warn(f"mixed_precision=fp16 on {torch.device(device).type}: loading the models in float32 instead "
                      f"(fp16 is for CUDA; set components.mixed_precision=no to silence this, or bf16 to halve memory "
                      f"on CPU)", stacklevel=2)
        return torch.float32
    return dtype


@dataclass
class ComponentsConfig:
    """Where the models come from. Key names follow the diffusers training examples."""

    pretrained_model_name_or_path: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    controlnet_model_name_or_path: list[str] = field(default_factory=lambda: ["lllyasviel/control_v11p_sd15_seg"])
    revision: Optional[str] = None
    variant: Optional[str] = None
    local_files_only: bool = False
    scheduler: str = "ddim"
    mixed_precision: str = "no"  # weights dtype: no/fp32, fp16, bf16
    enable_xformers_memory_efficient_attention: bool = False


@dataclass
class Components:
    unet: UNet2DConditionModel
    controlnets: list[ControlNetModel]
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: SchedulerMixin

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, *self.controlnets, self.vae, self.text_encoder]

    def to(self, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> "Components":
        for module in self.modules():
            module.to(device) if dtype is None else module.to(device=device, dtype=dtype)
        return self

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> list[Path]:
        """Write the diffusers layout; ControlNets go to ``controlnet/`` (or ``controlnet_<i>/``).
        Returns the ControlNet folders, in order."""
        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet")
        self.vae.save_pretrained(directory / "vae")
        self.text_encoder.save_pretrained(directory / "text_encoder")
        self.tokenizer.save_pretrained(directory / "tokenizer")
        self.scheduler.save_pretrained(directory / "scheduler")
        names = ["controlnet"] if len(self.controlnets) == 1 else [f"controlnet_{i}" for i in range(len(self.controlnets))]
        for name, controlnet in zip(names, self.controlnets):
            controlnet.save_pretrained(directory / name)
        return [directory / name for name in names]


def load_components(config: ComponentsConfig, dtype: Optional[torch.dtype] = None) -> Components:
    """Load real checkpoints (a local folder or a hub id) with ``from_pretrained``, in ``dtype``
    (default: the config's mixed_precision; :func:`weights_dtype` gives a device's)."""
    dtype = dtype or weights_dtype(config.mixed_precision)
    common = dict(revision=config.revision, local_files_only=config.local_files_only)
    weights = dict(common, variant=config.variant, torch_dtype=dtype)
    path = config.pretrained_model_name_or_path
    try:
        components = Components(
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights),
            controlnets=[ControlNetModel.from_pretrained(p, variant=config.variant, torch_dtype=dtype,
                                                         local_files_only=config.local_files_only)
                         for p in config.controlnet_model_name_or_path],
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **weights),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common),
            scheduler=SCHEDULERS.lookup(config.scheduler).from_pretrained(path, subfolder="scheduler", **common),
        )
    except (OSError, ValueError) as error:
        raise OSError(
            f"cannot load the component set from {path!r} with ControlNets {config.controlnet_model_name_or_path}: "
            f"{error}. Pass a local folder in the diffusers layout, or a hub id with network access "
            f"(local_files_only=false)."
        ) from error
    for module in components.modules():
        module.requires_grad_(False).eval()
    if config.enable_xformers_memory_efficient_attention:
        enable_xformers(components)
    return components


def enable_xformers(components: Components) -> bool:
    """Use xformers attention when it is importable and on CUDA; otherwise keep PyTorch's
    scaled-dot-product attention (diffusers' default, memory-efficient on CUDA too) and say why.
    Returns whether xformers is in use."""
    try:
        import xformers  # noqa: F401
    except Exception as error:  # not installed, or installed without its compiled kernels
        reason = f"xformers cannot be imported ({type(error).__name__}: {error}); install the 'xformers' extra on a CUDA machine"
    else:
        reason = None if torch.cuda.is_available() else "xformers' kernels need CUDA and none is available"
    if reason is not None:
        warnings.warn(f"enable_xformers_memory_efficient_attention=true, but {reason}: using PyTorch's "
                      f"scaled-dot-product attention instead (same results)", stacklevel=2)
        return False
    for module in (components.unet, *components.controlnets, components.vae):
        module.enable_xformers_memory_efficient_attention()
    return True


def tiny_tokenizer(max_length: int = 16) -> CLIPTokenizer:
    """A character-level CLIP tokenizer built in code: every byte-level character, alone and as
    end-of-word, with no merges. Enough to turn prompts into distinct token ids offline."""
    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_components(
    seed: int = 0,
    num_controlnets: int = 1,
    scheduler: str = "ddim",
    unet_channels: tuple[int, ...] = (16, 32),
    vae_channels: tuple[int, ...] = (8, 16, 16),
    image_size: int = 64,
    layers_per_block: int = 1,
    cross_attention_dim: int = 32,
    text_max_length: int = 16,
) -> Components:
    """A complete, small, randomly initialised SD + ControlNet set (no files, no network).

    The default is tiny (0.5 M parameters): the VAE downsamples by 4 (64x64 images -> 16x16
    latents) and the ControlNet's conditioning embedding by 4 to match. Wider ``unet_channels``
    and deeper ``vae_channels`` give mid-size sets for benchmarks, and the untrained starting
    point of ``guidedgen.training`` (which trains such a set on DigitScenes).
    """
    tokenizer = tiny_tokenizer(text_max_length)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(unet_channels) - 1)
    up = ("CrossAttnUpBlock2D",) * (len(unet_channels) - 1) + ("UpBlock2D",)
    blocks = dict(block_out_channels=unet_channels, layers_per_block=layers_per_block,
                  cross_attention_dim=cross_attention_dim, attention_head_dim=4,
                  norm_num_groups=8, down_block_types=down)
    torch.manual_seed(seed)
    latent_size = image_size // 2 ** (len(vae_channels) - 1)
    unet = UNet2DConditionModel(sample_size=latent_size, in_channels=4, out_channels=4, up_block_types=up, **blocks)
    controlnets = []
    for i in range(num_controlnets):
        torch.manual_seed(seed + 1 + i)
        embedding = tuple(8 * 2 ** min(j, 2) for j in range(len(vae_channels)))  # one stride-2 conv per VAE level
        controlnets.append(ControlNetModel(in_channels=4, conditioning_embedding_out_channels=embedding, **blocks))
    torch.manual_seed(seed + 100)
    vae = AutoencoderKL(
        block_out_channels=vae_channels, in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), sample_size=image_size,
    )
    torch.manual_seed(seed + 200)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_size=cross_attention_dim, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
    ))
    scheduler_instance = SCHEDULERS.lookup(scheduler)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                     num_train_timesteps=1000)
    components = Components(unet, controlnets, vae, text_encoder, tokenizer, scheduler_instance)
    for module in components.modules():
        module.requires_grad_(False).eval()
    return components
