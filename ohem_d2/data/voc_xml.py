"""PASCAL VOC annotation XML: the toy dataset's files and the evaluator's cleaned ground
truth are written here."""

from __future__ import annotations

import xml.etree.ElementTree as ET

__all__ = ["voc_annotation"]


def voc_annotation(objects, image: tuple | None = None) -> ET.Element:
    """The ``<annotation>`` element of one image.

    Args:
        objects: dicts with "name", "bbox" (XYXY_ABS, pixels [x1, x2) x [y1, y2), as
            Detectron2's VOC loader makes them) and, optionally, "truncated" and "difficult"
            (0 when absent).
        image: (folder, filename, width, height): the ``<folder>``, ``<filename>``,
            ``<size>`` (depth 3) and ``<segmented>`` elements before the objects; none if None.
    """
    root = ET.Element("annotation")
    if image is not None:
        folder, filename, width, height = image
        ET.SubElement(root, "folder").text = folder
        ET.SubElement(root, "filename").text = filename
        size = ET.SubElement(root, "size")
        for key, value in (("width", width), ("height", height), ("depth", 3)):
            ET.SubElement(size, key).text = str(value)
        ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj["name"]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(obj.get("truncated", 0))
        ET.SubElement(node, "difficult").text = str(obj.get("difficult", 0))
        box = ET.SubElement(node, "bndbox")
        x1, y1, x2, y2 = obj["bbox"]
        # VOC coordinates are 1-based inclusive pixel indices: pixels [x1, x2) -> x1+1..x2
        # (the inverse of Detectron2's VOC loader).
        for key, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(box, key).text = str(int(round(value)))
    return root
