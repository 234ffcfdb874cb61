"""Train a small mask-conditioned SD + ControlNet set on a segmentation dataset (DigitScenes).

No pretrained Stable Diffusion exists on this machine, so the whole stack is trained here, in
two resumable stages, following the diffusers training examples:

1. **VAE** (``AutoencoderKL``): L1 + MSE reconstruction with a small KL term. Its latent std
   sets ``scaling_factor``, as SD's does. Saved to ``vae/`` when done; a re-run skips it.
2. **UNet + ControlNet, jointly**: epsilon prediction under the DDPM noise schedule, min-SNR
   loss weighting (``snr_gamma``) and optionally more weight on latent pixels that touch an object
   (``foreground_loss_weight``), a share of empty prompts for classifier-free guidance, the
   ControlNet initialised from the UNet (``ControlNetModel.from_unet``) and conditioned on the
   palette image of the mask exactly as ``guidedgen.generate`` builds it. The two are trained
   together because there is no pretrained UNet to freeze. Optional EMA. ``accelerate``
   checkpoints every ``checkpointing_steps``; ``resume_from_checkpoint="latest"`` continues.

The text encoder is a tiny random CLIP that stays frozen (SD freezes its own); it only has to
tell prompts apart. The output folder has the diffusers layout, so
``guidedgen.components.load_components`` loads it through ``from_pretrained`` like SD-1.5.

Modules, one job each (no module imports one that imports it back):

- ``config``: ``TrainControlNetConfig`` / ``ArchitectureConfig`` and what a resume may change
- ``data``: the precomputed training set and reproducible batches
- ``models``: the component set, built untrained and saved in the diffusers layout
- ``loss_log``: per-stage loss CSVs and the loss curve
- ``vae``: stage 1 and the decoder-only fine-tune
- ``denoiser``: stage 2 (UNet + ControlNet) with its checkpoints
- ``report``: validation sample sheet and model card
- ``run``: ``train_controlnet``, every stage in order
"""

from guidedgen.training.config import (
    NOT_IDENTITY,
    RUN_LENGTH_KEYS,
    ArchitectureConfig,
    TrainControlNetConfig,
)
from guidedgen.training.data import TrainingData, foreground_weights, load_training_data
from guidedgen.training.denoiser import (
    encode_text,
    train_denoiser,
    weighted_denoising_error,
)
from guidedgen.training.loss_log import plot_losses
from guidedgen.training.models import build_untrained, save_components
from guidedgen.training.report import validation_sheet, write_model_card
from guidedgen.training.run import train_controlnet
from guidedgen.training.vae import finetune_vae_decoder, train_vae

__all__ = [
    "NOT_IDENTITY", "RUN_LENGTH_KEYS", "ArchitectureConfig", "TrainControlNetConfig", "TrainingData",
    "build_untrained", "encode_text", "finetune_vae_decoder", "foreground_weights", "load_training_data",
    "plot_losses", "save_components", "train_controlnet", "train_denoiser", "train_vae", "validation_sheet",
    "weighted_denoising_error", "write_model_card",
]
