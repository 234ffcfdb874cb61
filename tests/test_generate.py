"""The generation job: writer bookkeeping, CLI, kill -9 + resume, two processes = one."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from al.config import ConfigError
from al.data import load_folder
from al.data.folder import read_metadata
from guidedgen.writer import GenerationWriter, sample_seed, shard
from scripts.generate import main as generate_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def segmenter_dir(guiding_segmenters, tmp_path_factory):
    path = tmp_path_factory.mktemp("segmenter")
    guiding_segmenters[0].save_pretrained(path)
    return path


def overrides(output_dir, segmenter_dir, **extra):
    values = {"output_dir": output_dir, "guidance.segmenters": f"[{segmenter_dir}]", "num_inference_steps": 3,
              "num_samples": 5, "batch_size": 2, "masks.size": 32, "masks.num_train_images": 3, "progress": "false",
              "contact_sheet_samples": 2, "guidance.strength": 0.1, "tiny_components": "true", "masks_split": "train"}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def dataset_arrays(root):
    dataset = load_folder(root)
    return {s.id: (s.image.numpy(), s.mask.numpy()) for s in (dataset[i] for i in range(len(dataset)))}


def test_seeds_and_shards_do_not_depend_on_processes():
    assert sample_seed(0, 5) == sample_seed(0, 5) != sample_seed(1, 5)
    assert len({sample_seed(0, i) for i in range(1000)}) == 1000
    for processes in (1, 2, 3, 7):
        parts = [shard(range(10), p, processes) for p in range(processes)]
        assert sorted(i for part in parts for i in part) == list(range(10))  # disjoint, complete, unpadded


@pytest.mark.slow
@pytest.mark.parametrize("progress", [True, False])
def test_a_job_shows_a_bar_over_its_batches_and_a_step_bar_inside_each_batch(tmp_path, capsys, progress):
    """``progress`` turns on (or off) both the job's bar over its batches and the sampler's
    per-step bar, which each batch opens anew (and clears when it ends)."""
    args = ["--config", str(ROOT / "configs/demo.yaml"), f"output_dir={tmp_path}", "tiny_components=true",
            "num_samples=2", "batch_size=1", "num_inference_steps=3", "masks.size=32", "masks.num_train_images=2",
            "masks_split=train", "guidance.strength=0", "guidance.segmenters=[]", "contact_sheet_samples=0",
            f"progress={str(progress).lower()}"]
    assert generate_main(args) == 0
    err = capsys.readouterr().err
    if progress:
        assert re.search(r"generate \(process 0\): 100%.*2/2", err)  # the job's bar, one step per batch
        assert len(re.findall(r"denoise:\s+0%.*0/3", err)) == 2  # one step bar per batch
    else:
        assert "generate (process" not in err and "denoise" not in err


def write_a_set(root):
    """Samples 0 and 2 written (2 with an ignore map), 1 dropped."""
    writer = GenerationWriter(root, ["bg", "a"], [[0, 0, 0], [255, 0, 0]], {"k": 1})
    rng = np.random.default_rng(0)
    for i in (0, 2):
        writer.write(i, rng.integers(0, 256, (8, 6, 3), dtype=np.uint8), np.eye(8, 6, dtype=np.uint8),
                     np.eye(8, 6, dtype=bool) if i == 2 else None, {"seed": 10 + i, "prompt": f"p{i}"})
    writer.drop(1, "degenerate", {"seed": 11})
    return writer


def test_each_metadata_line_names_its_image_as_file_name_and_dropped_samples_have_their_own_file(tmp_path):
    """metadata.jsonl is Hugging Face imagefolder's: every line has a file_name, relative to the
    file's folder, of an image there; the dropped sample, which has none, is in dropped.jsonl."""
    write_a_set(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["000000", "000002"]
    for record in lines:
        assert record["file_name"] == record["image"] == f"images/{record['id']}.png"
        assert Image.open(tmp_path / record["file_name"]).size == (6, 8)
    dropped = [json.loads(line) for line in (tmp_path / "dropped.jsonl").read_text().splitlines()]
    assert [(r["id"], r["dropped"]) for r in dropped] == [("000001", "degenerate")]
    again = GenerationWriter(tmp_path, ["bg", "a"], [[0, 0, 0], [255, 0, 0]], {"k": 1})
    assert again.pending(range(4)) == [3]  # the dropped one counts as done
    assert load_folder(tmp_path).ids == ["000000", "000002"]
    assert [r["id"] for r in read_metadata(tmp_path)] == ["000000", "000002", "000001"]
    GenerationWriter(tmp_path, ["bg", "a"], [[0, 0, 0], [255, 0, 0]], {"k": 2}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json", "images", "masks"]  # dropped.jsonl too


def test_a_folder_written_before_file_name_and_dropped_jsonl_still_reads_and_resumes(tmp_path):
    write_a_set(tmp_path)
    metadata, dropped = tmp_path / "metadata.jsonl", tmp_path / "dropped.jsonl"
    old = [{k: v for k, v in json.loads(line).items() if k != "file_name"} for line in metadata.read_text().splitlines()]
    old.insert(1, json.loads(dropped.read_text()))  # the old layout: the dropped line among the others
    metadata.write_text("".join(json.dumps(r) + "\n" for r in old))
    dropped.unlink()
    writer = GenerationWriter(tmp_path, ["bg", "a"], [[0, 0, 0], [255, 0, 0]], {"k": 1})
    assert writer.pending(range(4)) == [3]
    writer.write(3, np.zeros((8, 6, 3), np.uint8) + 50, np.zeros((8, 6), np.uint8), None, {"seed": 13})
    assert load_folder(tmp_path).ids == ["000000", "000002", "000003"]
    assert [r.get("file_name") for r in read_metadata(tmp_path)] == [None, None, None, "images/000003.png"]
    assert not dropped.exists()
    GenerationWriter(tmp_path, ["bg", "a"], [[0, 0, 0], [255, 0, 0]], {"k": 2}, overwrite=True)  # still ours
    assert not metadata.exists() and not (tmp_path / "images" / "000003.png").exists()


@pytest.mark.slow
def test_hugging_face_imagefolder_reads_a_generated_set_with_its_metadata(tmp_path):
    datasets = pytest.importorskip("datasets")
    job = tmp_path / "job"
    args = ["--config", str(ROOT / "configs/demo.yaml"), f"output_dir={job}", "tiny_components=true", "num_samples=2",
            "batch_size=2", "num_inference_steps=2", "masks.size=32", "masks.num_train_images=2", "masks_split=train",
            "guidance.strength=0", "guidance.segmenters=[]", "contact_sheet_samples=0", "progress=false"]
    assert generate_main(args) == 0
    write_a_set(tmp_path / "dropped")  # with a dropped sample and an ignore map
    for root in (job, tmp_path / "dropped"):
        loaded = datasets.load_dataset("imagefolder", data_dir=str(root), split="train", cache_dir=str(tmp_path / "cache"))
        records = [r for r in read_metadata(root) if not r.get("dropped")]
        assert list(loaded["id"]) == [r["id"] for r in records]
        for row, record in zip(loaded, records):
            np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(Image.open(root / record["image"])))
            assert row["seed"] == record["seed"] and row["prompt"] == record["prompt"] and row["mask"] == record["mask"]


@pytest.mark.slow
def test_generate_writes_a_loadable_dataset_with_provenance(tmp_path, segmenter_dir):
    assert generate_main(["--config", str(ROOT / "configs/demo.yaml"), *overrides(tmp_path, segmenter_dir)]) == 0
    dataset = load_folder(tmp_path)
    assert dataset.ids == [f"{i:06d}" for i in range(5)] and dataset.classes[0] == "background"
    sample = dataset[4]
    assert sample.image.shape == (3, 32, 32) and sample.mask.shape == (32, 32)
    record = read_metadata(tmp_path)[4]
    assert record["seed"] == sample_seed(0, 4) and record["source_id"] == "train_0_000001"  # masks cycle
    assert record["trace"]["guided_steps"] == 2 and record["quality"]["mask_miou"] >= 0
    assert record["prompt"].endswith("extremely detailed")
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["generator"]["config"]["guidance"]["objective"] == "entropy" and len(info["palette"]) == 11
    assert (tmp_path / "contact_sheet.png").stat().st_size > 5000


@pytest.mark.slow
def test_another_config_is_refused_unless_overwrite(tmp_path, segmenter_dir, capsys):
    args = ["--config", str(ROOT / "configs/demo.yaml")]
    assert generate_main(args + overrides(tmp_path, segmenter_dir, num_samples=1, contact_sheet_samples=0)) == 0
    changed = overrides(tmp_path, segmenter_dir, num_samples=1, contact_sheet_samples=0, seed=9)
    assert generate_main(args + changed) == 2
    assert "another generation config (seed; hash" in capsys.readouterr().err
    assert generate_main(args + changed + ["overwrite=true"]) == 0
    assert read_metadata(tmp_path)[0]["seed"] == sample_seed(9, 0)


@pytest.mark.parametrize("override,message", [
    ("guidance.objective=uncertainty", "guidance.objective"),
    ("guidance.options.kind=kl", "an option of objective 'entropy': []"),
    ("guidance.segmenters=[]", "guidance.segmenters"),
    ("components.scheduler=pndm", "components.scheduler"),
    ("num_samples=0", "num_samples"),
    ("negative_mask=cat", "negative_mask"),
    ("guidance.decode_downsample=0", "guidance.decode_downsample"),
    ("guidance.strength=inf", "guidance.strength"),
    ("guidance.clip=-1", "guidance clip=-1"),
    ("guidance.end=1.5", "0 <= start <= end <= 1"),
])
def test_bad_configs_are_explained(tmp_path, segmenter_dir, capsys, override, message):
    assert generate_main(["--config", str(ROOT / "configs/demo.yaml"), *overrides(tmp_path, segmenter_dir), override]) == 2
    assert message in capsys.readouterr().err


def test_a_guide_of_other_classes_is_refused_before_sampling(tmp_path, capsys):
    from al.models import build_segmenter

    guide = tmp_path / "guide4"
    build_segmenter("unet", "tu-resnet10t", 4, encoder_depth=3, decoder_channels=(16, 8, 8)).save_pretrained(guide)
    out = tmp_path / "out"
    assert generate_main(["--config", str(ROOT / "configs/demo.yaml"), *overrides(out, guide)]) == 2
    err = capsys.readouterr().err
    assert "guidance.segmenters" in err and "11 classes" in err and "predicts 4" in err
    assert not out.exists()  # refused before anything was written


def test_objective_options_are_the_objectives_own_and_enter_the_identity_of_a_set():
    from guidedgen.generate import GenerateConfig, GuidanceConfig

    GuidanceConfig(objective="committee", options={"kind": "vote_entropy"}).validate_options()
    with pytest.raises(ConfigError, match="an option of objective 'committee': \\['kind'\\]"):
        GuidanceConfig(objective="committee", options={"labels": "mask"}).validate_options()
    plain = GenerateConfig(guidance=GuidanceConfig(objective="committee")).defining_config()["guidance"]
    assert "options" not in plain and plain["committee_kind"] == "kl"  # the flat form earlier sets recorded
    voting = GenerateConfig(guidance=GuidanceConfig(objective="committee", options={"kind": "vote_entropy"}))
    assert voting.defining_config()["guidance"]["options"] == {"kind": "vote_entropy"}


def test_a_last_layer_objective_with_a_pixel_ensemble_is_refused_at_config_time(tmp_path, capsys):
    ensemble = tmp_path / "ensemble"  # what DiffusionFeatureSegmenter.save_pretrained marks its folders with
    ensemble.mkdir()
    (ensemble / "segmenter.json").write_text("{}")
    (ensemble / "config.json").write_text("{}")
    args = ["--config", str(ROOT / "configs/demo.yaml"), *overrides(tmp_path / "out", ensemble)]
    assert generate_main(args + ["guidance.objective=expected_model_change"]) == 2
    assert "objective 'expected_model_change' reads the last layer" in capsys.readouterr().err


def test_masks_with_unknown_class_ids_name_the_file(tmp_path, segmenter_dir, capsys):
    masks = tmp_path / "masks_in" / "train"
    (masks / "images").mkdir(parents=True)
    (masks / "masks").mkdir()
    (masks / "dataset.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(11)]}))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(masks / "images" / "m0.png")
    Image.fromarray(np.full((32, 32), 40, np.uint8)).save(masks / "masks" / "m0.png")
    args = overrides(tmp_path / "out", segmenter_dir, **{"masks.kind": "folder", "masks.root": tmp_path / "masks_in"})
    assert generate_main(["--config", str(ROOT / "configs/demo.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert "m0.png" in err and "[40]" in err


def run_script(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_kill_9_then_resume_gives_every_index_exactly_once(tmp_path, segmenter_dir):
    args = ["scripts/generate.py", "--config", "configs/demo.yaml",
            *overrides(tmp_path, segmenter_dir, num_samples=8, batch_size=1, contact_sheet_samples=0)]
    process = run_script(args)
    metadata = tmp_path / "metadata.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metadata.exists() and len(metadata.read_bytes().splitlines()) >= 2:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = len(read_metadata(tmp_path))
    assert 2 <= killed_at < 8
    assert generate_main(["--config", str(ROOT / "configs/demo.yaml"),
                          *overrides(tmp_path, segmenter_dir, num_samples=8, batch_size=1, contact_sheet_samples=0)]) == 0
    stale = tmp_path / "masks" / ".000007.png.tmp-999999"  # what a kill inside a PNG write leaves
    stale.write_bytes(b"half a png")
    assert generate_main(["--config", str(ROOT / "configs/demo.yaml"),
                          *overrides(tmp_path, segmenter_dir, num_samples=8, batch_size=1, contact_sheet_samples=0)]) == 0
    assert not stale.exists()  # the resumed run, the folder's one writer, clears its staging files
    ids = [r["id"] for r in read_metadata(tmp_path)]
    lines = metadata.read_text().splitlines()
    assert sorted(ids) == [f"{i:06d}" for i in range(8)] and len(lines) == 8
    assert len(dataset_arrays(tmp_path)) == 8  # every file readable
    assert not list(tmp_path.rglob(".*tmp*"))


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path, segmenter_dir, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom al.folder_lock import FolderLock\n"
                               "FolderLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(300)", str(tmp_path)],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    args = ["--config", str(ROOT / "configs/demo.yaml"), *overrides(tmp_path, segmenter_dir, num_samples=1)]
    try:
        assert holder.stdout.readline().strip() == "held"
        assert generate_main(args) == 2
        err = capsys.readouterr().err
        assert str(tmp_path) in err and f"pid {holder.pid}" in err
        assert not (tmp_path / "dataset.json").exists()  # refused before anything was read or written
    finally:
        holder.kill()
        holder.wait()
    assert generate_main(args) == 0  # the OS dropped the killed holder's lock


@pytest.mark.slow
def test_overwrite_replaces_only_what_the_generator_wrote(tmp_path, segmenter_dir, capsys):
    def generate(folder, **extra):
        return generate_main(["--config", str(ROOT / "configs/demo.yaml"), *overrides(folder, segmenter_dir, **extra)])

    hand = tmp_path / "hand"  # a dataset made by hand, with a file of the user's
    hand.mkdir()
    (hand / "dataset.json").write_text('{"classes": ["a", "b"]}')
    (hand / "notes.txt").write_text("mine")
    assert generate(hand, overwrite="true") == 2
    assert "did not write" in capsys.readouterr().err
    assert (hand / "notes.txt").read_text() == "mine" and (hand / "dataset.json").read_text() == '{"classes": ["a", "b"]}'
    photos = tmp_path / "photos"  # not a dataset at all
    photos.mkdir()
    (photos / "cat.png").write_bytes(b"not ours")
    assert generate(photos) == 2
    assert "cat.png" in capsys.readouterr().err and (photos / "cat.png").read_bytes() == b"not ours"
    assert sorted(p.name for p in photos.iterdir()) == ["cat.png"]

    ours = tmp_path / "ours"
    assert generate(ours, num_samples=2) == 0
    (ours / "images" / "mine.png").write_bytes(b"a file of the user's")
    assert generate(ours, num_samples=1, seed=9, overwrite="true") == 2
    assert "images/mine.png" in capsys.readouterr().err
    assert [r["seed"] for r in read_metadata(ours)] == [sample_seed(0, 0), sample_seed(0, 1)]  # nothing deleted
    (ours / "images" / "mine.png").unlink()
    assert generate(ours, num_samples=1, seed=9, overwrite="true") == 0
    assert [r["seed"] for r in read_metadata(ours)] == [sample_seed(9, 0)]
    assert sorted(p.name for p in (ours / "images").iterdir()) == ["000000.png"]  # the old 000001 went with its dataset
    assert (ours / "contact_sheet.png").exists()


@pytest.mark.slow
def test_two_processes_write_the_same_dataset_as_one(tmp_path, segmenter_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    # unguided: the shards batch other samples together, and after a guided loop the normalised updates
    # amplify that re-blocking's rounding past any bound from one step's arithmetic (another machine:
    # 1e-2); that one guided step does not depend on the batch is tested in test_guidedgen.py
    common = {"num_samples": 5, "contact_sheet_samples": 0, "guidance.strength": 0.0}
    assert generate_main(["--config", str(ROOT / "configs/demo.yaml"), *overrides(one, segmenter_dir, **common)]) == 0
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    process = subprocess.run([*launcher, "scripts/generate.py", "--config", "configs/demo.yaml",
                              *overrides(two, segmenter_dir, **common)],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-2000:]
    writers = {r["written_by_process"] for r in read_metadata(two)}
    assert writers == {"0/2", "1/2"}
    a, b = dataset_arrays(one), dataset_arrays(two)
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.abs(a[key][0] - b[key][0]).max() <= 1.5 / 255  # same pixels up to PNG rounding of float noise
        assert np.array_equal(a[key][1], b[key][1])


@pytest.mark.slow
def test_a_canny_controlnet_beside_the_seg_one(tmp_path, segmenter_dir):
    args = overrides(tmp_path, segmenter_dir, num_samples=2, contact_sheet_samples=1,
                     extra_controls="[canny]", controlnet_conditioning_scale="[1.0,0.5]")
    assert generate_main(["--config", str(ROOT / "configs/demo.yaml"), *args]) == 0
    assert len(load_folder(tmp_path)) == 2 and (tmp_path / "contact_sheet.png").exists()
    mismatch = overrides(tmp_path / "x", segmenter_dir, extra_controls="[canny]")
    assert generate_main(["--config", str(ROOT / "configs/demo.yaml"), *mismatch]) == 2


def test_canny_control_marks_edges():
    import torch

    from guidedgen.controls import canny_control

    image = torch.zeros(1, 3, 32, 32)
    image[:, :, 8:24, 8:24] = 1.0
    edges = canny_control(image)
    assert edges.shape == (1, 3, 32, 32)
    assert edges[0, 0, 8:24, 7:10].max() == 1.0 and edges[0, 0, 14:18, 14:18].max() == 0.0


@pytest.mark.slow
def test_a_folder_of_masks_alone_is_enough_to_generate(tmp_path, segmenter_dir):
    masks = tmp_path / "in" / "train"
    (masks / "masks").mkdir(parents=True)
    (masks / "dataset.json").write_text(json.dumps({"classes": [f"c{i}" for i in range(11)]}))
    for i in range(2):
        mask = np.zeros((32, 32), np.uint8)
        mask[4:20, 4 + i:20] = 3 + i
        Image.fromarray(mask).save(masks / "masks" / f"m{i}.png")
    args = overrides(tmp_path / "out", segmenter_dir, num_samples=2, contact_sheet_samples=1,
                     **{"masks.kind": "masks", "masks.root": tmp_path / "in"})
    assert generate_main(["--config", str(ROOT / "configs/demo.yaml"), *args]) == 0
    generated = load_folder(tmp_path / "out")
    assert [r["source_id"] for r in read_metadata(tmp_path / "out")] == ["m0", "m1"]
    assert generated[1].mask[10, 10] == 4


@pytest.mark.slow
def test_the_committed_model_generates_from_the_demo_config(tmp_path, segmenter_dir):
    """`make demo`'s committed model loads through from_pretrained (local files) and generates."""
    args = ["--config", str(ROOT / "configs/demo.yaml"), f"output_dir={tmp_path}", f"guidance.segmenters=[{segmenter_dir}]",
            "num_samples=2", "batch_size=2", "num_inference_steps=4", "contact_sheet_samples=0", "progress=false",
            "masks.size=64"]
    assert generate_main(args) == 0
    dataset = load_folder(tmp_path)
    assert len(dataset) == 2
    records = read_metadata(tmp_path)
    assert records[0]["models"]["pretrained_model_name_or_path"] == "models/digitscenes-controlnet"
    for sample in (dataset[0], dataset[1]):
        assert sample.image.shape == (3, 64, 64) and 0.05 < float(sample.image.std()) < 0.5
