import pytest
import torch

from al.select import SELECTION_RULES, NotEnoughPixelsError, pixelpick, top_n


def test_top_n_takes_the_largest_available_scores():
    scores = torch.arange(16.0).reshape(4, 4)
    available = torch.ones(4, 4, dtype=torch.bool)
    available[3, 3] = available[3, 2] = False  # the two best are already labelled
    picked = top_n(scores, available, 3)
    assert {tuple(p) for p in picked.tolist()} == {(3, 1), (3, 0), (2, 3)}


def test_nan_scores_rank_last():
    scores = torch.tensor([[float("nan"), 0.1], [0.2, -5.0]])
    picked = top_n(scores, torch.ones(2, 2, dtype=torch.bool), 3)
    assert (0, 0) not in {tuple(p) for p in picked.tolist()}


@pytest.mark.parametrize("name", sorted(SELECTION_RULES))
def test_rules_never_pick_unavailable_pixels_and_return_n_distinct(name):
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(20, 20, generator=generator)
    available = torch.rand(20, 20, generator=generator) > 0.5
    picked = SELECTION_RULES[name](scores, available, 10, generator)
    assert picked.shape == (10, 2)
    assert len({tuple(p) for p in picked.tolist()}) == 10
    assert available[picked[:, 0], picked[:, 1]].all()


def test_pixelpick_draws_from_the_top_five_percent():
    scores = torch.arange(400.0).reshape(20, 20)  # top 5% of 400 = values >= 380
    available = torch.ones(20, 20, dtype=torch.bool)
    seen = set()
    for seed in range(30):
        picked = pixelpick(scores, available, 5, torch.Generator().manual_seed(seed))
        values = scores[picked[:, 0], picked[:, 1]]
        assert (values >= 380).all()
        seen.update(values.tolist())
    assert len(seen) == 20  # uniform draw covers the whole top 5%, not only the top 5


def test_pixelpick_is_reproducible_with_a_generator():
    scores = torch.rand(10, 10, generator=torch.Generator().manual_seed(1))
    available = torch.ones(10, 10, dtype=torch.bool)
    a = pixelpick(scores, available, 3, torch.Generator().manual_seed(5))
    b = pixelpick(scores, available, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_asking_for_more_pixels_than_unlabelled_is_explained():
    available = torch.zeros(4, 4, dtype=torch.bool)
    available[0, :2] = True
    with pytest.raises(NotEnoughPixelsError, match="only 2 are unlabelled"):
        top_n(torch.rand(4, 4), available, 3)


def test_unknown_rule_lists_valid_names():
    with pytest.raises(KeyError, match="pixelpick"):
        SELECTION_RULES.lookup("top-n")
