"""The decoder guidance reads the x0 estimate through (``guidance.decoder``): the full VAE, or a
tiny distilled one (diffusers' ``AutoencoderTiny``, TAESD) that is several times cheaper per
guided step, forward and backward. Final images are always decoded by the full VAE.

An ``AutoencoderTiny`` decodes UNet-space latents: diffusers' pipelines call
``decode(latents / scaling_factor)`` on it as on any VAE, and TAESD's ``scaling_factor`` is 1.0
(it was trained on SD latents already multiplied by SD's 0.18215).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from diffusers import AutoencoderKL, AutoencoderTiny
from torch import Tensor

from al.config import ConfigError

FULL_VAE = "vae"
KEY = "guidance.decoder"


def decode_latents(decoder, latents: Tensor) -> Tensor:
    """UNet-space latents -> the decoder's output in [-1, 1] (unclamped), an ``AutoencoderKL`` or an
    ``AutoencoderTiny`` alike: each takes the latents divided by its own ``scaling_factor``, as
    diffusers' pipelines call them."""
    return decoder.decode(latents / decoder.config.scaling_factor, return_dict=False)[0]


def to_unit_range(decoded: Tensor) -> Tensor:
    """A decoder's [-1, 1] output -> images in [0, 1], float32, clamped (what a segmenter reads)."""
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def upsampling_factor(vae) -> int:
    """How many image pixels per latent pixel along a side: 2^(levels - 1) for an ``AutoencoderKL``,
    the per-stage factor ^ (stages - 1) for an ``AutoencoderTiny``."""
    if isinstance(vae, AutoencoderTiny):
        return vae.config.upsampling_scaling_factor ** (len(vae.config.decoder_block_out_channels) - 1)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_guidance_decoder(decoder: AutoencoderTiny, vae: AutoencoderKL, source: str = "the tiny decoder") -> None:
    """Refuse a tiny decoder that cannot stand in for ``vae``: another latent channel count or
    upsampling factor (it would decode the x0 estimate to another image size, or not at all)."""
    mismatches = [f"{what} {mine} vs the VAE's {theirs}" for what, mine, theirs in (
        ("latent channels", decoder.config.latent_channels, vae.config.latent_channels),
        ("upsampling factor", upsampling_factor(decoder), upsampling_factor(vae)),
        ("output channels", decoder.config.out_channels, vae.config.out_channels),
    ) if mine != theirs]
    if mismatches:
        raise ConfigError(f"config key {KEY!r}: {source} does not fit this model's VAE ({'; '.join(mismatches)}); "
                          f"use a tiny decoder distilled for this VAE (scripts/distill_tiny_decoder.py) or "
                          f"{KEY}={FULL_VAE}")


def _looks_local(value: str) -> bool:
    """A local path rather than a hub id (``owner/name``): it exists, is explicitly relative or
    absolute, or has more parts than a hub id can."""
    return Path(value).exists() or value.startswith((".", "/", "~")) or value.count("/") > 1


REMEDY = (f"set {KEY} to {FULL_VAE!r} (the full VAE) or to an AutoencoderTiny folder or hub id (e.g. "
          f"madebyollin/taesd for SD-1.5; scripts/distill_tiny_decoder.py makes one for a small model)")


def decoder_location(value: str) -> str:
    """Where ``guidance.decoder`` points: a folder that must exist, or a hub id. Checked before any
    model loads, so a typo fails at start."""
    if not _looks_local(value):
        return value
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"config key {KEY!r} = {value!r}: no such folder; {REMEDY}")
    return str(path)


def load_guidance_decoder(value: str, vae: AutoencoderKL, local_files_only: bool = False) -> Optional[AutoencoderTiny]:
    """``guidance.decoder``: None for ``vae`` (guidance decodes with the full VAE), else the
    ``AutoencoderTiny`` in the folder or hub repo ``value``, frozen, in the VAE's dtype (the sampler
    puts it on the VAE's device)."""
    if value == FULL_VAE:
        return None
    location = decoder_location(value)
    try:
        record = AutoencoderTiny.load_config(location, local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        raise ConfigError(f"config key {KEY!r} = {value!r}: cannot read its config.json ({error}); {REMEDY}") from None
    if record.get("_class_name") != AutoencoderTiny.__name__:
        raise ConfigError(f"config key {KEY!r} = {value!r} holds a {record.get('_class_name')!r}, not an "
                          f"AutoencoderTiny; {REMEDY}")
    decoder = AutoencoderTiny.from_pretrained(location, torch_dtype=vae.dtype, local_files_only=local_files_only)
    check_guidance_decoder(decoder, vae, repr(value))
    return decoder.requires_grad_(False).eval()
