"""al.few_labels: a cell is reused when what its mIoU depends on is unchanged, whatever the grid."""

from dataclasses import asdict

from al.few_labels import DIFFUSION_FEATURES, FewLabelsConfig, cell_identity
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
