"""Issue 5 in the loop: DEAL's acquisitions (difficulty branch trained beside the segmenter,
image- and pixel-level rules), the diffusion-feature ensemble as the loop's model, and the
ensemble as a guidance committee."""

import copy

import pytest
import torch
from conftest import tiny_loop_config

from al.acquisition import ACQUISITIONS, Predictions, all_acquisitions, get_acquisition, pool_predictions
from al.config import ConfigError, load_config
from al.deal import difficulty_entropy, difficulty_loss, difficulty_sum
from al.diffusion_features import (
    DiffusionFeaturesConfig,
    DiffusionFeatureSegmenter,
    FeatureConfig,
    majority_vote,
)
from al.experiment import ExperimentConfig
from al.loop import ActiveLearningLoop
from al.loop_config import DealConfig
from al.models import Segmenter, load_model
from al.scores import SCORES, entropy, mean_prediction, register_score
from al.train import DenseTargetDataset, TrainConfig, train_segmenter
from guidedgen.guidance import build_objective


def tiny_features_config(path) -> DiffusionFeaturesConfig:
    return DiffusionFeaturesConfig(pretrained_model_name_or_path=str(path), features=FeatureConfig(timesteps=[50, 200]),
                                   pixels_per_image=200, num_members=3, max_epochs=4, extraction_batch_size=4)


@pytest.mark.slow
def test_a_score_registered_at_run_time_is_an_acquisition_of_the_config_and_the_loop(tiny_digits, tmp_path):
    def first_class(mc_probs, generator=None):  # the mean probability of class 0, per pixel
        return mean_prediction(mc_probs)[:, 0]

    with pytest.raises(ConfigError, match="'acquisitions' = 'first_class'"):
        ExperimentConfig(acquisitions=["first_class"]).validate()
    register_score("first_class", first_class)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_score("first_class", first_class)
        ExperimentConfig(acquisitions=["first_class"]).validate()
        probs = torch.rand(4, 2, 3, 5, 6).softmax(2)
        assert torch.equal(get_acquisition("first_class").score(Predictions(probs), None), probs.mean(0)[:, 0])
        train, val = tiny_digits
        records = ActiveLearningLoop(tiny_loop_config(cycles=1), "first_class", 0, train, val, tmp_path,
                                     progress=False).run()
        assert [r.cycle for r in records] == [0, 1] and records[1].labelled_pixels > records[0].labelled_pixels
    finally:
        del SCORES["first_class"]
    assert "first_class" not in all_acquisitions()


def test_every_score_and_deal_rule_is_one_registry():
    assert {"balent", "entropy", "bald", "random", "deal_ds", "deal_de", "deal_pixel",
            "deal_pixel_entropy"} <= set(all_acquisitions())
    assert get_acquisition("deal_ds").level == "image" and get_acquisition("deal_pixel").level == "pixel"
    with pytest.raises(KeyError, match="deal_de"):
        get_acquisition("deal")
    probs = torch.rand(4, 2, 3, 5, 6).softmax(2)
    difficulty = torch.rand(2, 5, 6)
    predictions = Predictions(probs, difficulty)
    assert torch.equal(ACQUISITIONS["deal_ds"].score(predictions, None), difficulty_sum(difficulty))
    assert torch.equal(ACQUISITIONS["deal_de"].score(predictions, None), difficulty_entropy(difficulty, 8))
    assert torch.allclose(ACQUISITIONS["deal_pixel_entropy"].score(predictions, None), difficulty * entropy(probs))
    with pytest.raises(ValueError, match="difficulty branch"):
        ACQUISITIONS["deal_pixel"].score(Predictions(probs), None)


@pytest.mark.slow
def test_training_a_deal_segmenter_teaches_its_difficulty_branch(tiny_digits, tmp_path):
    train, _ = tiny_digits
    torch.manual_seed(0)
    from conftest import tiny_model_config

    model = tiny_model_config().build(train.num_classes, difficulty_size=(8, 8))
    batch = torch.stack([train[i].image for i in range(4)])
    target = torch.stack([train[i].mask for i in range(4)])

    untrained = copy.deepcopy(model.difficulty_branch)
    gamma = model.difficulty_branch.attention.gamma.item()
    train_segmenter(model, DenseTargetDataset(train), TrainConfig(epochs=8, batch_size=2, lr=3e-3), progress=False)
    with torch.no_grad():  # both branches judged against the trained segmenter's own errors
        logits = model.eval()(batch)
        trained_loss = difficulty_loss(model.difficulty(logits), logits, target)
        untrained_loss = difficulty_loss(untrained(logits), logits, target)
    assert trained_loss < untrained_loss
    assert model.difficulty_branch.attention.gamma.item() != gamma  # PAM's gamma is trained
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path).eval()
    assert isinstance(loaded, Segmenter) and loaded.config.difficulty_size == (8, 8)
    assert torch.equal(loaded.difficulty(loaded(batch)), model.difficulty(model(batch)))
    predictions = pool_predictions(model, batch, 3, torch.Generator().manual_seed(0))
    assert predictions.probs.shape == (3, 4, 11, 32, 32) and predictions.difficulty.shape == (4, 32, 32)


@pytest.mark.parametrize("acquisition", ["deal_ds", "deal_de"])
@pytest.mark.slow
def test_image_level_deal_spends_the_pixel_budget_on_the_best_images(tiny_digits, tmp_path, acquisition):
    train, val = tiny_digits  # 6 images, 3 px each per cycle = 18 px per cycle
    config = tiny_loop_config(cycles=1, deal=DealConfig(size=[8, 8], pool_fraction=0.5, image_share=1 / 3))
    loop = ActiveLearningLoop(config, acquisition, 0, train, val, tmp_path, progress=False)
    records = loop.run()
    assert [r.labelled_pixels for r in records] == [18, 36]
    hit = [i for i in train.ids if loop.labels.has_tag(i, "cycle0")]
    assert len(hit) == 2 and all(len(loop.labels.queried(i, "cycle0")) == 9 for i in hit)
    # the same run again is a no-op: nothing queried twice
    again = ActiveLearningLoop(config, acquisition, 0, train, val, tmp_path, progress=False)
    assert [r.labelled_pixels for r in again.run()] == [18, 36]


@pytest.mark.slow
def test_pixel_level_deal_labels_the_most_difficult_pixels(tiny_digits, tmp_path):
    train, val = tiny_digits
    config = tiny_loop_config(cycles=1, deal=DealConfig(size=[8, 8]))
    loop = ActiveLearningLoop(config, "deal_pixel", 0, train, val, tmp_path, progress=False)
    loop.run()
    model = load_model(tmp_path / "model")
    image = train[0]
    difficulty = model.difficulty(model(image.image[None]))[0]
    chosen = loop.labels.queried(image.id, "cycle0")
    labelled_before = {tuple(c) for c in loop.labels.queried(image.id, "initial")}
    available = torch.ones_like(difficulty, dtype=torch.bool)
    for row, col in labelled_before:
        available[row, col] = False
    best = difficulty[available].topk(3).values
    # the loop scored this image in a batch of 4, the test alone: re-blocked conv sums, <= ~sqrt(576) eps32
    # = 3e-6 relative per layer over ~20 layers on O(1) logits, at most a quarter of that past the sigmoid
    tolerance = 5e-5
    assert sorted(difficulty[c[0], c[1]].item() for c in chosen) == pytest.approx(sorted(best.tolist()), abs=tolerance)
    assert best.min() - difficulty[available].median() > 10 * tolerance  # so a worse pick would fail


def test_deal_needs_a_segmenter_learner(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("acquisitions: [deal_pixel]\nsupervised_reference: false\nloop: {learner: diffusion_features}\n")
    with pytest.raises(ConfigError, match="difficulty branch"):
        load_config(ExperimentConfig, path, []).validate()


@pytest.mark.slow
def test_diffusion_feature_ensemble_is_a_loop_model(tiny_digits, tiny_diffusion_folder, tmp_path):
    train, val = tiny_digits
    config = tiny_loop_config(cycles=1, learner="diffusion_features",
                              diffusion_features=tiny_features_config(tiny_diffusion_folder))
    loop = ActiveLearningLoop(config, "balent", 0, train, val, tmp_path, progress=False)
    records = loop.run()
    assert [r.labelled_pixels for r in records] == [18, 36]
    assert 0.0 <= records[-1].miou <= 1.0
    model = load_model(tmp_path / "model")
    assert isinstance(model, DiffusionFeatureSegmenter)
    images = torch.stack([val[i].image for i in range(2)])
    probs = model.mc_probs(images)
    assert probs.shape == (3, 2, 11, 32, 32)
    assert torch.allclose(probs.sum(2), torch.ones(3, 2, 32, 32), atol=1e-5)
    assert torch.equal(model.predict(images), majority_vote(probs))


@pytest.mark.slow
def test_ensemble_fits_dense_labels_and_round_trips(tiny_digits, tiny_diffusion_folder, tmp_path):
    train, _ = tiny_digits
    model = DiffusionFeatureSegmenter(tiny_features_config(tiny_diffusion_folder), train.num_classes, seed=0)
    images = torch.stack([train[i].image for i in range(len(train))])
    masks = torch.stack([train[i].mask for i in range(len(train))])

    def nll() -> float:  # of the true classes under the members' mean prediction
        return -model.mc_probs(images).mean(0).gather(1, masks[:, None]).clamp_min(1e-12).log().mean().item()

    before = nll()
    iterations = model.fit([(images, masks)])
    assert len(iterations) == 3 and nll() < 0.8 * before
    model.save_pretrained(tmp_path)
    assert torch.equal(load_model(tmp_path).mc_probs(images[:2]), model.mc_probs(images[:2]))


@pytest.mark.slow
def test_ensemble_guides_as_a_committee(tiny_digits, tiny_diffusion_folder):
    train, _ = tiny_digits
    model = DiffusionFeatureSegmenter(tiny_features_config(tiny_diffusion_folder), train.num_classes, seed=0)
    images = torch.stack([train[i].image for i in range(2)])
    masks = torch.stack([train[i].mask for i in range(2)])
    model.fit([(images, masks)])
    committee = build_objective("committee", [model])
    x = images.clone().requires_grad_(True)
    value = committee(x, masks)
    (gradient,) = torch.autograd.grad(value.sum(), x)
    assert value.shape == (2,) and torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    stepped = (images + 0.02 * gradient / gradient.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
    assert (committee(stepped, masks) > value.detach()).all()  # a gradient step raises the disagreement
