import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from al.labels import JOURNAL_NAME, JournalCorruptError, SparseLabels

SHAPES = {"a": (4, 5), "b": (3, 3)}


def store(path):
    return SparseLabels(path, SHAPES, num_classes=3, void_index=255)


def test_add_as_target_and_reload(tmp_path):
    labels = store(tmp_path)
    assert labels.add("a", [[0, 0], [3, 4]], [1, 2]) == 2
    assert labels.add("b", [[1, 1]], [255]) == 1  # void: queried, ignored in training
    target = store(tmp_path).as_target("a", ignore_index=99)
    expected = torch.full((4, 5), 99)
    expected[0, 0], expected[3, 4] = 1, 2
    assert torch.equal(target, expected)
    reloaded = store(tmp_path)
    assert reloaded.count() == 3 and reloaded.count(include_void=False) == 2
    assert torch.equal(reloaded.as_target("b"), torch.full((3, 3), 255))
    assert reloaded.labelled_mask("b")[1, 1]


def test_add_is_idempotent_and_refuses_conflicts(tmp_path):
    labels = store(tmp_path)
    labels.add("a", [[1, 1]], [0])
    assert labels.add("a", [[1, 1], [1, 1]], [0, 0]) == 0
    with pytest.raises(ValueError, match="already labelled 0"):
        labels.add("a", [[1, 1]], [2])
    assert store(tmp_path).count() == 1


@pytest.mark.parametrize("coords,classes,match", [
    ([[4, 0]], [0], "outside image"),
    ([[0, 0]], [3], "not a class id"),
    ([[0, 0], [1, 1]], [0], "2 coordinates but 1 classes"),
])
def test_bad_labels_are_explained(tmp_path, coords, classes, match):
    with pytest.raises(ValueError, match=match):
        store(tmp_path).add("a", coords, classes)


def test_unknown_image_is_explained(tmp_path):
    with pytest.raises(KeyError, match="unknown image id 'zzz'"):
        store(tmp_path).add("zzz", [[0, 0]], [0])


def test_torn_last_record_is_dropped_and_cut(tmp_path):
    labels = store(tmp_path)
    labels.add("a", [[0, 0]], [1])
    labels.add("a", [[0, 1]], [2])
    path = tmp_path / JOURNAL_NAME
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # crash in the middle of the second record
    reloaded = store(tmp_path)
    assert reloaded.pixels("a") == {(0, 0): 1}
    reloaded.add("a", [[2, 2]], [0])  # appending after the cut gives a clean journal
    assert store(tmp_path).pixels("a") == {(0, 0): 1, (2, 2): 0}


def test_damage_before_the_last_record_is_an_error(tmp_path):
    labels = store(tmp_path)
    labels.add("a", [[0, 0]], [1])
    labels.add("a", [[0, 1]], [2])
    path = tmp_path / JOURNAL_NAME
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0].replace(b'"a"', b'"b"') + lines[1])
    with pytest.raises(JournalCorruptError, match="line 1 of 2"):
        store(tmp_path)


@pytest.mark.slow
def test_kill_9_loses_no_acknowledged_label(tmp_path):
    """A writer prints each label after add() returns; SIGKILL it mid-stream; reload keeps all
    printed labels and nothing else is half-there."""
    script = textwrap.dedent(f"""
        import sys
        from al.labels import SparseLabels
        labels = SparseLabels({str(tmp_path)!r}, {{"img": (100, 100)}}, num_classes=5)
        for i in range(10000):
            labels.add("img", [[i // 100, i % 100]], [i % 5], tag=i)
            print(i, flush=True)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acknowledged = []
    for line in process.stdout:
        acknowledged.append(int(line))
        if len(acknowledged) == 300:
            os.kill(process.pid, signal.SIGKILL)
            break
    process.wait()
    labels = SparseLabels(tmp_path, {"img": (100, 100)}, num_classes=5)
    pixels = labels.pixels("img")
    for i in acknowledged:
        assert pixels[(i // 100, i % 100)] == i % 5
    # at most the records written after the last print survive, each complete
    assert len(acknowledged) <= len(pixels) <= len(acknowledged) + 50
    assert all(pixels[(i // 100, i % 100)] == i % 5 for i in range(len(pixels)))


def test_classes_by_tag_survive_reload(tmp_path):
    labels = store(tmp_path)
    labels.add("a", [[0, 0], [1, 1]], [1, 2], tag="cycle0")
    labels.add("b", [[0, 0]], [0], tag="cycle0")
    labels.add("b", [[2, 2]], [1], tag="cycle1")
    assert store(tmp_path).classes_by_tag() == {"cycle0": [1, 2, 0], "cycle1": [1]}


def test_queries_pending_and_undo_survive_reload(tmp_path):
    labels = store(tmp_path)
    labels.query("a", [[0, 0], [1, 1], [2, 2]], "cycle0")
    assert labels.has_tag("a", "cycle0") and labels.pending("a", "cycle0") == [(0, 0), (1, 1), (2, 2)]
    labels.add("a", [[1, 1]], [2], tag="cycle0")
    labels.add("a", [[0, 0]], [1], tag="cycle0")
    assert labels.remove("a", [[0, 0], [3, 3]]) == 1  # an unlabelled pixel is skipped
    assert labels.remove("a", [[0, 0]]) == 0  # a repeated undo changes nothing
    again = store(tmp_path)
    assert again.pending("a", "cycle0") == [(0, 0), (2, 2)]
    assert again.pixels("a") == {(1, 1): 2} and again.classes_by_tag() == {"cycle0": [2]}
    assert again.query_tags() == ["cycle0"] and again.query_images("cycle0") == ["a"]
    again.add("a", [[0, 0]], [0], tag="cycle0")  # after undo the pixel may take another class
    assert store(tmp_path).pixels("a") == {(1, 1): 2, (0, 0): 0}


def test_query_outside_the_image_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"pixel \(9, 0\) is outside image 'a'"):
        store(tmp_path).query("a", [[9, 0]], "initial")


def test_ambiguous_or_inexact_input_is_refused_not_guessed(tmp_path):
    labels = store(tmp_path)
    with pytest.raises(ValueError, match=r"pixel \(0, 0\) of 'a' is given two classes in one call: 1 and 2"):
        labels.add("a", [[0, 0], [0, 0]], [1, 2])
    assert labels.add("a", [[0, 0], [0, 0]], [1, 1]) == 1  # the same label twice is one label
    with pytest.raises(ValueError, match="pixel coordinates must be integers"):
        labels.add("a", [[1.5, 2.0]], [1])
    assert labels.add("a", torch.tensor([[1.0, 2.0]]), [1]) == 1  # integral floats are exact
    with pytest.raises(ValueError, match="classes must be integers"):
        labels.add("a", [[2, 2]], [True])
    with pytest.raises(ValueError, match="classes must be integers"):
        labels.add("a", [[2, 2]], [0.5])
    assert store(tmp_path).count() == 2


@pytest.mark.parametrize("record,problem", [
    ({"image": "zz", "pixels": [[0, 0, 1]]}, "names image 'zz', which is not in this dataset"),
    ({"image": "b", "pixels": [[3, 0, 1]]}, "holds pixel (3, 0), outside image 'b' of size 3x3"),
    ({"image": "b", "query": [[0, 7]], "tag": "cycle0"}, "holds pixel (0, 7)"),
    ({"image": "b", "pixels": [[0, 0, 7]]}, "labels a pixel of 'b' with 7, not a class id"),
])
def test_replay_refuses_valid_records_that_do_not_fit_the_dataset(tmp_path, record, problem):
    from al.labels import _encode

    store(tmp_path).add("a", [[0, 0]], [1])
    with open(tmp_path / JOURNAL_NAME, "ab") as handle:
        handle.write(_encode(record))
    # a valid checksum: not a torn write, even as the last line, so it is refused rather than cut off
    with pytest.raises(JournalCorruptError, match=r"line 2 of 2 has a valid checksum but " + re.escape(problem)):
        store(tmp_path)
    assert len((tmp_path / JOURNAL_NAME).read_bytes().splitlines()) == 2  # nothing was truncated
