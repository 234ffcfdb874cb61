"""Pure helpers of the hand-run benchmarks."""

import pytest
import torch

from benchmarks.guidance_overhead import Variant, guidance_for, next_multiplier, relative_view_error
from benchmarks.mask_fidelity import object_errors
from guidedgen.generate import GuidanceConfig


def test_object_errors_split_wrong_object_pixels_into_missed_and_misread():
    masks = torch.tensor([[0, 3, 3, 3, 7, 255, 0, 0]])
    prediction = torch.tensor([[4, 0, 5, 3, 7, 0, 0, 2]])  # background errors and ignored pixels do not count
    errors = object_errors(prediction, masks, background=0)
    assert errors == pytest.approx({"missed": 1 / 4, "misread": 1 / 4})
    assert object_errors(masks.clamp(max=9), masks) == {"missed": 0.0, "misread": 0.0}
    # another dataset's ignore value: 7 is ignored, and 255 is an object the judge missed
    assert object_errors(prediction, masks, background=0, ignore_index=7) == pytest.approx({"missed": 2 / 4, "misread": 1 / 4})


def test_the_judge_loads_with_its_record_or_says_how_to_make_it(tmp_path):
    import json

    from al.data.base import DatasetError
    from al.models import build_segmenter
    from guidedgen.quality import load_judge

    with pytest.raises(FileNotFoundError, match="train_segmenter.py --config configs/segmenter_judge.yaml"):
        load_judge(tmp_path)
    build_segmenter("unet", "tu-resnet10t", 3, encoder_depth=3, decoder_channels=(16, 8, 8)).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing training.json"):
        load_judge(tmp_path)
    (tmp_path / "training.json").write_text('{"val_miou": ')
    with pytest.raises(DatasetError, match=f"{tmp_path / 'training.json'} is not valid JSON"):
        load_judge(tmp_path)
    (tmp_path / "training.json").write_text(json.dumps({"val_miou": 0.5}))
    judge, record = load_judge(tmp_path)
    assert record["val_miou"] == 0.5 and not judge.training


def test_guidance_variants_scale_strength_with_every_and_view_error_vanishes_for_linear_decoders():
    guidance = guidance_for(GuidanceConfig(strength=0.1), Variant({"every": 2, "decode_downsample": 2}, 0.5))
    assert (guidance.every, guidance.decode_downsample, guidance.strength) == (2, 2, pytest.approx(0.1))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mix = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    linear = lambda z: torch.einsum("ck,nkhw->nchw", mix, z)  # commutes with block averaging
    assert relative_view_error(linear, latents, 2) < 1e-6
    assert relative_view_error(lambda z: linear(z).square(), latents, 2) > 0.1


def test_strength_calibration_solves_a_proportional_rise_then_interpolates_a_bracket():
    rise = lambda multiplier: 0.3 * multiplier  # a variant whose rise is proportional to strength
    assert rise(next_multiplier([(1.0, rise(1.0))], target=0.75)) == pytest.approx(0.75)
    assert next_multiplier([(2.0, 0.01)], target=1.0) == pytest.approx(8.0)  # at most 4x per step
    assert next_multiplier([(2.0, 10.0)], target=1.0) == pytest.approx(0.5)
    assert next_multiplier([(2.0, -0.1)], target=1.0) == pytest.approx(8.0)  # no rise: push harder
    # a rise that peaks: once bracketed, interpolate within the lowest straddling pair
    tried = [(1.0, 0.5), (4.0, 0.7), (2.0, 1.5)]
    assert next_multiplier(tried, target=1.0) == pytest.approx(1.5)
    assert next_multiplier([(1.0, 0.5), (2.0, 0.5)], target=1.0) == pytest.approx(4.0)  # no bracket: proportional
