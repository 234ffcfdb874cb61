"""Images of any size (issue 28): VOC and ADE20K vary, CamVid's 360x480 is no multiple of 32. The
transforms' arithmetic, then each reader's tiny tree (odd sizes, scaled down) through the AL loop
and through generation; labels, scores and queries stay on the pixels as read."""

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import tiny_loop_config, tiny_model_config
from PIL import Image
from torch import nn

from al.acquisition import Predictions
from al.data import load_folder
from al.data.base import SegmentationDataset, to_sample
from al.data.config import DataConfig
from al.data.folder import read_metadata
from al.data.transforms import (
    TransformConfig,
    centre_crop_or_pad,
    crop_back,
    pad_to,
    random_crop_or_pad,
    resize_labels,
    resize_points,
    round_to_multiple,
    short_side_size,
)
from al.inference import View, size_groups
from al.loop import ActiveLearningLoop
from al.moments import MCMoments
from al.resume import identity
from al.train import TrainingCollate, evaluate
from guidedgen.generate import GenerateConfig, MaskFit
from guidedgen.writer import config_hash
from scripts.generate import main as generate_main

IGNORE = 255


# -- the arithmetic --------------------------------------------------------------------------------

def test_short_side_and_multiples():
    assert short_side_size(333, 500, 512) == (512, 769) and short_side_size(500, 375, 512) == (683, 512)
    assert short_side_size(360, 480, 360) == (360, 480)
    assert round_to_multiple((360, 480), 32) == (384, 480) and round_to_multiple((45, 67), 8, down=True) == (40, 64)
    assert round_to_multiple((5, 67), 8, down=True) == (8, 64)  # never below one multiple


def test_pad_crop_back_and_centre_crop_or_pad():
    x = torch.arange(45 * 67).view(1, 45, 67)
    padded = pad_to(x, (48, 72), IGNORE)
    assert padded.shape == (1, 48, 72) and (padded[:, 45:] == IGNORE).all() and (padded[:, :, 67:] == IGNORE).all()
    assert torch.equal(crop_back(padded, (45, 67)), x)  # pixels keep their coordinates
    fitted = centre_crop_or_pad(x, (40, 72), IGNORE)  # rows cropped, columns padded, both centred
    assert fitted.shape == (1, 40, 72)
    assert torch.equal(fitted[0, :, 2:69], x[0, 2:42]) and (fitted[0, :, :2] == IGNORE).all()


def test_nearest_labels_and_sparse_points():
    mask = torch.zeros(45, 67, dtype=torch.long)
    mask[10:30, 20:50] = 3
    assert set(resize_labels(mask, (90, 134)).unique().tolist()) == {0, 3}  # never a blend of classes
    target = torch.full((45, 67), IGNORE)
    points = [(0, 0, 1), (44, 66, 2), (10, 33, 3), (11, 33, 4)]
    for row, col, cls in points:
        target[row, col] = cls
    small = resize_points(target, (15, 22), IGNORE)
    # each labelled pixel lands where its centre falls (nearest resizing would keep few of them);
    # (10, 33) and (11, 33) share a pixel: the first in raster order wins
    assert {(r, c): int(small[r, c]) for r, c in (small != IGNORE).nonzero().tolist()} == {
        (0, 0): 1, (14, 21): 2, (3, 11): 3}
    assert int((resize_labels(target, (15, 22)) != IGNORE).sum()) < 3


def test_random_crop_pads_with_ignore_and_repeats_with_its_generator():
    image, target = torch.rand(3, 45, 67), torch.randint(0, 3, (45, 67))
    crops = [random_crop_or_pad(image, target, (48, 32), IGNORE, torch.Generator().manual_seed(1)) for _ in range(2)]
    (a_image, a_target), (b_image, b_target) = crops
    assert a_image.shape == (3, 48, 32) and a_target.shape == (48, 32)
    assert torch.equal(a_image, b_image) and torch.equal(a_target, b_target)
    assert (a_target[45:] == IGNORE).all() and (a_image[:, 45:] == 0).all() and (a_target[:45] != IGNORE).all()


def test_a_view_brings_maps_and_labels_back_to_the_original_pixels():
    view = View.of((45, 67), TransformConfig(short_side=32), multiple=16)
    assert (view.scaled, view.padded) == ((32, 48), (32, 48))
    view = View.of((45, 67), None, multiple=16)
    assert (view.scaled, view.padded) == ((45, 67), (48, 80)) and not view.is_identity
    assert View.of((64, 64), None, 16).is_identity
    images = torch.rand(2, 3, 45, 67)
    shown = view.images(images)
    assert shown.shape == (2, 3, 48, 80) and torch.equal(crop_back(shown, (45, 67)), images)
    probs = torch.rand(5, 2, 4, 48, 80).softmax(2)  # K x N x C: an ensemble's members
    back = Predictions(probs, torch.rand(2, 48, 80)).map(view.maps)
    assert back.probs.shape == (5, 2, 4, 45, 67) and back.difficulty.shape == (2, 45, 67)
    moments = Predictions(MCMoments.of(probs)).map(View.of((45, 67), TransformConfig(short_side=60), 16).maps)
    assert moments.probs.sum_p.shape == (2, 4, 45, 67) and (moments.probs.variance() >= 0).all()
    assert size_groups([(45, 67), (51, 67), (45, 67)]) == [[0, 2], [1]]


def test_training_batches_of_mixed_sizes_are_padded_and_fixed_sizes_untouched():
    items = [{"image": torch.rand(3, 45, 67), "target": torch.randint(0, 3, (45, 67)), "source": 0},
             {"image": torch.rand(3, 51, 60), "target": torch.randint(0, 3, (51, 60)), "source": 0}]
    batch = TrainingCollate(None, [False], IGNORE, multiple=8)(items)
    assert batch["image"].shape == (2, 3, 56, 72) and (batch["target"][0, 45:] == IGNORE).all()
    assert torch.equal(batch["target"][1, :51, :60], items[1]["target"])
    cropped = TrainingCollate(TransformConfig(short_side=40, crop_size=[32, 48]), [True], IGNORE, 8,
                              torch.Generator().manual_seed(0))(items)
    assert cropped["image"].shape == (2, 3, 32, 48)
    same = [{"image": torch.rand(3, 32, 32), "target": torch.randint(0, 3, (32, 32)), "source": 0} for _ in range(2)]
    plain = TrainingCollate(None, [False], IGNORE, 8)(same)
    assert torch.equal(plain["image"], torch.stack([i["image"] for i in same])) and plain["source"].tolist() == [0, 0]


def test_bad_transforms_are_explained():
    from al.config import ConfigError

    with pytest.raises(ConfigError, match="'data.transforms.crop_size'"):
        DataConfig(transforms=TransformConfig(crop_size=[32])).validate()
    with pytest.raises(ConfigError, match="'data.transforms.short_side'"):
        DataConfig(transforms=TransformConfig(short_side=0)).validate()
    with pytest.raises(ConfigError, match="'fit'"):
        GenerateConfig(fit="stretch").validate()


def test_default_transforms_leave_recorded_identities_as_they_were():
    """Run folders (data.json, the pipeline's identities) and generated sets (config_hash) recorded
    before transforms and mask fitting existed still match the default configs."""
    assert "transforms" not in identity(DataConfig()) and "transforms" not in identity({"data": DataConfig()})["data"]
    pinned = hashlib.sha256(json.dumps(identity({"data": DataConfig()}), sort_keys=True).encode()).hexdigest()[:16]
    assert pinned == "fb848e86616458ca"  # computed before the transforms existed
    custom = DataConfig(transforms=TransformConfig(short_side=40))
    assert identity(custom)["transforms"] == {"short_side": 40, "crop_size": None}
    assert DataConfig(**identity(custom)).transforms == custom.transforms  # how the annotation page rebuilds a pool
    assert config_hash(GenerateConfig().defining_config()) == "c432195716e2fc26"  # computed before mask fitting
    # masks.transforms are training's: they do not change the samples
    assert config_hash(GenerateConfig(masks=custom).defining_config()) == "c432195716e2fc26"
    assert config_hash(GenerateConfig(resolution=512).defining_config()) != "c432195716e2fc26"
    assert config_hash(GenerateConfig(fit="pad").defining_config()) != "c432195716e2fc26"


class ListDataset(SegmentationDataset):
    def __init__(self, masks, classes=("a", "b", "c")):
        self.classes, self.ignore_index, self.masks = list(classes), IGNORE, masks
        self.ids = [f"m{i}" for i in range(len(masks))]

    def __getitem__(self, index):  # the image's red channel tells the class
        mask = self.masks[index]
        image = np.repeat((np.where(mask == IGNORE, 0, mask) * 50).astype(np.uint8)[..., None], 3, axis=2)
        return to_sample(self.ids[index], image, mask)


class Strict(nn.Module):
    """Reads the class from the red channel; refuses sides that are no multiple of 8."""

    input_multiple = 8

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def predict(self, images):
        assert images.shape[-2] % 8 == 0 and images.shape[-1] % 8 == 0, images.shape
        return (images[:, 0] * 255 / 50).round().long()


def test_evaluation_pads_to_the_model_and_scores_the_original_pixels():
    rng = np.random.default_rng(0)
    masks = [np.kron(rng.integers(0, 3, (h // 3 + 1, w // 3 + 1)), np.ones((3, 3), np.int64))[:h, :w]
             for h, w in [(45, 67), (51, 67), (45, 67)]]
    masks[1][:5] = IGNORE
    assert evaluate(Strict(), ListDataset(masks), batch_size=3).miou == 1.0  # padding never reaches the score
    # at another scale the prediction comes back to the original pixels (nearest): close, not exact
    assert evaluate(Strict(), ListDataset(masks), transforms=TransformConfig(short_side=37)).miou > 0.6


def test_generation_fits_masks_to_the_components():
    fit = MaskFit(resolution=32, fit="crop", multiple=8, ignore_index=IGNORE)
    assert fit.size(51, 67) == (32, 40) and fit.size(67, 51) == (40, 32)  # 51x67 -> 32x42 -> cropped
    assert MaskFit(32, "pad", 8, IGNORE).size(51, 67) == (32, 48)
    sample = ListDataset([np.tile(np.arange(67) % 3, (51, 1))])[0]
    fitted = fit(sample)
    assert fitted.mask.shape == (32, 40) and fitted.image.shape == (3, 32, 40)
    assert torch.equal(fitted.mask, resize_labels(sample.mask, (32, 42))[:, 1:41])  # centred
    padded = MaskFit(32, "pad", 8, IGNORE)(sample).mask
    assert (padded[:, :3] == IGNORE).all() and (padded[:, -3:] == IGNORE).all() and (padded[:, 3:45] != IGNORE).all()
    assert MaskFit(None, "crop", 8, IGNORE)(ListDataset([np.zeros((64, 64), np.int64)])[0]).mask.shape == (64, 64)


# -- the readers' layouts, through the loop and generation -------------------------------------------

# Scaled down by about 7.5 (VOC 333x500 and 375x500, ADE20K portrait and landscape) and 8
# (CamVid 360x480): odd sides, no multiple of 8 or 16.
SIZES = {"voc": [(45, 67), (51, 67), (67, 45)], "camvid": [(45, 61), (45, 61), (45, 61)],
         "cityscapes": [(33, 65), (33, 65), (35, 63)], "ade20k": [(47, 63), (63, 47), (51, 67)]}
SPLITS = {"voc": ("train", "val"), "camvid": ("train", "val"), "cityscapes": ("train", "val"),
          "ade20k": ("training", "validation")}
# per layout: stored label values -> they stand for classes of the reader
STORED = {"voc": [0, 8, 15, 255], "camvid": [0, 3, 8, 11], "cityscapes": [7, 26, 24, 0], "ade20k": [1, 3, 13, 0]}


def write_tree(layout, root, seed=0):
    """A tiny tree of ``layout`` with both splits: random images, masks of blocks of a few labels."""
    rng = np.random.default_rng(seed)
    for split in SPLITS[layout]:
        names = []
        for i, (h, w) in enumerate(SIZES[layout]):
            name = f"{split}_{i:03d}"
            names.append(name)
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            blocks = rng.choice(STORED[layout], size=(h // 5 + 1, w // 5 + 1), p=[0.4, 0.25, 0.25, 0.1])
            mask = np.kron(blocks, np.ones((5, 5), np.int64))[:h, :w].astype(np.uint8)
            image_path, mask_path = {
                "voc": (root / "JPEGImages" / f"{name}.jpg", root / "SegmentationClass" / f"{name}.png"),
                "camvid": (root / split / f"{name}.png", root / f"{split}annot" / f"{name}.png"),
                "cityscapes": (root / "leftImg8bit" / split / "aachen" / f"{name}_leftImg8bit.png",
                               root / "gtFine" / split / "aachen" / f"{name}_gtFine_labelIds.png"),
                "ade20k": (root / "images" / split / f"{name}.jpg", root / "annotations" / split / f"{name}.png"),
            }[layout]
            for path in (image_path, mask_path):
                path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(image_path)
            Image.fromarray(mask).save(mask_path)
        if layout == "voc":
            (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
            (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    train_split, val_split = SPLITS[layout]
    return DataConfig(kind=layout, root=str(root), train_split=train_split, val_split=val_split)


@pytest.mark.parametrize("layout,transforms", [
    ("voc", TransformConfig()),  # whole images: batches padded to their largest, ignore in the padding
    ("voc", TransformConfig(short_side=40, crop_size=[32, 32])),
    ("camvid", TransformConfig(crop_size=[40, 48])),
    ("cityscapes", TransformConfig(short_side=24)),
    ("ade20k", TransformConfig(short_side=40, crop_size=[40, 40])),
])
def test_the_loop_runs_on_images_of_any_size_and_labels_their_own_pixels(tmp_path, monkeypatch, layout, transforms):
    from al.models import Segmenter

    seen, features = [], Segmenter.features

    def recorded(self, images):
        seen.append(tuple(images.shape[-2:]))
        return features(self, images)

    monkeypatch.setattr(Segmenter, "features", recorded)
    data = write_tree(layout, tmp_path / layout)
    train, val = data.build(data.train_split), data.build(data.val_split)
    assert len({tuple(s) for s in train.image_shapes().values()}) == len(set(SIZES[layout]))
    config = tiny_loop_config(cycles=1, pixels_per_image=4, mc_samples=2, inference_batch_size=2)
    loop = ActiveLearningLoop(config, "entropy", 0, train, val, tmp_path / "run", progress=False, transforms=transforms)
    records = loop.run()
    assert [r.cycle for r in records] == [0, 1] and all(0.0 <= r.miou <= 1.0 for r in records)
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in seen)  # every batch padded to the encoder's stride
    if transforms.crop_size:
        assert tuple(transforms.crop_size) in seen
    assert records[0].labelled_percent == pytest.approx(100 * 4 * 3 / sum(h * w for h, w in SIZES[layout]))
    for image_id, (height, width) in train.image_shapes().items():
        mask = train[train.index_of(image_id)].mask
        assert mask.shape == (height, width)
        queried = loop.labels.queried(image_id, "initial") + loop.labels.queried(image_id, "cycle0")
        assert len(set(queried)) == 8  # 4 initial + 4 acquired, on the image's own pixels
        # every label is the ground truth at its pixel as read: the journal never saw a resized one
        assert all(mask[r, c] == cls for (r, c), cls in loop.labels.pixels(image_id).items())


def test_image_level_scores_over_images_of_any_size(tmp_path):
    """DEAL's image-level rule ranks images of several sizes (scored per size group, matched by id)."""
    data = write_tree("voc", tmp_path / "voc")
    train, val = data.build(data.train_split), data.build(data.val_split)
    config = tiny_loop_config(cycles=1, pixels_per_image=2, mc_samples=2, inference_batch_size=3)
    config.deal.pool_fraction, config.deal.image_share = 1.0, 0.5
    loop = ActiveLearningLoop(config, "deal_ds", 0, train, val, tmp_path / "run", progress=False,
                              transforms=TransformConfig(short_side=32))
    loop.run()
    assert 1 <= len(loop.labels.query_images("cycle0")) <= 2


def test_an_experiment_on_images_of_any_size_records_its_transforms(tmp_path, capsys):
    """The CLI end to end on VOC-like sizes: the dense reference, the uncertainty maps (one row per
    image, each at its size) and the run's data record, which names the transforms."""
    from conftest import tiny_experiment_overrides

    from scripts.active_learning import main as cli_main

    data = write_tree("voc", tmp_path / "voc")
    args = [*tiny_experiment_overrides(tmp_path / "out"), "acquisitions=[entropy]", "uncertainty_map_images=3",
            "data.kind=voc", f"data.root={data.root}", "loop.train.batch_size=2", "data.transforms.short_side=40"]
    assert cli_main(["--config", "configs/al_digits.yaml", *args]) == 0
    recorded = json.loads((tmp_path / "out" / "runs" / "entropy" / "seed_0" / "data.json").read_text())
    assert recorded["transforms"] == {"short_side": 40, "crop_size": None}
    assert (tmp_path / "out" / "uncertainty_maps.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "supervised" / "seed_0.json").read_text())["miou"] >= 0
    assert cli_main(["--config", "configs/al_digits.yaml", *args[:-1], "data.transforms.short_side=48"]) == 2
    assert "data.transforms.short_side: 40 there, 48 now" in capsys.readouterr().err


def generate(tmp_path, data, **settings):
    values = {"output_dir": tmp_path / "out", "tiny_components": "true", "num_inference_steps": 2, "num_samples": 3,
              "batch_size": 2, "progress": "false", "guidance.strength": 0, "guidance.segmenters": "[]",
              "contact_sheet_samples": 0, "masks.kind": data.kind, "masks.root": data.root,
              "masks_split": data.train_split, "masks.train_split": data.train_split,
              "masks.val_split": data.val_split, **settings}
    return generate_main(["--config", "configs/demo.yaml", *[f"{k}={v}" for k, v in values.items()]])


@pytest.mark.filterwarnings("ignore:palette colours too close")  # ADE20K's own palette has near-twins
@pytest.mark.parametrize("layout,settings,sizes", [
    # short side 32 (tiny components take multiples of 8), the long side cropped or padded
    ("voc", {"resolution": 32, "fit": "crop"}, [(32, 48), (32, 40), (48, 32)]),  # 45x67 -> 32x48; 51x67 -> 32x42
    ("camvid", {"resolution": 32, "fit": "pad"}, [(32, 48)] * 3),  # 45x61 -> 32x43 -> 32x48
    ("cityscapes", {"resolution": 32, "fit": "crop"}, [(32, 56)] * 3),
    ("ade20k", {"resolution": 32, "fit": "pad", "palette.ade20k_mapping": "{}"}, [(32, 48), (48, 32), (32, 48)]),
    ("camvid", {}, [(40, 56)] * 3),  # masks as read, cropped to a multiple of 8
])
def test_generation_from_masks_of_any_size(tmp_path, layout, settings, sizes):
    data = write_tree(layout, tmp_path / layout)
    assert generate(tmp_path, data, **settings) == 0
    written = load_folder(tmp_path / "out")
    assert len(written) == 3
    for record in read_metadata(tmp_path / "out"):
        sample, source = written[written.index_of(record["id"])], SIZES[layout][record["index"] % 3]
        assert tuple(sample.mask.shape) == sizes[record["index"] % 3] and tuple(record["source_size"]) == source
        assert sample.image.shape[1:] == sample.mask.shape  # the mask at the size of the image
        if settings.get("fit") == "pad":  # the padding is unlabelled
            assert (sample.mask[:, :2] == IGNORE).all() or (sample.mask[:2] == IGNORE).all()


def test_instance_mode_and_the_contact_sheet_on_images_of_any_size(tmp_path):
    """Instance mode writes the real images' sizes: the quality check pads them for its segmenter,
    and the contact sheet shows the first samples of one size."""
    data = write_tree("voc", tmp_path / "voc")
    guide = tmp_path / "guide"
    tiny_model_config().build(21).save_pretrained(guide)
    settings = {"instances.size": 32, "instances.min_area": 20, "instances.max_per_image": 1,
                "instances.inpaint_dilation": 3, "instances.blend_dilation": 3, "instances.blend_blur": 3,
                "guidance.segmenters": f"[{guide}]", "contact_sheet_samples": 2, "num_samples": 3}
    assert generate(tmp_path, data, **settings) == 0
    written = load_folder(tmp_path / "out")
    shapes = {tuple(written[i].mask.shape) for i in range(len(written))}
    assert shapes <= set(SIZES["voc"]) and len(shapes) > 1
    assert all(r["quality"]["mask_miou"] >= 0 for r in read_metadata(tmp_path / "out"))
    assert (tmp_path / "out" / "contact_sheet.png").stat().st_size > 1000
