"""What is in each image, as the teacher and the verifier see it: objects with normalized boxes.

From COCO instances annotations when the image has some (matched by file name, so a URL ending in
`000000000139.jpg` finds COCO's `file_name` of that name), otherwise from CLIP zero-shot tagging of
the stored image embedding against "a photo of a {category}" over a vocabulary (the 80 COCO
categories by default). Tags carry no box and no count, so no question about place or number is
asked of them.
"""
from __future__ import annotations

import threading

from filters.object_tagger import ClipObjectTagger
from schemas.coco import load_coco_instances, url_file_name
from schemas.config import ClipConfig, ObjectsConfig
from schemas.records import ImageRecord, ObjectAnnotation, StageResult
from schemas.vocabulary import COCO_CATEGORIES


class ObjectFinder:
    """The `objects` stage: every live record gets its objects (annotations first, tags otherwise)."""

    name = "objects"
    columns = ("embedding", "objects")

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
                result.kept.append(record.model_copy(update={"objects": found}))
        return result
