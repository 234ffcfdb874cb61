"""The active-learning loop end to end on tiny data: labels per cycle, resume after a crash,
state protection, and the CLI with its errors."""

import csv
import json

import pytest
from conftest import tiny_experiment_overrides, tiny_loop_config

from al.config import ConfigError, load_config
from al.experiment import ExperimentConfig
from al.loop import ActiveLearningLoop, StateMismatchError
from al.oracles import GroundTruthOracle
from al.select import NotEnoughPixelsError
from scripts.active_learning import main as cli_main


def per_image_counts(loop):
    return {i: len(loop.labels.pixels(i)) for i in loop.train_set.ids}


@pytest.mark.slow
def test_each_cycle_labels_n_new_pixels_per_image(tiny_digits, tmp_path):
    train, val = tiny_digits
    loop = ActiveLearningLoop(tiny_loop_config(), "balent", 0, train, val, tmp_path, progress=False)
    records = loop.run()
    assert [r.cycle for r in records] == [0, 1, 2]
    assert [r.labelled_pixels for r in records] == [18, 36, 54]  # 6 images x 3 px per cycle
    assert records[-1].labelled_percent == pytest.approx(100 * 54 / (6 * 32 * 32))
    assert set(per_image_counts(loop).values()) == {9}
    # every label is the ground truth of its pixel
    for image_id in train.ids:
        mask = train[train.index_of(image_id)].mask
        assert all(mask[r, c] == cls for (r, c), cls in loop.labels.pixels(image_id).items())
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_acquisitions_of_a_seed_start_from_the_same_labels(tiny_digits, tmp_path):
    train, val = tiny_digits
    config = tiny_loop_config(cycles=0)
    a = ActiveLearningLoop(config, "balent", 3, train, val, tmp_path / "a", progress=False)
    b = ActiveLearningLoop(config, "random", 3, train, val, tmp_path / "b", progress=False)
    a.initial_labels(), b.initial_labels()
    for image_id in train.ids:
        assert len(a.labels.queried(image_id, "initial")) == config.pixels_per_image
        assert a.labels.queried(image_id, "initial") == b.labels.queried(image_id, "initial")


class CrashingOracle(GroundTruthOracle):
    """Answers ``budget`` queries, then dies like a killed process."""

    def __init__(self, dataset, budget):
        super().__init__(dataset)
        self.budget = budget

    def __call__(self, image_id, coords):
        if self.budget == 0:
            raise KeyboardInterrupt("killed")
        self.budget -= 1
        return super().__call__(image_id, coords)


@pytest.mark.parametrize("budget", [3, 8, 14])
@pytest.mark.slow
def test_resume_after_a_crash_loses_and_duplicates_nothing(tiny_digits, tmp_path, budget):
    """Crash during the initial labelling, during cycle 0's or cycle 1's acquisition; a fresh
    loop on the same folder finishes with exactly n labels per image per cycle."""
    train, val = tiny_digits
    config = tiny_loop_config()
    with pytest.raises(KeyboardInterrupt):
        ActiveLearningLoop(config, "entropy", 0, train, val, tmp_path, CrashingOracle(train, budget), progress=False).run()
    resumed = ActiveLearningLoop(config, "entropy", 0, train, val, tmp_path, progress=False)
    records = resumed.run()
    assert [r.cycle for r in records] == [0, 1, 2] and all(r.acquired for r in records)
    assert set(per_image_counts(resumed).values()) == {9}
    for image_id in train.ids:
        for tag in ("initial", "cycle0", "cycle1"):
            assert resumed.labels.has_tag(image_id, tag)


@pytest.mark.slow
def test_a_finished_run_is_not_recomputed(tiny_digits, tmp_path):
    train, val = tiny_digits
    first = ActiveLearningLoop(tiny_loop_config(cycles=1), "margin", 0, train, val, tmp_path, progress=False).run()
    again = ActiveLearningLoop(tiny_loop_config(cycles=1), "margin", 0, train, val, tmp_path, progress=False)
    again.train_model = None  # any training attempt would fail
    assert again.run() == first


def test_state_of_another_configuration_is_refused(tiny_digits, tmp_path):
    train, val = tiny_digits
    ActiveLearningLoop(tiny_loop_config(cycles=0), "bald", 0, train, val, tmp_path, progress=False).run()
    with pytest.raises(StateMismatchError, match="different configuration"):
        ActiveLearningLoop(tiny_loop_config(cycles=0, pixels_per_image=4), "bald", 0, train, val, tmp_path)


def test_running_out_of_pixels_names_the_image(tiny_digits, tmp_path):
    train, val = tiny_digits
    loop = ActiveLearningLoop(tiny_loop_config(pixels_per_image=32 * 32 + 1), "random", 0, train, val, tmp_path)
    with pytest.raises(NotEnoughPixelsError, match="image 'train_0_000000'"):
        loop.initial_labels()


@pytest.mark.slow
def test_cli_writes_curve_and_plots(tmp_path, capsys):
    assert cli_main(["--config", "configs/al_digits.yaml", *tiny_experiment_overrides(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "curve.csv").read_text().splitlines()))
    assert {(r["acquisition"], r["cycle"]) for r in rows} == {("balent", "0"), ("balent", "1"), ("random", "0"), ("random", "1")}
    assert {r["labelled_pixels"] for r in rows} == {"8", "16"}
    for name in ("curve.png", "uncertainty_maps.png", "summary.md"):
        assert (tmp_path / name).stat().st_size > 1000 or name == "summary.md"
    out = capsys.readouterr().out
    assert "| cycle | labelled px | balent | random |" in out and "| queried in | balent | random |" in out
    assert json.loads((tmp_path / "supervised" / "seed_0.json").read_text())["miou"] >= 0


@pytest.mark.parametrize("override,message", [
    ("acquisitions=[balnet]", "'acquisitions' = 'balnet' is not allowed; expected one of"),
    ("loop.selection=best", "'loop.selection'"),
    ("loop.mc_samples=1", "'loop.mc_samples'"),
    ("loop.cycles=many", "loop.cycles"),
    ("loop.no_such_key=1", "no_such_key"),
    ("data.kind=cityscapes", "'data.root'"),
    ("data.kind=masks", "active learning needs images"),
    ("loop.model.arch=segformer", "'loop.model.arch'"),
    ("loop.model.encoder=tu-no_such_net", "'loop.model.encoder'"),
    ("loop.model.decoder_channels=[8,8]", "'loop.model.decoder_channels'"),
    ("loop.train.batch_size=0", "'loop.train.batch_size'"),
    ("loop.train.lr=-1", "'loop.train.lr'"),
    ("loop.train.mixed_precision=fp8", "'loop.train.mixed_precision'"),
    ("loop.train.epochs=0", "'loop.train.epochs'"),
    *([("device=cuda", "'device' = 'cuda'")] if not __import__("torch").cuda.is_available() else []),
])
def test_cli_explains_bad_configuration(tmp_path, capsys, override, message):
    assert cli_main(["--config", "configs/al_digits.yaml", f"output_dir={tmp_path}", override]) == 2
    assert message in capsys.readouterr().err


def test_missing_config_file_is_explained():
    with pytest.raises(ConfigError, match="nope.yaml not found"):
        load_config(ExperimentConfig, "nope.yaml")


def write_pairs(root, dataset, classes=None):
    from al.data.folder import DatasetWriter

    writer = DatasetWriter(root, classes or dataset.classes, dataset.ignore_index)
    for i in range(len(dataset)):
        sample = dataset[i]
        image = (sample.image.permute(1, 2, 0).numpy() * 255).astype("uint8")
        writer.write(f"syn_{i}", image, sample.mask.numpy().astype("uint8"))
    return root


@pytest.mark.slow
def test_synthetic_pairs_join_every_cycles_training(tiny_digits, tmp_path, monkeypatch):
    from al import loop as loop_module
    from al.train import SyntheticConfig

    train, val = tiny_digits
    root = write_pairs(tmp_path / "synthetic", val)
    seen = []
    original = loop_module.train_segmenter
    monkeypatch.setattr(loop_module, "train_segmenter",
                        lambda model, sources, *a, **k: seen.append(sources) or original(model, sources, *a, **k))
    config = tiny_loop_config(cycles=1, synthetic=SyntheticConfig(str(root), share=0.25, loss_weight=0.5))
    records = ActiveLearningLoop(config, "entropy", 0, train, val, tmp_path / "run", progress=False).run()
    assert len(records) == 2 and len(seen) == 2
    for sources in seen:
        assert [s.name for s in sources] == ["real", "synthetic"]
        assert [s.share for s in sources] == [0.75, 0.25] and sources[1].loss_weight == 0.5
        assert len(sources[1].dataset) == len(val)
    assert config.fingerprint("entropy", 0) != tiny_loop_config(cycles=1).fingerprint("entropy", 0)


def test_synthetic_pairs_with_other_classes_are_refused(tiny_digits, tmp_path):
    from al.data.base import DatasetError
    from al.train import SyntheticConfig

    train, val = tiny_digits
    root = write_pairs(tmp_path / "synthetic", val, classes=[f"c{i}" for i in range(11)])
    config = tiny_loop_config(synthetic=SyntheticConfig(str(root)))
    with pytest.raises(DatasetError, match="synthetic classes"):
        ActiveLearningLoop(config, "entropy", 0, train, val, tmp_path / "run", progress=False)


def _save_plot_repeatedly(path, times):
    from matplotlib.figure import Figure

    from al.plots import save_figure

    for _ in range(times):
        figure = Figure(figsize=(2, 2))
        figure.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
        save_figure(figure, path)


@pytest.mark.slow
def test_processes_sharing_an_output_folder_can_write_the_same_plot(tmp_path):
    # The experiment's seeds run as separate processes that all redraw curve.png.
    import multiprocessing

    from PIL import Image

    path = tmp_path / "curve.png"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_save_plot_repeatedly, args=(path, 30)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [0, 0, 0]
    assert Image.open(path).size[0] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["curve.png"]


@pytest.mark.slow
def test_warm_start_fine_tunes_the_previous_cycle_and_resumes_to_the_same_run(tiny_digits, tmp_path):
    """Cycle c > 0 starts from cycle c-1's weights; a crash during cycle 1's acquisition (its model
    already trained) resumes to exactly the uninterrupted run."""
    train, val = tiny_digits
    config = tiny_loop_config(warm_start=True, warm_start_epochs=2)
    assert [config.epochs_of(c) for c in range(3)] == [1, 2, 2] and config.total_epochs() == 5
    straight = ActiveLearningLoop(config, "entropy", 0, train, val, tmp_path / "a", progress=False).run()
    with pytest.raises(KeyboardInterrupt):
        ActiveLearningLoop(config, "entropy", 0, train, val, tmp_path / "b", CrashingOracle(train, 14),
                           progress=False).run()
    resumed = ActiveLearningLoop(config, "entropy", 0, train, val, tmp_path / "b", progress=False).run()
    assert [r.miou for r in resumed] == [r.miou for r in straight]
    cold = ActiveLearningLoop(tiny_loop_config(), "entropy", 0, train, val, tmp_path / "c", progress=False).run()
    assert cold[0].miou == straight[0].miou  # cycle 0 trains from the initial weights either way
    assert [r.miou for r in cold[1:]] != [r.miou for r in straight[1:]]


@pytest.mark.slow
def test_runs_sharing_a_folder_train_cycle_0_once(tiny_digits, tmp_path, monkeypatch):
    """Every acquisition of a seed starts from the same labels and weights: the second run reuses
    the first one's cycle-0 model (same mIoU), then acquires on its own."""
    train, val = tiny_digits
    trained = []
    original = ActiveLearningLoop.train_model
    monkeypatch.setattr(ActiveLearningLoop, "train_model", lambda self, cycle: trained.append(cycle) or original(self, cycle))
    config = tiny_loop_config(cycles=1)
    shared = tmp_path / "shared"
    first = ActiveLearningLoop(config, "entropy", 0, train, val, tmp_path / "a", progress=False, shared_dir=shared).run()
    second = ActiveLearningLoop(config, "random", 0, train, val, tmp_path / "b", progress=False, shared_dir=shared).run()
    other_seed = ActiveLearningLoop(config, "random", 1, train, val, tmp_path / "c", progress=False, shared_dir=shared).run()
    assert trained == [0, 1, 1, 0, 1]
    assert second[0].miou == first[0].miou and other_seed[0].miou != first[0].miou


@pytest.mark.parametrize("name", ["al_digits3", "al_demo", "al_digits"])
def test_al_configs_load_and_validate(name):
    load_config(ExperimentConfig, f"configs/{name}.yaml").validate()


@pytest.mark.slow
def test_workers_share_an_experiment_and_give_the_same_curve(tmp_path):
    """Runs spread over two processes (spawned, each building its own data) reproduce the
    one-process curve exactly: seeds and labels never depend on which process ran what."""
    overrides = tiny_experiment_overrides(tmp_path / "one") + ["supervised_reference=false"]
    assert cli_main(["--config", "configs/al_digits3.yaml", *overrides]) == 0
    overrides = tiny_experiment_overrides(tmp_path / "two") + ["supervised_reference=false", "workers=2"]
    assert cli_main(["--config", "configs/al_digits3.yaml", *overrides]) == 0
    one, two = ((tmp_path / d / "curve.csv").read_text() for d in ("one", "two"))
    assert one == two and len(one.splitlines()) == 1 + 2 * 2  # header + 2 acquisitions x 2 cycles


@pytest.mark.slow
def test_mc_at_decoder_resolution_reaches_pool_scoring_and_only_then_enters_the_fingerprint(tiny_digits, tmp_path,
                                                                                            monkeypatch):
    import al.loop as loop_module

    train, val = tiny_digits
    flags = []
    original = loop_module.pool_predictions
    monkeypatch.setattr(loop_module, "pool_predictions",
                        lambda *args: flags.append(args[4]) or original(*args))
    config = tiny_loop_config(cycles=1, mc_at_decoder_resolution=True)
    ActiveLearningLoop(config, "entropy", 0, train, val, tmp_path, progress=False).run()
    assert flags and all(flags)
    assert config.fingerprint("entropy", 0) != tiny_loop_config(cycles=1).fingerprint("entropy", 0)
    # the default leaves earlier runs' fingerprints as they were (computed before the key existed)
    assert tiny_loop_config(cycles=1).fingerprint("entropy", 0) == "5ae69f5cc9f34b84"


# A run killed with SIGKILL at a chosen point: the wrapper patches one step to kill its own process
# on its n-th call, then runs the CLI (a real kill -9: nothing is flushed or cleaned up).
KILL_AT = """
import os, signal, sys
import {module} as target
original, calls = target.{owner}.{name}, [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
target.{owner}.{name} = dying
from scripts.active_learning import main
sys.exit(main(sys.argv[1:]))
"""


def run_labels(output, acquisition="balent"):
    """Every journal record of the run's queries and labels, per (tag, image): coords and classes."""
    from al.labels import SparseLabels

    config = load_config(ExperimentConfig, "configs/al_digits.yaml", tiny_experiment_overrides(output))
    train = config.data.build(config.data.train_split)
    labels = SparseLabels(output / "runs" / acquisition / "seed_0" / "labels", train.image_shapes(), train.num_classes)
    return {(tag, image_id): (labels.queried(image_id, tag), sorted(labels.pixels(image_id).items()))
            for tag in labels.query_tags() for image_id in labels.query_images(tag)}


def curve(output):
    return [(r["acquisition"], r["cycle"], r["labelled_pixels"], r["miou"]) for r in csv.DictReader(open(output / "curve.csv"))]


@pytest.mark.parametrize("module,owner,name,n", [
    ("al.labels", "SparseLabels", "query", 8),  # mid-acquisition: cycle 0's third image (6 initial queries)
    ("al.loop", "ActiveLearningLoop", "train_model", 2),  # mid-training of cycle 2
    ("al.loop", "ActiveLearningLoop", "_save_state", 4),  # between cycles: cycle 1 trained, its queries not made
])
@pytest.mark.slow
def test_a_run_killed_and_resumed_equals_the_uninterrupted_run(tmp_path, module, owner, name, n):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    extra = ["loop.cycles=2", "loop.selection=pixelpick", "acquisitions=[balent]", "supervised_reference=false"]
    args = lambda out: ["--config", "configs/al_digits.yaml", *tiny_experiment_overrides(out), *extra]  # noqa: E731
    assert cli_main(args(tmp_path / "whole")) == 0
    killed = subprocess.run([sys.executable, "-c", KILL_AT.format(module=module, owner=owner, name=name, n=n),
                             *args(tmp_path / "killed")], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert cli_main(args(tmp_path / "killed")) == 0
    assert run_labels(tmp_path / "killed") == run_labels(tmp_path / "whole")
    assert curve(tmp_path / "killed") == curve(tmp_path / "whole")


@pytest.mark.slow
def test_a_run_on_other_data_is_refused(tmp_path, capsys):
    args = ["--config", "configs/al_digits.yaml", *tiny_experiment_overrides(tmp_path), "acquisitions=[random]",
            "supervised_reference=false", "loop.cycles=0"]
    assert cli_main(args) == 0
    assert cli_main(args + ["data.seed=7"]) == 2
    assert "holds work made with other settings (data.seed: 0 there, 7 now); use another output_dir" in capsys.readouterr().err
    assert cli_main(args) == 0  # the run itself still resumes
    recorded = tmp_path / "runs" / "random" / "seed_0" / "data.json"
    older = {k: v for k, v in json.loads(recorded.read_text()).items() if k != "val_split"}
    recorded.write_text(json.dumps(older))  # a run recorded before data.val_split existed
    assert cli_main(args) == 0


def test_an_unwritable_output_folder_is_one_line_not_a_traceback(tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    args = ["--config", "configs/al_digits.yaml", *tiny_experiment_overrides(tmp_path / "file" / "out")]
    assert cli_main(args) == 2
    assert "file/out" in capsys.readouterr().err
