"""Writing the toy dataset's images and annotations in PASCAL VOC layout."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from PIL import Image

from .toy import ToyDatasetSpec, toy_image_ids
from .toy_render import render_image
from .voc_xml import voc_annotation

__all__ = ["write_voc_images"]


def _annotation_xml(image_id, width, height, objects) -> bytes:
    root = voc_annotation(objects, ("ohem_toy", f"{image_id}.jpg", width, height))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


def write_voc_images(root: str, spec: ToyDatasetSpec) -> dict:
    """Draw every image of ``spec`` and write it under ``root`` in VOC layout (JPEG image,
    XML annotation, image set files). Returns counts of objects and hard cases."""
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    stats = {"objects": 0, "difficult": 0, "truncated": 0, "cases": {}}
    ids_by_split = toy_image_ids(spec)
    for index, image_id in enumerate(ids_by_split["trainval"] + ids_by_split["test"]):
        image, objects, case = render_image(spec, index)
        height, width = image.shape[:2]
        Image.fromarray(image).save(
            os.path.join(root, "JPEGImages", f"{image_id}.jpg"), quality=spec.jpeg_quality
        )
        with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "wb") as f:
            f.write(_annotation_xml(image_id, width, height, objects))
        stats["objects"] += len(objects)
        stats["difficult"] += sum(o["difficult"] for o in objects)
        stats["truncated"] += sum(o["truncated"] for o in objects)
        stats["cases"][case] = stats["cases"].get(case, 0) + 1
    for split, ids in ids_by_split.items():
        with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("".join(i + "\n" for i in ids))
    return stats
