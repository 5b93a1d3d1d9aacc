"""What is in each image, as the teacher and the verifier see it: objects with normalized boxes.

From COCO instances annotations when the image has some (matched by file name, so a URL ending in
`000000000139.jpg` finds COCO's `file_name` of that name), otherwise from CLIP zero-shot tagging of
the stored image embedding against "a photo of a {category}" over a vocabulary (the 80 COCO
categories by default). Tags carry no box and no count, so no question about place or number is
asked of them.
"""
from __future__ import annotations

import json
import threading
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from generators.vocabulary import COCO_CATEGORIES
from schemas.config import ClipConfig, ObjectsConfig
from schemas.errors import UserError
from schemas.records import ImageRecord, ObjectAnnotation, StageResult


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


class ClipObjectTagger:
    """Zero-shot tags from an image embedding: categories whose prompt cosine passes a threshold."""

    def __init__(self, clip: ClipConfig, vocabulary: list[str], threshold: float, max_tags: int):
        from filters.clip_scorer import ClipScorer

        self.vocabulary, self.threshold, self.max_tags = vocabulary, threshold, max_tags
        scorer = ClipScorer(clip)
        self.text = scorer.embed_texts([f"a photo of a {name}." for name in vocabulary])  # [V, D], normalized

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        return embeddings @ self.text.T  # [N, V] cosine

    def tag(self, embedding: list[float]) -> list[ObjectAnnotation]:
        sims = self.scores(np.asarray(embedding, dtype=np.float32)[None])[0]
        best = [i for i in np.argsort(-sims)[: self.max_tags] if sims[i] >= self.threshold]
        return [ObjectAnnotation(category=self.vocabulary[i], box=None, score=float(np.clip(sims[i], 0, 1)),
                                 source="clip_zero_shot") for i in best]


class ObjectFinder:
    """The `objects` stage: every live record gets its objects (annotations first, tags otherwise)."""

    name = "objects"

    def __init__(self, objects: ObjectsConfig, clip: ClipConfig):
        self.config, self.clip = objects, clip
        self.annotations = load_coco_instances(objects.annotations)
        self.vocabulary = list(objects.vocabulary or COCO_CATEGORIES)
        self._tagger: ClipObjectTagger | None = None  # loaded only if an image lacks annotations
        self._tagger_lock = threading.Lock()  # threads sharing this stage load the CLIP once

    def tagger(self) -> ClipObjectTagger:
        with self._tagger_lock:
            if self._tagger is None:
                self._tagger = ClipObjectTagger(self.clip, self.vocabulary, self.config.tag_threshold, self.config.max_tags)
            return self._tagger

    def find(self, record: ImageRecord) -> list[ObjectAnnotation] | None:
        name = url_file_name(record.url)
        if name in self.annotations:
            return self.annotations[name]
        if record.embedding is None:
            return None
        return self.tagger().tag(record.embedding)

    def __call__(self, records: list[ImageRecord]) -> StageResult:
        result = StageResult()
        for record in records:
            found = self.find(record)
            if found is None:
                result.dropped.append(record.dropped(self.name, "no_objects:no annotation and no embedding to tag"))
            else:
                result.kept.append(record.model_copy(update={"objects": json.dumps([o.model_dump() for o in found])}))
        return result
