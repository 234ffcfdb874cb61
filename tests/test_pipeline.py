"""The train -> generate -> retrain pipeline on tiny models: every stage's artefacts, the
summary table, and a resume that recomputes nothing."""

import csv

from scripts.pipeline import main as cli_main

TINY = ["seeds=[0]", "data.num_train_images=4", "data.num_val_images=2", "data.size=64",
        "model.encoder_depth=3", "model.decoder_channels=[16,8,8]", "train.epochs=1", "train.batch_size=4",
        "committee_size=2", "num_synthetic=2", "generation.tiny_components=true", "generation.num_inference_steps=2",
        "generation.batch_size=2", "generation.guidance.strength=0.3", "progress=false"]


def test_pipeline_writes_every_stage_and_resumes_without_recomputing(tmp_path, capsys):
    args = ["--config", "configs/pipeline_digits.yaml", f"output_dir={tmp_path}", *TINY]
    assert cli_main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["condition"] for r in rows] == ["real only", "real + unguided", "real + entropy", "real + committee",
                                              "real + expected_model_change"]
    assert all(0 <= float(r["val_miou"]) <= 1 for r in rows)
    assert all(r["synthetic_samples"] == "2" for r in rows[1:])
    assert {"objective_entropy", "objective_committee", "objective_expected_model_change"} <= set(rows[1])
    for name in ("summary.md", "miou.png", "stages.csv"):
        assert (tmp_path / name).exists()
    for condition in ("unguided", "entropy", "committee", "expected_model_change"):
        assert len(list((tmp_path / "seed_0" / "generated" / condition / "images").glob("*.png"))) == 2
        assert (tmp_path / "seed_0" / "retrained" / condition / "training.json").exists()
    assert "| real + entropy |" in capsys.readouterr().out
    stages = (tmp_path / "stages.csv").read_text()
    assert len(stages.splitlines()) == 1 + 2 + 2 * 4  # header, 2 committee members, generate + retrain x 4
    first = (tmp_path / "results.csv").read_text()
    assert cli_main(args) == 0  # resume: every stage found done, same numbers, timings kept
    assert (tmp_path / "results.csv").read_text() == first
    assert (tmp_path / "stages.csv").read_text() == stages


def test_pipeline_explains_bad_conditions(tmp_path, capsys):
    assert cli_main(["--config", "configs/pipeline_digits.yaml", f"output_dir={tmp_path}", "conditions=[glow]"]) == 2
    assert "'conditions' = 'glow'" in capsys.readouterr().err
    assert cli_main(["--config", "configs/pipeline_digits.yaml", f"output_dir={tmp_path}", "committee_size=1"]) == 2
    assert "committee_size" in capsys.readouterr().err
