"""The train -> generate -> retrain pipeline on tiny models: every stage's artefacts, the
summary table, and a resume that recomputes nothing."""

import csv
import json

import numpy as np
import pytest
import torch

from guidedgen.pipeline_report import paired_changes, write_results
from scripts.pipeline import main as cli_main

TINY = ["seeds=[0]", "data.num_train_images=4", "data.num_val_images=2", "data.size=64",
        "model.encoder_depth=3", "model.decoder_channels=[16,8,8]", "train.epochs=1", "train.batch_size=4",
        "committee_size=2", "generation.tiny_components=true", "generation.num_inference_steps=2",
        "generation.batch_size=2", "generation.guidance.strength=0.3", "progress=false"]


@pytest.mark.slow
def test_pipeline_writes_every_stage_and_resumes_without_recomputing(tmp_path, capsys):
    args = ["--config", "configs/pipeline_digits.yaml", f"output_dir={tmp_path}", *TINY]
    assert cli_main(args) == 0
    rows = list(csv.DictReader((tmp_path / "results.csv").read_text().splitlines()))
    assert [r["condition"] for r in rows] == ["real only", "real + unguided", "real + entropy", "real + committee",
                                              "real + expected_model_change"]
    assert all(0 <= float(r["val_miou"]) <= 1 for r in rows)
    assert all(r["synthetic_samples"] == "4" for r in rows[1:])  # one per real mask
    assert {"objective_entropy", "objective_committee", "objective_expected_model_change"} <= set(rows[1])
    seconds = {r["stage"]: float(r["seconds"]) for r in csv.DictReader((tmp_path / "stages.csv").read_text().splitlines())}
    assert float(rows[2]["seconds_per_kept"]) == pytest.approx(seconds["seed 0: generate entropy"] / 4)
    for name in ("summary.md", "miou.png", "sets.png", "stages.csv"):
        assert (tmp_path / name).exists()
    for condition in ("unguided", "entropy", "committee", "expected_model_change"):
        assert len(list((tmp_path / "seed_0" / "generated" / condition / "images").glob("*.png"))) == 4
        assert (tmp_path / "seed_0" / "retrained" / condition / "training.json").exists()
    assert "| real + entropy |" in capsys.readouterr().out
    stages = (tmp_path / "stages.csv").read_text()
    assert len(stages.splitlines()) == 1 + 2 + 2 * 4  # header, 2 committee members, generate + retrain x 4
    first = (tmp_path / "results.csv").read_text()
    assert cli_main(args) == 0  # resume: every stage found done, same numbers, timings kept
    assert (tmp_path / "results.csv").read_text() == first
    assert (tmp_path / "stages.csv").read_text() == stages
    assert cli_main(args + ["train.lr=0.5"]) == 2  # stale stage-1 models are not reused
    assert "train.lr: 0.001 there, 0.5 now" in capsys.readouterr().err
    record_path = tmp_path / "seed_0" / "segmenter_0" / "training.json"
    record = json.loads(record_path.read_text())
    del record["identity"]  # as written before identities were recorded: still resumes
    record_path.write_text(json.dumps(record))
    assert cli_main(args) == 0 and (tmp_path / "results.csv").read_text() == first


def test_paired_changes_are_per_seed_differences_and_the_summary_shows_them(tmp_path):
    references = {"real + entropy": "real + unguided", "real + entropy filtered": "real + unguided filtered"}
    rows = [{"seed": s, "condition": c, "val_miou": v, "reference": references.get(c, c)} for s, c, v in
            [(0, "real only", 0.50), (1, "real only", 0.40), (2, "real only", 0.45),
             (0, "real + unguided", 0.52), (1, "real + unguided", 0.35), (2, "real + unguided", 0.45),
             (0, "real + entropy", 0.55), (2, "real + entropy", 0.47),
             (0, "real + entropy filtered", 0.60), (0, "real + unguided filtered", 0.58)]]
    assert paired_changes(rows, "real + unguided", "real only") == pytest.approx([2.0, -5.0, 0.0])
    assert paired_changes(rows, "real + entropy", "real + unguided") == pytest.approx([3.0, 2.0])  # seed 1 missing
    assert paired_changes(rows, "real only", "real only") == []
    summary = write_results(rows, tmp_path)
    entropy = next(line for line in summary.splitlines() if line.startswith("| real + entropy |"))
    assert "| +2.5 ± 0.5 (+3.0, +2.0) |" in entropy  # vs unguided: mean, population std, per seed
    assert "| +3.5 ± 1.5 (+5.0, +2.0) |" in entropy  # vs real only
    filtered = next(line for line in summary.splitlines() if line.startswith("| real + entropy filtered |"))
    assert "| +2.0 ± 0.0 (+2.0) |" in filtered  # against unguided filtered, not unguided


def test_a_second_pipeline_on_one_folder_is_refused(tmp_path, capsys):
    from al.folder_lock import FolderLock

    with FolderLock(tmp_path):
        assert cli_main(["--config", "configs/pipeline_digits.yaml", f"output_dir={tmp_path}", *TINY]) == 2
    assert f"{tmp_path} (pipeline run) is being written by another process" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # refused before anything was written


def test_pipeline_explains_bad_conditions(tmp_path, capsys):
    assert cli_main(["--config", "configs/pipeline_digits.yaml", f"output_dir={tmp_path}", "conditions=[glow]"]) == 2
    assert "'conditions' = 'glow'" in capsys.readouterr().err
    assert cli_main(["--config", "configs/pipeline_digits.yaml", f"output_dir={tmp_path}", "committee_size=1"]) == 2
    assert "committee_size" in capsys.readouterr().err


def tiny_judge(folder, num_classes=11):
    import json

    from al.models import build_segmenter

    torch.manual_seed(3)
    judge = build_segmenter("unet", "tu-resnet10t", num_classes, encoder_depth=3, decoder_channels=(16, 8, 8))
    judge.save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps({"val_miou": 0.5}))
    return judge.eval()


def test_judge_set_scores_fidelity_and_ignores_exactly_the_pixels_the_judge_reads_otherwise(tmp_path):
    from al.data.config import DataConfig
    from guidedgen.pipeline import judge_set, stacked

    images, masks = stacked(DataConfig(num_train_images=3, size=64, digits=[0, 1, 2]).build("train"))
    masks[0, :4] = 255  # unlabelled pixels stay unlabelled, whatever the judge reads
    judge = tiny_judge(tmp_path)
    with torch.no_grad():  # a judge that reads only background: right on some pixels, not all
        judge.classifier.weight.zero_()
        judge.classifier.bias.copy_(torch.eye(11)[0])
    scores, filtered = judge_set(images, masks, judge, 4, 255)
    prediction, masks = judge.predict(images).numpy(), masks.numpy()
    labelled = masks != 255
    agree = (prediction == masks) & labelled
    assert 0 < agree.sum() < labelled.sum()  # both kinds of pixel are checked below
    assert scores["fidelity_agreement"] == pytest.approx(agree.sum() / labelled.sum())
    ious = [(agree & (masks == c)).sum() / (((prediction == c) | (masks == c)) & labelled).sum()
            for c in range(4) if (((prediction == c) | (masks == c)) & labelled).any()]
    assert scores["fidelity_miou"] == pytest.approx(np.mean(ious))
    filtered = filtered.numpy()
    assert (filtered[agree] == masks[agree]).all() and (filtered[~agree] == 255).all()


@pytest.mark.slow
def test_variants_snapshot_committee_and_label_filter(tmp_path):
    import json

    judge = tmp_path / "judge"
    tiny_judge(judge)
    variants = "variants={entropy_late: {objective: entropy, start: 0.5, end: 1.0, strength: 0.6}," \
               " committee_snapshots: {objective: committee, committee: snapshots}}"
    args = ["--config", "configs/pipeline_digits.yaml", f"output_dir={tmp_path / 'run'}", *TINY, "committee_size=1",
            "conditions=[unguided,entropy_late,committee_snapshots]", variants, "snapshot_epochs=1",
            f"judge={judge}", "label_filter=true", "loss_filter=true",
            "loss_filter_margin=1.0"]  # a 1-epoch model reads every pixel at about ln(11): no pixel is 1.25x its mean
    assert cli_main(args) == 0
    rows = list(csv.DictReader((tmp_path / "run" / "results.csv").read_text().splitlines()))
    assert [r["condition"] for r in rows] == ["real only"] + [f"real + {c}{f}" for c in
                                                              ("unguided", "entropy_late", "committee_snapshots")
                                                              for f in ("", " filtered", " loss-filtered")]
    assert all(0 <= float(r["fidelity_miou"]) <= 1 and 0 <= float(r["fidelity_agreement"]) <= 1 for r in rows)
    shares = {r["condition"]: float(r["labelled_share"]) for r in rows[1:]}
    assert all(share == 1.0 for name, share in shares.items() if name.endswith(("unguided", "late", "snapshots")))
    assert any(share < 1.0 for name, share in shares.items() if name.endswith("loss-filtered"))
    assert next(r for r in rows if r["condition"] == "real + entropy_late loss-filtered")["reference"] == \
        "real + unguided loss-filtered"
    seed = tmp_path / "run" / "seed_0"
    generated = {c: json.loads((seed / "generated" / c / "dataset.json").read_text())["generator"]["config"]["guidance"]
                 for c in ("entropy_late", "committee_snapshots")}
    assert (generated["entropy_late"]["start"], generated["entropy_late"]["strength"]) == (0.5, 0.6)
    assert generated["committee_snapshots"]["segmenters"] == [str(seed / "segmenter_0"), str(seed / "segmenter_0_early")]
    assert json.loads((seed / "segmenter_0_early" / "training.json").read_text())["losses"].__len__() == 1
    assert (seed / "retrained" / "committee_snapshots_filtered" / "training.json").exists()
    assert (seed / "retrained" / "committee_snapshots_loss-filtered" / "training.json").exists()


def test_pipeline_explains_bad_variants(tmp_path, capsys):
    base = ["--config", "configs/pipeline_digits.yaml", f"output_dir={tmp_path}", "conditions=[late]"]
    assert cli_main([*base, "variants={late: {objective: entropy, begin: 0.5}}"]) == 2
    assert "variants.late" in capsys.readouterr().err
    assert cli_main([*base, "variants={late: {objective: glow}}"]) == 2
    assert "variants.late.objective" in capsys.readouterr().err
    assert cli_main([*base, "variants={late: {objective: entropy}}", "label_filter=true"]) == 2
    assert "judge" in capsys.readouterr().err
    assert cli_main([*base, "variants={late: {objective: entropy, start: 0.9, end: 0.5}}"]) == 2
    assert "'variants.late': guidance window must satisfy 0 <= start <= end <= 1" in capsys.readouterr().err
    assert cli_main([*base, "variants={late: {objective: entropy}}", "train.epochs=0"]) == 2
    assert "'train.epochs'" in capsys.readouterr().err


def test_kept_variants_are_the_top_k_of_each_unit_by_score():
    from guidedgen.pipeline import kept_variants

    units = ["a", "b", "a", "b", "a", "b"]  # written order: variant 0 of a, b, then variant 1, 2
    variants = [0, 0, 1, 1, 2, 2]
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 0.9])
    assert kept_variants(units, variants, scores, 1) == [2, 1]  # b: a tie between variants 0 and 2 keeps 0
    assert kept_variants(units, variants, scores, 2) == [2, 4, 1, 5]
    assert kept_variants(units, variants, None, 2) == [0, 2, 1, 3]  # no ranking: the first variants
    assert kept_variants(units, variants, scores, 3) == [2, 4, 0, 1, 5, 3]
    assert kept_variants(units, variants, scores, {"a": 1, "b": 3}) == [2, 1, 5, 3]  # a count per unit
    assert kept_variants(units, variants, None, {"a": 2, "b": 1}) == [0, 2, 1]


@pytest.mark.parametrize("recipe", ["joint", "finetune"])
def test_every_recipe_takes_as_many_optimizer_steps_as_real_only(recipe):
    import math

    from al.train import TrainingSource
    from guidedgen.pipeline import PipelineConfig, retraining_phases

    config = PipelineConfig()  # 30 epochs, share 0.5
    real = TrainingSource([{}] * 24)
    phases = retraining_phases(config, recipe, real, [{}] * 48)
    batch = config.train.batch_size
    real_only = config.train.epochs * math.ceil(24 / batch)
    # a mixed epoch shows len(real) / real share items; a single-source epoch shows its items
    steps = sum(epochs * math.ceil(len(sources[0].dataset) / sources[0].share / batch) for sources, epochs in phases)
    # finetune rounds the synthetic phase to whole epochs: within half an epoch of the 48 synthetic items
    assert steps == real_only if recipe == "joint" else abs(steps - real_only) <= math.ceil(48 / batch) / 2
    assert [[s.name for s in sources] for sources, _ in phases] == (
        [["real", "synthetic"]] if recipe == "joint" else [["synthetic"], ["real"]])


@pytest.mark.slow
def test_instance_mode_variants_and_recipes_in_the_pipeline(tmp_path):
    import json

    args = ["--config", "configs/augment_digits3.yaml", f"output_dir={tmp_path}", *TINY, "data.num_train_images=3",
            "data.size=32", "data.min_digit_size=14", "data.max_digit_size=20", "judge=null",
            "variants_per_unit=2", "keep_per_unit=1", "instances.size=32", "instances.min_area=10",
            "conditions=[unguided,unguided_instance,entropy_instance]", "hardness_resampling=true",
            "variants={unguided_instance: {mode: instance}, entropy_instance: {objective: entropy, mode: instance}}"]
    assert cli_main(args) == 0
    rows = list(csv.DictReader((tmp_path / "results.csv").read_text().splitlines()))
    assert [r["condition"] for r in rows] == ["real only"] + [f"real + {c}{s}{r}" for c in
                                                              ("unguided", "unguided_instance", "entropy_instance")
                                                              for s in ("", " resampled") for r in ("", " (finetune)")]
    by_name = {r["condition"]: r for r in rows}
    assert by_name["real + entropy_instance (finetune)"]["reference"] == "real + unguided_instance (finetune)"
    assert by_name["real + entropy_instance resampled"]["reference"] == "real + unguided_instance resampled"
    assert by_name["real + unguided"]["synthetic_samples"] == "3" and by_name["real + unguided"]["generated_samples"] == "6"
    # re-sampling keeps min(1 + round(i / N * 2), 2) of the 2 variants of the i-th easiest of N units
    for name in ("unguided", "unguided_instance"):
        n = int(by_name[f"real + {name}"]["synthetic_samples"])
        assert int(by_name[f"real + {name} resampled"]["synthetic_samples"]) == sum(
            min(1 + round(i / n * 2), 2) for i in range(1, n + 1))
        # each set's cost and objective values are its own pairs': the same generation, more pairs kept
        plain, resampled = by_name[f"real + {name}"], by_name[f"real + {name} resampled"]
        assert float(resampled["seconds_per_kept"]) * int(resampled["synthetic_samples"]) == pytest.approx(
            float(plain["seconds_per_kept"]) * n)
    entropy = {s: float(by_name[f"real + entropy_instance{s}"]["objective_entropy"]) for s in ("", " resampled")}
    assert entropy[""] != entropy[" resampled"]  # the resampled set keeps lower-entropy variants too
    shared = tmp_path / "shared" / "generated" / "unguided_instance"
    records = [json.loads(line) for line in (shared / "metadata.jsonl").read_text().splitlines()]
    units = int(by_name["real + unguided_instance"]["synthetic_samples"])
    assert len(records) == 2 * units and {r["instance"]["variant"] for r in records} == {0, 1}
    assert not (tmp_path / "seed_0" / "generated" / "unguided_instance").exists()  # shared, not per seed
    assert (tmp_path / "seed_0" / "generated" / "entropy_instance" / "dataset.json").exists()
    phases = json.loads((tmp_path / "seed_0" / "retrained" / "entropy_instance_finetune" / "training.json").read_text())["phases"]
    assert [p["sources"][0]["name"] for p in phases] == ["synthetic", "real"]


def test_region_fidelity_reads_only_the_regenerated_pixels_in_both_images(tmp_path):
    from guidedgen.pipeline import region_fidelity

    judge = tiny_judge(tmp_path)
    generator = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (2, 3, 64, 64), generator=generator).float() / 255
    images = real.clone()
    images[:, :, 10:30, 20:40] = torch.rand(2, 3, 20, 20, generator=generator)  # the regenerated block
    images[1, :, 0, 0] += 0.4 / 255  # within the same 8-bit value: not a change
    masks = torch.randint(0, 4, (2, 64, 64), generator=generator)
    masks[0, 10:15] = 255  # unlabelled pixels do not count
    scores = region_fidelity(images, real, masks, judge, 255)
    block = torch.zeros(2, 64, 64, dtype=torch.bool)
    block[:, 10:30, 20:40] = True
    block &= masks != 255
    for name, batch in (("generated", images), ("real", real)):
        expected = (judge.predict(batch) == masks)[block].float().mean()
        assert scores[f"fidelity_region_{name}"] == pytest.approx(float(expected))
    assert scores["fidelity_region_generated"] != scores["fidelity_region_real"]
