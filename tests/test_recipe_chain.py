"""The real recipe's chain (README "Train -> generate -> retrain on ADE20K"), run from its own
config files so they cannot drift: configs/segmenter_ade20k.yaml trains the guide,
configs/sd15_seg.yaml generates with it, configs/segmenter_ade20k_retrain.yaml retrains on real +
generated. Only paths, sizes and counts are overridden: a tiny ADE20K tree of odd sizes, a tiny
segmenter decoder, and a tiny SD + ControlNet set saved in the diffusers layout with SD-1.5's
shapes (latents 1/8 of the image, three UNet down-samplings: sides in multiples of 64; 77-token
prompts), loaded in fp16 with xformers as the config asks, which on CPU fall back to float32 and
PyTorch's attention with warnings."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from al.data.folder import load_folder, read_metadata
from al.data.standard import ade20k
from al.resume import identity
from guidedgen.components import tiny_components
from guidedgen.generate import MaskFit
from scripts.generate import main as generate
from scripts.train_segmenter import NOT_IDENTITY, read_record
from scripts.train_segmenter import main as train

IGNORE = 255
# Scaled down from ADE20K's sides of 300-700 px: at resolution 64 the 2:1 one is generated at 64x128,
# the others at 64x64
SIZES = {"training": [(45, 67), (41, 90), (70, 51)], "validation": [(51, 70)]}
STORED = [0, 1, 3, 13, 150]  # ADE20K's stored values: 0 = "other" (ignored), 1..150 = classes 0..149


def write_ade20k(root, seed=0):
    """An ADEChallengeData2016 tree: random JPEG images, label PNGs of 5-pixel blocks."""
    rng = np.random.default_rng(seed)
    for split, sizes in SIZES.items():
        for i, (height, width) in enumerate(sizes):
            blocks = rng.choice(STORED, size=(height // 5 + 1, width // 5 + 1))
            mask = np.kron(blocks, np.ones((5, 5), np.int64))[:height, :width].astype(np.uint8)
            for folder, array, suffix in (("images", rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "jpg"),
                                          ("annotations", mask, "png")):
                (root / folder / split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / folder / split / f"ADE_{split}_{i:08d}.{suffix}")


def segmenter_args(config, data, output, *extra):
    """The segmenter configs at tiny sizes: the config's arch, encoder and ImageNet weights with a
    narrow decoder, 64-px scale and crops, one epoch."""
    return ["--config", config, f"data.root={data}", f"output_dir={output}", "model.decoder_channels=[16,8,8,8,8]",
            "data.transforms.short_side=64", "data.transforms.crop_size=[64,64]", "train.epochs=1", "progress=false",
            *extra]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:palette colours too close")  # ADE20K's own palette has near-twins
def test_the_ade20k_recipe_runs_from_its_config_files(tmp_path, monkeypatch, capsys):
    import guidedgen.generate as generation

    data, guide, models = tmp_path / "ADEChallengeData2016", tmp_path / "guide", tmp_path / "sd15"
    write_ade20k(data)

    # 1. the guide
    assert train(segmenter_args("configs/segmenter_ade20k.yaml", data, guide)) == 0
    guide_record = read_record(guide / "training.json")
    assert "synthetic" not in guide_record["config"]  # as every segmenter trained before it existed
    assert guide_record["sources"] == [{"name": "real", "items": 3, "share": 1.0}]

    # 2. generation with SD-1.5's shapes, in the config's fp16 with xformers
    controlnets = tiny_components(unet_channels=(16, 32, 32, 32), vae_channels=(8, 16, 16, 16),
                                  text_max_length=77).save_pretrained(models)
    loaded, build = [], generation.build_components  # every set the job loads: the samples', the contact sheet's
    monkeypatch.setattr(generation, "build_components",
                        lambda config, device: loaded.append(components := build(config, device)) or components)
    generated = tmp_path / "generated"
    with pytest.warns(UserWarning) as warned:
        assert generate(["--config", "configs/sd15_seg.yaml", f"output_dir={generated}", f"masks.root={data}",
                         f"components.pretrained_model_name_or_path={models}",
                         f"components.controlnet_model_name_or_path=[{controlnets[0]}]",
                         "components.local_files_only=true", f"guidance.segmenters=[{guide}]", "resolution=64",
                         "num_samples=4", "batch_size=2", "num_inference_steps=2", "progress=false"]) == 0
    messages = " ".join(str(w.message) for w in warned)
    assert "fp16 on cpu: loading the models in float32" in messages and "scaled-dot-product attention" in messages
    assert loaded and all(p.dtype == torch.float32 for c in loaded for m in c.modules() for p in m.parameters())
    info = json.loads((generated / "dataset.json").read_text())
    assert len(info["classes"]) == 150 and info["ignore_index"] == IGNORE
    written, sources = load_folder(generated), ade20k(data, "training")
    assert len(written) == 4
    fit = MaskFit(64, "crop", 64, IGNORE)  # the config's fit at resolution 64, the components' multiple
    for record in read_metadata(generated):
        sample = written[written.index_of(record["id"])]
        source = sources[sources.index_of(record["source_id"])]
        assert torch.equal(sample.mask, fit(source).mask)  # the real mask, fitted: valid ids or ignore
        assert set(sample.mask.unique().tolist()) <= {*range(150), IGNORE}
        assert sample.image.shape[1:] == sample.mask.shape and all(side % 64 == 0 for side in sample.mask.shape)
    assert {tuple(written[i].mask.shape) for i in range(len(written))} == {(64, 64), (64, 128)}
    assert (generated / "contact_sheet.png").is_file()

    # 3. the retraining on real + generated
    retrained = tmp_path / "retrained"
    assert train(segmenter_args("configs/segmenter_ade20k_retrain.yaml", data, retrained,
                                f"synthetic.root={generated}")) == 0
    record = read_record(retrained / "training.json")
    assert record["sources"] == [{"name": "real", "items": 3, "share": 0.9},
                                 {"name": "synthetic", "items": 4, "share": 0.1}]
    assert record["config"]["synthetic"]["root"] == str(generated) and 0.0 <= record["val_miou"] <= 1.0
    assert identity(record["config"], NOT_IDENTITY) != identity(guide_record["config"], NOT_IDENTITY)
    # the guide's folder is refused to the retraining, naming the synthetic set
    assert train(segmenter_args("configs/segmenter_ade20k_retrain.yaml", data, guide,
                                f"synthetic.root={generated}")) == 2
    assert "synthetic: '(absent)' there" in capsys.readouterr().err
