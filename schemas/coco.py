"""COCO instances files read as our records: each image's objects with boxes normalized to 0..1, keyed by the
image's file name (which is also how a crawled URL names its image)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlparse

from schemas.errors import UserError
from schemas.records import ObjectAnnotation


def load_coco_instances(paths: list[str]) -> dict[str, list[ObjectAnnotation]]:
    """file_name -> its objects (normalized boxes) over all given COCO instances files."""
    by_name: dict[str, list[ObjectAnnotation]] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"objects.annotations file {path} does not exist; give COCO instances JSON files.")
        try:
            data = json.loads(path.read_text())
            names = {c["id"]: c["name"] for c in data["categories"]}
            images = {im["id"]: im for im in data["images"]}
            found: dict[int, list[ObjectAnnotation]] = defaultdict(list)
            for ann in data["annotations"]:
                im = images[ann["image_id"]]
                x, y, w, h = ann["bbox"]
                box = (max(0.0, x / im["width"]), max(0.0, y / im["height"]),
                       min(1.0, (x + w) / im["width"]), min(1.0, (y + h) / im["height"]))
                found[ann["image_id"]].append(ObjectAnnotation(category=names[ann["category_id"]], box=box))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path} is not COCO instances JSON ({type(err).__name__}: {err}); "
                            f"it needs images, annotations and categories.") from None
        for image_id, im in images.items():
            by_name[Path(im["file_name"]).name] = sorted(found.get(image_id, []), key=lambda o: (o.category, o.box))
    return by_name


def url_file_name(url: str) -> str:
    return Path(urlparse(url).path).name
