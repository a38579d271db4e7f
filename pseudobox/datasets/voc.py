"""PASCAL VOC source data: a VOCdevkit tree read into corpus samples.

Layout, per year directory (``VOC2007``, ``VOC2012``, or any VOC-format dataset)::

    <source>/<year>/JPEGImages/<id>.jpg
    <source>/<year>/Annotations/<id>.xml
    <source>/<year>/ImageSets/Main/<split>.txt     one image id per line

Annotations are parsed with the standard library. VOC boxes are 1-based pixel indices
(``xmin = 1`` is the first column); corpus boxes are continuous xyxy pixels, so
``x1 = xmin - 1``, ``y1 = ymin - 1`` and ``x2 = xmax``, ``y2 = ymax`` (a box covering
pixel columns 1..10 spans [0, 10)). Each object's ``difficult`` flag is kept: evaluation
ignores difficult objects (neither TP nor FP) and training leaves them out, as the devkit
does. An object whose class is not in the class list is an error naming the file and
the class: a silently dropped object would count as background in training and as a
false positive in evaluation.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from pseudobox.config import ConfigError

# The devkit's class order (VOCdevkit/VOCcode/VOCinit.m), which class indices follow.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def image_set_path(source: str, year: str, split: str) -> str:
    return os.path.join(source, year, "ImageSets", "Main", f"{split}.txt")


def annotation_path(source: str, year: str, image_id: str) -> str:
    return os.path.join(source, year, "Annotations", f"{image_id}.xml")


def image_relpath(year: str, image_id: str) -> str:
    """The image's path relative to the devkit root."""
    return f"{year}/JPEGImages/{image_id}.jpg"


def read_image_set(path: str) -> list[str]:
    """Image ids of an ``ImageSets/Main/<split>.txt``, in file order (the first column, so
    the per-class ``<class>_<split>.txt`` files read too)."""
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


def _number(obj: ET.Element, tag: str, where: str) -> float:
    text = obj.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: <{tag}> is {text!r}, not a number") from None


def parse_annotation(xml_path: str, class_index: dict[str, int]) -> dict:
    """One annotation XML → corpus meta ``{labels, boxes, box_labels, difficult}``.

    ``labels`` (image level) are the classes of the non-difficult objects; ``boxes`` are
    continuous xyxy pixels (see the module doc).
    """
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as e:
        raise ConfigError(f"{xml_path}: cannot read the annotation: {e}") from e
    boxes, box_labels, difficult = [], [], []
    for i, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in class_index:
            raise ConfigError(f"{xml_path}: object {i} has class {name!r}, which is not in the class list "
                              f"({len(class_index)} classes); for a custom VOC-format dataset pass classes=a,b,c")
        box = obj.find("bndbox")
        if box is None:
            raise ConfigError(f"{xml_path}: object {i} ({name}) has no <bndbox>")
        where = f"{xml_path}: object {i} ({name})"
        xmin, ymin, xmax, ymax = (_number(box, tag, where) for tag in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
        box_labels.append(class_index[name])
        difficult.append(int((obj.findtext("difficult") or "0").strip() == "1"))
    labels = sorted({c for c, hard in zip(box_labels, difficult) if not hard})
    return {"labels": labels, "boxes": boxes, "box_labels": box_labels, "difficult": difficult}
