"""Data: DigitScenes determinism and exact labels; the project layout round trip; standard
layouts from tiny fixture trees; clear errors for bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from al.data import (
    DIGIT_CLASSES,
    ArrayDataset,
    DatasetError,
    DatasetWriter,
    DigitScenesConfig,
    ade20k,
    camvid,
    cityscapes,
    digit_scenes,
    load_folder,
    voc,
)
from al.data.digitscenes import _digit_scans, _split_indices, render_scene
from al.data.standard import ADE20K_CLASSES, CITYSCAPES_CLASSES

SMALL = dict(size=32, min_digit_size=14, max_digit_size=20)


def test_digitscenes_is_deterministic_and_prefix_stable():
    a = digit_scenes(DigitScenesConfig(num_images=3, **SMALL))
    b = digit_scenes(DigitScenesConfig(num_images=5, **SMALL))
    np.testing.assert_array_equal(a.images, b.images[:3])
    np.testing.assert_array_equal(a.masks, b.masks[:3])
    c = digit_scenes(DigitScenesConfig(num_images=3, seed=1, **SMALL))
    assert not np.array_equal(a.images, c.images)


def test_digitscenes_labels_come_from_the_strokes():
    config = DigitScenesConfig(num_images=1, size=64, min_digits=1, max_digits=1)
    image, mask = render_scene(config, 0)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    classes = set(np.unique(mask).tolist())
    assert classes - {0} and classes <= set(range(11))
    digit = mask > 0
    # stroke pixels differ from the background around them: the label marks what is drawn
    background = image[~digit].astype(float).mean(0)
    assert np.abs(image[digit].astype(float).mean(0) - background).sum() > 30


def test_digitscenes_splits_use_disjoint_scans_and_all_classes():
    every = tuple(range(10))
    train, val = set(_split_indices("train", every).tolist()), set(_split_indices("val", every).tolist())
    assert not train & val and len(train | val) == len(_digit_scans()[1])
    dataset = digit_scenes(DigitScenesConfig(num_images=40))
    assert set(np.unique(dataset.masks).tolist()) == set(range(11))
    assert dataset.classes == DIGIT_CLASSES


def test_digitscenes_digit_subset_relabels_to_consecutive_classes():
    """The fewer-classes variant: only the chosen digits are drawn, as classes 1..len(digits)."""
    config = DigitScenesConfig(num_images=30, digits=(3, 5, 8), min_digits=1, max_digits=1)
    dataset = digit_scenes(config)
    assert dataset.classes == ["background", "three", "five", "eight"]
    assert set(np.unique(dataset.masks).tolist()) == {0, 1, 2, 3}
    scans, targets = _digit_scans()
    assert set(targets[_split_indices("train", config.digits)].tolist()) == {3, 5, 8}


@pytest.mark.parametrize("bad, message", [(dict(digits=(3, 3)), "distinct values in 0-9"),
                                          (dict(digits=(10,)), "distinct values in 0-9"),
                                          (dict(min_digits=3, max_digits=2), "min_digits <= max_digits"),
                                          (dict(min_digit_size=30, max_digit_size=20), "min_digit_size <= max_digit_size")])
def test_digitscenes_bad_variant_is_explained(bad, message):
    with pytest.raises(DatasetError, match=message):
        digit_scenes(DigitScenesConfig(num_images=1, **bad))


def test_digitscenes_bad_config_is_explained():
    with pytest.raises(DatasetError, match="split 'dev' is unknown"):
        digit_scenes(DigitScenesConfig(split="dev"))


def write_pair(image_path, mask_path, mask, size=(8, 6), mode="L"):
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(image_path)
    stored = Image.fromarray(mask.astype(np.uint8))
    if mode == "P":  # palette PNG as VOC ships it: the indices are the class ids
        stored.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tobytes())
        assert stored.mode == "P"
    stored.save(mask_path)


def test_folder_writer_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    writer = DatasetWriter(tmp_path, ["bg", "a", "b"], ignore_index=255)
    images = rng.integers(0, 256, (3, 6, 8, 3), dtype=np.uint8)
    masks = rng.integers(0, 3, (3, 6, 8)).astype(np.uint8)
    ignore = np.zeros((6, 8), bool)
    ignore[0, 0] = True
    for i in range(3):
        writer.write(f"s{i}", images[i], masks[i], ignore=ignore if i == 1 else None, metadata={"seed": i})
    writer.write("s0", images[0], masks[0])  # already done: skipped
    dataset = load_folder(tmp_path)
    assert dataset.ids == ["s0", "s1", "s2"]
    sample = dataset[1]
    np.testing.assert_array_equal((sample.image.permute(1, 2, 0).numpy() * 255).round(), images[1])
    assert sample.mask[0, 0] == 255 and sample.mask[0, 1] == masks[1][0, 1]
    lines = (tmp_path / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["seed"] == 2
    assert not list(tmp_path.rglob(".*tmp*"))  # nothing half-written left behind


def test_folder_reader_counts_only_samples_with_metadata_and_skips_a_torn_line(tmp_path):
    writer = DatasetWriter(tmp_path, ["bg", "a"])
    for i in range(2):
        writer.write(f"s{i}", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "masks" / "orphan.png")  # killed before metadata
    with open(tmp_path / "metadata.jsonl", "ab") as handle:
        handle.write(b'{"id": "s9", "ima')
    assert load_folder(tmp_path).ids == ["s0", "s1"]
    assert DatasetWriter(tmp_path, ["bg", "a"]).done_ids() == {"s0", "s1"}


def test_writer_refuses_a_folder_of_another_dataset(tmp_path):
    DatasetWriter(tmp_path, ["bg", "a"])
    with pytest.raises(DatasetError, match="describes a different dataset"):
        DatasetWriter(tmp_path, ["bg", "a", "b"])


@pytest.mark.parametrize("problem,match", [
    ("bad_value", r"values \[7\] that are not class ids"),
    ("size", "image is 8x6 but mask is 5x5"),
    ("unreadable", "cannot read image"),
    ("rgb_mask", "mask has mode 'RGB'"),
])
def test_bad_files_are_explained_with_their_name(tmp_path, problem, match):
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": ["bg", "a", "b"], "ignore_index": 255}))
    mask = np.zeros((6, 8))
    mask[0, 0] = 7 if problem == "bad_value" else 0
    if problem == "size":
        mask = np.zeros((5, 5))
    write_pair(tmp_path / "images" / "x.png", tmp_path / "masks" / "x.png", mask)
    if problem == "unreadable":
        (tmp_path / "images" / "x.png").write_bytes(b"not a png")
    if problem == "rgb_mask":
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "masks" / "x.png")
    with pytest.raises(DatasetError, match=match) as error:
        load_folder(tmp_path)[0]
    assert "x.png" in str(error.value)


def test_empty_and_unconfigured_folders_are_explained(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json is missing"):
        load_folder(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"classes": ["bg"]}))
    with pytest.raises(DatasetError, match="dataset is empty"):
        load_folder(tmp_path)
    with pytest.raises(DatasetError, match="no images"):
        ArrayDataset(np.zeros((0, 4, 4, 3), np.uint8), np.zeros((0, 4, 4)), ["bg"], [])


def test_voc_layout(tmp_path):
    root = tmp_path / "VOC2012"
    mask = np.zeros((6, 8)); mask[0, :3] = 15; mask[5, 7] = 255
    write_pair(root / "JPEGImages" / "2007_000001.jpg", root / "SegmentationClass" / "2007_000001.png", mask, mode="P")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n")
    sample = voc(root, "train")[0]
    assert sample.id == "2007_000001" and sample.mask[0, 0] == 15 and sample.mask[5, 7] == 255
    with pytest.raises(DatasetError, match="split list not found"):
        voc(root, "test")


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    mask = np.zeros((6, 8)); mask[0, 0] = 7; mask[0, 1] = 26; mask[0, 2] = 33; mask[0, 3] = 4
    write_pair(tmp_path / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
               tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png", mask)
    dataset = cityscapes(tmp_path, "train")
    sample = dataset[0]
    assert sample.id == "aachen_000000_000019" and len(dataset.classes) == 19
    assert sample.mask[0, :4].tolist() == [0, 13, 18, 255] and sample.mask[1, 1] == 255  # 0 = unlabeled
    assert CITYSCAPES_CLASSES[13] == "car"
    mask[2, 2] = 40
    write_pair(tmp_path / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
               tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png", mask)
    with pytest.raises(DatasetError, match=r"labelIds.png: mask values \[40\]"):
        dataset[0]


def test_camvid_void_is_ignored(tmp_path):
    mask = np.zeros((6, 8)); mask[0, 0] = 11; mask[0, 1] = 8
    write_pair(tmp_path / "val" / "0001TP_008550.png", tmp_path / "valannot" / "0001TP_008550.png", mask)
    sample = camvid(tmp_path, "val")[0]
    assert sample.mask[0, 0] == 255 and sample.mask[0, 1] == 8 and sample.mask[1, 1] == 0


def test_ade20k_shifts_classes_and_ignores_other(tmp_path):
    mask = np.zeros((6, 8)); mask[0, 0] = 1; mask[0, 1] = 150
    write_pair(tmp_path / "images/training/ADE_train_00000001.jpg",
               tmp_path / "annotations/training/ADE_train_00000001.png", mask)
    dataset = ade20k(tmp_path, "training")
    sample = dataset[0]
    assert len(ADE20K_CLASSES) == 150 == dataset.num_classes
    assert sample.mask[0, 0] == 0 and sample.mask[0, 1] == 149 and sample.mask[1, 1] == 255
    with pytest.raises(DatasetError, match="folder not found"):
        ade20k(tmp_path, "validation")
