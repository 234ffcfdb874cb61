"""Shared fixtures: tiny seeded datasets and models, built in code (no files, no network)."""

import os

# Before torch loads OpenMP (``make test`` sets it too): waiting threads sleep instead of spinning,
# so a busy machine slows the suite rather than multiplying its CPU time. Subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch

from al.config import load_config
from al.data import ArrayDataset, DigitScenesConfig, digit_scenes
from al.experiment import ExperimentConfig, run_dir, run_experiment
from al.loop_config import LoopConfig
from al.models import ModelConfig
from al.oracles import AwaitingAnnotations
from al.train import TrainConfig


# Float32 machine epsilon: the unit of the tolerances of tests that compare two float paths.
EPS32 = torch.finfo(torch.float32).eps


def softmax_rtol(num_classes: int) -> float:
    """Relative gap allowed between two float32 softmax implementations of the same logits: past
    the shared ``z - max z``, each p carries <= (C + 2) eps of rounding (1 for its exp, C - 1 for
    the sum, ~1 for the division), so two differ by at most twice that (no underflow: the tiny
    models' logits span far less than the 87 that float32 exp can take)."""
    return 2 * (num_classes + 2) * EPS32


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_digits():
    """(train, val) DigitScenes at 32x32, 6 + 4 images."""
    common = dict(size=32, min_digit_size=14, max_digit_size=20, min_digits=1, max_digits=2)
    return (
        digit_scenes(DigitScenesConfig(num_images=6, split="train", **common)),
        digit_scenes(DigitScenesConfig(num_images=4, split="val", **common)),
    )


def tiny_model_config() -> ModelConfig:
    return ModelConfig(arch="unet", encoder="tu-resnet10t", dropout=0.2, encoder_depth=3, decoder_channels=[16, 8, 8])


def tiny_loop_config(**overrides) -> LoopConfig:
    values = dict(pixels_per_image=3, cycles=2, mc_samples=4, inference_batch_size=4,
                  model=tiny_model_config(), train=TrainConfig(epochs=1, batch_size=4))
    values.update(overrides)
    return LoopConfig(**values)


def random_dataset(n=3, size=32, classes=("a", "b", "c"), seed=0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    masks = rng.integers(0, len(classes), size=(n, size, size), dtype=np.uint8)
    return ArrayDataset(images, masks, list(classes), [f"img{i}" for i in range(n)])


@pytest.fixture(scope="session")
def digit_masks_32():
    """Four DigitScenes masks at 32x32 (int64 [4, 32, 32]) and their dataset."""
    dataset = digit_scenes(DigitScenesConfig(num_images=4, size=32, min_digit_size=14, max_digit_size=20, seed=5))
    return torch.from_numpy(dataset.masks.astype(np.int64)), dataset


@pytest.fixture(scope="session")
def guiding_segmenters(tiny_digits):
    """Two small segmenters trained briefly (different seeds) on 32x32 DigitScenes, so their
    uncertainty varies over an image instead of sitting at ln(C)."""
    from al.train import DenseTargetDataset, train_segmenter

    train, _ = tiny_digits
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = tiny_model_config().build(11)
        train_segmenter(model, DenseTargetDataset(train), TrainConfig(epochs=6, batch_size=2, lr=3e-3, seed=seed), progress=False)
        models.append(model.eval())
    return models


def tiny_experiment_overrides(tmp_path):
    return [
        f"output_dir={tmp_path}", "acquisitions=[balent,random]", "seeds=[0]", "progress=false",
        "data.num_train_images=4", "data.num_val_images=2", "data.size=32", "uncertainty_map_images=2",
        "loop.cycles=1", "loop.pixels_per_image=2", "loop.mc_samples=3", "loop.train.epochs=1",
        "loop.model.encoder_depth=3", "loop.model.decoder_channels=[16,8,8]", "loop.model.encoder=tu-resnet10t",
        "loop.model.encoder_weights=null",
    ]


def human_config(tmp_path, **extra):
    overrides = tiny_experiment_overrides(tmp_path) + ["acquisitions=[entropy]", "annotator=human",
                                                      "supervised_reference=false"]
    return load_config(ExperimentConfig, "configs/al_digits.yaml", overrides + [f"{k}={v}" for k, v in extra.items()])


@pytest.fixture
def waiting_run(tmp_path):
    """A human-mode run stopped at its initial queries; returns its run folder."""
    config = human_config(tmp_path)
    with pytest.raises(AwaitingAnnotations, match="queried pixels of 'initial' wait"):
        run_experiment(config)
    return run_dir(tmp_path, "entropy", 0)


@pytest.fixture(scope="session")
def tiny_diffusion_folder(tmp_path_factory):
    """A tiny latent SD set saved in the diffusers layout (the diffusion-feature UNet)."""
    from guidedgen.components import tiny_components

    path = tmp_path_factory.mktemp("tiny_sd")
    tiny_components(seed=0).save_pretrained(path)
    return path


def live_controlnets(components, seed=0):
    """Random weights for the ControlNets' zero convolutions, in place; returns the set. An
    untrained ControlNet adds exactly zero, which would hide its control image from a test."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for controlnet in components.controlnets:
            for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                         controlnet.controlnet_cond_embedding.conv_out):
                conv.weight.normal_(std=0.1, generator=generator)
    return components
