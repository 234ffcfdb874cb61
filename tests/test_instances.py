"""Instance-level augmentation: which instances, the crop, the reference's alpha, the composite,
the guided region, and instance mode end to end through scripts/generate.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.measure import label
from test_diffusers_parity import PALETTE, PROMPTS, SEEDS

from al.data import ArrayDataset
from al.data.folder import load_folder, read_metadata
from guidedgen.components import tiny_components
from guidedgen.guidance import build_objective
from guidedgen.instances import (
    InstanceConfig,
    blend_alpha,
    components,
    crop_box,
    find_instances,
    make_crop,
    paste,
)
from guidedgen.sampler import GuidedControlNetSampler, KnownRegion
from guidedgen.schedule import GuidanceSchedule
from scripts.generate import main as generate_main

ROOT = Path(__file__).resolve().parents[1]

# OpenCV's 5x5 MORPH_ELLIPSE, written out (the reference's kernel)
ELLIPSE5 = np.array([[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], bool)


def scene(size=48):
    """A mask with two blobs of class 1 (one diagonal-connected pair of squares), one of class 2."""
    mask = np.zeros((size, size), np.int64)
    mask[4:10, 4:10] = 1
    mask[10:14, 10:14] = 1  # touches the first only at a corner: 8-connected, one component
    mask[30:40, 20:44] = 2
    mask[40:42, 2:4] = 1  # 4 pixels
    return mask


def test_components_are_the_8_connected_components_largest_first():
    mask = scene()
    found = components(mask, [1, 2], min_area=1, max_count=10)
    # the independent count: scikit-image's labelling at full connectivity, per class
    expected = sorted(((label(mask == c, connectivity=2) == k).sum(), c) for c in (1, 2)
                      for k in range(1, label(mask == c, connectivity=2).max() + 1))[::-1]
    assert [(int(m.sum()), c) for c, m in found] == [(int(a), c) for a, c in expected] == [(240, 2), (52, 1), (4, 1)]
    assert [c for c, _ in components(mask, [1, 2], min_area=5, max_count=10)] == [2, 1]
    assert [c for c, _ in components(mask, [1, 2], min_area=1, max_count=1)] == [2]
    assert components(mask, [1], min_area=1, max_count=10)[0][1][12, 12]


def test_find_instances_draws_each_instance_independently_of_the_others():
    masks = np.stack([scene(), scene()[::-1].copy(), np.zeros((48, 48), np.int64)])
    dataset = ArrayDataset(np.zeros((3, 48, 48, 3), np.uint8), masks, ["background", "one", "two"], ["a", "b", "c"])
    every = find_instances(dataset, InstanceConfig(min_area=5), seed=0)
    assert [(u.source_index, u.rank, u.class_id, u.area) for u in every] == [(0, 0, 2, 240), (0, 1, 1, 52),
                                                                            (1, 0, 2, 240), (1, 1, 1, 52)]
    half = find_instances(dataset, InstanceConfig(min_area=5, probability=0.5), seed=0)
    assert set(half) <= set(every)
    # a draw is a function of (seed, image, rank): the first image's draws do not change with the others
    alone = find_instances(ArrayDataset(np.zeros((1, 48, 48, 3), np.uint8), masks[:1], ["background", "one", "two"], ["a"]),
                           InstanceConfig(min_area=5, probability=0.5), seed=0)
    assert alone == [u for u in half if u.source_index == 0]
    assert [u.class_id for u in find_instances(dataset, InstanceConfig(min_area=5, classes=["one"]), 0)] == [1, 1]
    with pytest.raises(ValueError, match="instances.classes"):
        find_instances(dataset, InstanceConfig(classes=["seven"]), 0)


@pytest.mark.parametrize("top,left,height,width", [(20, 20, 6, 10), (0, 0, 5, 5), (40, 50, 8, 12), (10, 2, 30, 4)])
def test_crop_box_is_the_grown_square_shifted_into_the_image(top, left, height, width):
    instance = np.zeros((60, 64), bool)
    instance[top:top + height, left:left + width] = True
    crop_top, crop_left, side = crop_box(instance, 0.9)
    assert side == min(round(max(height, width) * 2.8), 60)
    assert 0 <= crop_top <= 60 - side and 0 <= crop_left <= 64 - side
    assert crop_top <= top and top + height <= crop_top + side  # the instance is inside
    assert crop_left <= left and left + width <= crop_left + side
    if side <= min(top, left, 60 - top - height, 64 - left - width) * 2:  # room on every side: centred
        assert abs((crop_top + side / 2) - (top + height / 2)) <= 1 and abs((crop_left + side / 2) - (left + width / 2)) <= 1


def test_blend_alpha_is_the_reference_5x5_ellipse_dilation_then_5x5_gaussian():
    instance = scene() == 2
    instance[0, 0] = True  # at the border: the blur's border rule shows
    dilated = ndimage.binary_dilation(instance, structure=ELLIPSE5).astype(np.float64)
    kernel = np.array([1, 4, 6, 4, 1]) / 16  # OpenCV's fixed 5-tap Gaussian (sigma from the size)
    # OpenCV's default border, BORDER_REFLECT_101, is scipy's "mirror"
    expected = ndimage.convolve1d(ndimage.convolve1d(dilated, kernel, axis=0, mode="mirror"), kernel, axis=1, mode="mirror")
    alpha = blend_alpha(instance, 5, 5)
    assert alpha.dtype == np.float32
    np.testing.assert_allclose(alpha, expected, atol=2 * np.finfo(np.float32).eps)
    assert (alpha[instance] > 0.5).all() and alpha.max() == 1.0


def test_paste_keeps_every_pixel_outside_the_alpha_and_puts_the_generated_crop_inside():
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 48, 48), generator=generator).float() / 255
    mask = torch.from_numpy(scene())
    instance = mask.numpy() == 1
    instance[30:] = False  # the first blob only
    config = InstanceConfig(size=32, inpaint_dilation=3)
    crop = make_crop(image, mask, instance, config)
    assert crop.box == (0, 0, round(10 * 2.8))  # the 10 px blob grown, shifted to the corner
    assert crop.image.shape == (3, 32, 32) and crop.mask.shape == crop.regenerate.shape == (32, 32)
    assert set(crop.mask.unique().tolist()) <= {0, 1, 2} and crop.regenerate.sum() > crop.mask.eq(1).sum()
    white = torch.ones(3, 32, 32)
    pasted = paste(image, white, instance, crop.box, config)
    alpha = blend_alpha(instance, config.blend_dilation, config.blend_blur)
    assert torch.equal(pasted[:, alpha == 0], image[:, alpha == 0])  # bit for bit
    assert torch.allclose(pasted[:, alpha == 1], torch.ones_like(pasted[:, alpha == 1]))
    middle = (alpha > 0) & (alpha < 1)
    expected = torch.from_numpy(alpha[middle]) + (1 - torch.from_numpy(alpha[middle])) * image[:, middle]
    assert torch.allclose(pasted[:, middle], expected, atol=1e-6)


@pytest.mark.slow
def test_guidance_moves_only_the_region_with_a_whole_image_step_size(guiding_segmenters, digit_masks_32):
    """The update is zero on the known latents and has RMS strength x noise level over the region
    (not over the whole latent, which would scale a small object's step up)."""
    masks = digit_masks_32[0][:len(PROMPTS)]
    sampler = GuidedControlNetSampler(tiny_components(seed=0), PALETTE, build_objective("entropy", guiding_segmenters),
                                      GuidanceSchedule(strength=0.3), num_inference_steps=4, guidance_scale=2.0)
    images = torch.rand(len(masks), 3, 32, 32, generator=torch.Generator().manual_seed(2))
    regenerate = torch.zeros(len(masks), 32, 32, dtype=torch.bool)
    regenerate[:, 8:24, 4:20] = True
    run = sampler.prepare(masks, PROMPTS, SEEDS, known=KnownRegion(images, regenerate, 1.0))
    step = sampler.guidance_step(run, 0)
    region = run.region.expand_as(step.update).bool()
    assert region.float().mean() == pytest.approx(0.25) and torch.equal(step.update[~region], torch.zeros_like(step.update[~region]))
    noise_level = float((1 - sampler.components.scheduler.alphas_cumprod[int(run.timesteps[0])]).sqrt())
    rms = torch.stack([u[r].square().mean().sqrt() for u, r in zip(step.update, region)])
    assert torch.allclose(rms, torch.full_like(rms, 0.3 * noise_level), rtol=1e-5)
    assert (run.objective_masks[~regenerate] == PALETTE.ignore_index).all()  # the objective reads the region only


@pytest.mark.slow
def test_instance_mode_writes_real_images_with_one_instance_regenerated(tmp_path, guiding_segmenters):
    segmenter = tmp_path / "segmenter"
    guiding_segmenters[0].save_pretrained(segmenter)
    args = ["--config", str(ROOT / "configs/demo.yaml"), f"output_dir={tmp_path / 'out'}", f"guidance.segmenters=[{segmenter}]",
            "num_inference_steps=3", "batch_size=3", "masks.size=32", "masks.num_train_images=3", "masks_split=train",
            "masks.min_digit_size=14", "masks.max_digit_size=20", "progress=false", "contact_sheet_samples=2",
            "contact_sheet_file=sheet.png",
            "guidance.strength=0.1", "tiny_components=true",
            "instances={size: 32, min_area: 10, inpaint_dilation: 3, blend_dilation: 3, blend_blur: 3, strength: 0.75}"]
    from al.data.config import DataConfig

    source = DataConfig(num_train_images=3, size=32, min_digit_size=14, max_digit_size=20).build("train")
    units = find_instances(source, InstanceConfig(size=32, min_area=10), seed=0)
    assert len(units) >= 3
    assert generate_main([*args, f"num_samples={len(units) + 1}"]) == 0
    written = load_folder(tmp_path / "out")
    records = read_metadata(tmp_path / "out")
    assert len(written) == len(units) + 1
    for sample, record, unit in zip(written, records, units + units[:1]):
        real = source[unit.source_index]
        assert record["source_id"] == real.id and record["instance"]["rank"] == unit.rank
        assert torch.equal(sample.mask, real.mask)  # the real mask labels the augmented image
        instance = components(real.mask.numpy(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 10, 10)[unit.rank][1]
        outside = blend_alpha(instance, 3, 3) == 0
        as_uint8 = lambda x: (x * 255).round().to(torch.uint8)
        assert torch.equal(as_uint8(sample.image)[:, outside], as_uint8(real.image)[:, outside])  # the rest stays real
        assert not torch.equal(as_uint8(sample.image)[:, instance], as_uint8(real.image)[:, instance])
    assert [r["instance"]["variant"] for r in records] == [0] * len(units) + [1]
    assert records[-1]["seed"] != records[0]["seed"]  # a second variant of the first instance, other noise
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["generator"]["config"]["instances"]["strength"] == 0.75
    assert (tmp_path / "out" / "sheet.png").stat().st_size > 0  # real | mask | unguided | guided | entropy


def test_instance_mode_explains_an_empty_selection_and_bad_settings(tmp_path, capsys):
    base = ["--config", str(ROOT / "configs/demo.yaml"), f"output_dir={tmp_path}", "tiny_components=true",
            "guidance.strength=0", "guidance.segmenters=[]", "masks.size=32", "masks.num_train_images=2",
            "masks_split=train"]
    assert generate_main([*base, "instances={size: 32, min_area: 5000}"]) == 2
    assert "instances.min_area=5000" in capsys.readouterr().err
    assert generate_main([*base, "instances={size: 32, blend_blur: 4}"]) == 2
    assert "instances.blend_blur" in capsys.readouterr().err
    assert generate_main([*base, "instances={size: 32, classes: [dragon]}"]) == 2
    assert "instances.classes" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written
