"""Round trips: export a cycle's queries to Label Studio / CVAT, import completed exports."""

import json
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict
from pathlib import Path

import pytest

from al.annotate.exchange import (
    ImportAnswersError,
    export_cvat,
    export_labelstudio,
    import_cvat,
    import_labelstudio,
)
from al.annotate.session import AnnotationSession
from al.data.config import DATA_CONFIG_NAME, DataConfig
from al.labels import SparseLabels

FIXTURE = Path(__file__).parent / "fixtures" / "labelstudio_export.json"
QUERIES = {"train_0_000000": [(1, 5), (20, 30)], "train_0_000001": [(0, 0), (31, 31)], "train_0_000002": [(10, 10)]}


@pytest.fixture
def hand_made_run(tmp_path):
    """A run folder whose initial queries are the fixture's pixels."""
    data = DataConfig(num_train_images=3, num_val_images=1, size=32)
    (tmp_path / DATA_CONFIG_NAME).write_text(json.dumps(asdict(data)))
    pool = data.build("train")
    labels = SparseLabels(tmp_path / "labels", pool.image_shapes(), pool.num_classes, pool.ignore_index)
    for image_id, pixels in QUERIES.items():
        labels.query(image_id, pixels, "initial")
    return tmp_path


def completed(tasks, answer):
    """What Label Studio exports after an annotator relabelled every pre-annotated point."""
    done = []
    for number, task in enumerate(tasks, start=1):
        results = []
        for result in task["predictions"][0]["result"]:
            row, col = (int(v) for v in result["id"][1:].split("_"))
            value = dict(result["value"], keypointlabels=[answer(task["data"]["image_id"], row, col)])
            results.append(dict(result, value=value, origin="prediction-changed"))
        done.append({"id": number, "data": task["data"], "annotations": [
            {"id": number, "was_cancelled": False, "result": results, "updated_at": "2026-11-22T03:00:00Z"}]})
    return done


def test_fixture_export_imports_the_latest_uncancelled_answers(hand_made_run):
    session = AnnotationSession(hand_made_run)
    counts = import_labelstudio(session, FIXTURE)
    assert counts == {"answered": 3, "unanswered": 1, "tasks_without_annotation": 1}
    void = session.void_index
    on_disk = AnnotationSession(hand_made_run).labels
    assert on_disk.pixels("train_0_000000") == {(1, 5): 4, (20, 30): void}  # "three"; unsure found by position
    assert on_disk.pixels("train_0_000001") == {(0, 0): 3}  # the newer "two", not "one" nor the cancelled "nine"
    assert on_disk.pixels("train_0_000002") == {}
    assert import_labelstudio(AnnotationSession(hand_made_run), FIXTURE)["answered"] == 3  # again: no change
    assert AnnotationSession(hand_made_run).labels.count() == 3


@pytest.mark.parametrize("edit,message", [
    (lambda t: t[0]["annotations"][0]["result"][0]["value"].update(keypointlabels=["ten"]), "label 'ten' is not a class"),
    (lambda t: t[0]["data"].update(image_id="../secret"), "not an image of this run"),
    (lambda t: t[0]["annotations"][0]["result"][0].update(id="moved", value={"x": 50.0, "y": 50.0,
                                                                             "keypointlabels": ["one"]}), "not a query"),
])
def test_bad_exports_name_the_task(hand_made_run, edit, message):
    tasks = json.loads(FIXTURE.read_text())
    edit(tasks)
    with pytest.raises(ImportAnswersError, match=f"task 101: .*{message}"):
        import_labelstudio(AnnotationSession(hand_made_run), tasks)


@pytest.mark.parametrize("x,y", [(-3.0, 50.0), (50.0, 101.0), ("50", 50.0)])
def test_points_outside_the_image_are_refused_not_clamped(hand_made_run, x, y):
    tasks = json.loads(FIXTURE.read_text())
    tasks[0]["annotations"][0]["result"][0].update(id="moved", value={"x": x, "y": y, "keypointlabels": ["one"]})
    with pytest.raises(ImportAnswersError, match=r"task 101: a point at x=.* is not inside the image"):
        import_labelstudio(AnnotationSession(hand_made_run), tasks)


def test_damaged_or_misshapen_files_are_named(hand_made_run, waiting_run, tmp_path, capsys):
    from scripts.annotate import main as annotate_main

    (tmp_path / "cut.json").write_text(FIXTURE.read_text()[:200])
    (tmp_path / "object.json").write_text('{"id": 1, "annotations": []}')
    (tmp_path / "cut.xml").write_text("<annotations><image name='a'>")
    tree = ElementTree.parse(export_cvat(AnnotationSession(waiting_run), tmp_path / "cvat"))
    first = next(tree.getroot().iter("points"))
    first.set("points", "1.5,left")
    tree.write(tmp_path / "words.xml")
    session = AnnotationSession(hand_made_run)
    with pytest.raises(ImportAnswersError, match=f"{tmp_path / 'cut.json'} is not valid JSON"):
        import_labelstudio(session, tmp_path / "cut.json")
    with pytest.raises(ImportAnswersError, match="holds a JSON dict, but a Label Studio JSON export is a list"):
        import_labelstudio(session, tmp_path / "object.json")
    with pytest.raises(ImportAnswersError, match=f"{tmp_path / 'cut.xml'} is not valid XML"):
        import_cvat(session, tmp_path / "cut.xml")
    with pytest.raises(ImportAnswersError, match=r"words.xml, image '000000.png': points '1.5,left' are not"):
        import_cvat(AnnotationSession(waiting_run), tmp_path / "words.xml")
    assert annotate_main(["--state", str(waiting_run), "--export-labelstudio", str(tmp_path / "cut.json")]) == 2
    assert "cut.json is a file; --export-labelstudio takes a folder" in capsys.readouterr().err


def test_round_trip_answers_every_query_with_the_annotators_classes(waiting_run, tmp_path):
    session = AnnotationSession(waiting_run)
    tasks_path = export_labelstudio(session, tmp_path / "ls")
    tasks = json.loads(tasks_path.read_text())
    assert len(tasks) == 4 and all(len(t["predictions"][0]["result"]) == 2 for t in tasks)
    assert all((tmp_path / "ls" / "images" / t["data"]["image"].rsplit("/", 1)[1]).is_file() for t in tasks)
    config = ElementTree.fromstring((tmp_path / "ls" / "labelling_config.xml").read_text())
    names = [label.get("value") for label in config.iter("Label")]
    assert names == ["query", *session.classes, "unsure"]
    pool = session.dataset
    truth = lambda image_id, row, col: session.classes[int(pool[pool.index_of(image_id)].mask[row, col])]
    counts = import_labelstudio(session, completed(tasks, truth))
    assert counts["answered"] == 8 and session.progress()["answered"] == 8
    for image_id in pool.ids:
        mask = pool[pool.index_of(image_id)].mask
        assert all(mask[r, c] == cls for (r, c), cls in session.labels.pixels(image_id).items())


def test_cvat_round_trip_answers_every_query(waiting_run, tmp_path):
    session = AnnotationSession(waiting_run)
    path = export_cvat(session, tmp_path / "cvat")
    tree = ElementTree.parse(path)
    assert [n.text for n in tree.getroot().iter("name")] == ["query", *session.classes, "unsure"]
    pool = session.dataset
    for image in tree.getroot().iter("image"):  # the annotator relabels every point with the truth
        mask = pool[pool.index_of(image.get("image_id"))].mask
        assert (tmp_path / "cvat" / "images" / image.get("name")).is_file()
        for points in image.iter("points"):
            x, y = (float(v) for v in points.get("points").split(","))
            points.set("label", session.classes[int(mask[int(y), int(x)])])
    first = next(tree.getroot().iter("points"))
    first.set("label", "query")  # one left unanswered
    tree.write(tmp_path / "done.xml")
    assert import_cvat(session, tmp_path / "done.xml") == {"answered": 7, "unanswered": 1}
    assert session.progress()["answered"] == 7
    for image_id in pool.ids:
        mask = pool[pool.index_of(image_id)].mask
        assert all(mask[r, c] == cls for (r, c), cls in session.labels.pixels(image_id).items())
    first.set("label", "eleven")
    tree.write(tmp_path / "bad.xml")
    with pytest.raises(ImportAnswersError, match="label 'eleven' is not a class"):
        import_cvat(AnnotationSession(waiting_run), tmp_path / "bad.xml")


def test_annotate_cli_exports_imports_and_explains_a_bad_state(waiting_run, tmp_path, capsys):
    from scripts.annotate import main as annotate_main

    assert annotate_main(["--state", str(waiting_run), "--export-labelstudio", str(tmp_path / "ls")]) == 0
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    (tmp_path / "done.json").write_text(json.dumps(completed(tasks, lambda *_: "unsure")))
    assert annotate_main(["--state", str(waiting_run), "--import-labelstudio", str(tmp_path / "done.json")]) == 0
    assert "progress: 8/8" in capsys.readouterr().out
    assert annotate_main(["--state", str(tmp_path / "nowhere")]) == 2
    assert "data.json is missing" in capsys.readouterr().err
