"""Round trips with labelling tools people already run: a cycle's queries out, answers back in.

**Label Studio.**
Each task carries one image and its queried pixels as *pre-annotated keypoints* labelled
``query``; the annotator relabels each point with a class (or ``unsure``). The labelling config
lists the classes. On import, a point is matched to its query by the region id the export gave
it (``q<row>_<col>``), or else by its position, and its label goes into ``SparseLabels``.
Importing twice changes nothing.

Label Studio keypoints are in percent of the image size, measured to the point itself; we put a
pixel's point at its centre, ``(col + 0.5) / W * 100``.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Optional, Union
from xml.sax.saxutils import quoteattr

from al.annotate.session import AnnotationSession

QUERY_LABEL = "query"
UNSURE_LABEL = "unsure"
FROM_NAME, TO_NAME = "class", "image"
# Label Studio's local-files storage serves <document root>/<d>; point it at the export folder.
DEFAULT_IMAGE_URL = "/data/local-files/?d=images/{file}"


class ImportAnswersError(ValueError):
    """An annotation that cannot be imported; the message names the task or image and the fix."""


def _apply(session: AnnotationSession, where: str, image_id: str, row: int, col: int, name: str) -> bool:
    """Answer one query with label ``name``; False when it is still the ``query`` placeholder."""
    if name == QUERY_LABEL:
        return False
    if name != UNSURE_LABEL and name not in session.classes:
        raise ImportAnswersError(f"{where}: label {name!r} is not a class of this run "
                                 f"({', '.join(session.classes)}, or {UNSURE_LABEL!r}); fix the labelling config")
    try:
        session.answer(image_id, row, col, None if name == UNSURE_LABEL else session.classes.index(name))
    except ValueError as error:
        raise ImportAnswersError(f"{where}: {error}") from None
    return True


def _export_folder(directory: Union[str, Path], option: str) -> Path:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ImportAnswersError(f"{directory} is a file; {option} takes a folder to write the tasks and images into")
    (directory / "images").mkdir(parents=True, exist_ok=True)
    return directory


def labelling_config(session: AnnotationSession) -> str:
    """The Label Studio labelling config (XML): the image plus one keypoint label per class."""
    labels = [f'    <Label value="{QUERY_LABEL}" background="#ffd400"/>']
    labels += [f"    <Label value={quoteattr(c['name'])} background={quoteattr(c['colour'])}/>" for c in session.classes_info()]
    labels.append(f'    <Label value="{UNSURE_LABEL}" background="#777777"/>')
    return "\n".join([
        "<View>",
        f'  <Image name="{TO_NAME}" value="$image" zoom="true" zoomControl="true"/>',
        f'  <KeyPointLabels name="{FROM_NAME}" toName="{TO_NAME}" smart="false">',
        *labels,
        "  </KeyPointLabels>",
        "</View>",
    ]) + "\n"


def export_labelstudio(session: AnnotationSession, directory: Union[str, Path], image_url: str = DEFAULT_IMAGE_URL,
                 only_pending: bool = True) -> Path:
    """Write ``tasks.json``, ``labelling_config.xml`` and ``images/<id>.png`` for the open tag.
    Returns the tasks file."""
    directory = _export_folder(directory, "--export-labelstudio")
    tag, tasks = session.tag, []
    for item in session.progress()["images"]:
        if only_pending and item["pending"] == 0:
            continue
        info = session.image_info(item["id"])
        file = f"{len(tasks):06d}.png"  # never the id itself: ids may hold characters paths must not
        (directory / "images" / file).write_bytes(session.image_png(item["id"]))
        points = [q for q in info["queries"] if not only_pending or q["class_id"] is None]
        tasks.append({
            "data": {"image": image_url.format(file=file), "image_id": item["id"], "tag": tag},
            "predictions": [{"model_version": f"al-queries-{tag}", "result": [
                {"id": f"q{q['row']}_{q['col']}", "from_name": FROM_NAME, "to_name": TO_NAME, "type": "keypointlabels",
                 "original_width": info["width"], "original_height": info["height"], "image_rotation": 0,
                 "value": {"x": (q["col"] + 0.5) / info["width"] * 100, "y": (q["row"] + 0.5) / info["height"] * 100,
                           "width": 0.5, "keypointlabels": [QUERY_LABEL]}}
                for q in points]}],
        })
    (directory / "labelling_config.xml").write_text(labelling_config(session))
    path = directory / "tasks.json"
    path.write_text(json.dumps(tasks, indent=1))
    return path


def _pixel(result: dict, height: int, width: int, where: str) -> tuple[int, int]:
    region = str(result.get("id", ""))
    if region.startswith("q") and "_" in region:
        try:
            row, col = (int(v) for v in region[1:].split("_"))
            value = result["value"]
            moved = abs((col + 0.5) / width * 100 - value["x"]) > 100 / width or \
                abs((row + 0.5) / height * 100 - value["y"]) > 100 / height
            if not moved:
                return row, col
        except (ValueError, KeyError):
            pass
    value = result["value"]
    x, y = value.get("x"), value.get("y")
    if not all(isinstance(v, (int, float)) and 0 <= v <= 100 for v in (x, y)):
        raise ImportAnswersError(f"{where}: a point at x={x!r}, y={y!r} is not inside the image (Label Studio gives "
                                 f"percentages in [0, 100]); move it onto a queried pixel and export again")
    # x = 100 (the right edge) is the last column, not one past it
    return min(math.floor(y / 100 * height), height - 1), min(math.floor(x / 100 * width), width - 1)


def _read_export(path: Path) -> list:
    try:
        tasks = json.loads(path.read_text())
    except ValueError as error:
        raise ImportAnswersError(f"{path} is not valid JSON ({error}); export it again from Label Studio "
                                 f"(Export -> JSON)") from None
    if not isinstance(tasks, list):
        raise ImportAnswersError(f"{path} holds a JSON {type(tasks).__name__}, but a Label Studio JSON export is a list "
                                 f"of tasks; export with the 'JSON' format (not 'JSON-MIN' of one task)")
    return tasks


def import_labelstudio(session: AnnotationSession, export: Union[str, Path, list]) -> dict:
    """Read a Label Studio JSON export and answer the open tag's queries with it.

    Per task the most recent annotation that was not cancelled counts. Points still labelled
    ``query`` are unanswered and skipped; ``unsure`` becomes void. A point that is not one of
    the tag's queries is refused (the loop asked about other pixels). Returns counts.
    """
    tasks = export if isinstance(export, list) else _read_export(Path(export))
    counts = {"answered": 0, "unanswered": 0, "tasks_without_annotation": 0}
    for number, task in enumerate(tasks, start=1):
        if not isinstance(task, dict):
            raise ImportAnswersError(f"item {number} of the export is {type(task).__name__}, not a task object")
        where = f"task {task.get('id', number)}"
        image_id = task.get("data", {}).get("image_id")
        if image_id not in session.shapes:
            raise ImportAnswersError(f"{where}: data.image_id {image_id!r} is not an image of this run; "
                                         f"import the export of this run's tasks")
        annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        if not annotations:
            counts["tasks_without_annotation"] += 1
            continue
        latest = max(annotations, key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a.get("id", 0)))
        height, width = session.shapes[image_id]
        for result in latest.get("result", []):
            if result.get("type") != "keypointlabels":
                continue
            name = (result["value"].get("keypointlabels") or [QUERY_LABEL])[0]
            answered = _apply(session, where, image_id, *_pixel(result, height, width, where), name)
            counts["answered" if answered else "unanswered"] += 1
    return counts


def export_cvat(session: AnnotationSession, directory: Union[str, Path], only_pending: bool = True) -> Path:
    """Write ``annotations.xml`` (CVAT for images 1.1) and ``images/<n>.png`` for the open tag."""
    directory = _export_folder(directory, "--export-cvat")
    root = ElementTree.Element("annotations")
    ElementTree.SubElement(root, "version").text = "1.1"
    labels = ElementTree.SubElement(ElementTree.SubElement(ElementTree.SubElement(root, "meta"), "task"), "labels")
    for name in [QUERY_LABEL, *session.classes, UNSURE_LABEL]:
        label = ElementTree.SubElement(labels, "label")
        ElementTree.SubElement(label, "name").text = name
        ElementTree.SubElement(label, "type").text = "points"
    count = 0
    for item in session.progress()["images"]:
        if only_pending and item["pending"] == 0:
            continue
        info = session.image_info(item["id"])
        file = f"{count:06d}.png"
        (directory / "images" / file).write_bytes(session.image_png(item["id"]))
        image = ElementTree.SubElement(root, "image", id=str(count), name=file, width=str(info["width"]),
                                       height=str(info["height"]), image_id=item["id"])
        for q in info["queries"]:
            if not only_pending or q["class_id"] is None:
                ElementTree.SubElement(image, "points", label=QUERY_LABEL, source="manual", occluded="0",
                                       points=f"{q['col'] + 0.5:.2f},{q['row'] + 0.5:.2f}", z_order="0")
        count += 1
    path = directory / "annotations.xml"
    ElementTree.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path


def import_cvat(session: AnnotationSession, annotations: Union[str, Path], file_ids: Optional[dict] = None) -> dict:
    """Read a CVAT for images 1.1 XML export and answer the open tag's queries with it. Images
    are matched by the ``image_id`` attribute the export wrote, else by ``file_ids[name]``."""
    try:
        root = ElementTree.parse(annotations).getroot()
    except ElementTree.ParseError as error:
        raise ImportAnswersError(f"{annotations} is not valid XML ({error}); export it again from CVAT "
                                 f"(CVAT for images 1.1)") from None
    counts = {"answered": 0, "unanswered": 0}
    for image in root.iter("image"):
        where = f"image {image.get('name')!r}"
        image_id = image.get("image_id") or (file_ids or {}).get(image.get("name"))
        if image_id not in session.shapes:
            raise ImportAnswersError(f"{where}: it is not an image of this run; import the export of this run's queries")
        height, width = session.shapes[image_id]
        for points in image.iter("points"):
            for pair in points.get("points", "").split(";"):
                try:
                    x, y = (float(v) for v in pair.split(","))
                except ValueError:
                    raise ImportAnswersError(f"{annotations}, {where}: points {pair!r} are not 'x,y' numbers") from None
                if not (0 <= x <= width and 0 <= y <= height):
                    raise ImportAnswersError(f"{annotations}, {where}: point ({x}, {y}) is outside the {width}x{height} "
                                             f"image; move it onto a queried pixel and export again")
                row, col = min(math.floor(y), height - 1), min(math.floor(x), width - 1)
                answered = _apply(session, where, image_id, row, col, points.get("label", QUERY_LABEL))
                counts["answered" if answered else "unanswered"] += 1
    return counts
