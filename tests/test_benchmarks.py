"""Pure helpers of the hand-run benchmarks."""

import pytest
import torch

from benchmarks.mask_fidelity import object_errors


def test_object_errors_split_wrong_object_pixels_into_missed_and_misread():
    masks = torch.tensor([[0, 3, 3, 3, 7, 255, 0, 0]])
    prediction = torch.tensor([[4, 0, 5, 3, 7, 0, 0, 2]])  # background errors and ignored pixels do not count
    errors = object_errors(prediction, masks, background=0)
    assert errors == pytest.approx({"missed": 1 / 4, "misread": 1 / 4})
    assert object_errors(masks.clamp(max=9), masks) == {"missed": 0.0, "misread": 0.0}
    # another dataset's ignore value: 7 is ignored, and 255 is an object the judge missed
    assert object_errors(prediction, masks, background=0, ignore_index=7) == pytest.approx({"missed": 2 / 4, "misread": 1 / 4})
