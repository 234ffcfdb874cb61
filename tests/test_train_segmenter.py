"""scripts/train_segmenter.py: the config and output folder are checked before training, its
record is written atomically, and a damaged record is named."""

import json

import pytest

from scripts.train_segmenter import main

TINY = ["data.num_train_images=2", "data.num_val_images=2", "data.size=32", "model.encoder_depth=3",
        "model.decoder_channels=[16,8,8]", "train.epochs=1", "train.batch_size=2", "progress=false"]


def run(tmp_path, *extra):
    return main(["--config", "configs/segmenter_digits.yaml", f"output_dir={tmp_path}", *TINY, *extra])


@pytest.mark.parametrize("override,key", [("train.epochs=0", "'train.epochs'"), ("train.lr=-1", "'train.lr'"),
                                          ("model.encoder=resnet_9000", "'model.encoder'"),
                                          ("data.transforms.short_side=0", "'data.transforms.short_side'"),
                                          ("synthetic.share=1", "'synthetic.share'"),
                                          ("synthetic.root=no/such/folder", "'synthetic.root'")])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, capsys, override, key):
    assert run(tmp_path / "out", override) == 2
    assert key in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_an_unwritable_output_folder_is_refused_before_training(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("a file, not a folder")  # unwritable for root too
    import scripts.train_segmenter as script

    monkeypatch.setattr(script, "train_segmenter", None)  # training would fail: the refusal comes first
    assert run(tmp_path / "file" / "out") == 2
    assert "file/out" in capsys.readouterr().err


def test_a_damaged_record_is_named_and_a_good_one_skips_training(tmp_path, capsys):
    assert run(tmp_path) == 0
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["config"]["train"]["epochs"] == 1 and not list(tmp_path.glob(".*tmp*"))
    assert run(tmp_path) == 0 and "already holds this segmenter" in capsys.readouterr().out
    (tmp_path / "training.json").write_text('{"config": ')
    assert run(tmp_path) == 2
    assert f"{tmp_path / 'training.json'} is not a training record" in capsys.readouterr().err


@pytest.mark.slow
def test_other_settings_are_refused_by_name_and_overwrite_replaces(tmp_path, capsys):
    assert run(tmp_path) == 0
    assert run(tmp_path, "train.lr=0.01", "progress=true") == 2
    error = capsys.readouterr().err
    assert "train.lr: 0.001 there, 0.01 now" in error and "overwrite=true" in error and "progress" not in error
    assert run(tmp_path, "train.lr=0.01", "overwrite=true") == 0
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["config"]["train"]["lr"] == 0.01
    # a record written before a setting existed resumes at that setting's default
    del record["config"]["overwrite"], record["config"]["data"]["val_split"]
    (tmp_path / "training.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert run(tmp_path, "train.lr=0.01") == 0 and "already holds this segmenter" in capsys.readouterr().out


@pytest.mark.slow
def test_the_script_runs_as_a_command(tmp_path):
    """As make demo calls it: a subprocess whose exit code and message are the CLI's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "scripts/train_segmenter.py", "--config", "configs/segmenter_digits.yaml",
                           f"output_dir={tmp_path}", "train.epochs=0"], check=False, cwd=root, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert done.returncode == 2 and "'train.epochs'" in done.stderr
