"""al.few_labels: a cell is reused when what its mIoU depends on is unchanged, whatever the grid."""

from dataclasses import asdict, replace

import pytest

from al.few_labels import (
    DENSE_CEILING,
    DIFFUSION_FEATURES,
    DenseCeilingConfig,
    FewLabelsConfig,
    cell_identity,
)
from al.models import ModelConfig


def test_a_cell_identity_leaves_out_the_grid_and_keeps_its_own_model():
    config = FewLabelsConfig(segmenters={"unet": ModelConfig(), "fpn": ModelConfig(arch="fpn")})
    wider = FewLabelsConfig(seeds=[0, 1, 2, 3], label_counts=[5], progress=False, output_dir="elsewhere",
                            segmenters={"unet": ModelConfig(), "fpn": ModelConfig(arch="fpn", dropout=0.5)})
    assert cell_identity(asdict(config), "unet") == cell_identity(asdict(wider), "unet")
    assert cell_identity(asdict(config), "fpn")["segmenter"]["dropout"] == 0.2
    assert cell_identity(asdict(wider), "fpn")["segmenter"]["dropout"] == 0.5
    assert cell_identity(asdict(config), DIFFUSION_FEATURES)["segmenter"] is None
    assert cell_identity(asdict(config), "unet") != cell_identity(asdict(FewLabelsConfig(train_steps=5)), "unet")


def test_the_dense_ceiling_is_a_named_segmenter_on_every_training_scene_with_its_own_budget():
    segmenters = {"unet": ModelConfig(), "fpn": ModelConfig(arch="fpn")}
    config = FewLabelsConfig(segmenters=segmenters, seeds=[0, 1], label_counts=[5],
                             dense_ceiling=DenseCeilingConfig(segmenter="fpn", train_steps=30))
    config.validate()
    assert [cell for cell in config.cells() if cell[0] == DENSE_CEILING] == [(DENSE_CEILING, 20, 0), (DENSE_CEILING, 20, 1)]
    assert len(FewLabelsConfig(segmenters=segmenters, seeds=[0, 1], label_counts=[5]).cells()) == 6  # no ceiling
    ceiling = cell_identity(asdict(config), DENSE_CEILING)
    assert ceiling["segmenter"]["arch"] == "fpn" and ceiling["train_steps"] == 30
    # the few-label cells do not depend on the ceiling's settings, nor the ceiling on theirs
    longer = replace(config, train_steps=7, dense_ceiling=DenseCeilingConfig(segmenter="fpn", train_steps=60))
    assert cell_identity(asdict(config), "unet") != cell_identity(asdict(longer), "unet")
    assert cell_identity(asdict(config), "unet") == cell_identity(asdict(replace(longer, train_steps=400)), "unet")
    assert cell_identity(asdict(replace(config, train_steps=7)), DENSE_CEILING) == ceiling
    with pytest.raises(ValueError, match="dense_ceiling.segmenter"):
        replace(config, dense_ceiling=DenseCeilingConfig(segmenter="deeplab")).validate()
